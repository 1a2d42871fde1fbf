"""Adapters for the Llama family: Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma, Gemma-2, Gemma-3
(text).

They share pre-RMSNorm blocks, rotary positions, gated MLPs and (optionally) grouped-query
attention; each adapter adds only what differs. Trunk weights go through TransformerLens's own
converters.
"""

from typing import Any

from transformer_lens.pretrained.weight_conversions import (
    convert_gemma_weights,
    convert_llama_weights,
    convert_mixtral_weights,
    convert_qwen2_weights,
    convert_qwen3_weights,
)

from ._base import Adapter, check_activation, refuse, rope_parameters

LLAMA_KEYS = frozenset(
    {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
        "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_scaling",
        "rope_theta", "attention_bias", "mlp_bias",
    }
)


def _rope(
    hf_config: Any, cfg: dict[str, Any], *, allow_llama3: bool, family: str = "this family"
) -> None:
    params = rope_parameters(hf_config)
    rope_type = params["rope_type"]
    cfg["rotary_base"] = params["rope_theta"]
    if rope_type == "default":
        return
    if rope_type == "llama3" and allow_llama3:
        pct = params.get("partial_rotary_factor", 1.0)
        if pct != 1.0:
            raise refuse(
                "rope_parameters.partial_rotary_factor", pct, "with llama3 RoPE it computes "
                "frequencies for part of each head, which transformers' Llama attention then "
                "applies to the whole head (it fails to run); TransformerLens rotates whole heads",
            )
        cfg["use_NTK_by_parts_rope"] = True
        cfg["NTK_original_ctx_len"] = params.get(
            "original_max_position_embeddings", hf_config.max_position_embeddings
        )
        cfg["NTK_by_parts_low_freq_factor"] = params.get("low_freq_factor", 1.0)
        cfg["NTK_by_parts_high_freq_factor"] = params.get("high_freq_factor", 4.0)
        cfg["NTK_by_parts_factor"] = params.get("factor", 1.0)
        return
    kept = "'default' and (for Llama) 'llama3'" if allow_llama3 else "'default'"
    raise refuse(
        "rope_parameters.rope_type", rope_type, f"it rescales the rotary position frequencies "
        f"(RoPE scaling '{rope_type}'); TransformerLens reproduces only {kept} for {family}",
    )


def rope_only(hf_config: Any, cfg: dict[str, Any], family: str) -> None:
    """Default RoPE only (the rotary base into ``cfg``); any scaling is refused."""
    _rope(hf_config, cfg, allow_llama3=False, family=family)


def _attention_layout(hf_config: Any, cfg: dict[str, Any], *, per_layer: bool) -> None:
    """Sliding-window layers as the installed HF forward applies them.

    ``per_layer``: the family's attention reads ``layer_types`` (Qwen2, Qwen3, Gemma-2); else
    (Mistral) ``sliding_window`` applies to every layer whatever ``layer_types`` says.
    """
    window = getattr(hf_config, "sliding_window", None)
    if per_layer:
        layer_types = list(getattr(hf_config, "layer_types", None) or ["full_attention"] * cfg["n_layers"])
    else:
        layer_types = ["full_attention" if window is None else "sliding_attention"] * cfg["n_layers"]
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise refuse(
            "layer_types", sorted(unknown), "only sliding_attention and full_attention layers are "
            "converted"
        )
    if len(layer_types) != cfg["n_layers"]:
        raise refuse(
            "layer_types", layer_types, f"it names {len(layer_types)} layers for "
            f"num_hidden_layers={cfg['n_layers']}"
        )
    if "sliding_attention" in layer_types:
        if window is None:
            raise refuse(
                "sliding_window", None, "layer_types has sliding_attention layers but no window "
                "size (the HF model cannot run either)"
            )
        cfg["use_local_attn"] = True
        cfg["window_size"] = window
        cfg["attn_types"] = [
            "local" if t == "sliding_attention" else "global" for t in layer_types
        ]


def llama_trunk(
    hf_config: Any, *, act_key: str | None = "hidden_act", per_layer_windows: bool = True
) -> dict[str, Any]:
    """HookedTransformerConfig keywords shared by the family (``act_key=None``: the family's
    MLP has its own activation, and reads no activation key)."""
    n_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    cfg: dict[str, Any] = {
        "d_model": hf_config.hidden_size,
        "d_head": head_dim,
        "n_heads": n_heads,
        "n_key_value_heads": n_kv if n_kv != n_heads else None,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": hf_config.rms_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": "silu" if act_key is None else check_activation(act_key, getattr(hf_config, act_key)),
        "normalization_type": "RMS",
        "positional_embedding_type": "rotary",
        "rotary_dim": head_dim,
        "rotary_adjacent_pairs": False,
        "final_rms": True,
        "gated_mlp": True,
    }
    _attention_layout(hf_config, cfg, per_layer=per_layer_windows)
    return cfg


def _no_biases(hf_config: Any, *keys: str) -> None:
    for key in keys:
        if getattr(hf_config, key, False):
            raise refuse(
                key, True, f"it adds biases to the {key.split('_')[0]} projections, and "
                "TransformerLens's weight converter for this family drops them",
            )


def llama_config(hf_config: Any) -> dict[str, Any]:
    _no_biases(hf_config, "attention_bias", "mlp_bias")
    cfg = llama_trunk(hf_config)
    _rope(hf_config, cfg, allow_llama3=True)
    return cfg


def mistral_config(hf_config: Any) -> dict[str, Any]:
    # transformers' Mistral applies sliding_window to every layer; it never reads layer_types.
    cfg = llama_trunk(hf_config, per_layer_windows=False)
    _rope(hf_config, cfg, allow_llama3=False)
    return cfg


def mixtral_config(hf_config: Any) -> dict[str, Any]:
    # Mistral's trunk with a sparse mixture of gated-MLP experts in place of the MLP
    cfg = mistral_config(hf_config)
    # TransformerLens's Mixtral converter always writes grouped K/V weights.
    cfg["n_key_value_heads"] = hf_config.num_key_value_heads
    cfg["num_experts"] = hf_config.num_local_experts
    cfg["experts_per_token"] = hf_config.num_experts_per_tok
    # transformers' Mixtral router always renormalises the top-k weights to sum to 1
    cfg["norm_topk_prob"] = True
    return cfg


def qwen2_config(hf_config: Any) -> dict[str, Any]:
    cfg = llama_trunk(hf_config)
    # TransformerLens's Qwen2 converter always writes grouped K/V weights.
    cfg["n_key_value_heads"] = hf_config.num_key_value_heads
    _rope(hf_config, cfg, allow_llama3=False)
    return cfg


def qwen3_config(hf_config: Any) -> dict[str, Any]:
    _no_biases(hf_config, "attention_bias")
    cfg = llama_trunk(hf_config)
    cfg["use_qk_norm"] = True
    _rope(hf_config, cfg, allow_llama3=False)
    return cfg


def gemma_config(hf_config: Any, *, rope: bool = True) -> dict[str, Any]:
    _no_biases(hf_config, "attention_bias")
    if getattr(hf_config, "use_bidirectional_attention", None):
        raise refuse(
            "use_bidirectional_attention", True, "it makes every token attend to later tokens "
            "too; TransformerLens's attention is causal",
        )
    # transformers' Gemma MLP reads hidden_act, Gemma-2's hidden_activation (each ignores the other)
    act_key = "hidden_act" if hf_config.model_type == "gemma" else "hidden_activation"
    cfg = llama_trunk(hf_config, act_key=act_key)
    # TransformerLens's Gemma converter always writes grouped K/V weights.
    cfg["n_key_value_heads"] = hf_config.num_key_value_heads
    if rope:
        _rope(hf_config, cfg, allow_llama3=False)
    return cfg


def gemma2_config(hf_config: Any, *, rope: bool = True) -> dict[str, Any]:
    cfg = gemma_config(hf_config, rope=rope)
    cfg["use_normalization_before_and_after"] = True
    cfg["attn_scale"] = float(hf_config.query_pre_attn_scalar) ** 0.5
    if hf_config.attn_logit_softcapping:
        cfg["attn_scores_soft_cap"] = float(hf_config.attn_logit_softcapping)
    # final_logit_softcapping is not applied by Gemma2ForSequenceClassification: no cap on the score.
    return cfg


def gemma3_text_config(hf_config: Any) -> dict[str, Any]:
    """Gemma-2's block plus per-head query/key RMSNorm, and one RoPE per layer type (sliding
    layers keep their own base; only the full-attention layers may be linearly scaled)."""
    cfg = gemma2_config(hf_config, rope=False)
    # transformers' Gemma3Attention stores attn_logit_softcapping but never passes it to the
    # attention function: the HF model's scores are not capped, so neither are these.
    cfg.pop("attn_scores_soft_cap", None)
    cfg["use_qk_norm"] = True
    per_type = dict(getattr(hf_config, "rope_parameters", None) or {})
    for layer_type, kept in (("sliding_attention", ("default",)),
                             ("full_attention", ("default", "linear"))):
        params = per_type.get(layer_type) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type not in kept:
            raise refuse(
                f"rope_parameters.{layer_type}.rope_type", rope_type, "it rescales the rotary "
                f"position frequencies of the {layer_type} layers; TransformerLens reproduces "
                f"only {' and '.join(repr(k) for k in kept)} RoPE there for Gemma-3",
            )
        theta = params.get("rope_theta", 10000.0 if layer_type == "sliding_attention" else 1e6)
        if layer_type == "sliding_attention":
            cfg["rotary_base_local"] = theta
        else:
            cfg["rotary_base"] = theta
            if rope_type == "linear":
                cfg["rotary_scaling_factor"] = float(params["factor"])
    if "local" not in cfg.get("attn_types", []):  # TransformerLens's local base needs local layers
        cfg.pop("rotary_base_local")
    return cfg


_QWEN_KEYS = LLAMA_KEYS | {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
_GEMMA_KEYS = LLAMA_KEYS | {"hidden_activation", "use_bidirectional_attention"}

ADAPTERS = (
    Adapter("llama", "LlamaForCausalLM", "model", llama_config, convert_llama_weights, LLAMA_KEYS),
    # Mistral's trunk is Llama's (no biases, GQA) plus a sliding window, which the config carries.
    Adapter(
        "mistral", "MistralForCausalLM", "model", mistral_config, convert_llama_weights,
        LLAMA_KEYS | {"sliding_window", "layer_types"},
    ),
    Adapter(
        "mixtral", "MixtralForCausalLM", "model", mixtral_config, convert_mixtral_weights,
        LLAMA_KEYS | {"sliding_window", "layer_types", "num_local_experts", "num_experts_per_tok"},
        ignored={
            "router_jitter_noise": "noise on the router's input in training mode only",
            "output_router_logits": "whether the router's logits are returned, not the reward",
            "router_aux_loss_coef": "the load-balancing loss in training",
        },
    ),
    Adapter("qwen2", "Qwen2ForCausalLM", "model", qwen2_config, convert_qwen2_weights, _QWEN_KEYS),
    Adapter("qwen3", "Qwen3ForCausalLM", "model", qwen3_config, convert_qwen3_weights, _QWEN_KEYS),
    Adapter("gemma", "GemmaForCausalLM", "model", gemma_config, convert_gemma_weights, _GEMMA_KEYS),
    Adapter(
        "gemma2", "Gemma2ForCausalLM", "model", gemma2_config, convert_gemma_weights,
        _GEMMA_KEYS | {"query_pre_attn_scalar", "sliding_window", "layer_types",
                       "attn_logit_softcapping"},
        ignored={
            "final_logit_softcapping": "only Gemma2ForCausalLM caps its vocabulary logits; "
            "Gemma2ForSequenceClassification's score is not capped",
        },
    ),
    Adapter(
        "gemma3_text", "Gemma3ForCausalLM", "model", gemma3_text_config, convert_gemma_weights,
        _GEMMA_KEYS | {"query_pre_attn_scalar", "sliding_window", "layer_types"},
        ignored={
            "attn_logit_softcapping": "stored by transformers' Gemma3Attention but never passed "
            "to its attention function: the scores are not capped",
            "final_logit_softcapping": "only Gemma3ForCausalLM caps its vocabulary logits; "
            "Gemma3TextForSequenceClassification's score is not capped",
            **dict.fromkeys(
                ("image_token_id", "mm_tokens_per_image", "vision_config",
                 "text_config"),
                "only the multimodal Gemma3 classes (images, their tokens and the vision tower)",
            ),
            "attention_chunk_size": "only create_masks_for_generate (generation, and the "
            "multimodal Gemma3 model)",
        },
    ),
)
