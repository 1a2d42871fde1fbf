"""Adapters for OLMo-1 (LayerNorm without weights or biases, optional clamping of the query, key
and value projections) and OLMo-2 (RMSNorm after each sublayer: post-norm, no norm before it, and
RMSNorm on the whole query and key projections). Trunk weights go through TransformerLens's own
converters."""

import math
from typing import Any

import einops
import torch
from torch import Tensor
from transformer_lens.pretrained.weight_conversions import (
    convert_olmo2_weights,
    convert_olmo3_weights,
    convert_olmo_weights,
)

from ._base import Adapter, check_activation, refuse
from .llama_like import LLAMA_KEYS, llama_trunk, rope_only


def olmo_config(hf_config: Any) -> dict[str, Any]:
    if getattr(hf_config, "attention_bias", False):
        raise refuse(
            "attention_bias", True, "it adds biases to the attention projections, and "
            "TransformerLens's OLMo converter drops them",
        )
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
        # transformers' OlmoLayerNorm: no weight, no bias, eps fixed at 1e-5
        "eps": 1e-5,
        "d_vocab": hf_config.vocab_size,
        "act_fn": check_activation("hidden_act", hf_config.hidden_act),
        "normalization_type": "LN",
        "positional_embedding_type": "rotary",
        "rotary_dim": head_dim,
        "rotary_adjacent_pairs": False,
        "gated_mlp": True,
        "clip_qkv": hf_config.clip_qkv,
    }
    rope_only(hf_config, cfg, "OLMo")
    return cfg


def convert_olmo(hf_model: Any, cfg: Any) -> dict[str, Tensor]:
    """TransformerLens's OLMo converter (weightless LayerNorms written as ones and zeros), which
    reads K/V as one head per query head; with grouped key/value heads, the same conversion with
    the grouped layout of TransformerLens's other converters (``_W_K``, ``_W_V``, zero biases)."""
    if cfg.n_key_value_heads is None:
        return convert_olmo_weights(hf_model, cfg)
    trunk = hf_model.model
    state: dict[str, Tensor] = {"embed.W_E": trunk.embed_tokens.weight}
    for i, layer in enumerate(trunk.layers):
        p = f"blocks.{i}."
        state |= _grouped_layer(layer, p, cfg)
        for ln in ("ln1", "ln2"):  # OLMo's LayerNorms have no weights: the identity ones
            state |= {p + f"{ln}.w": torch.ones(cfg.d_model, dtype=cfg.dtype),
                      p + f"{ln}.b": _zeros(cfg, cfg.d_model)}
    state |= {"ln_final.w": torch.ones(cfg.d_model, dtype=cfg.dtype),
              "ln_final.b": _zeros(cfg, cfg.d_model)}
    return state


def _heads(w: Tensor, n: int) -> Tensor:
    return einops.rearrange(w, "(n h) m -> n m h", n=n)


def _zeros(cfg: Any, *shape: int) -> Tensor:
    return torch.zeros(*shape, dtype=cfg.dtype)


def _grouped_layer(layer: Any, p: str, cfg: Any) -> dict[str, Tensor]:
    """One bias-free OLMo(-2/-3) layer's attention and gated MLP in TransformerLens's grouped
    key/value layout (``_W_K``, ``_W_V``, zero biases), under the key prefix ``p``."""
    n_kv, attn, mlp = cfg.n_key_value_heads, layer.self_attn, layer.mlp
    return {
        p + "attn.W_Q": _heads(attn.q_proj.weight, cfg.n_heads),
        p + "attn._W_K": _heads(attn.k_proj.weight, n_kv),
        p + "attn._W_V": _heads(attn.v_proj.weight, n_kv),
        p + "attn.b_Q": _zeros(cfg, cfg.n_heads, cfg.d_head),
        p + "attn._b_K": _zeros(cfg, n_kv, cfg.d_head),
        p + "attn._b_V": _zeros(cfg, n_kv, cfg.d_head),
        p + "attn.W_O": einops.rearrange(attn.o_proj.weight, "m (n h) -> n h m", n=cfg.n_heads),
        p + "attn.b_O": _zeros(cfg, cfg.d_model),
        p + "mlp.W_in": mlp.up_proj.weight.T,
        p + "mlp.W_gate": mlp.gate_proj.weight.T,
        p + "mlp.b_in": _zeros(cfg, cfg.d_mlp),
        p + "mlp.W_out": mlp.down_proj.weight.T,
        p + "mlp.b_out": _zeros(cfg, cfg.d_model),
    }


def olmo2_config(hf_config: Any) -> dict[str, Any]:
    if getattr(hf_config, "attention_bias", False):
        raise refuse(
            "attention_bias", True, "it adds biases to the attention projections, and "
            "TransformerLens's OLMo-2 converter drops them",
        )
    cfg = llama_trunk(hf_config)
    if cfg["n_heads"] * cfg["d_head"] != cfg["d_model"]:
        raise refuse(
            "head_dim", cfg["d_head"], f"num_attention_heads * head_dim = "
            f"{cfg['n_heads'] * cfg['d_head']} differs from hidden_size = {cfg['d_model']}; "
            "TransformerLens's OLMo-2 query/key norm has hidden_size weights",
        )
    rope_only(hf_config, cfg, "OLMo-2")
    return cfg


def convert_olmo2(hf_model: Any, cfg: Any) -> dict[str, Tensor]:
    """TransformerLens's OLMo-2 converter, which reads K/V as one head per query head; with
    grouped key/value heads (OLMo-2 32B) the same conversion with the grouped layout of
    TransformerLens's other converters (``_W_K``, ``_W_V``, zero ``_b_K``, ``_b_V``)."""
    if cfg.n_key_value_heads is None:
        return convert_olmo2_weights(hf_model, cfg)
    trunk = hf_model.model
    state: dict[str, Tensor] = {"embed.W_E": trunk.embed_tokens.weight}
    for i, layer in enumerate(trunk.layers):
        p = f"blocks.{i}."
        state |= _grouped_layer(layer, p, cfg) | {
            p + "attn.q_norm.w": layer.self_attn.q_norm.weight,
            p + "attn.k_norm.w": layer.self_attn.k_norm.weight,
            # post-norm: TransformerLens's ln1 / ln2 are OLMo-2's norms after each sublayer
            p + "ln1.w": layer.post_attention_layernorm.weight,
            p + "ln2.w": layer.post_feedforward_layernorm.weight,
        }
    state["ln_final.w"] = trunk.norm.weight
    return state


def olmo3_config(hf_config: Any) -> dict[str, Any]:
    """OLMo-2's block with per-layer sliding windows (``layer_types``) and one RoPE per layer
    type: the sliding layers' plain, the full-attention layers' plain or YaRN-scaled (as the
    OLMo-3 releases), each reproduced by TransformerLens's rotary tables."""
    if getattr(hf_config, "attention_bias", False):
        raise refuse(
            "attention_bias", True, "it adds biases to the attention projections, and "
            "TransformerLens's OLMo-3 converter drops them",
        )
    cfg = llama_trunk(hf_config)
    if cfg["n_heads"] * cfg["d_head"] != cfg["d_model"]:
        raise refuse(
            "head_dim", cfg["d_head"], f"num_attention_heads * head_dim = "
            f"{cfg['n_heads'] * cfg['d_head']} differs from hidden_size = {cfg['d_model']}; "
            "TransformerLens's OLMo-3 query/key norm has hidden_size weights",
        )
    # TransformerLens's OLMo-3 converter writes grouped K/V weights whenever this is set
    cfg["n_key_value_heads"] = hf_config.num_key_value_heads
    per_type = dict(getattr(hf_config, "rope_parameters", None) or {})
    for layer_type, kept in (("sliding_attention", ("default",)),
                             ("full_attention", ("default", "yarn"))):
        params = per_type.get(layer_type) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type not in kept:
            raise refuse(
                f"rope_parameters.{layer_type}.rope_type", rope_type, "it rescales the rotary "
                f"position frequencies of the {layer_type} layers; TransformerLens reproduces "
                f"only {' and '.join(repr(k) for k in kept)} RoPE there for OLMo-3",
            )
        if layer_type == "sliding_attention":
            cfg["rotary_base_local"] = params["rope_theta"]
            continue
        cfg["rotary_base"] = params["rope_theta"]
        if rope_type == "yarn":
            factor = float(params["factor"])
            attention_factor = params.get("attention_factor")
            if attention_factor is None:  # transformers' default, get_mscale(factor)
                attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
            if params.get("mscale") or params.get("mscale_all_dim"):
                raise refuse(
                    "rope_parameters.full_attention.mscale", params.get("mscale"), "it changes "
                    "YaRN's attention factor in a way TransformerLens's YaRN does not compute",
                )
            cfg |= {
                "use_yarn_rope": True, "yarn_global_attn_only": True,
                "yarn_factor": factor, "yarn_attention_factor": float(attention_factor),
                "yarn_beta_fast": float(params.get("beta_fast") or 32.0),
                "yarn_beta_slow": float(params.get("beta_slow") or 1.0),
                "yarn_original_max_position_embeddings": params.get(
                    "original_max_position_embeddings", hf_config.max_position_embeddings),
                "yarn_truncate": params.get("truncate", True),
            }
    if "local" not in cfg.get("attn_types", []):  # TransformerLens's local base needs local layers
        cfg.pop("rotary_base_local")
    return cfg


ADAPTERS = (
    Adapter(
        "olmo", "OlmoForCausalLM", "model", olmo_config, convert_olmo,
        (LLAMA_KEYS - {"rms_norm_eps", "mlp_bias"}) | {"clip_qkv"},
    ),
    Adapter(
        "olmo2", "Olmo2ForCausalLM", "model", olmo2_config, convert_olmo2,
        LLAMA_KEYS,
    ),
    Adapter(
        "olmo3", "Olmo3ForCausalLM", "model", olmo3_config, convert_olmo3_weights,
        LLAMA_KEYS | {"sliding_window", "layer_types"},
    ),
)
