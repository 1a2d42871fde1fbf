"""Randomised HF configs per family: each draw matches the HF model's own forward within 1e-4
(left and right padding, with the processing drawn too) or is refused with UnsupportedConfigError.
Zero silent wrong numbers, zero crashes."""

from collections import Counter

import pytest
import torch
import transformers as T
from helpers import hf_rewards_alone, pad_batch, randomize_
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tl_reward import errors, load_reward_model

TOL = 1e-4
VOCAB = 50
EOS = 1
KEPT_ACTS = ["silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "gelu_fast"]
ACTS = KEPT_ACTS * 3 + ["quick_gelu", "tanh"]  # and two that TransformerLens lacks
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def common(draw) -> dict:
    """What every family shares: ids, labels, pad id absent / equal to eos / distinct."""
    pad = draw(st.sampled_from([None, EOS, 3]))
    return dict(vocab_size=VOCAB, num_labels=draw(st.integers(1, 3)), eos_token_id=EOS,
                bos_token_id=2, pad_token_id=pad,
                tie_word_embeddings=draw(st.booleans()))


@st.composite
def llama_like(draw, cls, **family) -> T.PretrainedConfig:
    n_heads = draw(st.sampled_from([1, 2, 4]))
    n_kv = draw(st.sampled_from([k for k in (1, 2, 4) if n_heads % k == 0]))  # MQA, GQA, MHA
    head_dim = draw(st.sampled_from([4, 6, 8]))
    hidden = draw(st.sampled_from([8, 16, 24]))
    intermediate = draw(st.sampled_from([hidden, 12, 40]))  # square and not
    theta = draw(st.sampled_from([100.0, 10000.0, 500000.0]))
    rope: dict = {"rope_type": "default", "rope_theta": theta}
    if draw(st.booleans()) and family.pop("_llama3", False):
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": draw(st.sampled_from([2.0, 8.0])),
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": draw(st.sampled_from([4, 16]))}
    family.pop("_llama3", None)
    kwargs = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=draw(st.integers(1, 3)),
                  num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
                  max_position_embeddings=32, rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])),
                  hidden_act=draw(st.sampled_from(ACTS)), rope_parameters=rope)
    kwargs |= draw(common()) | family
    return cls(**kwargs)


def _windows(draw, n_layers_hint: int = 3) -> dict:
    return dict(sliding_window=draw(st.sampled_from([None, 2, 3, 5])),
                layer_types=draw(st.sampled_from([None, "alternate", "random"])))


@st.composite
def configs(draw, family: str) -> T.PretrainedConfig:
    b = st.booleans()
    rare = st.sampled_from([False, False, False, True])  # options tl_reward refuses: drawn less
    if family == "llama":
        return draw(llama_like(T.LlamaConfig, _llama3=True, attention_bias=draw(rare), mlp_bias=draw(rare)))
    if family == "mistral":
        cfg = draw(llama_like(T.MistralConfig, sliding_window=draw(st.sampled_from([None, 2, 3, 5]))))
        if draw(b):  # Mistral's forward never reads layer_types: the window applies everywhere
            cfg.layer_types = [draw(st.sampled_from(["sliding_attention", "full_attention"]))
                               for _ in range(cfg.num_hidden_layers)]
        return cfg
    if family in ("qwen2", "qwen3"):
        cls = T.Qwen2Config if family == "qwen2" else T.Qwen3Config
        extra = {"attention_bias": draw(rare)} if family == "qwen3" else {}
        return draw(llama_like(cls, use_sliding_window=draw(b), sliding_window=draw(st.sampled_from([2, 3, 5])),
                               max_window_layers=draw(st.integers(0, 3)), **extra))
    if family == "gemma":
        return draw(llama_like(T.GemmaConfig, attention_bias=draw(rare)))
    if family == "gemma2":
        cfg = draw(llama_like(
            T.Gemma2Config, hidden_activation=draw(st.sampled_from(ACTS)),
            sliding_window=draw(st.sampled_from([2, 3, 5])),
            attn_logit_softcapping=draw(st.sampled_from([None, 2.0, 50.0])),
            final_logit_softcapping=draw(st.sampled_from([None, 3.0])),
            query_pre_attn_scalar=draw(st.sampled_from([4, 16, 24]))))
        if draw(b):
            cfg.layer_types = [draw(st.sampled_from(["sliding_attention", "full_attention"]))
                               for _ in range(cfg.num_hidden_layers)]
        return cfg
    if family == "phi3":
        cfg = draw(llama_like(T.Phi3Config, sliding_window=draw(st.sampled_from([None, 2, 3, 5]))))
        pcts = [0.5, 0.6, 0.75, 1.0]
        if not draw(rare):  # odd rotary dimensions are refused: drawn less
            pcts = [p for p in pcts if int(cfg.head_dim * p) % 2 == 0]
        pct = draw(st.sampled_from(pcts))
        rope = {"rope_type": "default", "rope_theta": draw(st.sampled_from([100.0, 10000.0])),
                "partial_rotary_factor": pct}
        if draw(b):  # LongRoPE (Phi-3.5, Phi-4-mini): one factor per frequency
            n = int(cfg.head_dim * pct) // 2
            factors = st.lists(st.sampled_from([1.0, 1.25, 2.0, 6.0]), min_size=n, max_size=n)
            cfg.original_max_position_embeddings = 16  # within it the short factors hold
            rope |= {"rope_type": "longrope", "short_factor": draw(factors),
                     "long_factor": draw(factors), "original_max_position_embeddings": 16}
        cfg.rope_parameters = rope
        return cfg
    if family == "mixtral":
        n_experts = draw(st.integers(1, 4))
        return draw(llama_like(
            T.MixtralConfig, sliding_window=draw(st.sampled_from([None, 2, 3, 5])),
            num_local_experts=n_experts, num_experts_per_tok=draw(st.integers(1, n_experts)),
            router_jitter_noise=draw(st.sampled_from([0.0, 0.1]))))
    if family == "olmo2":
        cfg = draw(llama_like(T.Olmo2Config, attention_bias=draw(rare)))
        if not draw(rare):  # TransformerLens's q/k norms need heads * head_dim == hidden_size
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        return cfg
    if family == "gemma3_text":
        cfg = draw(llama_like(
            T.Gemma3TextConfig, hidden_activation=draw(st.sampled_from(ACTS)),
            sliding_window=draw(st.sampled_from([2, 3, 5])),
            attn_logit_softcapping=draw(st.sampled_from([None, 2.0])),
            query_pre_attn_scalar=draw(st.sampled_from([4, 16, 24])),
            rope_parameters={
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": draw(st.sampled_from([100.0, 10000.0]))},
                "full_attention": draw(st.sampled_from([
                    {"rope_type": "default", "rope_theta": 1e6},
                    {"rope_type": "linear", "rope_theta": 1e4, "factor": 8.0}]))}))
        cfg.layer_types = [draw(st.sampled_from(["sliding_attention", "full_attention"]))
                           for _ in range(cfg.num_hidden_layers)]
        return cfg
    if family == "gptj":
        n_head = draw(st.sampled_from([1, 2, 4]))
        d_head = draw(st.sampled_from([4, 8, 12]))
        return T.GPTJConfig(
            n_embd=n_head * d_head, n_head=n_head, n_layer=draw(st.integers(1, 3)), n_positions=32,
            n_inner=draw(st.sampled_from([None, n_head * d_head, 20])),
            rotary_dim=draw(st.sampled_from([2, 4, d_head, 3])),
            activation_function=draw(st.sampled_from(ACTS)),
            layer_norm_epsilon=draw(st.sampled_from([1e-5, 0.1])), **draw(common()))
    if family == "phi":
        n_heads = draw(st.sampled_from([1, 2, 4]))
        hidden = n_heads * draw(st.sampled_from([8, 12, 16]))
        return T.PhiConfig(
            hidden_size=hidden, num_attention_heads=n_heads, num_hidden_layers=draw(st.integers(1, 3)),
            intermediate_size=draw(st.sampled_from([hidden, 20])), max_position_embeddings=32,
            hidden_act=draw(st.sampled_from(ACTS)), qk_layernorm=draw(rare),
            layer_norm_eps=draw(st.sampled_from([1e-5, 0.1])),
            rope_parameters={"rope_type": "default", "rope_theta": draw(st.sampled_from([100.0, 1e4])),
                             "partial_rotary_factor": draw(st.sampled_from([0.25, 0.4, 0.5, 1.0]))},
            **draw(common()))
    if family == "opt":
        n_heads = draw(st.sampled_from([1, 2, 4]))
        hidden = n_heads * draw(st.sampled_from([4, 8, 12]))
        off = draw(st.sampled_from([None] * 4 + ["do_layer_norm_before", "enable_bias"]))
        return T.OPTConfig(
            hidden_size=hidden, word_embed_proj_dim=hidden, num_attention_heads=n_heads,
            num_hidden_layers=draw(st.integers(1, 3)), ffn_dim=draw(st.sampled_from([hidden, 20])),
            max_position_embeddings=32, activation_function=draw(st.sampled_from(ACTS)),
            do_layer_norm_before=off != "do_layer_norm_before", enable_bias=off != "enable_bias",
            **draw(common()))
    if family == "gpt2":
        n_head = draw(st.sampled_from([1, 2, 4]))
        n_embd = n_head * draw(st.sampled_from([4, 6, 8]))
        return T.GPT2Config(
            n_embd=n_embd, n_head=n_head, n_layer=draw(st.integers(1, 3)), n_positions=32,
            n_inner=draw(st.sampled_from([None, n_embd, 20])), activation_function=draw(st.sampled_from(ACTS)),
            scale_attn_weights=draw(b), scale_attn_by_inverse_layer_idx=draw(b),
            reorder_and_upcast_attn=draw(b), layer_norm_epsilon=draw(st.sampled_from([1e-5, 0.1])),
            **draw(common()))
    if family == "gpt_neox":
        n_heads = draw(st.sampled_from([1, 2, 4]))
        hidden = n_heads * draw(st.sampled_from([8, 12, 16]))
        return T.GPTNeoXConfig(
            hidden_size=hidden, num_attention_heads=n_heads, num_hidden_layers=draw(st.integers(1, 3)),
            intermediate_size=draw(st.sampled_from([hidden, 20])), max_position_embeddings=32,
            hidden_act=draw(st.sampled_from(ACTS)), use_parallel_residual=draw(b),
            attention_bias=not draw(rare), layer_norm_eps=draw(st.sampled_from([1e-5, 0.1])),
            rope_parameters={"rope_type": "default", "rope_theta": draw(st.sampled_from([100.0, 10000.0])),
                             "partial_rotary_factor": draw(st.sampled_from([0.25, 0.3, 0.33, 0.5, 1.0]))},
            **draw(common()))
    if family == "gpt_neo":
        n_heads = draw(st.sampled_from([1, 2, 4]))
        hidden = n_heads * draw(st.sampled_from([4, 8, 12]))
        n_layers = draw(st.integers(1, 3))
        kinds = [draw(st.sampled_from(["global", "local"])) for _ in range(n_layers)]
        return T.GPTNeoConfig(
            hidden_size=hidden, num_heads=n_heads, num_layers=n_layers,
            attention_types=[[[k], 1] for k in kinds], window_size=draw(st.sampled_from([1, 2, 3, 5, 32])),
            intermediate_size=draw(st.sampled_from([None, hidden, 20])), max_position_embeddings=32,
            activation_function=draw(st.sampled_from(ACTS)),
            layer_norm_epsilon=draw(st.sampled_from([1e-5, 0.1])), **draw(common()))
    if family == "bloom":
        n_head = draw(st.sampled_from([1, 2, 4, 8, 3]))  # 3: refused (ALiBi slopes differ)
        return T.BloomConfig(
            hidden_size=n_head * draw(st.sampled_from([4, 8, 12])), n_head=n_head,
            n_layer=draw(st.integers(1, 3)), layer_norm_epsilon=draw(st.sampled_from([1e-5, 0.1])),
            apply_residual_connection_post_layernorm=draw(rare),
            pretraining_tp=draw(st.sampled_from([1, 2])), slow_but_exact=draw(b), **draw(common()))
    if family == "olmo":
        cfg = draw(llama_like(T.OlmoConfig, attention_bias=draw(rare),
                              clip_qkv=draw(st.sampled_from([None, 0.3, 2.0, 8.0]))))
        del cfg.rms_norm_eps  # OLMo's LayerNorm has a fixed eps, no such key
        return cfg
    if family == "olmo3":
        cfg = draw(llama_like(
            T.Olmo3Config, attention_bias=draw(rare), sliding_window=draw(st.sampled_from([2, 3, 5])),
            rope_parameters={
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": draw(st.sampled_from([100.0, 10000.0]))},
                "full_attention": draw(st.sampled_from([
                    {"rope_type": "default", "rope_theta": 1e4},
                    {"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0,
                     "original_max_position_embeddings": 16},
                    {"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0, "beta_fast": 16.0,
                     "original_max_position_embeddings": 8, "attention_factor": 1.3},
                    {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}]))}))
        if not draw(rare):  # TransformerLens's q/k norms need heads * head_dim == hidden_size
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        cfg.layer_types = [draw(st.sampled_from(["sliding_attention", "full_attention"]))
                           for _ in range(cfg.num_hidden_layers)]
        return cfg
    if family == "gpt_oss":
        n_experts = draw(st.integers(1, 4))
        rope = draw(st.sampled_from([
            {"rope_type": "default", "rope_theta": 1e4},
            {"rope_type": "yarn", "rope_theta": 1.5e5, "factor": 32.0, "beta_fast": 32.0,
             "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 16},
            {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
             "original_max_position_embeddings": 8}]))
        cfg = draw(llama_like(
            T.GptOssConfig, sliding_window=draw(st.sampled_from([2, 3, 5])),
            num_local_experts=n_experts, num_experts_per_tok=draw(st.integers(1, n_experts)),
            attention_bias=not draw(rare),
            swiglu_limit=draw(st.sampled_from([7.0, 7.0, 7.0, 1.0])), rope_parameters=rope))
        cfg.layer_types = [draw(st.sampled_from(["sliding_attention", "full_attention"]))
                           for _ in range(cfg.num_hidden_layers)]
        return cfg
    raise KeyError(family)


@st.composite
def sequences(draw, pad_id) -> list[list[int]]:
    seqs = []
    for _ in range(4):
        # at least one token that is not the pad id: a row of pads has nothing to score
        seq = draw(st.lists(st.integers(2, VOCAB - 1).filter(lambda t: t != pad_id),
                            min_size=1, max_size=9))
        if pad_id is not None and draw(st.booleans()):
            seq = seq + [pad_id]  # a trailing pad/eos id: HF pools the token before it
        seqs.append(seq)
    return seqs


def _check(config, seqs, fold_ln: bool, center: bool, outcomes: list[str]) -> None:
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    try:
        hf = T.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
        hf = randomize_(hf, 0).eval()
        truth = hf_rewards_alone(hf, seqs)
    except Exception:  # noqa: BLE001 - a config the HF model itself cannot build or run
        outcomes.append("hf cannot run it")
        assume(False)
    layer_norm = config.model_type in ("gpt2", "gpt_neox", "gptj", "opt", "phi", "gpt_neo", "bloom",
                                       "olmo")
    post_norm = config.model_type in ("olmo2", "olmo3")  # fold_ln refused (tested in test_loading)
    kwargs = {"fold_ln": fold_ln and not post_norm, "center_writing_weights": center and layer_norm}
    try:
        model = load_reward_model(hf, **kwargs)
    except errors.UnsupportedConfigError as err:
        outcomes.append(f"refused: {str(err).split(' cannot')[0]}")
        return  # refused, with its reason: allowed
    for side in ("right", "left"):
        tokens, mask = pad_batch(seqs, side)
        with torch.no_grad():
            out = model(tokens, attention_mask=mask)
        out = out if out.ndim == 2 else out[:, None]
        torch.testing.assert_close(out, truth, atol=TOL, rtol=0, msg=f"{side} {kwargs}")
    outcomes.append("matches HF")


NEWER = ["phi3", "mixtral", "olmo2", "gemma3_text", "gptj", "opt", "phi", "gpt_neo", "bloom",
         "olmo", "olmo3", "gpt_oss"]  # fewer draws each: the suite's time budget
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2", "gpt_neox", *NEWER]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_random_configs_match_hf_or_are_refused(family):
    outcomes: list[str] = []

    @(settings(SETTINGS, max_examples=10) if family in NEWER else SETTINGS)
    @given(data=st.data())
    def run(data):
        config = data.draw(configs(family))
        seqs = data.draw(sequences(config.pad_token_id))
        _check(config, seqs, data.draw(st.booleans()), data.draw(st.booleans()), outcomes)

    run()
    counts = Counter(outcomes)
    print(family, dict(counts))
    assert counts["matches HF"] >= len(outcomes) // 4, counts  # the draws mostly compare
