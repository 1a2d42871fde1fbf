"""Conversion of HF reward models: parity with the HF model's own forward, and bad inputs."""

import json
import re

import pytest
import torch
import transformers as T
from helpers import (
    ARCHS,
    GQA_ARCHS,
    MORE_ARCHS,
    PAD,
    POST_NORM_ARCHS,
    hf_rewards_alone,
    make_config,
    make_hf_model,
    pad_batch,
    ragged_sequences,
    randomize_,
)

import tl_reward
from tl_reward import errors, load_reward_model

TOL = 1e-4
ALL_ARCHS = ARCHS + MORE_ARCHS
CASES = [(a, g) for a in ALL_ARCHS for g in ([False, True] if a in GQA_ARCHS else [False])]
LN_ARCHS = {"gpt2", "gpt_neox", "gptj", "opt", "phi", "gpt_neo", "bloom", "olmo"}


def _processing(arch: str) -> list[dict]:
    if arch in POST_NORM_ARCHS:
        return [{}]
    opts = [{}, {"fold_ln": True}]
    if arch in LN_ARCHS:
        opts += [{"center_writing_weights": True}, {"fold_ln": True, "center_writing_weights": True}]
    return opts


@pytest.mark.parametrize("arch,gqa", CASES)
@pytest.mark.parametrize("num_labels", [1, 3])
def test_parity_with_hf_each_sequence_alone(arch, gqa, num_labels):
    hf = make_hf_model(arch, gqa, num_labels)
    seqs = ragged_sequences(seed=1)
    truth = hf_rewards_alone(hf, seqs)
    assert truth.std() > 0.1, "rewards must vary, or a 1e-4 tolerance proves nothing"
    for kwargs in _processing(arch):
        model = load_reward_model(hf, **kwargs)
        for side in ("right", "left"):
            tokens, mask = pad_batch(seqs, side)
            for fast in (True, False):  # last block at the scoring tokens only, or everywhere
                model.fast_pooling = fast
                with torch.no_grad():
                    out = model(tokens, attention_mask=mask)
                out = out if num_labels > 1 else out[:, None]
                torch.testing.assert_close(out, truth, atol=TOL, rtol=0,
                                           msg=f"{kwargs} {side} fast={fast}")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt_neox"])
def test_anything_observing_the_last_block_gets_the_full_forward(arch):
    """The reward runs the last block at the scoring tokens only, unless a hook, a cache or a
    torch hook is on it: then every position is computed and seen, with the same reward."""
    model = load_reward_model(make_hf_model(arch, gqa=arch != "gpt_neox"))
    tokens, mask = pad_batch(ragged_sequences(seed=2), "right")
    last = model.cfg.n_layers - 1
    seen = []
    with torch.no_grad():
        fast = model(tokens, attention_mask=mask)
        assert model._reward_needs_scoring_tokens_only()
        hooked = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[
            (f"blocks.{last}.mlp.hook_post", lambda a, hook: seen.append(a.shape) or a)])
        cached, cache = model.run_with_cache(tokens, attention_mask=mask)
        handle = model.ln_final.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        assert not model._reward_needs_scoring_tokens_only()
        torch_hooked = model(tokens, attention_mask=mask)
        handle.remove()
    assert seen[0][:2] == tokens.shape and seen[1][:2] == tokens.shape
    assert cache[f"blocks.{last}.hook_resid_post"].shape[:2] == tokens.shape
    for other in (hooked, cached, torch_hooked):
        torch.testing.assert_close(other, fast, atol=1e-5, rtol=0)
    assert model._reward_needs_scoring_tokens_only()  # nothing left behind


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_batched_left_padding_is_not_the_truth_for_gpt2(arch):
    """HF's batched GPT-2 forward ignores left padding in its positions; ours does not."""
    hf = make_hf_model(arch)
    seqs = ragged_sequences(seed=2)
    tokens, mask = pad_batch(seqs, "left")
    truth = hf_rewards_alone(hf, seqs)[:, 0]
    with torch.no_grad():
        hf_batched = hf(tokens, attention_mask=mask).logits[:, 0]
        ours = load_reward_model(hf)(tokens, attention_mask=mask)
    torch.testing.assert_close(ours, truth, atol=TOL, rtol=0)
    if arch == "gpt2":
        assert (hf_batched - truth).abs().max() > 1e-2


@pytest.mark.parametrize(
    "arch,change",
    [
        ("gemma2", {"attn_logit_softcapping": None}),
        ("gemma2", {"sliding_window": 64}),
        ("mistral", {"sliding_window": None}),
        ("qwen2", {"use_sliding_window": False}),
        ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
        ("gemma2", {"query_pre_attn_scalar": 16}),
        ("phi3", {"sliding_window": None}),
        ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}),
        ("mixtral", {"num_experts_per_tok": 1}),
        ("gptj", {"rotary_dim": 8}),
        ("mixtral", {"sliding_window": None}),
        ("gemma3_text", {"sliding_window": 64}),
        ("gemma3_text", {"rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}}),
        ("gemma3_text", {"rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
        ("gpt_neo", {"window_size": 64}),
        ("olmo", {"clip_qkv": None}),
        # transformers' slow_but_exact output projections drop their biases
        ("bloom", {"pretraining_tp": 2, "slow_but_exact": True}),
        ("olmo3", {"sliding_window": 64}),
        ("gpt_oss", {"sliding_window": 64}),
        ("gpt_oss", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}),
        ("gpt_oss", {"num_experts_per_tok": 1}),
        # the experts' clamp: a value TransformerLens cannot take changes HF's rewards, so the
        # refusal below is necessary
        ("gpt_oss", {"swiglu_limit": 0.5}),
        ("gpt_oss", {"swiglu_alpha": 1.0}),
        ("olmo3", {"rope_parameters": {  # YaRN on the full-attention layer acts
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
        ("olmo3", {"rope_parameters": {  # the sliding layers' own base acts
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                               "original_max_position_embeddings": 16, "attention_factor": 1.2}}}),
    ],
)
def test_tiny_configs_exercise_each_special_feature(arch, change):
    """Parity above only proves a feature is kept if switching it off changes the rewards."""
    hf = make_hf_model(arch)
    config = make_config(arch)
    for k, v in change.items():
        setattr(config, k, v)
    if arch == "qwen2":
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    config._attn_implementation = "eager"
    other = T.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    other.load_state_dict(hf.state_dict())
    seqs = ragged_sequences(seed=3, lo=10, hi=14)
    diff = (hf_rewards_alone(hf, seqs) - hf_rewards_alone(other.eval(), seqs)).abs().max()
    assert diff > 1e-3


def test_pooling_skips_trailing_pad_eos_and_matches_hf_rule():
    hf = make_hf_model("llama")
    model = load_reward_model(hf)
    tokens = torch.tensor([[5, 6, 7, PAD], [PAD, PAD, 8, 9], [5, PAD, 6, PAD]])
    assert model.pooled_index(tokens).tolist() == [2, 3, 2]
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    assert model.pooled_index(tokens, mask).tolist() == [1, 3, 2]


def test_per_position_rewards_at_the_pooled_token_equal_the_reward():
    hf = make_hf_model("qwen2", gqa=True)
    model = load_reward_model(hf)
    tokens, mask = pad_batch(ragged_sequences(seed=4), "left")
    with torch.no_grad():
        dense = model(tokens, attention_mask=mask, return_type="per_position")
        pooled = model(tokens, attention_mask=mask)
    assert dense.shape == tokens.shape
    idx = model.pooled_index(tokens, mask)
    torch.testing.assert_close(dense[torch.arange(len(idx)), idx], pooled, atol=1e-6, rtol=0)


def test_reward_hooks_and_head_read_consistently():
    hf = make_hf_model("gpt2")
    model = load_reward_model(hf, fold_ln=True, center_writing_weights=True)
    tokens, mask = pad_batch(ragged_sequences(seed=5), "right")
    reward, cache = model.run_with_cache(tokens, attention_mask=mask)
    assert cache["reward_head.hook_pooled"].shape == (len(tokens), model.cfg.d_model)
    assert cache["reward_head.hook_reward"].shape == (len(tokens), 1)
    recomputed = cache["reward_head.hook_pooled"] @ model.reward_direction + model.reward_bias
    torch.testing.assert_close(recomputed, reward, atol=1e-5, rtol=0)
    assert "blocks.1.attn.hook_z" in model.hook_dict
    assert "blocks.0.hook_resid_pre" in model.hook_dict
    # TransformerLens's ActivationCache works unchanged on the reward model
    stack = cache.accumulated_resid(layer=-1, incl_mid=False)
    assert stack.shape[0] == model.cfg.n_layers + 1


@pytest.mark.parametrize("arch,gqa", CASES)
def test_weights_are_stored_in_the_layout_their_matmuls_read(arch, gqa):
    """TransformerLens reshapes W_Q/W_K/W_V/W_O and a gated MLP's weights for F.linear in every
    forward; stored in nn.Linear's layout, those reshapes are views (no copy of the weights per
    forward), and the layout survives loading, folding, a dtype change and a copy."""
    import copy

    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    model = load_reward_model(make_hf_model(arch, gqa), fold_ln=arch not in POST_NORM_ARCHS)
    for m in (model, copy.deepcopy(model).to(torch.float64)):
        for block in m.blocks:
            attn = block.attn
            for w in (attn.W_Q, attn._parameters.get("_W_K", attn.W_K),
                      attn._parameters.get("_W_V", attn.W_V)):
                assert w.permute(0, 2, 1).is_contiguous(), (arch, w.stride())
            assert attn.W_O.permute(2, 0, 1).is_contiguous(), (arch, attn.W_O.stride())
            if isinstance(block.mlp, GatedMLP):
                for w in (block.mlp.W_gate, block.mlp.W_in, block.mlp.W_out):
                    assert w.T.is_contiguous(), (arch, w.stride())


def test_fold_ln_folds_the_head_and_keeps_rewards():
    hf = make_hf_model("llama")
    raw = load_reward_model(hf)
    folded = load_reward_model(hf, fold_ln=True)
    w = raw.ln_final.w
    torch.testing.assert_close(folded.W_R, w[:, None] * raw.W_R)


def test_hook_edit_on_pooled_changes_reward():
    hf = make_hf_model("llama")
    model = load_reward_model(hf)
    tokens = torch.tensor([[5, 6, 7, 8]])

    def zero(act, hook):
        return torch.zeros_like(act)

    out = model.run_with_hooks(tokens, fwd_hooks=[("reward_head.hook_pooled", zero)])
    torch.testing.assert_close(out, model.b_R[:1].expand(1), atol=1e-6, rtol=0)


def test_hook_removal_keeps_transformer_lens_semantics():
    """remove_all_hook_fns skips empty hook points; what stays and what goes is TransformerLens's
    (context levels, permanent hooks, directions), checked against HookedTransformer's own method
    on the same hooks."""
    from transformer_lens import HookedTransformer

    model = load_reward_model(make_hf_model("llama"))
    tokens = torch.tensor([[5, 6, 7, 8]])
    fired: list[str] = []

    def note(tag):
        def hook(act, hook):
            fired.append(tag)
        return hook

    def held():
        return {(name, len(hp.fwd_hooks), len(hp.bwd_hooks)) for name, hp in model.hook_dict.items()
                if hp.fwd_hooks or hp.bwd_hooks}

    model.add_hook("blocks.0.hook_resid_pre", note("permanent"), is_permanent=True)
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", note("outer"))]):
        with model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", note("inner"))],
                         bwd_hooks=[("blocks.0.hook_mlp_out", note("grad"))]):
            assert len(held()) == 3
        assert held() == {("blocks.0.hook_resid_pre", 1, 0), ("blocks.1.hook_resid_pre", 1, 0)}
        model(tokens)
    assert fired == ["permanent", "outer"]
    assert held() == {("blocks.0.hook_resid_pre", 1, 0)}
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", note("temporary"))])
    assert fired[-2:] == ["permanent", "temporary"] and held() == {("blocks.0.hook_resid_pre", 1, 0)}

    def setup():  # the same hooks before each removal
        model.remove_all_hook_fns("both", including_permanent=True)
        model.add_hook("blocks.0.hook_resid_pre", note("permanent"), is_permanent=True)
        model.add_hook("blocks.1.hook_mlp_out", note("x"))
        model.add_hook("blocks.1.hook_mlp_out", note("y"), dir="bwd")

    for direction in ("fwd", "bwd", "both"):
        for permanent in (False, True):
            setup()
            model.remove_all_hook_fns(direction, including_permanent=permanent)
            ours = held()
            setup()
            HookedTransformer.remove_all_hook_fns(model, direction, including_permanent=permanent)
            assert held() == ours, (direction, permanent)
    assert ours == set()  # both directions, permanent hooks included


def test_multi_objective_heads_and_objectives():
    hf = make_hf_model("llama", num_labels=3)
    seqs = ragged_sequences(seed=6)
    truth = hf_rewards_alone(hf, seqs)
    tokens, mask = pad_batch(seqs, "right")
    with torch.no_grad():
        all_out = load_reward_model(hf)(tokens, attention_mask=mask)
        one = load_reward_model(hf, objective=2)(tokens, attention_mask=mask)
        w = torch.tensor([0.5, -1.0, 2.0])
        mixed = load_reward_model(hf, objective=w)(tokens, attention_mask=mask)
    assert all_out.shape == (len(seqs), 3)
    torch.testing.assert_close(one, truth[:, 2], atol=TOL, rtol=0)
    torch.testing.assert_close(mixed, truth @ w, atol=TOL, rtol=0)
    model = load_reward_model(hf)
    with pytest.raises(errors.ObjectiveError, match="set_objective"):
        _ = model.reward_direction
    model.set_objective(1)
    assert model.reward_direction.shape == (model.cfg.d_model,)


@pytest.mark.parametrize("bad", [3, -4, [1.0, 2.0], [1.0, float("nan"), 0.0], True])
def test_bad_objective(bad):
    hf = make_hf_model("llama", num_labels=3)
    with pytest.raises(errors.ObjectiveError):
        load_reward_model(hf, objective=bad)


# ---------------------------------------------------------------- sources and architectures
def test_local_directory_roundtrip_with_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<unk>": 0, "<bos>": 2} | {f"w{i}": i for i in range(3, 97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>"
    )
    hf = make_hf_model("mistral", gqa=True)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_reward_model(str(tmp_path))
    assert model.tokenizer is not None
    texts = ["w5 w6 w7", "w8 w9 w10 w11 w12 w13 w14", "w3 w4 <pad>"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    truth = hf_rewards_alone(hf, ids)[:, 0]
    torch.testing.assert_close(model.score(texts, batch_size=2, progress=False), truth, atol=TOL, rtol=0)
    pairs = model.score_pairs(texts[:2], texts[1:], progress=False)
    torch.testing.assert_close(pairs.margin, truth[:2] - truth[1:], atol=2 * TOL, rtol=0)
    assert list(pairs.to_dataframe().columns) == ["chosen", "rejected", "margin"]
    model.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    chat = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"}]
    torch.testing.assert_close(model.score([chat], progress=False), truth[:1], atol=TOL, rtol=0)


def test_hub_id_or_missing_path(tmp_path):
    with pytest.raises(errors.ModelSourceError, match="never downloads"):
        load_reward_model("meta-llama/Llama-3.1-8B")
    with pytest.raises(errors.ModelSourceError, match="config.json"):
        load_reward_model(tmp_path)
    with pytest.raises(errors.ModelSourceError, match="dict"):
        load_reward_model({"not": "a model"})


def test_causal_lm_has_no_score_head(tmp_path):
    lm = T.LlamaForCausalLM(make_config("llama"))
    with pytest.raises(errors.NotARewardModelError, match="no score head"):
        load_reward_model(lm)
    lm.save_pretrained(tmp_path)
    with pytest.raises(errors.NotARewardModelError, match="ForSequenceClassification"):
        load_reward_model(tmp_path)


def test_unsupported_architecture_lists_supported():
    cfg = T.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)
    with pytest.raises(errors.UnsupportedArchitectureError, match="llama"):
        load_reward_model(T.BertForSequenceClassification(cfg))
    assert "gemma2" in tl_reward.supported_architectures()


@pytest.mark.parametrize(
    "arch,key,value",
    [
        ("llama", "attention_bias", True),
        ("llama", "mlp_bias", True),
        ("llama", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
        ("qwen3", "attention_bias", True),
        ("gpt2", "activation_function", "quick_gelu"),
        ("llama", "is_causal", False),
        ("gemma", "use_bidirectional_attention", True),
        ("gpt2", "add_cross_attention", True),
        ("phi3", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
        ("phi3", "rope_parameters", {"rope_type": "default", "rope_theta": 1e4,
                                     "partial_rotary_factor": 0.33}),  # int(0.33 * 16) = 5
        ("olmo2", "attention_bias", True),
        ("olmo2", "head_dim", 8),
        ("gemma3_text", "rope_parameters", {
            "sliding_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1e6}}),
        ("gemma3_text", "use_bidirectional_attention", True),
        ("gptj", "rotary_dim", 5),
        ("phi", "qk_layernorm", True),
        ("phi", "num_key_value_heads", 2),
        ("opt", "do_layer_norm_before", False),
        ("opt", "word_embed_proj_dim", 32),
        ("opt", "enable_bias", False),
        ("opt", "_remove_final_layer_norm", True),
        ("opt", "layer_norm_elementwise_affine", False),
        ("gpt_neo", "activation_function", "quick_gelu"),
        ("bloom", "apply_residual_connection_post_layernorm", True),
        ("bloom", "n_head", 6),
        ("olmo", "attention_bias", True),
        ("olmo", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
        ("olmo3", "attention_bias", True),
        ("gpt_oss", "swiglu_limit", 0.5),
        ("gpt_oss", "swiglu_alpha", 1.0),
        ("gpt_oss", "attention_bias", False),
        ("gpt_oss", "rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
        ("olmo3", "rope_parameters", {
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
    ],
)
def test_config_values_the_adapter_cannot_reproduce(arch, key, value):
    hf = make_hf_model(arch)
    setattr(hf.config, key, value)
    with pytest.raises(errors.UnsupportedConfigError, match=key.split(".")[0]):
        load_reward_model(hf)


LONGROPE = {"rope_type": "longrope", "rope_theta": 1000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0], "long_factor": [4.0] * 6,
            "original_max_position_embeddings": 16}


@pytest.mark.parametrize("gqa", [False, True])
def test_phi3_longrope_matches_hf_within_the_original_context(gqa):
    """Phi-3.5 / Phi-4-mini's LongRoPE: per-frequency short factors and the attention factor
    sqrt(1 + ln(64 / 16) / ln(16)) on cos and sin, as transformers computes them; the context
    is the original one (beyond it transformers switches every position to the long factors)."""
    config = make_config("phi3", gqa)
    config.rope_parameters = dict(LONGROPE)
    config.original_max_position_embeddings = 16  # transformers syncs the rope entry to this
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = randomize_(T.AutoModelForSequenceClassification.from_config(config), 0).eval()
    seqs = ragged_sequences(seed=1, hi=15)
    truth = hf_rewards_alone(hf, seqs)
    plain_config = config.__class__.from_dict(config.to_dict())  # hf.config is `config`
    plain_config.rope_parameters = {"rope_type": "default", "rope_theta": 1000.0,
                                    "partial_rotary_factor": 0.75}
    plain = T.AutoModelForSequenceClassification.from_config(plain_config)
    plain.load_state_dict(hf.state_dict())
    assert (hf_rewards_alone(plain.eval(), seqs) - truth).abs().max() > 1e-3  # LongRoPE acts
    for kwargs in _processing("phi3"):
        model = load_reward_model(hf, **kwargs)
        assert model.cfg.n_ctx == 16
        for side in ("right", "left"):
            tokens, mask = pad_batch(seqs, side)
            for fast in (True, False):
                model.fast_pooling = fast
                with torch.no_grad():
                    out = model(tokens, attention_mask=mask)
                torch.testing.assert_close(out[:, None], truth, atol=TOL, rtol=0,
                                           msg=f"{kwargs} {side} {fast}")
    with pytest.raises(errors.UnsupportedConfigError, match="n_ctx=17"):
        load_reward_model(hf, n_ctx=17)


@pytest.mark.parametrize("arch", sorted(POST_NORM_ARCHS))
def test_fold_ln_refused_for_post_norm_blocks(arch):
    """OLMo-2 / OLMo-3 normalise each sublayer's output: no linear map follows their norms."""
    with pytest.raises(errors.UnsupportedConfigError, match="post-norm"):
        load_reward_model(make_hf_model(arch), fold_ln=True)


def test_gemma3_attention_scores_are_not_capped_as_in_hf():
    """transformers' Gemma3Attention stores attn_logit_softcapping but never applies it: the HF
    rewards do not depend on it, and the converted model (which does not cap) matches them.
    When a transformers release starts applying it, the first assertion fails."""
    hf = make_hf_model("gemma3_text", gqa=True)
    seqs = ragged_sequences(seed=3, lo=10, hi=14)
    truth = hf_rewards_alone(hf, seqs)
    hf.config.attn_logit_softcapping = 0.5
    torch.testing.assert_close(hf_rewards_alone(hf, seqs), truth, atol=0, rtol=0)
    model = load_reward_model(hf)
    assert model.cfg.attn_scores_soft_cap < 0  # TransformerLens's "no cap"
    tokens, mask = pad_batch(seqs, "left")
    with torch.no_grad():
        out = model(tokens, attention_mask=mask)
    torch.testing.assert_close(out[:, None], truth, atol=TOL, rtol=0)


def test_center_writing_weights_refused_for_rmsnorm():
    with pytest.raises(errors.UnsupportedConfigError, match="RMSNorm"):
        load_reward_model(make_hf_model("llama"), center_writing_weights=True)


# ---------------------------------------------------------------- bad model inputs
@pytest.fixture(scope="module")
def llama():
    return load_reward_model(make_hf_model("llama"))


def test_sequence_longer_than_n_ctx(llama):
    with pytest.raises(errors.InvalidInputError, match="n_ctx=64"):
        llama(torch.full((1, 65), 5))


def test_token_ids_out_of_range(llama):
    with pytest.raises(errors.InvalidInputError, match=r"\[0, 97\)"):
        llama(torch.tensor([[5, 97]]))
    with pytest.raises(errors.InvalidInputError, match="-1"):
        llama(torch.tensor([[-1, 5]]))


def test_empty_input(llama):
    with pytest.raises(errors.InvalidInputError, match="empty"):
        llama(torch.zeros((0, 4), dtype=torch.long))
    with pytest.raises(errors.InvalidInputError, match="no texts"):
        llama.score([])


def test_all_padding_row_has_no_scoring_token(llama):
    with pytest.raises(errors.InvalidInputError, match=r"rows \[1\]"):
        llama(torch.tensor([[5, 6], [PAD, PAD]]))


def test_mask_shape_and_pair_counts(llama):
    with pytest.raises(errors.InvalidInputError, match="attention_mask shape"):
        llama(torch.tensor([[5, 6]]), attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(errors.InvalidInputError, match="pairs must match"):
        llama.score_pairs(["a", "b"], ["c"])


def test_no_tokenizer_for_texts(llama):
    with pytest.raises(errors.InvalidInputError, match="no tokenizer"):
        llama.score(["hello"])


@pytest.mark.parametrize("device", ["bogus", "cuda:99"]
                         + ([] if torch.cuda.is_available() else ["cuda"]))
def test_bad_device(device):
    with pytest.raises(errors.DeviceError, match=re.escape(f"device={device!r}")):
        load_reward_model(make_hf_model("llama"), device=device)


def test_errors_are_also_builtins():
    assert issubclass(errors.InvalidInputError, ValueError)
    assert issubclass(errors.HookNameError, KeyError)
    assert issubclass(errors.NotARewardModelError, TypeError)


def test_jaxtyping_hook_is_active():
    """Canary: the runtime shape checks the test run relies on are installed."""
    from jaxtyping import TypeCheckError

    from tl_reward.model import pooled_positions

    with pytest.raises(TypeCheckError):
        pooled_positions(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), 1, (2, 3))


# ---------------------------------------------------------------- shapes TransformerLens guesses from
SHAPE_CASES = [
    ("llama", {"intermediate_size": 64}),  # square gated MLP
    ("gemma2", {"intermediate_size": 64}),  # square, (1 + w) norms
    ("gpt2", {"n_inner": 64}),  # square MLP, LayerNorm biases
    ("gpt_neox", {"intermediate_size": 64}),  # square, parallel residual with its own ln2
    ("gptj", {"n_inner": 64}),  # square, parallel blocks under one LayerNorm
    ("opt", {"ffn_dim": 64}),
    ("phi", {"intermediate_size": 64}),
    ("gpt2", {"num_labels": 64}),  # a head with d_model outputs
    ("llama", {"num_labels": 64}),
    ("gpt2", {"vocab_size": 64}),  # d_vocab == d_model: the head was centred along its outputs
    ("gpt_neox", {"vocab_size": 64}),
]


def _shaped_hf_model(arch: str, change: dict):
    config = make_config(arch)
    for k, v in change.items():
        setattr(config, k, v)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = T.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    return randomize_(hf, 0).eval()


@pytest.mark.parametrize("arch,change", SHAPE_CASES)
def test_fold_ln_where_the_shapes_do_not_tell_the_layout(arch, change):
    """TransformerLens 3.9 folds norms into W_in and W_U by guessing d_model's axis from the
    shape; square MLPs, d_model-output heads and d_vocab == d_model fooled it (rewards off by
    0.8-5.6 with random norm weights)."""
    hf = _shaped_hf_model(arch, change)
    vocab = hf.config.vocab_size
    seqs = [[t % vocab for t in s] for s in ragged_sequences(seed=1)]
    truth = hf_rewards_alone(hf, seqs)
    for kwargs in _processing(arch)[1:]:
        model = load_reward_model(hf, **kwargs)
        for side in ("right", "left"):
            tokens, mask = pad_batch(seqs, side)
            with torch.no_grad():
                out = model(tokens, attention_mask=mask)
            out = out if out.ndim == 2 else out[:, None]
            torch.testing.assert_close(out, truth, atol=TOL, rtol=0, msg=f"{kwargs} {side}")


def test_transformer_lens_own_fold_is_wrong_for_a_square_mlp():
    """The upstream fault the override above works around, on a plain HookedTransformer: when
    this starts failing, TransformerLens has fixed it and the override can go."""
    import copy

    from transformer_lens import HookedTransformer

    model = load_reward_model(_shaped_hf_model("llama", {"intermediate_size": 64}))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = HookedTransformer.forward(model, tokens)
        plain = HookedTransformer(copy.deepcopy(model.cfg))
        plain.load_and_process_state_dict(state, fold_ln=True, center_writing_weights=False,
                                          center_unembed=False, fold_value_biases=False)
        got = plain(tokens)
    assert (got - want).abs().max() > 0.1


def test_value_biases_are_not_folded_under_attention_sinks(monkeypatch):
    """GPT-OSS's sinks take a share of each softmax row, so a value bias reaches the output scaled
    by the row's sum, not once: TransformerLens 3.9 folds it into b_O anyway (rewards off by
    about 1 here); tl_reward does not. When this starts failing, TransformerLens skips the fold."""
    from transformer_lens.weight_processing import ProcessWeights

    hf = make_hf_model("gpt_oss")
    seqs = ragged_sequences(seed=1)
    truth = hf_rewards_alone(hf, seqs)
    tokens, mask = pad_batch(seqs, "right")
    with torch.no_grad():
        ours = load_reward_model(hf, fold_ln=True)(tokens, attention_mask=mask)
    torch.testing.assert_close(ours[:, None], truth, atol=TOL, rtol=0)
    process = ProcessWeights.process_weights

    def folding_value_biases(*args, **kwargs):
        return process(*args, **(kwargs | {"fold_value_biases": True}))

    monkeypatch.setattr(ProcessWeights, "process_weights", staticmethod(folding_value_biases))
    with torch.no_grad():
        folded = load_reward_model(hf, fold_ln=True)(tokens, attention_mask=mask)
    assert (folded[:, None] - truth).abs().max() > 0.1


def test_gpt_oss_weights_that_are_not_plain_matrices_are_refused():
    """Quantised expert weights (an int8 finetune here) cannot be read as matrices: refused with
    TransformerLens's reason, as a TLRewardError, not converted into plausible garbage."""
    hf = make_hf_model("gpt_oss")
    experts = hf.model.layers[0].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(
        experts.gate_up_proj.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(errors.UnsupportedConfigError, match="gate_up_proj"):
        load_reward_model(hf)


# ---------------------------------------------------------------- what the installed HF forward reads
READ_CASES = [
    # transformers' Gemma MLP reads hidden_act, Gemma-2's hidden_activation: each ignores the other
    ("gemma", {"hidden_act": "silu", "hidden_activation": "gelu_pytorch_tanh"}),
    ("gemma2", {"hidden_act": "silu", "hidden_activation": "gelu_pytorch_tanh"}),
    ("gemma2", {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "silu"}),
    # transformers' Mistral applies sliding_window to every layer whatever layer_types says
    ("mistral", {"layer_types": ["full_attention", "sliding_attention"]}),
    ("mistral", {"layer_types": ["full_attention", "full_attention"]}),
    # Bloom's slow_but_exact output projections: column slices summed, biases dropped
    ("bloom", {"pretraining_tp": 2, "slow_but_exact": True}),
    ("bloom", {"pretraining_tp": 3, "slow_but_exact": True}),  # slices of 64 / 3 columns
    # GPT-Neo: every layer local, a window of one token (each attends to itself alone)
    ("gpt_neo", {"attention_layers": ["local", "local"], "window_size": 1}),
    # GPT-NeoX rotary dimension: int(0.3 * 16) = 4 (round() gave 5)
    ("gpt_neox", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0,
                                      "partial_rotary_factor": 0.3}}),
]


@pytest.mark.parametrize("arch,change", READ_CASES)
def test_keys_are_read_as_the_installed_hf_forward_reads_them(arch, change):
    hf = _shaped_hf_model(arch, change)
    seqs = ragged_sequences(seed=7, lo=8, hi=14)
    truth = hf_rewards_alone(hf, seqs)
    for kwargs in _processing(arch)[:2]:
        model = load_reward_model(hf, **kwargs)
        tokens, mask = pad_batch(seqs, "left")
        with torch.no_grad():
            out = model(tokens, attention_mask=mask)
        torch.testing.assert_close(out[:, None], truth, atol=TOL, rtol=0, msg=str(kwargs))


@pytest.mark.parametrize("n_heads", [1, 2, 3, 6, 8, 12, 16, 32, 112])
def test_bloom_refusal_is_exactly_where_alibi_slopes_differ(n_heads):
    """TransformerLens's ALiBi slopes equal transformers' Bloom slopes for a power-of-two head
    count and differ otherwise (bigscience/bloom's 112 heads): the adapter refuses exactly those.
    When TransformerLens matches them, this fails and the refusal can go."""
    from transformer_lens.components.abstract_attention import AbstractAttention
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    ours = -AbstractAttention.create_alibi_bias(n_heads, 2, "cpu")[:, 1, 0]  # slope * (0 - 1)
    same = torch.allclose(ours, _get_alibi_slopes(n_heads, "cpu"), rtol=1e-6, atol=0)
    assert same == (n_heads & (n_heads - 1) == 0)
    config = make_config("bloom")
    config.n_head, config.hidden_size = n_heads, 4 * n_heads
    hf = T.BloomForSequenceClassification(config).eval()
    if same:
        load_reward_model(hf)
    else:
        with pytest.raises(errors.UnsupportedConfigError, match="ALiBi slopes"):
            load_reward_model(hf)


def test_odd_neox_rotary_dimension_is_refused_with_the_reason():
    hf = _shaped_hf_model("gpt_neox", {"rope_parameters": {
        "rope_type": "default", "rope_theta": 1000.0, "partial_rotary_factor": 0.33}})
    with pytest.raises(errors.UnsupportedConfigError, match=r"odd rotary dimension int\(0.33 \* 16\) = 5"):
        load_reward_model(hf)


# ---------------------------------------------------------------- checkpoints that cannot be read
@pytest.mark.parametrize("loader", ["load_reward_model", "load_causal_lm"])
def test_custom_code_directory_is_refused_naming_it_and_the_supported(tmp_path, loader):
    import tl_reward

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "internlm2", "architectures": ["InternLM2ForRewardModel"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
        "hidden_size": 64}))
    with pytest.raises(errors.UnsupportedArchitectureError) as info:
        getattr(tl_reward, loader)(tmp_path)
    message = str(info.value)
    for part in (str(tmp_path), "internlm2", "custom-code", "auto_map", "'gemma2'", "'llama'"):
        assert part in message


def test_a_reward_model_directory_is_not_a_causal_lm(tmp_path):
    from tl_reward import load_causal_lm

    make_hf_model("llama").save_pretrained(tmp_path)
    with pytest.raises(errors.NotARewardModelError, match="LlamaForSequenceClassification"):
        load_causal_lm(tmp_path)


@pytest.mark.parametrize("damage", ["config", "weights"])
def test_any_failure_reading_a_checkpoint_names_the_directory_and_cause(tmp_path, damage):
    make_hf_model("llama").save_pretrained(tmp_path)
    if damage == "config":
        (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    else:
        weights = next(tmp_path.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(errors.ModelSourceError) as info:
        load_reward_model(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert info.value.__cause__ is not None


def test_a_score_linear_is_not_enough_token_classifier_refused():
    config = make_config("llama")
    token_clf = T.LlamaForTokenClassification(config)
    assert isinstance(getattr(token_clf, "score", None), torch.nn.Linear)
    with pytest.raises(errors.NotARewardModelError, match="LlamaForTokenClassification"):
        load_reward_model(token_clf)


# ---------------------------------------------------------------- the refusal rule
def test_what_the_hf_forward_reads_comes_from_the_installed_source():
    from tl_reward.loading._base import forward_reads

    assert "sliding_window" in forward_reads("mistral") and "layer_types" not in forward_reads("mistral")
    assert "hidden_act" in forward_reads("gemma") and "hidden_activation" not in forward_reads("gemma")
    assert "hidden_activation" in forward_reads("gemma2") and "hidden_act" not in forward_reads("gemma2")
    assert "attn_logit_softcapping" in forward_reads("gemma2")
    assert "n_embd" in forward_reads("gpt2")  # read as config.hidden_size, an alias of n_embd
    assert "is_causal" in forward_reads("llama")  # read by masking_utils.create_causal_mask
    for never in ("cache_implementation", "use_mrope", "n_special", "is_llama_config",
                  "sliding_window_size", "transformers.js_config", "rope_interleaved"):
        assert all(never not in forward_reads(a) for a in tl_reward.supported_architectures())


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_key_the_hf_forward_reads_is_converted_or_shown_harmless(arch):
    """With the installed transformers no key is refused for being unknown: each key its forward
    reads is converted by the adapter (which refuses values it cannot reproduce), or listed with
    the reason it cannot change the reward."""
    from tl_reward.loading import REGISTRY
    from tl_reward.loading._base import CAUSAL, READ_WITHOUT_EFFECT, forward_reads

    adapter, config_cls = REGISTRY[arch], type(make_config(arch))
    reads = {k for k in forward_reads(arch) if not callable(getattr(config_cls, k, None))}
    known = adapter.handled | set(adapter.ignored) | set(READ_WITHOUT_EFFECT) | {CAUSAL}
    assert reads - known == set()
    assert set(adapter.ignored) <= set(forward_reads(arch))  # no stale reasons


def test_a_read_key_the_adapter_does_not_convert_is_refused_for_the_user(monkeypatch):
    from tl_reward.loading import _base

    reads = dict(_base.forward_reads("llama"), attn_temperature="scale = config.attn_temperature")
    monkeypatch.setattr(_base, "forward_reads", lambda model_type: reads)
    hf = make_hf_model("llama")
    hf.config.attn_temperature = 0.5
    with pytest.raises(errors.UnsupportedConfigError) as info:
        load_reward_model(hf)
    message = str(info.value)
    for part in ("attn_temperature=0.5", "scale = config.attn_temperature", "remove the key",
                 "different rewards"):
        assert part in message
    assert "tl_reward/loading" not in message and "adapter's handled" not in message


def test_keys_no_hf_forward_reads_are_accepted_and_logged(caplog):
    hf = make_hf_model("gemma2")
    hf.config.cache_implementation = "hybrid"
    hf.config.sliding_window_size = 4096
    with caplog.at_level("DEBUG", logger="tl_reward.loading._base"):
        load_reward_model(hf)
    assert "cache_implementation" in caplog.text and "never reads" in caplog.text


def test_a_row_of_pad_ids_alone_is_refused_not_pooled_at_its_last_position():
    """HF pools the last position of a row with no non-pad token (its argmax finds none); that
    reward reads a pad token, so tl_reward refuses the row, naming it."""
    hf = make_hf_model("llama")
    model = load_reward_model(hf)
    pad = hf.config.pad_token_id
    tokens = torch.tensor([[5, 6, 7], [pad, pad, pad]])
    with pytest.raises(errors.InvalidInputError, match=r"rows \[1\] have no token to score"):
        model(tokens)
