"""Adapter for OLMo-2: RMSNorm after each sublayer (post-norm, no norm before it), and RMSNorm
on the whole query and key projections. Trunk weights go through TransformerLens's own
converter."""

from typing import Any

import einops
import torch
from torch import Tensor
from transformer_lens.pretrained.weight_conversions import convert_olmo2_weights

from ._base import Adapter, refuse
from .llama_like import LLAMA_KEYS, llama_trunk, rope_only


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
    n_kv, trunk = cfg.n_key_value_heads, hf_model.model

    def heads(w: Tensor, n: int) -> Tensor:
        return einops.rearrange(w, "(n h) m -> n m h", n=n)

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(*shape, dtype=cfg.dtype)

    state: dict[str, Tensor] = {"embed.W_E": trunk.embed_tokens.weight}
    for i, layer in enumerate(trunk.layers):
        p, attn, mlp = f"blocks.{i}.", layer.self_attn, layer.mlp
        state |= {
            p + "attn.W_Q": heads(attn.q_proj.weight, cfg.n_heads),
            p + "attn._W_K": heads(attn.k_proj.weight, n_kv),
            p + "attn._W_V": heads(attn.v_proj.weight, n_kv),
            p + "attn.b_Q": zeros(cfg.n_heads, cfg.d_head),
            p + "attn._b_K": zeros(n_kv, cfg.d_head),
            p + "attn._b_V": zeros(n_kv, cfg.d_head),
            p + "attn.q_norm.w": attn.q_norm.weight,
            p + "attn.k_norm.w": attn.k_norm.weight,
            p + "attn.W_O": einops.rearrange(attn.o_proj.weight, "m (n h) -> n h m", n=cfg.n_heads),
            p + "attn.b_O": zeros(cfg.d_model),
            # post-norm: TransformerLens's ln1 / ln2 are OLMo-2's norms after each sublayer
            p + "ln1.w": layer.post_attention_layernorm.weight,
            p + "ln2.w": layer.post_feedforward_layernorm.weight,
            p + "mlp.W_in": mlp.up_proj.weight.T,
            p + "mlp.W_gate": mlp.gate_proj.weight.T,
            p + "mlp.b_in": zeros(cfg.d_mlp),
            p + "mlp.W_out": mlp.down_proj.weight.T,
            p + "mlp.b_out": zeros(cfg.d_model),
        }
    state["ln_final.w"] = trunk.norm.weight
    return state


ADAPTERS = (
    Adapter(
        "olmo2", "Olmo2ForCausalLM", "model", olmo2_config, convert_olmo2,
        LLAMA_KEYS,
    ),
)
