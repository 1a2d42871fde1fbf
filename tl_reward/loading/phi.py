"""Adapters for Phi-3 (pre-RMSNorm, fused QKV and gate/up projections) and Phi (parallel
attention and MLP under one LayerNorm, partial rotary). Trunk weights go through TransformerLens's
own converters."""

import math
from typing import Any

import torch
from torch import Tensor
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


def phi3_config(hf_config: Any) -> dict[str, Any]:
    params = rope_parameters(hf_config)
    if params["rope_type"] not in ("default", "longrope"):
        raise refuse(
            "rope_parameters.rope_type", params["rope_type"], "it rescales the rotary position "
            f"frequencies (RoPE scaling '{params['rope_type']}'); tl_reward reproduces only "
            "'default' and 'longrope' RoPE for Phi-3",
        )
    # transformers' Phi-3 windows every layer when sliding_window is set (no layer_types)
    cfg = llama_trunk(hf_config, per_layer_windows=False)
    cfg["rotary_base"] = params["rope_theta"]
    if params["rope_type"] == "longrope":
        # transformers switches to the long factors for a batch whose positions pass the
        # original context; within it (the longest sequence accepted here) the short ones hold
        cfg["n_ctx"] = min(cfg["n_ctx"], params.get(
            "original_max_position_embeddings", hf_config.original_max_position_embeddings))
    cfg["rotary_dim"] = partial_rotary_dim(
        "rope_parameters.partial_rotary_factor", params.get("partial_rotary_factor", 1.0),
        cfg["d_head"],
    )
    return cfg


def longrope_tables(hf_config: Any, cfg: Any) -> tuple[Tensor, Tensor] | None:
    """Phi-3's LongRoPE tables within the original context, as transformers computes them
    (``_compute_longrope_parameters``): per-frequency ``short_factor`` divisors of the default
    inverse frequencies, and cos / sin scaled by the attention factor. ``None`` for default
    RoPE (TransformerLens's own tables are exact)."""
    params = rope_parameters(hf_config)
    if params["rope_type"] != "longrope":
        return None
    dim = cfg.rotary_dim
    original = params.get("original_max_position_embeddings",
                          hf_config.original_max_position_embeddings)
    factor = params.get("factor") or hf_config.max_position_embeddings / original
    scale = params.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = torch.tensor(params["short_factor"], dtype=torch.float32)
    inv_freq = 1.0 / (short * params["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.arange(cfg.n_ctx, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)  # TransformerLens's NeoX-style (2 d) layout
    return angles.sin() * scale, angles.cos() * scale


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
            "original_max_position_embeddings": "only generation's choice between LongRoPE's "
            "long and short factors (the forward's is read from rope_parameters)",
        },
        rotary=longrope_tables,
    ),
)
