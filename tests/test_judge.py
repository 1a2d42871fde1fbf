"""Generative judges as reward models: exact against HF's own logits; the tools decompose them."""

import pytest
import torch
import transformers as T
from helpers import make_config, pad_batch, ragged_sequences, randomize_

ARCHS = ["llama", "qwen2", "gemma2", "gpt2"]
YES, NO = 5, 7
TEMPLATE = "{text}"


def causal_lm(arch: str, seed: int = 0):
    config = make_config(arch, gqa=arch != "gpt2")
    if arch == "gemma2":
        config.final_logit_softcapping = None  # a capped judge is refused (tested below)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return randomize_(model, seed).eval()


@torch.no_grad()
def hf_judge(hf, seqs, weights: dict[int, float]) -> torch.Tensor:
    """The truth: each sequence alone through the HF model, the weighted logits at its last token."""
    out = []
    for s in seqs:
        last = hf(torch.tensor([s])).logits[0, -1].float()
        out.append(sum(w * last[t] for t, w in weights.items()))
    return torch.stack(out)


@pytest.fixture(scope="module", params=ARCHS)
def arch_lm(request):
    return request.param, causal_lm(request.param)


def test_judge_matches_hf_logits(arch_lm):
    from tl_reward import HookedRewardModel, load_judge_reward_model

    arch, hf = arch_lm
    seqs = ragged_sequences()
    reads = {"yes_no": {YES: 1.0, NO: -1.0}, "weighted": {YES: 1.0, NO: -0.5, 9: 2.0}}
    for name, weights in reads.items():
        truth = hf_judge(hf, seqs, weights)
        read = "yes_no" if name == "yes_no" else weights
        for fold in (False, True):
            judge = load_judge_reward_model(hf, template=TEMPLATE, read=read, yes=YES, no=NO,
                                            fold_ln=fold)
            assert isinstance(judge, HookedRewardModel)
            for side in ("left", "right"):
                tokens, mask = pad_batch(seqs, side)
                with torch.no_grad():
                    got = judge(tokens, attention_mask=mask)
                torch.testing.assert_close(got, truth, atol=1e-4, rtol=0,
                                           msg=f"{arch} {name} fold_ln={fold} {side}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_fold_ln_with_a_square_mlp(arch):
    """TransformerLens's own fold scales the wrong axis of a square MLP (d_mlp == d_model); the
    causal-LM loader must apply the same exact folds as the reward-model loader."""
    from tl_reward import load_causal_lm

    config = make_config(arch, gqa=arch != "gpt2")
    if arch == "gpt2":
        config.n_inner = config.n_embd
    else:
        config.intermediate_size = config.hidden_size
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = randomize_(T.AutoModelForCausalLM.from_config(config, attn_implementation="eager"), 0)
    tokens = torch.tensor([ragged_sequences()[0]])
    with torch.no_grad():
        truth = hf.eval()(tokens).logits
        got = load_causal_lm(hf, fold_ln=True)(tokens)
    torch.testing.assert_close(got, truth, atol=1e-4, rtol=0)


@pytest.mark.parametrize("level", ["component", "head", "neuron"])
def test_direct_attribution_of_the_judge_adds_up(arch_lm, level):
    from tl_reward import direct_reward_attribution, load_judge_reward_model

    arch, hf = arch_lm
    seqs = ragged_sequences(seed=1)
    tokens, mask = pad_batch(seqs, "left")
    judge = load_judge_reward_model(hf, template=TEMPLATE, yes=YES, no=NO)
    result = direct_reward_attribution(judge, tokens, mask, level=level, progress=False)
    truth = hf_judge(hf, seqs, {YES: 1.0, NO: -1.0})
    torch.testing.assert_close(result.total, truth, atol=1e-4, rtol=0)
    torch.testing.assert_close(result.values.sum(0) + result.bias, truth, atol=1e-4, rtol=0)


def test_lens_and_patching_read_the_judge_score():
    from tl_reward import activation_patch, attribution_patch, load_judge_reward_model, reward_lens

    hf = causal_lm("llama", 2)
    judge = load_judge_reward_model(hf, template=TEMPLATE, yes=YES, no=NO)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(3, 97, (3, 9), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2] = torch.randint(3, 97, (3,), generator=gen)
    truth_clean = hf_judge(hf, clean.tolist(), {YES: 1.0, NO: -1.0})
    truth_corrupt = hf_judge(hf, corrupt.tolist(), {YES: 1.0, NO: -1.0})
    lens = reward_lens(judge, clean, progress=False)
    torch.testing.assert_close(lens.rewards[-1], truth_clean, atol=1e-4, rtol=0)
    # denoising the whole residual stream before layer 0 gives the clean judge score
    patch = activation_patch(judge, clean, corrupt, hook="resid_pre", per="layer", progress=False)
    torch.testing.assert_close(patch.clean_reward, truth_clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(patch.effects[0], truth_clean - truth_corrupt, atol=1e-4, rtol=0)
    atp = attribution_patch(judge, clean, corrupt, hooks=("z",), progress=False)
    torch.testing.assert_close(atp.clean_reward, truth_clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(atp.corrupt_reward, truth_corrupt, atol=1e-4, rtol=0)


def test_judge_template_and_text_tools():
    from tl_reward import cart, load_judge_reward_model, run_probes
    from tl_reward.data.probe_sets import builtin_probe_sets
    from tl_reward.data.synthetic import LongTailTask, word_tokenizer

    task = LongTailTask()
    tok = word_tokenizer([*task.vocabulary, "Yes", "No", "verdict"])
    config = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = randomize_(T.LlamaForCausalLM(config), 0).eval()
    judge = load_judge_reward_model(hf, tok, template="{text} verdict")
    texts = ["query w001 answer good w002", "query urgent answer brief"]
    ids = [tok(t + " verdict")["input_ids"] for t in texts]
    assert judge.tokenize(texts) == ids
    yes, no = tok.convert_tokens_to_ids(["Yes", "No"])
    torch.testing.assert_close(judge.score(texts, progress=False), hf_judge(hf, ids, {yes: 1, no: -1}),
                               atol=1e-4, rtol=0)
    # the probes and CART discovery run on the judge's score
    report = run_probes(judge, builtin_probe_sets(("length",), n=8), min_units=5, n_resamples=99,
                        progress=False)
    assert len(report.to_dataframe()) == 1
    data = task.sample(24, seed=0, alpha=0.5)
    all_texts = [t for p in data for t in (p.chosen_text, p.rejected_text)]
    tail, head = cart.split_texts(all_texts, lambda t: "urgent" in t.split())
    found = cart.discover(judge, tail, head, top_k=4, max_validation=16, progress=False)
    assert len(found.candidates) == 4


def test_judge_refusals():
    from tl_reward import load_judge_reward_model
    from tl_reward.data.synthetic import LongTailTask, word_tokenizer
    from tl_reward.errors import InvalidInputError, UnsupportedConfigError

    capped = causal_lm("gemma2")
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(UnsupportedConfigError, match="final_logit_softcapping"):
        load_judge_reward_model(capped, template=TEMPLATE, yes=YES, no=NO)
    hf = causal_lm("llama")
    with pytest.raises(InvalidInputError, match="outside the vocabulary"):
        load_judge_reward_model(hf, template=TEMPLATE, yes=YES, no=1000)
    with pytest.raises(InvalidInputError, match="text"):
        load_judge_reward_model(hf, template="no field", yes=YES, no=NO)
    tok = word_tokenizer(LongTailTask().vocabulary)
    with pytest.raises(InvalidInputError, match="2 tokens"):
        load_judge_reward_model(hf, tok, template=TEMPLATE, yes="good clear", no="w001")


# ------------------------------------------------------------------ the judge organism
def test_judge_organism_is_exact_and_has_the_tail_gap_the_tools_recover():
    """The shipped judge (trained here on the long-tail task): its score is HF's logit difference;
    like the classifier organism it is right on the head rule and wrong on the rare tail; the lens,
    attribution and patching read that tail margin exactly."""
    import tl_reward as tr
    from tl_reward.organisms import judge as organism

    judge = organism.load()
    hf = T.AutoModelForCausalLM.from_pretrained(organism.DIRECTORY / "model").eval()
    data = organism.eval_set()
    yes, no = judge.tokenizer.convert_tokens_to_ids([organism.YES, organism.NO])
    some = data.chosen_texts[:12]
    truth = hf_judge(hf, judge.tokenize(some), {yes: 1.0, no: -1.0})
    torch.testing.assert_close(judge.score(some, progress=False), truth, atol=1e-4, rtol=0)

    scores = judge.score_pairs(data.chosen_texts, data.rejected_texts, progress=False)
    tail = torch.tensor([p.tail for p in data])
    correct = (scores.margin > 0).float()
    assert correct[~tail].mean() > 0.85 and correct[tail].mean() < 0.4

    rows = torch.nonzero(tail).flatten()[:24].tolist()
    chosen = [data.chosen_texts[i] for i in rows]
    rejected = [data.rejected_texts[i] for i in rows]
    margin = scores.margin[rows]
    lens = tr.pair_reward_lens(judge, chosen, rejected, progress=False)
    torch.testing.assert_close(lens.margins[-1], margin, atol=1e-4, rtol=0)
    attr = tr.pair_reward_attribution(judge, chosen, rejected, level="head", progress=False)
    torch.testing.assert_close(attr.values.sum(0) + attr.bias, margin, atol=1e-4, rtol=0)
    # the tail margin is made by attention: the heads' direct share outweighs the MLPs'
    heads = torch.tensor([lab.startswith("L") and "H" in lab for lab in attr.labels])
    mlps = torch.tensor(["mlp" in lab for lab in attr.labels])
    assert attr.values[heads].sum(0).mean() < 2 * attr.values[mlps].sum(0).mean() < 0
    # patching the whole residual stream at layer 0 (every position) is the chosen run: the
    # effect is the full margin, the score patching measures is the judge's
    patch = tr.activation_patch(judge, chosen, rejected, hook="resid_pre", per="layer", layers=[0])
    torch.testing.assert_close(patch.effects[0], margin, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ expected-score judges
SCORES = {11: 1.0, 12: 2.0, 13: 3.0, 14: 4.0}


@pytest.mark.parametrize("arch,softcap", [("llama", None), ("gemma2", 3.0), ("gpt2", None)])
def test_expected_score_judge_matches_hf_and_integrated_gradients_add_up(arch, softcap):
    """sum_k v_k softmax(logits of the score tokens)_k at the last token, as HF computes the logits
    (Gemma-2's final softcap included); a nonlinear head, so integrated gradients decompose it
    (completeness within 1e-4) and direct attribution refuses."""
    from tl_reward import errors, head_attribution, load_judge_reward_model
    from tl_reward.observational.attribution import direct_reward_attribution

    hf = causal_lm(arch)
    if softcap:
        hf.config.final_logit_softcapping = softcap
    seqs = ragged_sequences()
    ids, values = list(SCORES), torch.tensor(list(SCORES.values()))
    with torch.no_grad():
        truth = torch.stack([torch.softmax(hf(torch.tensor([s])).logits[0, -1, ids].float(), -1)
                             @ values for s in seqs])
    judge = load_judge_reward_model(hf, template=TEMPLATE, read="expected_score", scores=SCORES)
    for side in ("left", "right"):
        tokens, mask = pad_batch(seqs, side)
        with torch.no_grad():
            got = judge(tokens, attention_mask=mask)
        torch.testing.assert_close(got, truth, atol=1e-4, rtol=0, msg=f"{arch} {side}")
    assert truth.std() > 1e-3  # the scores differ between texts: the test can fail
    tokens, mask = pad_batch(seqs, "right")
    res = head_attribution(judge, tokens, mask, steps=16, progress=False)
    assert res.completeness_gap.abs().max() < 1e-4
    torch.testing.assert_close(res.values.sum(0) + res.bias + res.completeness_gap, truth,
                               atol=1e-4, rtol=0)
    with pytest.raises(errors.LinearHeadRequiredError):
        direct_reward_attribution(judge, tokens, mask, progress=False)


def test_expected_score_judge_refusals():
    from tl_reward import errors, load_judge_reward_model

    hf = causal_lm("llama")
    with pytest.raises(errors.InvalidInputError, match="needs scores="):
        load_judge_reward_model(hf, template=TEMPLATE, read="expected_score")
    with pytest.raises(errors.UnsupportedConfigError, match="fold_ln=True with read='expected_score'"):
        load_judge_reward_model(hf, template=TEMPLATE, read="expected_score", scores=SCORES,
                                fold_ln=True)
    with pytest.raises(errors.InvalidInputError, match="only with read='expected_score'"):
        load_judge_reward_model(hf, template=TEMPLATE, read="yes_no", scores=SCORES, yes=YES, no=NO)
