"""What every architecture adapter shares: the adapter type and the config-key audit.

The audit's rule: a key of the HF config is refused only where the installed transformers'
forward for that family reads it and the adapter does not reproduce it. What the forward reads is
taken from the source of the family's modelling module (and of what that module takes from
transformers' shared ``masking_utils`` / ``modeling_layers``): every ``config.<key>`` and
``getattr(config, "<key>")``. Keys it never reads (generation, caching, tokenisation, other
families, bookkeeping) cannot change the reward and are accepted (logged at debug level).
"""

import functools
import importlib
import inspect
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedConfigError

logger = logging.getLogger(__name__)

_DROPOUT = "dropout, off in eval mode"
_OUTPUTS = "which outputs the HF model returns, not their values"

# Keys the HF forwards read that cannot change the reward of an eval-mode float forward, with why.
READ_WITHOUT_EFFECT: Mapping[str, str] = {
    "_attn_implementation": "the attention kernel (eager, sdpa, ...); each computes the same "
    "attention, and parity is checked against eager",
    "attention_dropout": _DROPOUT, "hidden_dropout": _DROPOUT, "classifier_dropout": _DROPOUT,
    "resid_pdrop": _DROPOUT, "embd_pdrop": _DROPOUT, "attn_pdrop": _DROPOUT,
    "summary_first_dropout": _DROPOUT, "summary_last_dropout": _DROPOUT,
    "output_attentions": _OUTPUTS, "output_hidden_states": _OUTPUTS, "return_dict": _OUTPUTS,
    "use_return_dict": _OUTPUTS,
    "use_cache": "the key/value cache of generation",
    "initializer_range": "the initialisation of fresh weights; the checkpoint's are loaded",
    "problem_type": "the training loss",
    "num_labels": "the score head's width, which tl_reward reads from the head's weights",
    "pad_token_id": "the pooling rule (rightmost token that is not the pad id), which "
    "HookedRewardModel applies with the same id",
    "dtype": "the parameters' dtype; load_reward_model(dtype=...) or the HF model's own",
    "name_or_path": "bookkeeping",
    "is_decoder": "encoder-decoder bookkeeping (a warning in the causal-LM class)",
    "token_classification_bias": "only the *ForTokenClassification class's head",
}

# Keys every adapter checks (in ``Adapter.audit``): only the value tl_reward reproduces is accepted.
CAUSAL = "is_causal"

# Activation names TransformerLens implements with the same function as transformers.
SUPPORTED_ACTIVATIONS = frozenset({"silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "gelu_fast"})

_SHARED_MODULES = ("transformers.masking_utils", "transformers.modeling_layers")
_READ = re.compile(r"config(?:\.get_text_config\(\))?\.([A-Za-z_]\w*)")
_GETATTR = re.compile(r"(?:get|has)attr\(\s*(?:self\.)?\w*config\s*,\s*[\"']([A-Za-z_]\w*)[\"']")


# model_type -> the transformers.models package that holds its code, where the names differ
_PACKAGE = {"gemma3_text": "gemma3"}


@functools.cache
def forward_reads(model_type: str) -> Mapping[str, str] | None:
    """Config attributes the installed transformers' code for ``model_type`` reads, each with the
    first source line that reads it; ``None`` where that source cannot be read.

    Read from ``transformers.models.<package>.modeling_<package>`` (the package is the
    ``model_type`` but for Gemma-3's text model, in ``gemma3``) and from the classes and
    functions it imports from ``masking_utils`` / ``modeling_layers``. Attribute aliases
    (GPT-2's ``hidden_size`` -> ``n_embd``) are mapped to the key the config stores.
    """
    package = _PACKAGE.get(model_type, model_type)
    try:
        module = importlib.import_module(f"transformers.models.{package}.modeling_{package}")
        config_module = importlib.import_module(
            f"transformers.models.{package}.configuration_{package}"
        )
        sources = [inspect.getsource(module)]
        for obj in vars(module).values():
            if getattr(obj, "__module__", None) in _SHARED_MODULES and (
                inspect.isclass(obj) or inspect.isfunction(obj)
            ):
                sources.append(inspect.getsource(obj))
    except (ImportError, OSError, TypeError):
        return None
    aliases: dict[str, str] = {}
    for obj in vars(config_module).values():
        if inspect.isclass(obj) and getattr(obj, "model_type", None) == model_type:
            aliases.update(getattr(obj, "attribute_map", {}) or {})
    reads: dict[str, str] = {}
    for source in sources:
        for line in source.splitlines():
            for name in (*_READ.findall(line), *_GETATTR.findall(line)):
                reads.setdefault(aliases.get(name, name), line.strip())
    return reads


def refuse(key: str, value: Any, why: str, fix: str = "") -> UnsupportedConfigError:
    """A refusal written for the user: the key, its value, what it changes, what they can do."""
    fix = fix or (
        "Score with the HF model itself, or use a checkpoint of this family without this setting"
    )
    return UnsupportedConfigError(
        f"HF config {key}={value!r} cannot be converted: {why}. The converted model would "
        f"compute different rewards than the HF model, so tl_reward refuses. {fix}."
    )


@dataclass(frozen=True)
class Adapter:
    """How one HF ``model_type`` becomes a HookedRewardModel.

    - ``config``: HF config -> HookedTransformerConfig keyword arguments (trunk only; the loader
      adds the head, dtype and device). It raises ``UnsupportedConfigError`` on values it cannot
      reproduce.
    - ``convert``: TransformerLens's weight converter for the trunk; it is given an object whose
      ``base_attr`` is the HF trunk (the score head is written by the loader).
    - ``handled``: config keys ``config`` reads and reproduces (or refuses by value).
    - ``ignored``: keys this family's HF module reads that cannot change the reward, each with
      why (beyond :data:`READ_WITHOUT_EFFECT`, shared by every family).
    - ``rotary``: where TransformerLens's rotary tables cannot express the HF frequencies (Phi-3's
      LongRoPE), ``(hf_config, cfg) -> (sin, cos)`` tables ``[n_ctx, rotary_dim]`` in
      TransformerLens's layout (or ``None``: its own are exact), written over every attention
      layer's by :meth:`set_rotary`.
    """

    model_type: str
    original_architecture: str
    base_attr: str
    config: Callable[[Any], dict[str, Any]]
    convert: Callable[[Any, Any], Mapping[str, Any]]
    handled: frozenset[str]
    ignored: Mapping[str, str] = field(default_factory=dict)
    rotary: Callable[[Any, Any], tuple[Any, Any] | None] | None = None

    def set_rotary(self, model: Any, hf_config: Any) -> None:
        """Write this family's rotary tables (``rotary``) over every attention layer's, one
        shared copy in each layer's dtype and device; nothing where the family has none."""
        tables = self.rotary(hf_config, model.cfg) if self.rotary is not None else None
        if tables is None:
            return
        sin, cos = tables
        for block in model.blocks:
            old = block.attn.rotary_sin
            block.attn.rotary_sin = sin.to(device=old.device, dtype=old.dtype)
            block.attn.rotary_cos = cos.to(device=old.device, dtype=old.dtype)

    def audit(self, hf_config: Any) -> None:
        """Refuse a key only where the installed HF forward reads it and this adapter does not
        reproduce it; accept the rest, logging why at debug level."""
        if getattr(hf_config, CAUSAL, True) is not True:
            raise refuse(
                CAUSAL, getattr(hf_config, CAUSAL), "it makes transformers' attention mask "
                "bidirectional (tokens see later tokens); TransformerLens's attention is causal",
            )
        reads = forward_reads(self.model_type)
        unread, without_effect = [], []
        for key, value in sorted(hf_config.to_dict().items()):
            if key in self.handled or key == CAUSAL:
                continue
            if key in self.ignored or key in READ_WITHOUT_EFFECT:
                without_effect.append(key)
                continue
            if reads is not None and key not in reads:
                unread.append(key)
                continue
            if reads is None:
                raise refuse(
                    key, value, f"the source of transformers' {self.model_type} modelling code "
                    "cannot be read here, so tl_reward cannot tell whether its forward uses this "
                    f"key, and the {self.model_type} adapter does not convert it",
                    "Install transformers from a wheel or source distribution (with its .py "
                    "files), or score with the HF model itself",
                )
            raise refuse(
                key, value, f"transformers' {self.model_type} forward reads it "
                f"(`{reads[key]}`) and the {self.model_type} adapter does not convert it",
                "If the checkpoint was trained without this setting, remove the key from its "
                "config.json; otherwise score with the HF model itself",
            )
        if unread:
            logger.debug(
                "%s config: accepted %s, which transformers' %s forward never reads",
                self.model_type, unread, self.model_type,
            )
        if without_effect:
            logger.debug(
                "%s config: accepted %s, read by transformers but without effect on the reward "
                "(%s)", self.model_type, without_effect,
                "; ".join(f"{k}: {self.ignored.get(k) or READ_WITHOUT_EFFECT[k]}" for k in without_effect),
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
        raise refuse(
            key, value, "it picks the MLP's activation function, and TransformerLens implements "
            f"the same function as transformers only for {sorted(SUPPORTED_ACTIVATIONS)}",
        )
    return value
