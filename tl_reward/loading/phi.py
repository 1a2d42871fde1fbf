"""Adapters for Phi-3 (pre-RMSNorm, fused QKV and gate/up projections) and Phi (parallel
attention and MLP under one LayerNorm, partial rotary). Trunk weights go through TransformerLens's
own converters."""

from typing import Any

from transformer_lens.pretrained.weight_conversions import convert_phi3_weights

from ._base import Adapter, refuse, rope_parameters
from .llama_like import LLAMA_KEYS, llama_trunk


def partial_rotary_dim(key: str, pct: float, head_dim: int) -> int:
    """The rotary dimension transformers uses, ``int(head_dim * pct)`` (truncated); an odd one is
    refused (transformers rotates one more dimension than it has frequencies for)."""
    rotary_dim = int(head_dim * pct)
    if rotary_dim % 2 or rotary_dim == 0:
        raise refuse(
            key, pct, f"it gives a rotary dimension int({pct} * {head_dim}) = {rotary_dim}, "
            "which is odd or zero; transformers' rotary embedding then does not rotate whole "
            "pairs, which TransformerLens's rotary embedding does not reproduce",
        )
    return rotary_dim


def _default_rope_only(hf_config: Any, family: str) -> dict[str, Any]:
    params = rope_parameters(hf_config)
    if params["rope_type"] != "default":
        raise refuse(
            "rope_parameters.rope_type", params["rope_type"], "it rescales the rotary position "
            f"frequencies (RoPE scaling '{params['rope_type']}'); TransformerLens reproduces only "
            f"'default' RoPE for {family}",
        )
    return params


def phi3_config(hf_config: Any) -> dict[str, Any]:
    params = _default_rope_only(hf_config, "Phi-3")
    # transformers' Phi-3 windows every layer when sliding_window is set (no layer_types)
    cfg = llama_trunk(hf_config, per_layer_windows=False)
    cfg["rotary_base"] = params["rope_theta"]
    cfg["rotary_dim"] = partial_rotary_dim(
        "rope_parameters.partial_rotary_factor", params.get("partial_rotary_factor", 1.0),
        cfg["d_head"],
    )
    return cfg


def convert_phi3(hf_model: Any, cfg: Any) -> dict[str, Any]:
    state = convert_phi3_weights(hf_model, cfg)
    # TransformerLens writes zero norm biases of the wrong length ([d_vocab]); RMSNorm has none
    return {k: v for k, v in state.items() if not k.endswith((".ln1.b", ".ln2.b"))}


ADAPTERS = (
    Adapter(
        "phi3", "Phi3ForCausalLM", "model", phi3_config, convert_phi3,
        (LLAMA_KEYS - {"attention_bias", "mlp_bias"}) | {"sliding_window",
                                                         "partial_rotary_factor"},
        ignored={
            "original_max_position_embeddings": "only generation's choice between the "
            "long and short LongRoPE factors, and LongRoPE is refused",
        },
    ),
)
