"""What every architecture adapter shares: the adapter type and the config-key audit."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedConfigError

# Config keys that never change a float forward pass of a sequence-classification model
# (bookkeeping, generation, training-only dropout, ids handled by pooling).
COMMON_IGNORED = frozenset(
    {
        "_name_or_path", "_attn_implementation", "_attn_implementation_autoset",
        "_commit_hash", "add_cross_attention", "architectures", "auto_map", "bad_words_ids",
        "begin_suppress_tokens", "bos_token_id", "chunk_size_feed_forward", "classifier_dropout",
        "cross_attention_hidden_size", "decoder_start_token_id", "diversity_penalty", "do_sample",
        "dtype", "early_stopping", "encoder_no_repeat_ngram_size", "eos_token_id",
        "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id",
        "forced_eos_token_id", "id2label", "initializer_range", "is_decoder",
        "is_encoder_decoder", "label2id", "length_penalty", "max_length", "min_length",
        "model_type", "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_labels",
        "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores",
        "pad_token_id", "prefix", "problem_type", "pruned_heads", "remove_invalid_values",
        "repetition_penalty", "return_dict", "return_dict_in_generate", "sep_token_id",
        "suppress_tokens", "task_specific_params", "temperature", "tf_legacy_loss",
        "tie_encoder_decoder", "tie_word_embeddings", "tokenizer_class", "top_k", "top_p",
        "torch_dtype", "torchscript", "transformers_version", "typical_p", "use_bfloat16",
        "use_cache", "attention_dropout", "hidden_dropout", "embd_pdrop", "attn_pdrop",
        "resid_pdrop", "summary_type", "summary_use_proj", "summary_activation",
        "summary_proj_to_labels", "summary_first_dropout", "pretraining_tp", "output_past",
    }
)

# Activation names TransformerLens implements with the same function as transformers.
SUPPORTED_ACTIVATIONS = frozenset({"silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "gelu_fast"})


def refuse(key: str, value: Any, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(
        f"HF config {key}={value!r} is not supported: {why}. tl_reward refuses rather than "
        "analyse a different function than the HF model computes."
    )


@dataclass(frozen=True)
class Adapter:
    """How one HF ``model_type`` becomes a HookedRewardModel.

    - ``config``: HF config -> HookedTransformerConfig keyword arguments (trunk only; the loader
      adds the head, dtype and device). It raises ``UnsupportedConfigError`` on values it cannot
      reproduce.
    - ``convert``: TransformerLens's weight converter for the trunk; it is given an object whose
      ``base_attr`` is the HF trunk (the score head is written by the loader).
    - ``handled``: config keys ``config`` reads; every other key must be in ``ignored`` or
      ``COMMON_IGNORED``, or loading is refused.
    """

    model_type: str
    original_architecture: str
    base_attr: str
    config: Callable[[Any], dict[str, Any]]
    convert: Callable[[Any, Any], Mapping[str, Any]]
    handled: frozenset[str]
    ignored: frozenset[str] = field(default_factory=frozenset)

    def audit(self, hf_config: Any) -> None:
        """Refuse any config key this adapter neither handles nor knows to be irrelevant."""
        known = self.handled | self.ignored | COMMON_IGNORED
        unknown = sorted(k for k in hf_config.to_dict() if k not in known)
        if unknown:
            raise UnsupportedConfigError(
                f"the {self.model_type} adapter does not know the HF config keys {unknown}; they "
                "may change the forward pass. Add them to the adapter's handled or ignored keys "
                "(tl_reward/loading) once you have checked what they do."
            )


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """RoPE settings in the transformers 5 layout (``rope_parameters``), or the 4.x attributes."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not params:
        scaling = getattr(hf_config, "rope_scaling", None) or {}
        params.update(scaling)
        if getattr(hf_config, "rope_theta", None) is not None:
            params["rope_theta"] = hf_config.rope_theta
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", 10000.0)
    return params


def check_activation(key: str, value: str) -> str:
    if value not in SUPPORTED_ACTIVATIONS:
        raise refuse(key, value, f"supported activations are {sorted(SUPPORTED_ACTIVATIONS)}")
    return value
