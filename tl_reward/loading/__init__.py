"""Convert HF ``*ForSequenceClassification`` reward models into :class:`HookedRewardModel`.

One small adapter per architecture family (``llama_like``, ``gpt``, ``phi``, ``olmo``,
``gpt_oss``) in a
registry keyed by the HF ``model_type``; trunk weights go through TransformerLens's own converters,
the score head becomes the model's ``unembed``.
"""

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components.transformer_block import POST_NORM_ARCHITECTURES

from .._device import checked_device, checked_n_devices
from ..errors import (
    ModelSourceError,
    NotARewardModelError,
    UnsupportedArchitectureError,
    UnsupportedConfigError,
)
from ..heads import as_reward_head
from ..model import HookedRewardModel, exact_ambiguous_folds
from . import gpt, gpt_oss, llama_like, olmo, phi
from ._base import Adapter
from ._build import assign_state, empty_parameters, place_buffers
from .heads import checkpoint_head, head_of

logger = logging.getLogger(__name__)

REGISTRY: dict[str, Adapter] = {
    a.model_type: a for a in (*llama_like.ADAPTERS, *gpt.ADAPTERS, *phi.ADAPTERS, *olmo.ADAPTERS,
                               *gpt_oss.ADAPTERS)
}

# TransformerLens builds [n_ctx, rotary_dim] rotary tables for every attention layer (the loader
# keeps one shared copy; its causal mask is built per forward): n_ctx is capped by default so a
# 128k-context config does not build tables it will not use. load_reward_model(n_ctx=...) raises it.
DEFAULT_MAX_N_CTX = 4096


def supported_architectures() -> list[str]:
    """HF ``model_type`` values tl_reward can convert."""
    return sorted(REGISTRY)


def _checked_config(path: Path, suffixes: tuple[str, ...], kind: str,
                    accept: Callable[[dict[str, Any]], bool] | None = None) -> str:
    """The ``model_type`` of the checkpoint directory ``path``, read from its ``config.json``
    without transformers (which would raise its own error for an unknown or custom-code type),
    after checking it is a supported architecture whose ``architectures`` end in ``suffixes``
    (or for which ``accept(config)`` holds). ``kind``: what the loader needs, for the error (e.g.
    "a *ForSequenceClassification reward model: it has no score head")."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelSourceError(
            f"{str(path)!r} has no config.json; pass a directory written by save_pretrained()"
        )
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelSourceError(f"cannot read {str(config_file)!r}: {err}") from err
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in REGISTRY:
        custom = isinstance(raw, dict) and "auto_map" in raw
        raise UnsupportedArchitectureError(
            f"{str(path)!r} holds a model_type={model_type!r} model"
            + (" with its own modelling code (auto_map in config.json)" if custom else "")
            + ". tl_reward converts only architectures whose code ships with transformers and "
            "that TransformerLens can express; custom-code (trust_remote_code) models are not "
            f"supported. Supported model_type values: {supported_architectures()}"
        )
    architectures = list(raw.get("architectures") or [])
    if accept is not None and accept(raw):
        return model_type
    if not any(a.endswith(suffixes) for a in architectures):
        raise NotARewardModelError(
            f"{str(path)!r} holds a {architectures or model_type} model, not {kind}"
        )
    return model_type


def _from_directory(path: Path, tokenizer: Any, gate_pattern: Sequence[int] | None,
                    **hf_kwargs: Any) -> tuple[Any, Any, Any]:
    """``(hf_model, tokenizer, head)``: ``head`` is the nonlinear head the checkpoint's tensors
    hold (then ``hf_model`` is the trunk, read with transformers' own class for the family, never
    the checkpoint's modelling code), else ``None``."""
    from transformers import (
        MODEL_MAPPING,
        AutoConfig,
        AutoModelForSequenceClassification,
    )

    found: dict[str, Any] = {}

    def holds_head(raw: dict[str, Any]) -> bool:
        found["head"] = checkpoint_head(path, raw, gate_pattern)
        return found["head"] is not None

    model_type = _checked_config(
        path, ("ForSequenceClassification",),
        "a *ForSequenceClassification reward model: it has no score head", accept=holds_head,
    )
    head = found.get("head")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if head is None:
            hf_model = AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True, **hf_kwargs
            )
        else:  # the family's own trunk class; the head's tensors are read by checkpoint_head
            hf_model = MODEL_MAPPING[type(config)].from_pretrained(
                path, config=config, local_files_only=True, **hf_kwargs
            )
    except Exception as err:  # noqa: BLE001 - any failure to read the checkpoint, with its cause
        raise ModelSourceError(
            f"cannot load the {model_type} checkpoint in {str(path)!r} with transformers: "
            f"{type(err).__name__}: {err}"
        ) from err
    return hf_model, local_tokenizer(path, tokenizer), head


def local_directory(model: str | os.PathLike) -> Path:
    """``model`` as a local directory; anything else (a hub id, a missing path) is refused:
    tl_reward never downloads."""
    path = Path(model)
    if not path.is_dir():
        raise ModelSourceError(
            f"{str(model)!r} is not a local directory. tl_reward never downloads from a hub: "
            "load the model with transformers and pass the object, or save_pretrained() it "
            "and pass the directory."
        )
    return path


def local_tokenizer(path: Path, tokenizer: Any) -> Any:
    """``tokenizer``, or when it is None the one saved in the directory ``path`` (None if it
    has none); a broken one is a ModelSourceError naming the directory."""
    from transformers import AutoTokenizer

    if tokenizer is not None or not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        return tokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise ModelSourceError(
            f"cannot load the tokenizer in {str(path)!r}: {type(err).__name__}: {err}. Pass "
            "tokenizer= explicitly, or remove the broken tokenizer files."
        ) from err


def _adapter_for(hf_config: Any) -> Adapter:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model_type values: "
            f"{supported_architectures()}"
        )
    return REGISTRY[model_type]


def _read_kwargs(device: str | None, dtype: torch.dtype | None,
                 n_devices: int = 1) -> dict[str, Any]:
    """``from_pretrained`` arguments that read the checkpoint once, as it will be used: in
    ``dtype`` (no float32 round trip) and, for an accelerator, straight onto it (no host copy);
    split over ``n_devices`` GPUs from ``device``'s index on, balanced as the layers will be.
    On the CPU, transformers memory-maps the safetensors file and its tensors are reused as they
    are."""
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device is not None and torch.device(device).type != "cpu":
        if n_devices > 1:
            start = torch.device(device).index or 0
            kwargs["device_map"] = "balanced"
            kwargs["max_memory"] = {i: torch.cuda.mem_get_info(i)[0]
                                    for i in range(start, start + n_devices)}
        else:
            kwargs["device_map"] = device
    return kwargs


def _trunk_of(hf_model: Any, adapter: Adapter) -> Any:
    """The HF trunk (``LlamaModel``, ...): the model's ``base_attr``, or the model itself when
    it is the trunk."""
    trunk = getattr(hf_model, adapter.base_attr, None)
    if trunk is None and getattr(hf_model, "base_model", None) is hf_model:
        return hf_model
    if trunk is None:
        raise NotARewardModelError(
            f"{type(hf_model).__name__} has no {adapter.base_attr!r} trunk (the "
            f"{adapter.model_type} transformer); pass the HF model object that holds it"
        )
    return trunk


def converted_state(
    hf_model: Any, adapter: Adapter, score: nn.Linear | SimpleNamespace, cfg: Any
) -> dict[str, Tensor]:
    """The TransformerLens state dict of ``hf_model``: views of its tensors where the layout
    allows (TransformerLens's converters reshape and transpose; the head is ``score.weight.T``;
    ``score``: the Linear, or its ``weight``, ``bias`` and ``out_features`` for a computed head;
    a nonlinear reward head's model gets a zero ``unembed``, never read)."""
    trunk = SimpleNamespace(**{adapter.base_attr: _trunk_of(hf_model, adapter)})
    trunk.lm_head = trunk.embed_out = score  # read by some converters; replaced below
    with torch.no_grad():
        state = dict(adapter.convert(trunk, cfg))
        state["unembed.W_U"] = score.weight.T
        state["unembed.b_U"] = (
            score.bias
            if score.bias is not None
            else torch.zeros(score.out_features, dtype=score.weight.dtype)
        )
    return state


def hooked_config(
    hf_model: Any,
    adapter: Adapter,
    n_out: int,
    *,
    center_writing_weights: bool,
    n_ctx: int | None,
    dtype: torch.dtype | None,
    device: str | torch.device | None,
    extra_cfg: dict[str, Any] | None = None,
    n_devices: int = 1,
) -> HookedTransformerConfig:
    """The HookedTransformerConfig of ``hf_model`` (checked by its adapter) with ``n_out`` head
    outputs, in ``dtype`` on ``device`` (default: the HF model's), ``n_ctx`` checked and capped."""
    hf_config = hf_model.config
    adapter.audit(hf_config)
    cfg_kwargs = adapter.config(hf_config)
    cfg_kwargs.update(extra_cfg or {})
    if center_writing_weights and cfg_kwargs["normalization_type"] != "LN":
        raise UnsupportedConfigError(
            f"center_writing_weights=True needs LayerNorm, which removes the mean; this "
            f"{adapter.model_type} model uses RMSNorm, where centring would change the output. "
            "Use fold_ln=True alone."
        )
    hf_ctx = cfg_kwargs["n_ctx"]
    if n_ctx is not None:
        if n_ctx < 1 or n_ctx > hf_ctx:
            raise UnsupportedConfigError(
                f"n_ctx={n_ctx} must be between 1 and the HF model's context {hf_ctx}"
            )
        cfg_kwargs["n_ctx"] = n_ctx
    elif cfg_kwargs["positional_embedding_type"] != "standard":
        cfg_kwargs["n_ctx"] = min(hf_ctx, DEFAULT_MAX_N_CTX)
    first_param = next(hf_model.parameters())
    return HookedTransformerConfig(
        **cfg_kwargs,
        d_vocab_out=n_out,
        original_architecture=adapter.original_architecture,
        model_name=Path(getattr(hf_config, "_name_or_path", "") or adapter.model_type).name,
        dtype=dtype or first_param.dtype,
        device=device if device is not None else str(first_param.device),
        n_devices=n_devices,
        init_weights=False,
        default_prepend_bos=False,
    )


def fill(
    model: HookedTransformer,
    state: dict[str, Tensor],
    *,
    fold_ln: bool,
    center_writing_weights: bool,
) -> None:
    """Fill ``model`` (built under ``empty_parameters``) with ``state`` (TransformerLens layout),
    processed as asked, with the folds TransformerLens's shape-guessing gets wrong (square MLPs,
    ``d_model`` outputs) done exactly; ``state`` is emptied as it goes."""
    if fold_ln and model.cfg.original_architecture in POST_NORM_ARCHITECTURES:
        raise UnsupportedConfigError(
            f"fold_ln=True cannot be applied to this {model.cfg.original_architecture} model: its "
            "blocks normalise each sublayer's output (post-norm), so no linear map follows those "
            "norms to fold their weights into. Load it with fold_ln=False."
        )
    place_buffers(model)
    overrides = exact_ambiguous_folds(state, model.cfg) if fold_ln else None
    assign_state(
        model, state, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
        overrides=overrides,
    )


def load_reward_model(
    model: Any,
    tokenizer: Any = None,
    *,
    objective: int | Sequence[float] | Tensor | None = None,
    fold_ln: bool = False,
    center_writing_weights: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    n_ctx: int | None = None,
    head: nn.Module | None = None,
    gate_pattern: Sequence[int] | None = None,
    n_devices: int = 1,
) -> HookedRewardModel:
    """Convert an HF reward model into a :class:`HookedRewardModel` with identical rewards.

    Args:
        model: an instantiated HF ``*ForSequenceClassification`` model, or a local directory
            written by ``save_pretrained`` (never a hub id: nothing is downloaded). A directory
            whose safetensors hold a published nonlinear head (GRM ``v_head.summary``, a
            ``Sequential`` ``score``, ArmoRM ``regression_layer`` + ``gating``) is read without
            its modelling code: the trunk with transformers' class for its ``model_type``, the
            head from its tensors. With
            ``head=``, the trunk (``LlamaModel``, ...) or any HF model object holding it. An
            object carrying a published nonlinear head is read in that layout
            (:data:`tl_reward.loading.heads.HEAD_ADAPTERS`): a GRM ``v_head`` (MLP head), an
            ArmoRM ``regression_layer`` + ``gating`` (gated head).
        tokenizer: the HF tokenizer (loaded from the directory when omitted and present there).
        head: the reward head to use instead of the model's own: an
            :class:`~tl_reward.heads.MLPHead`, :class:`~tl_reward.heads.GatedHead`, or any
            ``nn.Module`` mapping the pooled state ``[batch, d_model]`` to ``[batch, n_rewards]``
            (see :mod:`tl_reward.heads`). A nonlinear head needs ``fold_ln=False``.
        gate_pattern: for an ArmoRM model object, the token ids that end the prompt (see
            :class:`~tl_reward.heads.GatedHead`).
        objective: for a multi-objective head, the scalar reward: an output index or a weight
            vector over the outputs (``None`` keeps every output).
        fold_ln: fold the norms' weights into the following weights (the final norm into the
            reward head), as TransformerLens does; rewards are unchanged.
        center_writing_weights: centre the weights writing to the residual stream (LayerNorm
            models only, where the norm removes the mean); rewards are unchanged.
        device, dtype: where and in what precision to build the model (default: the HF model's).
        n_ctx: longest sequence accepted (default: the HF context, capped at 4096).
        n_devices: split the layers over this many CUDA devices from ``device`` on (a model
            that does not fit one GPU): TransformerLens's own split (``cfg.n_devices``), block
            ``i`` on ``tl_reward._device.block_device(cfg, i)``, the embeddings with the first
            block, the final norm and the head with the last; a directory is read straight onto
            those devices.
    """
    if device is not None:  # before any loading
        device = checked_device(device)
    n_devices = checked_n_devices(device, n_devices)
    if isinstance(model, str | os.PathLike):
        path = local_directory(model)
        # read once, in the requested dtype, straight to the requested device (memory-mapped)
        model, tokenizer, stored_head = _from_directory(path, tokenizer, gate_pattern,
                                                        **_read_kwargs(device, dtype, n_devices))
        head = head if head is not None else stored_head
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ModelSourceError(
            f"model must be an HF *ForSequenceClassification model or a local directory, got "
            f"{type(model).__name__}"
        )
    hf_config = model.config
    adapter = _adapter_for(hf_config)
    if head is not None:
        reward_head, score = as_reward_head(head), None
    else:
        reward_head, score = head_of(model, gate_pattern)
    if score is None:  # a nonlinear head: the unembed is unused (zeros)
        if fold_ln:
            raise UnsupportedConfigError(
                f"fold_ln=True with a {reward_head.kind} head: the final norm would have to be "
                "folded into the head's first layers, which tl_reward does not do. Load with "
                "fold_ln=False (the default); rewards are the same."
            )
        d_model = adapter.config(hf_config)["d_model"]
        score = nn.Linear(d_model, reward_head.n_outputs(d_model), bias=False)
        nn.init.zeros_(score.weight)
    cfg = hooked_config(
        model, adapter, score.out_features, center_writing_weights=center_writing_weights,
        n_ctx=n_ctx, dtype=dtype, device=device, n_devices=n_devices,
    )
    id2label = getattr(hf_config, "id2label", None) or {}
    labels = [str(id2label.get(i, f"reward_{i}")) for i in range(score.out_features)]
    with empty_parameters():
        reward_model = HookedRewardModel(
            cfg, tokenizer, pad_token_id=getattr(hf_config, "pad_token_id", None),
            label_names=labels,
        )
    state = converted_state(model, adapter, score, cfg)  # views of the HF tensors
    name = type(model).__name__
    del model, score  # a model read here is freed tensor by tensor as its weights are assigned
    fill(reward_model, state, fold_ln=fold_ln, center_writing_weights=center_writing_weights)
    adapter.set_rotary(reward_model, hf_config)
    if not reward_head.is_linear:
        reward_model.set_reward_head(reward_head)
    reward_model.set_objective(objective)
    reward_model.eval()
    logger.info("converted %s (%s) into a HookedRewardModel", name, adapter.model_type)
    return reward_model
