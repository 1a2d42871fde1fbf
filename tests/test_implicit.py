"""The DPO implicit reward against HF's own log-probabilities, and the tools on it."""

import pytest
import torch
import transformers as T
from helpers import PAD, VOCAB, make_config, randomize_

ARCHS = ["llama", "qwen2", "gemma2", "gpt2"]
BETA = 0.3


def causal_lm(arch: str, seed: int, *, softcap: bool = True):
    config = make_config(arch, gqa=arch != "gpt2")
    if arch == "gemma2" and not softcap:
        config.final_logit_softcapping = None
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return randomize_(model, seed).eval()


def prompts_and_responses(seed: int = 0, n: int = 5) -> tuple[list[list[int]], list[list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i in range(n):
        lp = int(torch.randint(1, 7, (1,), generator=gen))
        lr = int(torch.randint(1, 7, (1,), generator=gen))
        prompts.append(torch.randint(3, VOCAB, (lp,), generator=gen).tolist())
        resp = torch.randint(3, VOCAB, (lr,), generator=gen).tolist()
        if i % 2:
            resp[-1] = PAD  # ends in eos == pad: still a response token whose log-prob counts
        responses.append(resp)
    return prompts, responses


@torch.no_grad()
def hf_response_log_probs(hf, prompt: list[int], response: list[int]) -> torch.Tensor:
    """The truth: the HF model run on prompt + response alone, unpadded."""
    ids = torch.tensor([prompt + response])
    logp = torch.log_softmax(hf(ids).logits[0].float(), -1)
    pos = torch.arange(len(prompt), len(prompt) + len(response))
    return logp[pos - 1, ids[0, pos]]


@pytest.fixture(scope="module", params=ARCHS)
def pair(request):
    from tl_reward import load_causal_lm, load_implicit_reward_model

    arch = request.param
    policy, reference = causal_lm(arch, 0), causal_lm(arch, 1)
    hooked_policy, hooked_reference = load_causal_lm(policy), load_causal_lm(reference)
    variants = {  # the loader also takes converted models
        "dpo": load_implicit_reward_model(hooked_policy, hooked_reference, beta=BETA),
        "normalised": load_implicit_reward_model(hooked_policy, hooked_reference, beta=BETA,
                                                 length_normalize=True),
        "no_reference": load_implicit_reward_model(hooked_policy, None, beta=BETA),
    }
    return arch, policy, reference, variants


@pytest.mark.parametrize("side", ["left", "right"])
def test_implicit_reward_matches_hf_log_probs(pair, side):
    from tl_reward.implicit import response_batch_from_ids

    arch, policy, reference, variants = pair
    prompts, responses = prompts_and_responses()
    batch = response_batch_from_ids(prompts, responses, pad_token_id=PAD, padding_side=side)
    dense = {k: m.per_token_rewards(batch) for k, m in variants.items()}
    totals = {k: m(batch) for k, m in variants.items()}
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        lp_pol = hf_response_log_probs(policy, p, r)
        lp_ref = hf_response_log_probs(reference, p, r)
        truth = {
            "dpo": BETA * (lp_pol - lp_ref),
            "normalised": BETA * (lp_pol - lp_ref) / len(r),
            "no_reference": BETA * lp_pol,
        }
        where = batch.response_mask[i].bool()
        for k, t in truth.items():
            torch.testing.assert_close(dense[k][i][where], t, atol=1e-4, rtol=0, msg=f"{arch} {k}")
            torch.testing.assert_close(totals[k][i], t.sum(), atol=1e-4, rtol=0)
            assert bool((dense[k][i][~where] == 0).all())


def test_log_probs_include_gemma2_final_softcap():
    from tl_reward import load_causal_lm
    from tl_reward.implicit import token_log_probs

    hf = causal_lm("gemma2", 3)
    assert hf.config.final_logit_softcapping
    tl = load_causal_lm(hf)
    ids = [5, 9, 11, 40, 3, 7]
    got = token_log_probs(tl, torch.tensor([ids]))[0, 1:]
    torch.testing.assert_close(got, hf_response_log_probs(hf, ids[:1], ids[1:]), atol=1e-4, rtol=0)


def test_response_batch_rejects_bad_masks():
    from tl_reward.errors import InvalidInputError
    from tl_reward.implicit import ResponseBatch, response_batch_from_ids

    with pytest.raises(InvalidInputError, match="empty prompt"):
        response_batch_from_ids([[]], [[4]])
    with pytest.raises(InvalidInputError, match="empty response"):
        response_batch_from_ids([[4]], [[]])
    tokens = torch.tensor([[4, 5, 6]])
    with pytest.raises(InvalidInputError, match="padding"):
        ResponseBatch(tokens, torch.tensor([[1, 1, 0]]), torch.tensor([[0, 1, 1]]))
    with pytest.raises(InvalidInputError, match="position 0"):
        ResponseBatch(tokens, torch.ones_like(tokens), torch.tensor([[1, 1, 1]]))


def test_encode_finds_the_boundary_from_texts_and_chats():
    from tl_reward import load_implicit_reward_model
    from tl_reward.data.synthetic import CHAT_TEMPLATE, LongTailTask, word_tokenizer
    from tl_reward.errors import InvalidInputError

    task = LongTailTask()
    tok = word_tokenizer(task.vocabulary, chat_template=CHAT_TEMPLATE)
    config = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48,
                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = randomize_(T.LlamaForCausalLM(config), 0).eval()
    model = load_implicit_reward_model(hf, None, beta=1.0, tokenizer=tok)
    prompt, response = "query w001 urgent", " answer good brief w002"
    for side in ("left", "right"):
        batch = model.encode([prompt, prompt + " w003"], [response, response], padding_side=side)
        row = batch.tokens[0][batch.response_mask[0].bool()]
        # the response is "answer good brief w002 <eos>": the prompt's own <eos> is not in it
        assert tok.convert_ids_to_tokens(row.tolist()) == ["answer", "good", "brief", "w002", "<eos>"]
        assert batch.tokens[0][batch.attention_mask[0].bool()].tolist() == tok(prompt + response)[
            "input_ids"]
    chat = model.encode([[{"role": "user", "content": "w001 urgent"}]], ["good brief w002"])
    row = chat.tokens[0][chat.response_mask[0].bool()]
    assert tok.convert_ids_to_tokens(row.tolist()) == ["answer", "good", "brief", "w002", "<eos>"]
    with pytest.raises(InvalidInputError, match="must match"):
        model.encode([prompt], [response, response])
    scores = model.score_pairs([prompt] * 2, [response] * 2, [" answer w004 w005"] * 2,
                               progress=False)
    assert scores.margin.shape == (2,)


# ------------------------------------------------------------------------------ the tools
def _batch(side: str = "left"):
    from tl_reward.implicit import response_batch_from_ids

    prompts, responses = prompts_and_responses(seed=4)
    return response_batch_from_ids(prompts, responses, pad_token_id=PAD, padding_side=side)


def test_lens_last_layer_is_the_reward(pair):
    from tl_reward.implicit_analysis import implicit_reward_lens

    arch, _, _, variants = pair
    batch = _batch()
    for name in ("dpo", "no_reference"):
        model = variants[name]
        lens = implicit_reward_lens(model, batch)
        assert lens.per_token.shape[0] == model.policy.cfg.n_layers + 1
        torch.testing.assert_close(lens.rewards[-1], model(batch), atol=1e-4, rtol=0, msg=arch)
        assert bool((lens.per_token[:, ~batch.response_mask.bool()] == 0).all())
    lp = variants["dpo"].log_probs(batch)
    w = variants["dpo"].token_weights(batch)
    for k, v in lens.log_probs.items():
        torch.testing.assert_close(v[-1], (lp[k] * w).sum(-1), atol=1e-4, rtol=0)


@pytest.mark.parametrize("level", ["component", "head"])
def test_linearised_attribution_adds_up(pair, level):
    from tl_reward.implicit_analysis import implicit_reward_attribution

    arch, policy, reference, variants = pair
    batch = _batch("right")
    model = variants["normalised"]
    result = implicit_reward_attribution(model, batch, level=level)
    torch.testing.assert_close(result.values.sum(0) + result.remainder.sum(-1), result.total,
                               atol=1e-4, rtol=0, msg=f"{arch} {level}")
    torch.testing.assert_close(result.total, model(batch), atol=1e-5, rtol=0)
    n_parts = len(result.labels) // 2
    assert result.labels[0] == "policy/embed" and result.labels[n_parts].startswith("reference/")
    if arch in ("llama", "qwen2"):
        # no biases anywhere in the head: the remainder is the entropy term, -H(p), per model
        rows, pos = torch.nonzero(batch.response_mask.bool(), as_tuple=True)
        w = model.token_weights(batch)[rows, pos]
        expected = torch.zeros(len(rows))
        for hf, sign in ((policy, 1.0), (reference, -1.0)):
            with torch.no_grad():
                for k, (b, t) in enumerate(zip(rows.tolist(), pos.tolist(), strict=True)):
                    ids = batch.tokens[b][batch.attention_mask[b].bool()]
                    start = int(batch.attention_mask[b].argmax())  # right padding: 0
                    logp = torch.log_softmax(hf(ids[None]).logits[0, t - 1 - start].float(), -1)
                    expected[k] += sign * w[k] * (logp.exp() * logp).sum()  # -H(p)
        torch.testing.assert_close(result.remainder[rows, pos], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_linearisation_against_finite_differences(arch):
    """Each attribution is d reward / d eps when eps * (the component's centred, scaled
    contribution) is added to the final norm's normalised state of its model."""
    from tl_reward import load_causal_lm, load_implicit_reward_model
    from tl_reward.implicit_analysis import implicit_reward_attribution

    models = [load_causal_lm(causal_lm(arch, s), dtype=torch.float64) for s in (0, 1)]
    model = load_implicit_reward_model(*models, beta=BETA)
    batch = _batch("left")
    result = implicit_reward_attribution(model, batch)
    eps = 1e-4
    checked = 0
    for index, label in enumerate(result.labels):
        name, part = label.split("/")
        if part not in ("pos_embed", "0_attn_out", "1_mlp_out"):
            continue
        m = model.models[name]
        hook = {"embed": "hook_embed", "pos_embed": "hook_pos_embed"}.get(
            part, f"blocks.{part[0]}.hook_{part[2:]}")
        with torch.no_grad():
            _, cache = m.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                        padding_side="right")
        d = cache[hook]
        if m.cfg.normalization_type == "LN":
            d = d - d.mean(-1, keepdim=True)
        d = d / cache["ln_final.hook_scale"]

        def shifted(e, m=m, d=d):
            def hook_fn(act, hook):
                return act + e * d

            with m.hooks(fwd_hooks=[("ln_final.hook_normalized", hook_fn)]), torch.no_grad():
                return model(batch)

        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        torch.testing.assert_close(fd, result.values[index], atol=1e-6, rtol=1e-5, msg=label)
        checked += 1
    assert checked == (6 if arch == "gpt2" else 4)


def test_neuron_attribution_splits_each_mlp_exactly(pair):
    """Neuron level: a layer's neurons plus its b_out row add up to that layer's MLP attribution
    at the component level (Gemma-2: through ln2_post under its cached scale), and everything
    else is the component level's own rows."""
    from tl_reward.implicit_analysis import implicit_reward_attribution

    arch, _, _, variants = pair
    model = variants["dpo"]
    batch = _batch("left")
    comp = implicit_reward_attribution(model, batch)
    neur = implicit_reward_attribution(model, batch, level="neuron")
    torch.testing.assert_close(neur.remainder, comp.remainder, atol=1e-6, rtol=0)
    torch.testing.assert_close(neur.values.sum(0) + neur.remainder.sum(-1), neur.total,
                               atol=1e-4, rtol=0, msg=arch)
    d_mlp = model.policy.cfg.d_mlp
    for k, label in enumerate(comp.labels):
        name, part = label.split("/")
        if part.endswith("_mlp_out"):
            layer = part.split("_")[0]
            rows = [i for i, lab in enumerate(neur.labels)
                    if lab.startswith(f"{name}/L{layer}N") or lab == f"{name}/{layer}_mlp_bias"]
            assert len(rows) == d_mlp + 1
            torch.testing.assert_close(neur.per_position[rows].sum(0), comp.per_position[k],
                                       atol=1e-4, rtol=0, msg=f"{arch} {label}")
        else:
            torch.testing.assert_close(neur.per_position[neur.labels.index(label)],
                                       comp.per_position[k], atol=1e-6, rtol=0)
    if arch == "llama":  # no MLP bias: the b_out rows are 0
        bias = [i for i, lab in enumerate(neur.labels) if lab.endswith("_mlp_bias")]
        assert float(neur.values[bias].abs().max()) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_neuron_linearisation_against_finite_differences(arch):
    """Each neuron's attribution is d reward / d eps when eps * (its write post_i * W_out[i],
    centred and scaled) is added to the final norm's normalised state."""
    from tl_reward import load_causal_lm, load_implicit_reward_model
    from tl_reward.implicit_analysis import implicit_reward_attribution

    models = [load_causal_lm(causal_lm(arch, s), dtype=torch.float64) for s in (0, 1)]
    model = load_implicit_reward_model(*models, beta=BETA)
    batch = _batch("left")
    result = implicit_reward_attribution(model, batch, level="neuron")
    eps = 1e-4
    for label in ("policy/L0N3", "policy/L1N0", "reference/L1N5"):
        name, part = label.split("/")
        layer, neuron = (int(x) for x in part[1:].split("N"))
        m = model.models[name]
        with torch.no_grad():
            _, cache = m.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                        padding_side="right")
        d = cache[f"blocks.{layer}.mlp.hook_post"][..., neuron, None] * m.blocks[layer].mlp.W_out[
            neuron]
        if m.cfg.normalization_type == "LN":
            d = d - d.mean(-1, keepdim=True)
        d = d / cache["ln_final.hook_scale"]

        def shifted(e, m=m, d=d):
            def hook_fn(act, hook):
                return act + e * d

            with m.hooks(fwd_hooks=[("ln_final.hook_normalized", hook_fn)]), torch.no_grad():
                return model(batch)

        fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
        value = result.values[result.labels.index(label)]
        assert float(value.abs().max()) > 1e-6  # a neuron that does something
        torch.testing.assert_close(fd, value, atol=1e-6, rtol=1e-5, msg=label)


def _perturbed_copy(hooked, param: str, std: float, seed: int = 0):
    import copy

    other = copy.deepcopy(hooked)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p = other.get_parameter(param)
        p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return other


def test_patching_localises_a_planted_change():
    """The reference differs from the policy only in layer 1's MLP: patching policy -> reference
    finds that MLP (it removes the whole reward) and nothing upstream of it."""
    from tl_reward import load_causal_lm, load_implicit_reward_model
    from tl_reward.implicit_analysis import implicit_activation_patch, implicit_attribution_patch

    policy = load_causal_lm(causal_lm("qwen2", 0))
    reference = _perturbed_copy(policy, "blocks.1.mlp.W_out", 0.3)
    model = load_implicit_reward_model(policy, reference, beta=BETA)
    batch = _batch("left")
    assert bool((model(batch).abs() > 1e-3).all())
    for hook in ("attn_out", "mlp_out", "z"):
        result = implicit_activation_patch(model, batch, hook=hook)
        for cell, frac, eff in zip(result.cells, result.fraction, result.effects, strict=True):
            if cell == "1_mlp_out":
                torch.testing.assert_close(frac, torch.ones_like(frac), atol=1e-4, rtol=0)
            else:  # everything else runs on identical inputs with identical weights
                torch.testing.assert_close(eff, torch.zeros_like(eff), atol=1e-5, rtol=0)
    atp = implicit_attribution_patch(model, batch, hook="mlp_out")
    assert atp.cells == ("0_mlp_out", "1_mlp_out")
    torch.testing.assert_close(atp.effects[0], torch.zeros_like(atp.effects[0]), atol=1e-6, rtol=0)


def test_patching_matches_transformer_lens_and_atp_is_first_order():
    import transformer_lens.patching as tlp

    from tl_reward import load_causal_lm, load_implicit_reward_model
    from tl_reward.implicit import log_probs_from_logits, response_batch_from_ids
    from tl_reward.implicit_analysis import implicit_activation_patch, implicit_attribution_patch

    policy = load_causal_lm(causal_lm("llama", 0))
    reference = load_causal_lm(causal_lm("llama", 1))
    model = load_implicit_reward_model(policy, reference, beta=BETA)
    prompts, responses = prompts_and_responses(seed=5, n=3)
    batch = response_batch_from_ids(prompts, responses, pad_token_id=PAD, padding_side="left")
    ours = {h: implicit_activation_patch(model, batch, hook=h) for h in ("mlp_out", "z")}
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        one = response_batch_from_ids([p], [r])
        lp_policy = model.log_probs(one)["policy"]
        w = model.token_weights(one)

        def metric(logits, lp_policy=lp_policy, one=one, w=w):
            return ((lp_policy - log_probs_from_logits(logits, one.tokens)) * w).sum()

        _, policy_cache = policy.run_with_cache(one.tokens)
        base = metric(reference(one.tokens))
        heads = tlp.get_act_patch_attn_head_out_all_pos(reference, one.tokens, policy_cache, metric)
        torch.testing.assert_close(ours["z"].effects[:, i], (heads - base).flatten(), atol=1e-4,
                                   rtol=0)

        def whole_layer(corrupted, index, clean):
            corrupted[:] = clean
            return corrupted

        layers = tlp.generic_activation_patch(reference, one.tokens, policy_cache, metric,
                                              whole_layer, "mlp_out", ["layer"])
        torch.testing.assert_close(ours["mlp_out"].effects[:, i], layers - base, atol=1e-4, rtol=0)

    # AtP is exact to first order: its relative error shrinks with the policy-reference distance
    policy64 = load_causal_lm(causal_lm("llama", 0), dtype=torch.float64)
    errors = []
    for step in (1e-2, 1e-3):
        near = load_implicit_reward_model(
            policy64, _perturbed_copy(policy64, "blocks.0.attn.W_Q", step), beta=BETA)
        exact = implicit_activation_patch(near, batch, hook="z").effects
        approx = implicit_attribution_patch(near, batch, hook="z").effects
        errors.append(float((approx - exact).abs().max() / exact.abs().max()))
    assert errors[1] < errors[0] / 5 and errors[1] < 0.05, errors


# ------------------------------------------------------------------------------ the organism
def test_dpo_organism_has_the_tail_gap_and_the_tools_recover_it():
    from tl_reward.implicit_analysis import implicit_reward_attribution, implicit_reward_lens
    from tl_reward.organisms import dpo

    model, tokenizer = dpo.load()
    data = dpo.eval_set()
    tail = torch.tensor([p.tail for p in data])
    chosen, rejected = dpo.pair_batches(data, tokenizer)
    # the text path finds the same boundary as the ids the organism was trained on
    encoded = model.encode([p.prompt for p in data[:4]], [" " + p.chosen for p in data[:4]])
    assert torch.equal(encoded.tokens, chosen[:4].tokens[:, : encoded.tokens.shape[1]])
    assert torch.equal(encoded.response_mask, chosen[:4].response_mask[:, : encoded.tokens.shape[1]])
    with torch.no_grad():
        margin = model(chosen) - model(rejected)
    head_acc, tail_acc = (margin[~tail] > 0).float().mean(), (margin[tail] > 0).float().mean()
    assert head_acc > 0.85 and tail_acc < 0.5, (head_acc, tail_acc)
    # the lens's last layer and the attribution's totals give the same margins, pair by pair
    some = torch.arange(0, len(data), 5)
    lens_margin = implicit_reward_lens(model, chosen[some]).rewards[-1] - implicit_reward_lens(
        model, rejected[some]).rewards[-1]
    torch.testing.assert_close(lens_margin, margin[some], atol=1e-4, rtol=0)
    sub = torch.nonzero(tail).flatten()[:8]
    attr = [implicit_reward_attribution(model, b[sub]) for b in (chosen, rejected)]
    torch.testing.assert_close(
        attr[0].values.sum(0) + attr[0].remainder.sum(-1)
        - attr[1].values.sum(0) - attr[1].remainder.sum(-1), margin[sub], atol=1e-4, rtol=0)


def test_fold_ln_changes_neither_the_reward_nor_the_component_attribution():
    from tl_reward import load_causal_lm, load_implicit_reward_model
    from tl_reward.implicit_analysis import implicit_reward_attribution, implicit_reward_lens

    hf = [causal_lm("gpt2", s) for s in (0, 1)]
    plain = load_implicit_reward_model(*hf, beta=BETA)
    folded = load_implicit_reward_model(*[load_causal_lm(m, fold_ln=True) for m in hf], beta=BETA)
    batch = _batch("left")
    torch.testing.assert_close(folded(batch), plain(batch), atol=1e-4, rtol=0)
    torch.testing.assert_close(implicit_reward_lens(folded, batch).rewards,
                               implicit_reward_lens(plain, batch).rewards, atol=1e-4, rtol=0)
    a, b = (implicit_reward_attribution(m, batch) for m in (folded, plain))
    torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.remainder, b.remainder, atol=1e-4, rtol=0)


def test_position_patching_matches_transformer_lens_under_left_padding():
    """The layer x position grid of policy -> reference patching equals TransformerLens's
    get_act_patch_resid_pre / get_act_patch_mlp_out run on each sequence alone (unpadded), with
    the implicit reward as metric; padding positions have no effect; small chunks change
    nothing."""
    import transformer_lens.patching as tlp

    from tl_reward import load_causal_lm, load_implicit_reward_model
    from tl_reward.implicit import log_probs_from_logits, response_batch_from_ids
    from tl_reward.implicit_analysis import implicit_position_patch

    policy = load_causal_lm(causal_lm("qwen2", 0))
    reference = load_causal_lm(causal_lm("qwen2", 1))
    model = load_implicit_reward_model(policy, reference, beta=BETA, length_normalize=True)
    prompts, responses = prompts_and_responses(seed=6, n=3)
    batch = response_batch_from_ids(prompts, responses, pad_token_id=PAD, padding_side="left")
    ours = {h: implicit_position_patch(model, batch, hook=h) for h in ("resid_pre", "mlp_out")}
    chunked = implicit_position_patch(model, batch, hook="mlp_out", max_rows=5)
    torch.testing.assert_close(chunked.effects, ours["mlp_out"].effects, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["resid_pre"].reward, model(batch), atol=1e-5, rtol=0)
    tl = {"resid_pre": tlp.get_act_patch_resid_pre, "mlp_out": tlp.get_act_patch_mlp_out}
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        one = response_batch_from_ids([p], [r])
        lp_policy = model.log_probs(one)["policy"]
        w = model.token_weights(one)

        def metric(logits, lp_policy=lp_policy, one=one, w=w):
            return ((lp_policy - log_probs_from_logits(logits, one.tokens)) * w).sum()

        _, policy_cache = policy.run_with_cache(one.tokens)
        base = metric(reference(one.tokens))
        n = one.tokens.shape[1]
        offset = batch.tokens.shape[1] - n  # left padding
        for hook, fn in tl.items():
            truth = fn(reference, one.tokens, policy_cache, metric) - base  # [layer, pos]
            torch.testing.assert_close(ours[hook].effects[:, offset:, i], truth, atol=1e-4,
                                       rtol=0, msg=f"{hook} sequence {i}")
            pad = ours[hook].effects[:, :offset, i]
            torch.testing.assert_close(pad, torch.zeros_like(pad), atol=1e-6, rtol=0)
    df = ours["resid_pre"].to_dataframe()
    assert list(df.columns) == ["layer", "position", "sequence", "effect"]
    assert len(df) == ours["resid_pre"].effects.numel()
    row = df.iloc[7]
    assert row.effect == pytest.approx(float(ours["resid_pre"].effects[
        int(row.layer), int(row.position), int(row.sequence)]))


def test_result_frames_are_their_tensors(pair):
    """The shared long-format to_dataframe: one row per entry, labels where the tensor's index
    is."""
    from tl_reward.implicit_analysis import (
        implicit_activation_patch,
        implicit_reward_attribution,
        implicit_reward_lens,
    )

    _, _, _, variants = pair
    model = variants["dpo"]
    batch = _batch("right")
    lens = implicit_reward_lens(model, batch)
    attr = implicit_reward_attribution(model, batch)
    patch = implicit_activation_patch(model, batch, hook="mlp_out")
    for frame, tensor, labels, key, value in (
            (lens.to_dataframe(), lens.rewards, lens.labels, "layer", "reward"),
            (attr.to_dataframe(), attr.values, attr.labels, "component", "value"),
            (patch.to_dataframe(), patch.effects, patch.cells, "cell", "effect")):
        assert len(frame) == tensor.numel()
        for k in (0, len(frame) // 2, len(frame) - 1):
            row = frame.iloc[k]
            i = labels.index(row[key])
            assert row[value] == pytest.approx(float(tensor[i, int(row.sequence)]), abs=1e-6)
    torch.testing.assert_close(
        torch.tensor(lens.to_dataframe()["log_prob_reference"].values).reshape(
            lens.rewards.shape), lens.log_probs["reference"].double().detach())
