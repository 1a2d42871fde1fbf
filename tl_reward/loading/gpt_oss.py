"""Adapter for GPT-OSS: Llama-like blocks with attention sinks (a learned per-head logit that
takes a share of each softmax), q/k/v/o biases, alternating sliding and full attention, YaRN
RoPE on every layer, and a mixture of experts whose router keeps the top-k logits and whose
experts use a clamped SwiGLU (``gate * sigmoid(alpha * gate) * (up + 1)``). Trunk weights go
through TransformerLens's own converter, which expresses every one of these."""

import math
from typing import Any

from transformer_lens.components.mlps.gpt_oss_moe import GPT_OSS_ALPHA, GPT_OSS_LIMIT
from transformer_lens.pretrained.weight_conversions import convert_gpt_oss_weights

from ..errors import UnsupportedConfigError
from ._base import Adapter, refuse, rope_parameters
from .llama_like import LLAMA_KEYS, llama_trunk


def gpt_oss_config(hf_config: Any) -> dict[str, Any]:
    for key, kept in (("swiglu_alpha", GPT_OSS_ALPHA), ("swiglu_limit", GPT_OSS_LIMIT)):
        value = getattr(hf_config, key)
        if value != kept:
            raise refuse(
                key, value, f"it sets the experts' clamped SwiGLU ({key.split('_')[1]}), which "
                f"TransformerLens's GPT-OSS experts fix at {kept} (the released value)",
            )
    if not getattr(hf_config, "attention_bias", True):
        raise refuse(
            "attention_bias", False, "it removes the attention projections' biases, which "
            "TransformerLens's GPT-OSS converter reads",
        )
    # the experts' activation is their own (clamped SwiGLU); transformers never reads hidden_act
    cfg = llama_trunk(hf_config, act_key=None)
    cfg["n_key_value_heads"] = hf_config.num_key_value_heads  # the converter writes grouped K/V
    cfg["num_experts"] = hf_config.num_local_experts
    cfg["experts_per_token"] = hf_config.num_experts_per_tok
    cfg["use_attention_sinks"] = True
    params = rope_parameters(hf_config)
    cfg["rotary_base"] = params["rope_theta"]
    if params["rope_type"] == "yarn":
        if params.get("mscale") or params.get("mscale_all_dim"):
            raise refuse(
                "rope_parameters.mscale", params.get("mscale"), "it changes YaRN's attention "
                "factor in a way TransformerLens's YaRN does not compute",
            )
        factor = float(params["factor"])
        attention_factor = params.get("attention_factor")
        if attention_factor is None:  # transformers' default, get_mscale(factor)
            attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        cfg |= {
            "use_yarn_rope": True, "yarn_factor": factor,
            "yarn_attention_factor": float(attention_factor),
            "yarn_beta_fast": float(params.get("beta_fast") or 32.0),
            "yarn_beta_slow": float(params.get("beta_slow") or 1.0),
            "yarn_original_max_position_embeddings": params.get(
                "original_max_position_embeddings", hf_config.max_position_embeddings),
            "yarn_truncate": params.get("truncate", True),
        }
    elif params["rope_type"] != "default":
        raise refuse(
            "rope_parameters.rope_type", params["rope_type"], "it rescales the rotary position "
            "frequencies; tl_reward reproduces only 'default' and 'yarn' RoPE for GPT-OSS",
        )
    return cfg


def convert_gpt_oss(hf_model: Any, cfg: Any) -> dict[str, Any]:
    """TransformerLens's GPT-OSS converter; weights it cannot read as plain matrices (the
    released MXFP4-packed experts, int8 / FP8 finetunes) are refused with its reason."""
    try:
        return convert_gpt_oss_weights(hf_model, cfg)
    except NotImplementedError as err:
        raise UnsupportedConfigError(
            f"the GPT-OSS weights cannot be converted: {err} For tl_reward: read the reward "
            "model with its weights dequantised (for MXFP4, transformers' "
            "Mxfp4Config(dequantize=True) as quantization_config) and pass the model object."
        ) from err


ADAPTERS = (
    Adapter(
        "gpt_oss", "GptOssForCausalLM", "model", gpt_oss_config, convert_gpt_oss,
        (LLAMA_KEYS - {"mlp_bias"}) | {"sliding_window", "layer_types", "num_local_experts",
                                       "num_experts_per_tok", "swiglu_alpha", "swiglu_limit"},
        ignored={
            "output_router_logits": "whether the router's logits are returned, not the reward",
            "router_aux_loss_coef": "the load-balancing loss in training",
        },
    ),
)
