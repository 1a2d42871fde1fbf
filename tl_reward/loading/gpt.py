"""Adapters for GPT-2 (absolute positions, LayerNorm), GPT-NeoX (parallel blocks, partial RoPE),
GPT-J (parallel attention and MLP under one LayerNorm, rotary on adjacent pairs), OPT (learned
positions, pre-LayerNorm blocks), GPT-Neo (GPT-2's block, unscaled attention, local and global
layers) and Bloom (ALiBi positions, a LayerNorm on the embeddings)."""

from typing import Any

import torch
from transformer_lens.pretrained.weight_conversions import (
    convert_bloom_weights,
    convert_gpt2_weights,
    convert_gptj_weights,
    convert_neo_weights,
    convert_neox_weights,
    convert_opt_weights,
)

from ._base import Adapter, check_activation, refuse, rope_parameters

_DROPOUT_WHY = "dropout, off in eval mode"


def gpt2_config(hf_config: Any) -> dict[str, Any]:
    if getattr(hf_config, "add_cross_attention", False):
        raise refuse(
            "add_cross_attention", True, "it adds cross-attention to an encoder's states to each "
            "block; TransformerLens's GPT-2 has none",
        )
    return {
        "d_model": hf_config.n_embd,
        "d_head": hf_config.n_embd // hf_config.n_head,
        "n_heads": hf_config.n_head,
        "d_mlp": hf_config.n_inner or 4 * hf_config.n_embd,
        "n_layers": hf_config.n_layer,
        "n_ctx": hf_config.n_positions,
        "eps": hf_config.layer_norm_epsilon,
        "d_vocab": hf_config.vocab_size,
        "act_fn": check_activation("activation_function", hf_config.activation_function),
        "use_attn_scale": hf_config.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": hf_config.scale_attn_by_inverse_layer_idx,
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
    }


def neox_config(hf_config: Any) -> dict[str, Any]:
    if not getattr(hf_config, "attention_bias", True):
        raise refuse(
            "attention_bias", False, "it removes the attention projections' biases, which "
            "TransformerLens's GPT-NeoX converter reads",
        )
    params = rope_parameters(hf_config)
    if params["rope_type"] != "default":
        raise refuse(
            "rope_parameters.rope_type", params["rope_type"], "it rescales the rotary position "
            "frequencies; TransformerLens reproduces only 'default' RoPE for GPT-NeoX",
        )
    d_head = hf_config.hidden_size // hf_config.num_attention_heads
    rope_head_dim = getattr(hf_config, "head_dim", None) or d_head
    if rope_head_dim != d_head:
        raise refuse(
            "head_dim", rope_head_dim, f"GPT-NeoX attention heads have hidden_size // "
            f"num_attention_heads = {d_head} dimensions; a different head_dim changes only the "
            "rotary frequencies, which TransformerLens cannot express"
        )
    pct = params.get("partial_rotary_factor", 1.0)
    rotary_dim = int(rope_head_dim * pct)  # transformers truncates
    if rotary_dim % 2:
        raise refuse(
            "rope_parameters.partial_rotary_factor", pct, f"it gives an odd rotary dimension "
            f"int({pct} * {rope_head_dim}) = {rotary_dim}; transformers then rotates "
            f"{rotary_dim + 1} dimensions with frequencies computed for {rotary_dim}, which "
            "TransformerLens's rotary embedding does not reproduce"
        )
    return {
        "d_model": hf_config.hidden_size,
        "d_head": d_head,
        "n_heads": hf_config.num_attention_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": hf_config.layer_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": check_activation("hidden_act", hf_config.hidden_act),
        "parallel_attn_mlp": hf_config.use_parallel_residual,
        "positional_embedding_type": "rotary",
        "rotary_dim": rotary_dim,
        "rotary_base": params["rope_theta"],
        "rotary_adjacent_pairs": False,
        "normalization_type": "LN",
    }


def gptj_config(hf_config: Any) -> dict[str, Any]:
    d_head = hf_config.n_embd // hf_config.n_head
    rotary_dim = hf_config.rotary_dim
    if rotary_dim is None or rotary_dim % 2 or rotary_dim > d_head:
        raise refuse(
            "rotary_dim", rotary_dim, f"transformers' GPT-J computes its rotary frequencies for "
            f"rotary_dim (or, when unset, for n_embd = {hf_config.n_embd}) and rotates that many "
            f"dimensions of each {d_head}-dimensional head; TransformerLens reproduces an even "
            "rotary_dim up to the head size",
        )
    return {
        "d_model": hf_config.n_embd,
        "d_head": d_head,
        "n_heads": hf_config.n_head,
        "d_mlp": hf_config.n_inner or 4 * hf_config.n_embd,
        "n_layers": hf_config.n_layer,
        "n_ctx": hf_config.n_positions,
        "eps": hf_config.layer_norm_epsilon,
        "d_vocab": hf_config.vocab_size,
        "act_fn": check_activation("activation_function", hf_config.activation_function),
        "parallel_attn_mlp": True,
        "positional_embedding_type": "rotary",
        "rotary_dim": rotary_dim,
        "rotary_base": 10000,  # fixed in transformers' GPT-J
        "rotary_adjacent_pairs": True,
        "normalization_type": "LN",
    }


def opt_config(hf_config: Any) -> dict[str, Any]:
    why = {
        "do_layer_norm_before": (False, "it normalises after each sublayer (post-norm, as OPT-350m); "
                                 "TransformerLens's OPT blocks normalise before"),
        "_remove_final_layer_norm": (True, "it removes the final LayerNorm, which TransformerLens's "
                                     "OPT converter reads"),
        "enable_bias": (False, "it removes every projection's bias, which TransformerLens's OPT "
                        "converter reads"),
        "layer_norm_elementwise_affine": (False, "it removes the LayerNorms' weights and biases, "
                                          "which TransformerLens's OPT converter reads"),
    }
    for key, (bad, reason) in why.items():
        if getattr(hf_config, key, not bad) == bad:
            raise refuse(key, bad, reason)
    if hf_config.word_embed_proj_dim != hf_config.hidden_size:
        raise refuse(
            "word_embed_proj_dim", hf_config.word_embed_proj_dim, f"it projects the embeddings "
            f"from {hf_config.word_embed_proj_dim} to hidden_size={hf_config.hidden_size} "
            "dimensions and back (project_in / project_out, as OPT-350m); TransformerLens's OPT "
            "has no such projections",
        )
    return {
        "d_model": hf_config.hidden_size,
        "d_head": hf_config.hidden_size // hf_config.num_attention_heads,
        "n_heads": hf_config.num_attention_heads,
        "d_mlp": hf_config.ffn_dim,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": 1e-5,  # fixed in transformers' OPT LayerNorms
        "d_vocab": hf_config.vocab_size,
        "act_fn": check_activation("activation_function", hf_config.activation_function),
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
    }


def gpt_neo_config(hf_config: Any) -> dict[str, Any]:
    layers = list(hf_config.attention_layers)
    unknown = set(layers) - {"global", "local"}
    if unknown or len(layers) != hf_config.num_layers:
        raise refuse(
            "attention_types", hf_config.attention_types, f"it gives the layer kinds {layers} for "
            f"num_layers={hf_config.num_layers}; only one 'global' or 'local' per layer is "
            "converted (the HF model cannot run others either)",
        )
    cfg = {
        "d_model": hf_config.hidden_size,
        "d_head": hf_config.hidden_size // hf_config.num_heads,
        "n_heads": hf_config.num_heads,
        "d_mlp": hf_config.intermediate_size or 4 * hf_config.hidden_size,
        "n_layers": hf_config.num_layers,
        "n_ctx": hf_config.max_position_embeddings,
        "eps": hf_config.layer_norm_epsilon,
        "d_vocab": hf_config.vocab_size,
        "act_fn": check_activation("activation_function", hf_config.activation_function),
        "use_attn_scale": False,  # transformers' GPT-Neo does not divide scores by sqrt(d_head)
        "normalization_type": "LN",
        "positional_embedding_type": "standard",
    }
    if "local" in layers:
        # transformers' local layers see the window_size keys up to and including the query,
        # as TransformerLens's local attention does
        cfg |= {"use_local_attn": True, "window_size": hf_config.window_size,
                "attn_types": layers}
    return cfg


def bloom_config(hf_config: Any) -> dict[str, Any]:
    if hf_config.apply_residual_connection_post_layernorm:
        raise refuse(
            "apply_residual_connection_post_layernorm", True, "it makes each block add its "
            "sublayer's output to the normalised input instead of the input itself; "
            "TransformerLens's blocks add to the unnormalised residual stream",
        )
    n_heads = hf_config.n_head
    if n_heads & (n_heads - 1):
        raise refuse(
            "n_head", n_heads, "it is not a power of two, and for such head counts transformers' "
            "Bloom and TransformerLens give the heads different ALiBi slopes (transformers "
            "interleaves a second geometric series; TransformerLens spreads one series over all "
            "heads), so the attention differs",
        )
    return {
        "d_model": hf_config.hidden_size,
        "d_head": hf_config.hidden_size // n_heads,
        "n_heads": n_heads,
        "d_mlp": 4 * hf_config.hidden_size,  # fixed in transformers' Bloom MLP
        "n_layers": hf_config.n_layer,
        # ALiBi has no position table and no context limit in the config: this is a cap on the
        # sequences accepted, which load_reward_model(n_ctx=...) can change
        "n_ctx": 2048,
        "eps": hf_config.layer_norm_epsilon,
        "d_vocab": hf_config.vocab_size,
        "act_fn": "gelu_fast",  # transformers' bloom_gelu_forward: the same tanh approximation
        "normalization_type": "LN",
        "post_embedding_ln": True,
        "positional_embedding_type": "alibi",
    }


def convert_bloom(hf_model: Any, cfg: Any) -> dict[str, Any]:
    """TransformerLens's Bloom converter, plus the zero position table TransformerLens builds
    for an ALiBi model and never reads (written, so that it is not reported missing).

    With ``pretraining_tp > 1`` and ``slow_but_exact``, transformers' Bloom sums its output
    projections (attention ``dense``, MLP ``dense_4h_to_h``) over column slices with
    ``F.linear`` and no bias: those biases never reach the output, so they are written as zeros.
    """
    state = dict(convert_bloom_weights(hf_model, cfg))
    state["pos_embed.W_pos"] = torch.zeros(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype)
    config = hf_model.transformer.config
    if config.pretraining_tp > 1 and config.slow_but_exact:
        for i in range(cfg.n_layers):
            for key in (f"blocks.{i}.attn.b_O", f"blocks.{i}.mlp.b_out"):
                state[key] = torch.zeros(cfg.d_model, dtype=state[key].dtype)
    return state


ADAPTERS = (
    Adapter(
        "gpt2", "GPT2LMHeadModel", "transformer", gpt2_config, convert_gpt2_weights,
        frozenset({"n_embd", "n_head", "n_inner", "n_layer", "n_positions", "n_ctx",
                   "layer_norm_epsilon", "vocab_size", "activation_function", "scale_attn_weights",
                   "scale_attn_by_inverse_layer_idx", "add_cross_attention"}),
        ignored={
            "reorder_and_upcast_attn": "the order and precision of the attention-score "
            "computation (upcast to float32), not the function",
            **dict.fromkeys(
                ("summary_type", "summary_use_proj", "summary_activation",
                 "summary_proj_to_labels"),
                "only GPT2DoubleHeadsModel's multiple-choice head",
            ),
        },
    ),
    Adapter(
        "gpt_neox", "GPTNeoXForCausalLM", "gpt_neox", neox_config, convert_neox_weights,
        frozenset({"hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers",
                   "max_position_embeddings", "layer_norm_eps", "vocab_size", "hidden_act",
                   "use_parallel_residual", "rope_parameters", "rope_scaling", "rotary_pct",
                   "rotary_emb_base", "rope_theta", "attention_bias", "partial_rotary_factor",
                   "head_dim"}),
    ),
    Adapter(
        "opt", "OPTForCausalLM", "model", opt_config, convert_opt_weights,
        frozenset({"hidden_size", "num_attention_heads", "ffn_dim", "num_hidden_layers",
                   "max_position_embeddings", "vocab_size", "activation_function",
                   "do_layer_norm_before", "_remove_final_layer_norm", "enable_bias",
                   "layer_norm_elementwise_affine", "word_embed_proj_dim"}),
        ignored={"dropout": _DROPOUT_WHY, "layerdrop": "layer dropping in training mode only"},
    ),
    Adapter(
        "gptj", "GPTJForCausalLM", "transformer", gptj_config, convert_gptj_weights,
        frozenset({"n_embd", "n_head", "n_inner", "n_layer", "n_positions", "layer_norm_epsilon",
                   "vocab_size", "activation_function", "rotary_dim"}),
    ),
    Adapter(
        "gpt_neo", "GPTNeoForCausalLM", "transformer", gpt_neo_config, convert_neo_weights,
        frozenset({"hidden_size", "num_heads", "intermediate_size", "num_layers",
                   "max_position_embeddings", "layer_norm_epsilon", "vocab_size",
                   "activation_function", "attention_layers", "attention_types", "window_size"}),
        ignored={"embed_dropout": _DROPOUT_WHY, "resid_dropout": _DROPOUT_WHY,
                 "_is_quantized": "only the flash-attention path's choice of dtype"},
    ),
    Adapter(
        "bloom", "BloomForCausalLM", "transformer", bloom_config, convert_bloom,
        frozenset({"hidden_size", "n_head", "n_layer", "layer_norm_epsilon", "vocab_size",
                   "apply_residual_connection_post_layernorm", "pretraining_tp",
                   "slow_but_exact"}),
    ),
)
