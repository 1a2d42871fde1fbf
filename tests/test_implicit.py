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
