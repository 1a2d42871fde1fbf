"""Adapters for Phi-3 (pre-RMSNorm, fused QKV and gate/up projections, LongRoPE) and Phi-1/2
(parallel attention and MLP under one LayerNorm, partial rotary). Trunk weights go through
TransformerLens's own converters."""

import math
from typing import Any

import torch
from torch import Tensor
from transformer_lens.pretrained.weight_conversions import convert_phi3_weights, convert_phi_weights

from ._base import Adapter, check_activation, refuse, rope_parameters
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


def phi_config(hf_config: Any) -> dict[str, Any]:
    if getattr(hf_config, "qk_layernorm", False):
        raise refuse(
            "qk_layernorm", True, "it adds a LayerNorm on each query and key head, which "
            "TransformerLens's Phi converter does not read",
        )
    n_heads = hf_config.num_attention_heads
    d_head = hf_config.hidden_size // n_heads
    head_dim = getattr(hf_config, "head_dim", None) or d_head
    if head_dim != d_head:
        raise refuse(
            "head_dim", head_dim, f"TransformerLens's Phi converter reads heads of hidden_size // "
            f"num_attention_heads = {d_head} dimensions",
        )
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    if n_kv != n_heads:
        raise refuse(
            "num_key_value_heads", n_kv, f"it groups the key and value heads ({n_heads} query "
            "heads); TransformerLens's Phi converter reads one key and value head per query head",
        )
    params = rope_parameters(hf_config)
    if params["rope_type"] != "default":
        raise refuse(
            "rope_parameters.rope_type", params["rope_type"], "it rescales the rotary position "
            "frequencies; TransformerLens reproduces only 'default' RoPE for Phi",
        )
    return {
        "d_model": hf_config.hidden_size,
        "d_head": d_head,
        "n_heads": n_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": hf_config.layer_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": check_activation("hidden_act", hf_config.hidden_act),
        "normalization_type": "LN",
        "positional_embedding_type": "rotary",
        "rotary_base": params["rope_theta"],
        "rotary_dim": partial_rotary_dim(
            "rope_parameters.partial_rotary_factor", params.get("partial_rotary_factor", 1.0),
            d_head,
        ),
        "rotary_adjacent_pairs": False,
        "parallel_attn_mlp": True,
    }


def convert_phi3(hf_model: Any, cfg: Any) -> dict[str, Any]:
    state = convert_phi3_weights(hf_model, cfg)
    # TransformerLens writes zero norm biases of the wrong length ([d_vocab]); RMSNorm has none
    return {k: v for k, v in state.items() if not k.endswith((".ln1.b", ".ln2.b"))}


ADAPTERS = (
    Adapter(
        "phi", "PhiForCausalLM", "model", phi_config, convert_phi_weights,
        frozenset({"hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                   "intermediate_size", "num_hidden_layers", "max_position_embeddings",
                   "layer_norm_eps", "vocab_size", "hidden_act", "qk_layernorm",
                   "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor"}),
    ),
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
