"""Attribution patching (AtP): a first-order estimate of every activation patch at once.

For a cell (a head, a neuron, a layer's residual at a position ...) exact patching replaces the
target run's activation ``a_t`` by the source run's ``a_s`` and measures the reward change. AtP
estimates it by the first-order Taylor term around the target run::

    effect ~ (a_s - a_t) . dReward/da   (evaluated on the target run)

summed over the cell's entries (``d_head`` of a head, every position of a per-layer cell ...).
Every cell of every requested hook comes from two forwards (source and target, activations
cached through TransformerLens hooks) and one backward pass (``torch.autograd.grad`` of the
summed rewards with respect to the cached target activations; rows are independent, so each
row's gradient is that row's reward gradient). No parameter gradient is computed or
accumulated, so the model's ``.grad`` fields are left alone.

Conventions are those of :func:`tl_reward.activation_patch`: ``mode="denoise"`` (the default)
writes clean into corrupt and takes the gradient on the corrupt run, ``mode="noise"`` writes
corrupt into clean with the gradient on the clean run; sequences of different lengths are
aligned from the scoring token (``positions="align_end"``) by the same position map, and
:meth:`AtPResult.as_patch_result` gives a :class:`~tl_reward.causal.patching.PatchResult` with the same
axes, labels and NaN cells as the exact grid, so the two compare cell by cell.

The estimate is exact where the reward is linear in the patched activation (no nonlinearity
between it and the reward), and good for small nodes (heads, neurons); it is known to be poor
for large patches of the residual stream, where saturating norms and attention make the
reward far from linear.
"""

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._memory import checkpointed_blocks, needs_checkpointing, rows_that_fit
from .._readout import as_tokens, choose, readout_dtype
from ..errors import InvalidInputError
from ..model import HookedRewardModel, Text
from ._runs import HOOKS, PERS, Run, aligned, layer_flops, position_map
from .patching import PatchResult, PatchStats

ATP_HOOKS = tuple(h for h in HOOKS if h != "pattern")
ATP_MODES = ("denoise", "noise")


@dataclass(frozen=True)
class AtPResult:
    """First-order patching estimates of several hooks, kept at the finest grid.

    ``estimates[hook]`` is ``[layer, pos, pair]`` for residual-stream hooks and
    ``[layer, unit, pos, pair]`` for head (``z``, ``q``, ``k``, ``v``; units are key/value heads
    for ``k``/``v`` under grouped-query attention) and neuron (``mlp_post``) hooks, with layers
    as in ``layers`` and positions the target run's absolute positions; entries at positions without a source counterpart
    (padding, no aligned source token) are 0 and are masked by ``pos_map``.

    Use :meth:`as_patch_result` for a :class:`PatchResult`-shaped grid (same axes, labels and
    NaN cells as :func:`activation_patch` with the same ``hook``/``per``/``positions``) and
    :meth:`flat` for rows labelled in attribution's naming.
    """

    estimates: dict[str, Tensor] = field(repr=False)
    pos_map: Int[Tensor, "pair pos"] = field(repr=False)
    target_pooled: Int[Tensor, "pair"] = field(repr=False)
    clean_reward: Float[Tensor, "pair"]
    corrupt_reward: Float[Tensor, "pair"]
    hooks: tuple[str, ...]
    layers: tuple[int, ...]
    mode: str
    relative_positions: bool
    stats: PatchStats = field(compare=False)

    def _kind(self, hook: str) -> str:
        choose("hook", hook, self.hooks)
        return HOOKS[hook][1]

    def as_patch_result(self, hook: str, per: str) -> PatchResult:
        """The estimate of ``activation_patch(..., hook=hook, per=per, mode=mode)`` as a
        :class:`PatchResult` (``mode`` is ``"atp_denoise"`` or ``"atp_noise"``).

        Cells summed over positions (``per`` without ``_pos``) or over units (``per="layer"``
        or ``"layer_pos"`` of a head or neuron hook) add up the fine-grained estimates, which
        is what first order gives for patching them together.
        """
        kind = self._kind(hook)
        choose("per", per, PERS[kind])
        est = self.estimates[hook]  # [layer, (unit,) pos, pair]
        if kind == "resid":
            est = est[:, None]
        n_layers, n_units, n_t, n_pairs = est.shape
        valid = (self.pos_map >= 0).T  # [pos, pair]
        unit_axis = {"head": "head", "head_pos": "head", "neuron": "neuron"}.get(per)
        if unit_axis is None:
            est = est.sum(1, keepdim=True)
        nan = torch.tensor(float("nan"), dtype=est.dtype, device=est.device)
        if per.endswith("_pos"):
            if self.relative_positions:
                span = int(self.target_pooled.max()) + 1
                rel = torch.arange(-(span - 1), 1, device=est.device)
                p = self.target_pooled[None, :] + rel[:, None]  # [rel, pair]
                labels = tuple(str(r) for r in rel.tolist())
            else:
                p = torch.arange(n_t, device=est.device)[:, None].expand(n_t, n_pairs)
                labels = tuple(str(r) for r in range(n_t))
            inside = (p >= 0) & (p < n_t)
            pc = p.clamp(0, n_t - 1)
            ok = inside & valid.gather(0, pc)  # [rel, pair]
            idx = pc[None, None].expand(n_layers, est.shape[1], -1, -1)
            grid = torch.where(ok, est.gather(2, idx), nan)  # [layer, unit, rel, pair]
        else:
            grid = torch.where(valid.any(0), est.sum(2), nan)[:, :, None]  # [layer, unit, 1, pair]
            labels = None
        axes = ["layer"]
        axis_labels: list[tuple[str, ...]] = [tuple(str(l) for l in self.layers)]
        if unit_axis:
            axes.append(unit_axis)
            axis_labels.append(tuple(str(u) for u in range(n_units)))
        else:
            grid = grid[:, 0]
        if labels is not None:
            axes.append("pos")
            axis_labels.append(labels)
        else:
            grid = grid[..., 0, :]
        gap = self.clean_reward - self.corrupt_reward
        sign = 1.0 if self.mode == "denoise" else -1.0
        return PatchResult(
            effects=grid, normalized=sign * grid / gap, clean_reward=self.clean_reward,
            corrupt_reward=self.corrupt_reward, axes=tuple(axes), axis_labels=tuple(axis_labels),
            hook=hook, per=per, mode=f"atp_{self.mode}", stats=self.stats,
        )

    def flat(self, hook: str, per: str) -> tuple[Float[Tensor, "component pair"], tuple[str, ...]]:
        """Cells as rows with the labels of ``PatchResult.flat()`` for the same hook and per."""
        return self.as_patch_result(hook, per).flat()

    def to_dataframe(self):
        """Long format over every hook at its finest per: one row per (hook, cell, pair)."""
        import pandas as pd

        finest = {"resid": "layer_pos", "head": "head_pos", "neuron": "neuron"}
        frames = []
        for hook in self.hooks:
            df = self.as_patch_result(hook, finest[self._kind(hook)]).to_dataframe()
            df.insert(0, "hook", hook)
            frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def plot(self, hook: str, per: str, normalized: bool = True, title: str | None = None):
        """Plot of ``as_patch_result(hook, per)`` (heatmap or bars of the pair mean)."""
        title = title or f"attribution patching ({self.mode}) of {hook} per {per}"
        return self.as_patch_result(hook, per).plot(normalized=normalized, title=title)


def attribution_patch(
    model: HookedRewardModel,
    clean: Int[Tensor, "pair pos"] | Sequence[Text],
    corrupt: Int[Tensor, "_pair _pos"] | Sequence[Text],
    *,
    clean_mask: Int[Tensor, "pair pos"] | None = None,
    corrupt_mask: Int[Tensor, "_pair _pos"] | None = None,
    hooks: Sequence[str] = ("z", "mlp_post", "resid_pre", "attn_out", "mlp_out"),
    mode: str = "denoise",
    positions: str | Tensor = "align_end",
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    checkpoint: bool | None = None,
    progress: bool = True,
) -> AtPResult:
    """Attribution patching: first-order estimates of every patch of ``hooks`` at once.

    Args:
        clean, corrupt: the two runs of each pair (token ids with masks, or texts); for a
            preference pair, clean = chosen and corrupt = rejected.
        hooks: any of ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``
            (per layer x position), ``z``, ``q``, ``k``, ``v`` (per head x position),
            ``mlp_post`` (per neuron x position). Attention patterns are not supported.
        mode: ``denoise`` (clean written into corrupt, gradient on the corrupt run; matches
            ``activation_patch(mode="denoise")``) or ``noise`` (the reverse).
        positions: ``"align_end"`` or a ``[pair, target_pos]`` map, as in ``activation_patch``.
        layers: restrict to these layers (default all).
        batch_size: pairs per chunk (each chunk: two forwards and one backward); bounds memory.
            Fewer pairs run at once where the memory budget
            (:func:`tl_reward.set_memory_budget`) allows fewer.
        checkpoint: run the target run's blocks under activation checkpointing
            (:func:`tl_reward._memory.checkpointed_blocks`: one layer's graph held at a time
            during the backward pass, for one more forward); ``None`` (default) does so exactly
            when one pair's full backward graph would not fit the memory budget (long inputs).
            The estimates are the same either way.
        progress: show a progress bar over the chunks.

    Cost: two forwards and one backward per chunk of pairs, whatever the number of cells (one
    forward more with ``checkpoint``).
    """
    hooks = tuple(hooks)
    if not hooks:
        raise InvalidInputError("hooks is empty; pass at least one of " + ", ".join(ATP_HOOKS))
    for hook in hooks:
        if hook == "pattern":
            raise InvalidInputError(
                "attribution patching of attention patterns is not supported; patch 'z' or "
                "'v' (or use activation_patch(hook='pattern'))"
            )
        choose("hook", hook, ATP_HOOKS)
    if len(set(hooks)) != len(hooks):
        raise InvalidInputError(f"hooks {list(hooks)} contain duplicates")
    choose("mode", mode, ATP_MODES)
    cfg = model.cfg
    layers = list(range(cfg.n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < cfg.n_layers]
    if bad or not layers:
        raise InvalidInputError(f"layers {bad or layers} are not in 0..{cfg.n_layers - 1}")
    started = time.perf_counter()

    clean_t, clean_m = as_tokens(model, clean, clean_mask)
    corrupt_t, corrupt_m = as_tokens(model, corrupt, corrupt_mask)
    if corrupt_t.shape[0] != clean_t.shape[0]:
        raise InvalidInputError(
            f"{clean_t.shape[0]} clean but {corrupt_t.shape[0]} corrupt sequences; pairs must match"
        )
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    names = {f"blocks.{l}.{HOOKS[h][0]}": (h, l) for h in hooks for l in layers}
    # the memory budget: the target run's graph, kept for the backward, and the activations read
    # (both runs' and the gradients) bound the pairs per chunk; a graph that does not fit even
    # for one pair is recomputed layer by layer in the backward pass instead
    n_pos = max(clean_t.shape[1], corrupt_t.shape[1])
    kept = 3 * n_pos * sum(_cell_width(cfg, HOOKS[h][1], h) for h in hooks) * len(layers) * max(
        torch.tensor([], dtype=cfg.dtype).element_size(), 4)
    if checkpoint is None:
        checkpoint = needs_checkpointing(cfg, n_pos, kept_per_row=kept)
    batch_size = rows_that_fit(cfg, n_pos, batch_size, kept_per_row=kept, grad=True,
                               checkpointed=checkpoint)
    t_tokens, t_mask = (corrupt_t, corrupt_m) if mode == "denoise" else (clean_t, clean_m)
    s_tokens, s_mask = (clean_t, clean_m) if mode == "denoise" else (corrupt_t, corrupt_m)
    if not isinstance(positions, str):
        positions = torch.as_tensor(positions, device=t_tokens.device).long()

    from tqdm.auto import tqdm

    n_pairs, n_t = t_tokens.shape
    chunks = []
    starts = range(0, n_pairs, batch_size)
    for lo in tqdm(starts, desc=f"attribution patching ({mode})", disable=not progress or len(starts) < 2,
                   leave=False):
        rows = slice(lo, min(lo + batch_size, n_pairs))
        chunks.append(_atp_rows(
            model, names, layers,
            s_tokens[rows], None if s_mask is None else s_mask[rows],
            t_tokens[rows], None if t_mask is None else t_mask[rows],
            positions if isinstance(positions, str) else positions[rows], checkpoint,
        ))
    estimates = {h: torch.cat([c[0][h] for c in chunks], dim=-1) for h in hooks}
    pos_map, pooled, source_r, target_r = (torch.cat([c[k] for c in chunks]) for k in range(1, 5))
    clean_r, corrupt_r = (source_r, target_r) if mode == "denoise" else (target_r, source_r)
    flops = n_pairs * cfg.n_layers * (
        layer_flops(model, s_tokens.shape[1], s_tokens.shape[1])
        # forward + backward (about twice a forward), and the recomputing forward
        + (3 + checkpoint) * layer_flops(model, n_t, n_t)
    )
    stats = PatchStats(n_forwards=(2 + checkpoint) * len(chunks), n_rows=2 * n_pairs, flops=float(flops),
                       seconds=time.perf_counter() - started, device=str(pooled.device),
                       dtype=cfg.dtype)
    return AtPResult(
        estimates=estimates, pos_map=pos_map, target_pooled=pooled, clean_reward=clean_r,
        corrupt_reward=corrupt_r, hooks=hooks, layers=tuple(layers), mode=mode,
        relative_positions=isinstance(positions, str), stats=stats,
    )


def _cell_width(cfg, kind: str, hook: str) -> int:
    """Entries of one position of ``hook`` at one layer (heads times d_head, neurons, d_model)."""
    if kind == "neuron":
        return cfg.d_mlp
    if kind == "head":
        kv = hook in ("k", "v") and cfg.n_key_value_heads is not None
        return (cfg.n_key_value_heads if kv else cfg.n_heads) * cfg.d_head
    return cfg.d_model


def _atp_rows(model, names, layers, s_tokens, s_mask, t_tokens, t_mask, positions,
              checkpoint: bool):
    """Estimates of one chunk of pairs: two forwards (source, target) and one backward."""
    source = _forward(model, s_tokens, s_mask, names, grad=False)
    with checkpointed_blocks(model) if checkpoint else nullcontext():
        target = _forward(model, t_tokens, t_mask, names, grad=True)
        acts = list(target.cache)
        grads = torch.autograd.grad(target.reward.sum(), [target.cache[n] for n in acts])
    pos_map = position_map(target, source, positions)
    n_pairs, n_t = target.tokens.shape
    dt = readout_dtype(model)
    estimates: dict[str, Tensor] = {}
    with torch.no_grad():
        for name, grad in zip(acts, grads, strict=True):
            hook, layer = names[name]
            kind = HOOKS[hook][1]
            act = target.cache[name].detach().to(dt)
            diff = aligned(source.cache[name], pos_map, kind).to(dt) - act
            diff = diff * (pos_map >= 0).reshape(n_pairs, n_t, *([1] * (act.ndim - 2)))
            term = diff * grad.to(dt)  # [pair, pos, (unit,) (d,)]
            if kind in ("head", "resid"):  # over d_head / d_model
                term = term.sum(-1)
            term = term.permute(*range(2, term.ndim), 1, 0)  # [(unit,) pos, pair]
            if hook not in estimates:
                estimates[hook] = term.new_empty((len(layers), *term.shape))
            estimates[hook][layers.index(layer)] = term
    return (estimates, pos_map, target.pooled, source.reward.detach().to(dt),
            target.reward.detach().to(dt))


def _forward(model: HookedRewardModel, tokens: Tensor, mask: Tensor | None,
             names: dict[str, tuple[str, int]], grad: bool) -> Run:
    """One run caching ``names``; with ``grad`` the cached tensors stay in the autograd graph.

    An activation that does not require grad (frozen parameters upstream) is replaced in the
    forward by an identical leaf that does, so its gradient is still defined.
    """
    pooled = model.pooled_index(tokens, mask)
    cache: dict[str, Tensor] = {}

    def store(act: Tensor, hook) -> Tensor:
        if grad and not act.requires_grad:
            act = act.detach().requires_grad_(True)
        cache[hook.name] = act if grad else act.detach()
        return act

    with torch.set_grad_enabled(grad):
        reward = model.run_with_hooks(
            tokens, attention_mask=mask, pool_index=pooled,
            fwd_hooks=[(lambda n: n in names, store)],
        )
    if reward.ndim != 1:
        raise InvalidInputError(
            "attribution patching measures a scalar reward; choose an objective with "
            "model.set_objective(...)"
        )
    return Run(tokens, mask, pooled, reward, cache)
