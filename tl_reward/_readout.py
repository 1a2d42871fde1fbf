"""Shared machinery of the observational tools: inputs, pooled caches and the reward read-out.

Everything is read at the pooled (scoring) token. The cached final-norm scale linearises the final
norm, so any residual-stream vector ``x`` written before it contributes
``center(x) / scale . w_eff`` to the reward, where ``w_eff`` is the reward direction with the final
norm's weight folded in (``ln_final.w * w_r``; identical to ``w_r`` after ``fold_ln``) and the norm's
bias goes into the read-out bias.
"""

import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from ._device import readout_dtype
from .errors import DeviceError, HookNameError, InvalidInputError
from .model import HookedRewardModel, Text


def choose(name: str, value: str, options: Iterable[str]) -> str:
    """Check ``value`` is one of ``options``; otherwise say which are valid and suggest the closest."""
    options = list(options)
    if value in options:
        return value
    close = difflib.get_close_matches(str(value), options, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    error = HookNameError if name == "hook" else InvalidInputError
    raise error(f"{name}={value!r} is not one of {options}.{hint}")


def as_tokens(
    model: HookedRewardModel,
    tokens: Tensor | Sequence[Text],
    attention_mask: Tensor | None,
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"] | None]:
    """Token ids and mask from token ids or texts (texts are tokenized and right-padded).

    The analysis tools gather activations of every layer in one place, so they need the model on
    one device: a model split over several (``n_devices``) is refused here with what to do."""
    if model.cfg.n_devices > 1:
        raise DeviceError(
            f"this tool needs the model on one device; it is split over {model.cfg.n_devices} "
            "(n_devices). A split model scores (model.score, score_pairs, forward, "
            "run_with_cache); for the analysis tools load it with n_devices=1 on one device "
            "with room for it (or in a lower dtype)"
        )
    if isinstance(tokens, Tensor):
        tokens, attention_mask = model._check_tokens(tokens.to(model.cfg.device), attention_mask)
        return tokens, attention_mask
    if isinstance(tokens, str):
        tokens = [tokens]
    if attention_mask is not None:
        raise InvalidInputError("attention_mask goes with token ids, not with texts")
    if len(tokens) == 0:
        raise InvalidInputError("no texts given")
    return model.pad(model.tokenize(list(tokens)))


def read_out(model: HookedRewardModel) -> tuple[Float[Tensor, "d_model k"], Float[Tensor, "k"]]:
    """Effective read-out of the final-normalised-but-unweighted residual, in
    :func:`readout_dtype`.

    Columns are the scalar reward (one column) when the model has one, else every objective.
    ``ln_final``'s weight and bias (present when ``fold_ln`` was not used) are folded in here.
    """
    dt = readout_dtype(model)
    if model.is_scalar:
        weights = model.reward_direction[:, None].to(dt)
        bias = model.reward_bias[None].to(dt)
    else:
        weights, bias = model.W_R.to(dt), model.b_R.to(dt)
    ln = model.ln_final
    if getattr(ln, "b", None) is not None:
        bias = bias + ln.b.to(dt) @ weights
    if getattr(ln, "w", None) is not None:
        weights = ln.w.to(dt)[:, None] * weights
    return weights, bias


def centers(model: HookedRewardModel) -> bool:
    """Whether the model's norms subtract the mean (LayerNorm) before scaling."""
    return model.cfg.normalization_type in ("LN", "LNPre")


@dataclass(frozen=True)
class PooledRun:
    """One forward with the activations gathered at the pooled token (``pos`` dimension of 1)."""

    rewards: Tensor  # what the model returned
    cache: ActivationCache
    pool_index: Int[Tensor, "batch"]
    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"] | None


# Activations whose second axis is the position: gathered at the pooled token.
_POSITIONAL = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid",
               "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_scale", "hook_z",
               "hook_post", "hook_normalized")


def pooled_run(
    model: HookedRewardModel,
    tokens: Tensor,
    attention_mask: Tensor | None,
    names: Callable[[str], bool],
    *,
    with_prompt_end: bool = False,
) -> PooledRun:
    """Run once (no autograd graph), keep only ``names`` (plus the final-norm scale), each
    gathered at the pooled token as the forward produces it, in :func:`readout_dtype`.
    ``with_prompt_end``: positional activations keep two positions, the pooled token and the end
    of the prompt (a gated head's second input; see ``HookedRewardModel.prompt_end_index``).

    Attention patterns keep their key axis (``[batch, head, 1, key_pos]``, the pooled query's
    row only); values ``hook_v`` keep every position. Nothing else of the forward is kept, so
    the memory held is the weights, one layer's working set and ``[batch, d_model]`` per name.
    """
    dt = readout_dtype(model)
    pool_index = model.pooled_index(tokens, attention_mask)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    n_pos = tokens.shape[1]
    gathered: dict[str, Tensor] = {}
    at = pool_index[:, None]  # [batch, kept positions]
    if with_prompt_end:
        at = torch.stack([pool_index, model.prompt_end_index(tokens, attention_mask, pool_index)], 1)

    def wanted(name: str) -> bool:
        return name == "ln_final.hook_scale" or names(name)

    def keep(act: Tensor, hook) -> None:
        name = hook.name
        if name.endswith("hook_pattern"):
            act = act[rows[:, None], :, at.to(act.device)].transpose(1, 2)
        elif name.rsplit(".", 1)[-1] in _POSITIONAL and act.ndim >= 2 and act.shape[1] == n_pos:
            act = act[rows.to(act.device)[:, None], at.to(act.device)]
        gathered[name] = act.detach().to(dt)

    with torch.no_grad():
        rewards = model.run_with_hooks(
            tokens, attention_mask=attention_mask, pool_index=pool_index,
            fwd_hooks=[(wanted, keep)],
        )
    return PooledRun(
        rewards=rewards,
        cache=ActivationCache(gathered, model),
        pool_index=pool_index,
        tokens=tokens,
        attention_mask=attention_mask,
    )


def batches(n: int, batch_size: int, progress: bool, desc: str):
    """Row slices of ``batch_size`` with a progress bar when there is more than one."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        yield slice(start, min(start + batch_size, n))


def long_frame(values: Tensor, dims: Sequence[str], labels: dict[str, Sequence] | None = None,
               *, value: str = "value", extra: dict[str, Tensor] | None = None):
    """A tensor as a long-format DataFrame: one row per entry (C order), one column per dimension
    (its ``labels``, or the index 0..n-1) then ``value``; ``extra`` tensors of the same shape add
    columns. The ``to_dataframe`` of the result classes."""
    import numpy as np
    import pandas as pd

    v = values.detach().cpu()
    if v.ndim != len(dims):
        raise InvalidInputError(f"a {v.ndim}-d tensor needs {v.ndim} dimension names, got {dims}")
    labels = labels or {}
    index = np.indices(tuple(v.shape)).reshape(v.ndim, -1)
    columns = {}
    for d, (name, idx) in enumerate(zip(dims, index, strict=True)):
        if name in labels:
            if len(labels[name]) != v.shape[d]:
                raise InvalidInputError(
                    f"{len(labels[name])} labels for dimension {name!r} of size {v.shape[d]}")
            columns[name] = np.asarray(list(labels[name]))[idx]
        else:
            columns[name] = idx
    columns[value] = v.double().numpy().reshape(-1)
    for k, t in (extra or {}).items():
        columns[k] = t.detach().cpu().double().numpy().reshape(-1)
    return pd.DataFrame(columns)
