"""Exact activation patching for reward models, batched and started at the patched layer.

How a grid is computed (every number exact, no approximation):

- the target run (corrupt for ``denoise``, clean otherwise) is cached once: each layer's residual
  input and every layer's keys and values; the source run (or zeros, or a reference mean) gives
  the replacement activations, aligned to the target's positions;
- each patched forward starts at the patched layer from the cached residual
  (``HookedTransformer.forward(start_at_layer=...)``); a patch of what a block adds to the
  residual stream (``resid_post``, ``mlp_out``, MLP neurons of an MLP that ends in its output
  matrix) is written into the cached residual directly, and a patch of the attention's output
  (``attn_out``, head ``z``) reruns only the block's MLP, before the run goes on at the next
  block;
- a patch at position ``p`` cannot change positions before ``p`` (causal attention), so those
  positions are not recomputed: their keys and values come from the cached run through
  TransformerLens's key-value cache, and only positions ``>= p`` are run;
- likewise, where the source run has the same tokens at the same positions as the target (a
  preference pair's shared prompt), every activation there is the same in both runs: a patch
  starts at the first position where they differ, a cell patching only the shared prefix
  has an effect of exactly 0 without being run, and the source run itself starts after the
  prefix (on the target run's keys and values);
- many cells (pairs x positions x heads ...) go into one forward as rows of a batch, at most
  ``max_rows`` to bound memory, sorted by patched position: a forward starts at the earliest
  position it patches, and rows at nearby positions share a forward when that wastes less than
  a forward's fixed cost (a small dynamic programme); where the patch enters the residual
  stream between blocks (the shortcuts above), the rows of several layers share a forward too,
  each layer's rows joining the run at the block after its patch;
- positions after the scoring token are never run, and patches there have an effect of exactly
  0; the last block runs at each row's scoring token alone (its keys and values for the
  earlier positions come from its own projections: queries, attention and MLP are only needed
  where the reward is read).
"""

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._device import checked_device
from .._memory import rows_that_fit
from .._readout import as_tokens, choose, readout_dtype
from ..errors import InvalidInputError
from ..model import HookedRewardModel, Text
from ._runs import (
    HOOKS,
    MODES,
    PERS,
    Run,
    aligned,
    cached_run,
    common_prefix,
    kv_prefix,
    layer_flops,
    pair_tokens,
    position_map,
    run_after,
    scoring_block_flops,
    shared_prefix,
)


def matmul_rate(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                cached: bool = True) -> float:
    """This machine's matmul rate in FLOP/s on ``device`` in ``dtype``: the fastest of 5 timed
    2048 x 2048 matmuls after a warm-up (about 0.5 s on a 2-core CPU). Measured once per device
    and dtype unless ``cached=False``."""
    key = (checked_device(device), dtype)
    if not cached or key not in _MATMUL_RATES:
        n = 2048
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        sync = torch.cuda.synchronize if a.device.type == "cuda" else (lambda: None)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(5):
            sync()
            start = time.perf_counter()
            torch.mm(a, b)
            sync()
            best = min(best, time.perf_counter() - start)
        _MATMUL_RATES[key] = 2 * n**3 / best
    return _MATMUL_RATES[key]


_MATMUL_RATES: dict[tuple[str, torch.dtype], float] = {}


@dataclass(frozen=True)
class PatchStats:
    """What a grid cost: forwards run, rows (cells x pairs) computed, matmul FLOPs, wall time,
    and where it ran (the model's device and dtype)."""

    n_forwards: int
    n_rows: int
    flops: float
    seconds: float
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

    @property
    def flops_per_second(self) -> float:
        return self.flops / self.seconds if self.seconds > 0 else float("nan")

    def fraction_of_matmul_rate(self) -> float:
        """The achieved FLOP rate over this machine's matmul rate on the same device and dtype
        (:func:`matmul_rate`, measured on the first call)."""
        return self.flops_per_second / matmul_rate(self.device, self.dtype)


@dataclass(frozen=True)
class PatchResult:
    """Effects of patching, one value per cell and pair: ``effects[*cells, pair]``.

    ``effects`` is the patched reward minus the target run's reward (the corrupt run for
    ``denoise``, the clean run otherwise). ``normalized`` is the fraction of the clean - corrupt
    gap the patch restores (``denoise``: (patched - corrupt) / (clean - corrupt)) or destroys
    (other modes: (clean - patched) / (clean - corrupt)). NaN marks a cell that does not exist for
    a pair (a position before its first token or without a counterpart in the source).
    """

    effects: Tensor
    normalized: Tensor
    clean_reward: Float[Tensor, "pair"]
    corrupt_reward: Float[Tensor, "pair"] | None
    axes: tuple[str, ...]
    axis_labels: tuple[tuple[str, ...], ...]
    hook: str
    per: str
    mode: str
    stats: PatchStats = field(compare=False)

    @property
    def mean_effect(self) -> Tensor:
        """Effect averaged over pairs (NaN cells ignored)."""
        return self.effects.nanmean(-1)

    @property
    def mean_normalized(self) -> Tensor:
        return self.normalized.nanmean(-1)

    def flat(self) -> tuple[Float[Tensor, "component pair"], tuple[str, ...]]:
        """Cells as rows with labels in attribution's naming (``"3_attn_out"``, ``"L2H1"``,
        ``"L0N7"``; positions as ``"@-2"`` from the scoring token), for comparisons."""
        names = _cell_names(self)
        return self.effects.reshape(len(names), -1), names

    def cells(self):
        """One row per cell (``flat()`` names): effect and normalised effect averaged over pairs."""
        import pandas as pd

        names = _cell_names(self)
        return pd.DataFrame({"cell": list(names),
                             "mean_effect": self.mean_effect.reshape(-1).cpu().numpy(),
                             "mean_normalized": self.mean_normalized.reshape(-1).cpu().numpy()})

    def top(self, k: int = 10):
        """The ``k`` cells with the largest ``|mean_effect|`` (NaN cells last)."""
        df = self.cells()
        return df.reindex(df["mean_effect"].abs().sort_values(ascending=False).index).head(k)

    def to_dataframe(self):
        """Long format: one row per (cell, pair)."""
        import itertools

        import pandas as pd

        rows = []
        e, n = self.effects.cpu(), self.normalized.cpu()
        for idx in itertools.product(*(range(len(a)) for a in self.axis_labels)):
            cell = {ax: self.axis_labels[k][i] for k, (ax, i) in enumerate(zip(self.axes, idx, strict=True))}
            for pair in range(e.shape[-1]):
                rows.append({**cell, "pair": pair, "effect": float(e[idx + (pair,)]),
                             "normalized": float(n[idx + (pair,)])})
        return pd.DataFrame(rows)

    def plot(self, normalized: bool = True, title: str | None = None):
        """Heatmap (two cell axes) or bars (one) of the pair-averaged effect."""
        import plotly.express as px

        values = (self.mean_normalized if normalized else self.mean_effect).cpu()
        what = "normalised effect" if normalized else "reward change"
        title = title or f"{self.mode} patching of {self.hook} per {self.per}"
        if values.ndim == 1:
            return px.bar(x=list(self.axis_labels[0]), y=values.numpy(), title=title,
                          labels={"x": self.axes[0], "y": what})
        if values.ndim == 3:  # head x pos: average over positions would hide them; show layer.head rows
            values = values.reshape(-1, values.shape[-1])
            rows = [f"L{a}H{b}" for a in self.axis_labels[0] for b in self.axis_labels[1]]
            cols = list(self.axis_labels[2])
        else:
            rows, cols = list(self.axis_labels[0]), list(self.axis_labels[1])
        lim = float(values.nan_to_num().abs().max()) or 1.0
        return px.imshow(values.numpy(), x=cols, y=rows, color_continuous_scale="RdBu",
                         zmin=-lim, zmax=lim, aspect="auto", title=title,
                         labels={"x": self.axes[-1], "y": "layer" if len(rows) and values.ndim == 2 else "", "color": what})


def normalized_effects(effects: Tensor, clean: Tensor, corrupt: Tensor | None, mode: str) -> Tensor:
    """:attr:`PatchResult.normalized`: the share of the clean - corrupt gap an effect restores
    (``denoise``) or destroys (other modes); NaN without a corrupt run."""
    if corrupt is None:
        return torch.full_like(effects, float("nan"))
    sign = 1.0 if mode == "denoise" else -1.0
    return sign * effects / (clean - corrupt)


def _cell_names(result: PatchResult) -> tuple[str, ...]:
    import itertools

    names = []
    for idx in itertools.product(*(range(len(a)) for a in result.axis_labels)):
        lab = dict(zip(result.axes, (result.axis_labels[k][i] for k, i in enumerate(idx)), strict=True))
        layer = lab["layer"]
        if "head" in lab:
            name = f"L{layer}H{lab['head']}"
        elif "neuron" in lab:
            name = f"L{layer}N{lab['neuron']}"
        else:  # "3_attn_out", "3_resid_pre"; path patching's "mlp_out->reward" gives "3_mlp_out"
            name = f"{layer}_{result.hook.split('->')[0]}"
        if "pos" in lab:
            name += f"@{lab['pos']}"
        names.append(name)
    return tuple(names)


# ---------------------------------------------------------------------------------- main entry
def activation_patch(
    model: HookedRewardModel,
    clean: Int[Tensor, "pair pos"] | Sequence[Text],
    corrupt: Int[Tensor, "_pair _pos"] | Sequence[Text] | None = None,
    *,
    hook: str = "resid_pre",
    per: str = "layer_pos",
    mode: str = "denoise",
    clean_mask: Int[Tensor, "pair pos"] | None = None,
    corrupt_mask: Int[Tensor, "_pair _pos"] | None = None,
    positions: str | Tensor = "align_end",
    reference: Int[Tensor, "batch _pos"] | Sequence[Text] | None = None,
    reference_mask: Int[Tensor, "batch _pos"] | None = None,
    layers: Sequence[int] | None = None,
    max_rows: int = 64,
    use_kv_cache: bool = True,
    progress: bool = True,
) -> PatchResult:
    """Exact activation patching of a reward model over a grid of cells.

    Args:
        hook: ``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``, ``z``,
            ``q``, ``k``, ``v`` (per key/value head under grouped-query attention), ``pattern``,
            ``mlp_post`` (MLP neurons).
        per: ``layer``, ``layer_pos``, ``head``, ``head_pos`` (head hooks), ``neuron``
            (``mlp_post``).
        clean, corrupt: the two runs of each pair (token ids with masks, or texts); for a
            preference pair, clean = chosen and corrupt = rejected. ``corrupt`` may be omitted
            for ``zero`` and ``mean`` ablation.
        mode: ``denoise`` (clean into corrupt), ``noise`` (corrupt into clean), ``zero`` or
            ``mean`` ablation of the clean run (``mean``: over ``reference``'s real tokens).
        positions: ``"align_end"`` lines the scoring tokens up (sequences of different lengths
            are compared position-from-the-end), or an explicit ``[pair, target_pos]`` map to
            source positions (-1: none). Grid positions are relative to the scoring token
            (``"-3"``) with ``align_end``, absolute target positions with a map.
        layers: restrict to these layers (default all).
        max_rows: rows (cells x pairs) per forward; bounds memory.
        use_kv_cache: reuse cached keys/values of the positions before a patched position
            (and skip the clean and corrupt runs' shared prefix); ``False`` recomputes every
            position of every patched forward (the reference the fast path is tested against).
            A gated head (which also reads the end of the prompt) always gets ``False``, and
            every patched forward runs the last block at every position.

    Several grids on the same pairs (``attn_out`` and ``mlp_out`` per layer, say) share the
    clean and corrupt runs under :func:`activation_patch_grids`.
    """
    return activation_patch_grids(
        model, clean, corrupt, [(hook, per)], mode=mode, clean_mask=clean_mask,
        corrupt_mask=corrupt_mask, positions=positions, reference=reference,
        reference_mask=reference_mask, layers=layers, max_rows=max_rows,
        use_kv_cache=use_kv_cache, progress=progress,
    )[0]


def activation_patch_grids(
    model: HookedRewardModel,
    clean: Int[Tensor, "pair pos"] | Sequence[Text],
    corrupt: Int[Tensor, "_pair _pos"] | Sequence[Text] | None = None,
    grids: Sequence[Sequence[str]] = (("attn_out", "layer"), ("mlp_out", "layer")),
    *,
    mode: str = "denoise",
    clean_mask: Int[Tensor, "pair pos"] | None = None,
    corrupt_mask: Int[Tensor, "_pair _pos"] | None = None,
    positions: str | Tensor = "align_end",
    reference: Int[Tensor, "batch _pos"] | Sequence[Text] | None = None,
    reference_mask: Int[Tensor, "batch _pos"] | None = None,
    layers: Sequence[int] | None = None,
    max_rows: int = 64,
    use_kv_cache: bool = True,
    progress: bool = True,
) -> list[PatchResult]:
    """:func:`activation_patch` of several ``(hook, per)`` grids on the same pairs, one
    :class:`PatchResult` each, in order: the clean and corrupt runs (and a ``mean`` reference)
    are run once for all of them. The default is reward-lens's and the seed's component grid,
    ``attn_out`` and ``mlp_out`` of every layer; TransformerLens's ``get_act_patch_block_every``
    is ``[("resid_pre", "layer_pos"), ("attn_out", "layer_pos"), ("mlp_out", "layer_pos")]``.
    The shared runs' time is counted in the first result's ``stats.seconds``.

    Args:
        grids: ``(hook, per)`` pairs, as ``hook`` and ``per`` of :func:`activation_patch`.
        Other arguments: as in :func:`activation_patch`.
    """
    grids = [tuple(g) for g in grids]
    if not grids or any(len(g) != 2 for g in grids):
        raise InvalidInputError(
            f"grids must be a non-empty list of (hook, per) pairs such as ('attn_out', 'layer'), "
            f"got {grids!r}"
        )
    for hook, per in grids:
        choose("hook", hook, HOOKS)
        choose("per", per, PERS[HOOKS[hook][1]])
    choose("mode", mode, MODES)
    kinds = {HOOKS[hook][1] for hook, _ in grids}
    if mode == "mean" and "pattern" in kinds:
        raise InvalidInputError("mean ablation of attention patterns is not defined; use zero or z")
    if mode == "mean" and reference is None:
        raise InvalidInputError(
            "mode='mean' needs reference= inputs to average over (token ids or texts, e.g. the "
            "chosen and rejected texts of your dataset)"
        )
    if max_rows < 1:
        raise InvalidInputError(f"max_rows must be >= 1, got {max_rows}")
    if model.reward_head.reads_prompt_end:
        # a gated head also reads the end of the prompt: every patched forward runs every
        # position from the first one (no cached prefix, no last block at the scoring token alone)
        use_kv_cache = False
    started = time.perf_counter()
    cfg = model.cfg
    layers = list(range(cfg.n_layers)) if layers is None else list(layers)
    bad = [l for l in layers if not 0 <= l < cfg.n_layers]
    if bad or not layers:
        raise InvalidInputError(f"layers {bad or layers} are not in 0..{cfg.n_layers - 1}")

    clean_t, clean_m, corrupt_t, corrupt_m = pair_tokens(model, clean, corrupt, clean_mask,
                                                          corrupt_mask, mode)
    # the memory budget: a patched forward's rows run at up to the full length
    n_pos = max(t.shape[1] for t in (clean_t, corrupt_t) if t is not None)
    max_rows = rows_that_fit(cfg, n_pos, max_rows)

    hook_names = {HOOKS[hook][0] for hook, _ in grids}
    act_names = {f"blocks.{l}.{h}" for l in layers for h in hook_names}
    base_names = {f"blocks.{l}.hook_resid_pre" for l in layers}
    for hook_name in hook_names:
        shortcut = _shortcut(model, hook_name)
        if shortcut is not None:  # what the patched block's output is computed from
            base_names |= {f"blocks.{l}.hook_{x}" for l in layers
                           for x in ("resid_post", "attn_out", "resid_mid")
                           if x != "resid_mid" or not (cfg.parallel_attn_mlp or shortcut == "output")}
    base_names |= {f"blocks.{l}.attn.hook_{x}" for l in range(cfg.n_layers) for x in "kv"}
    target_is_clean = mode != "denoise"
    t_tokens, t_mask = (clean_t, clean_m) if target_is_clean else (corrupt_t, corrupt_m)
    target = cached_run(model, t_tokens, t_mask, base_names | act_names)
    other = None
    if corrupt_t is not None:
        o_tokens, o_mask = (corrupt_t, corrupt_m) if target_is_clean else (clean_t, clean_m)
        start = common_prefix(model, target, o_tokens, o_mask, positions) if use_kv_cache else 0
        other = (run_after(model, o_tokens, o_mask, act_names, target, start) if start > 0
                 else cached_run(model, o_tokens, o_mask, act_names))
    clean_run, corrupt_run = (target, other) if target_is_clean else (other, target)
    source = other if mode in ("denoise", "noise") else None
    pos_map = position_map(target, source, positions)
    if "pattern" in kinds and source is not None and (
        source.tokens.shape != target.tokens.shape or bool((source.pooled != target.pooled).any())
        or bool((pos_map != torch.arange(pos_map.shape[1], device=pos_map.device)).any())
    ):
        raise InvalidInputError(
            "pattern patching needs clean and corrupt runs with identical token layouts "
            "(same lengths and padding); patch z, q, k or v instead"
        )
    if mode == "mean":
        ref_t, ref_m = as_tokens(model, reference, reference_mask)
        source = cached_run(model, ref_t, ref_m, act_names)  # averaged in _replacements

    dt = readout_dtype(model)
    clean_r = clean_run.reward.to(dt)
    corrupt_r = corrupt_run.reward.to(dt) if corrupt_run is not None else None
    results = []
    for hook, per in grids:
        effects, axes, labels, stats = _patch_grid(model, target, source, mode, hook, per, layers,
                                                   pos_map, positions, max_rows, use_kv_cache,
                                                   progress, started)
        started = time.perf_counter()  # the shared runs count in the first grid's seconds
        results.append(PatchResult(
            effects=effects, normalized=normalized_effects(effects, clean_r, corrupt_r, mode),
            clean_reward=clean_r, corrupt_reward=corrupt_r,
            axes=axes, axis_labels=labels, hook=hook, per=per, mode=mode, stats=stats,
        ))
    return results


def _patch_grid(model, target: Run, source: Run | None, mode: str, hook: str, per: str,
                layers: list[int], pos_map: Tensor, positions, max_rows: int,
                use_kv_cache: bool, progress: bool, started: float):
    """Effects ``[layer, *unit, *pos, pair]`` of one grid, its axes, labels and stats."""
    from tqdm.auto import tqdm

    hook_name, kind = HOOKS[hook]
    replacements = _replacements(mode, hook_name, kind, layers, source, target, pos_map)
    n_pairs, n_t = target.tokens.shape
    with_pos = per.endswith("_pos")
    if with_pos and isinstance(positions, str):
        span = int(target.pooled.max()) + 1
        rel = list(range(-(span - 1), 1))  # relative to the scoring token
        pos_labels = tuple(str(r) for r in rel)
    elif with_pos:
        rel = list(range(n_t))
        pos_labels = tuple(str(p) for p in rel)
    example = replacements[layers[0]]
    if per in ("head", "head_pos"):
        n_units = example.shape[1] if kind == "pattern" else example.shape[2]
    elif per == "neuron":
        n_units = example.shape[2]
    else:
        n_units = 0
    unit_axis = {"head": "head", "head_pos": "head", "neuron": "neuron"}.get(per)

    axes: list[str] = ["layer"]
    labels: list[tuple[str, ...]] = [tuple(str(l) for l in layers)]
    if unit_axis:
        axes.append(unit_axis)
        labels.append(tuple(str(u) for u in range(n_units)))
    if with_pos:
        axes.append("pos")
        labels.append(pos_labels)
    shape = [len(a) for a in labels] + [n_pairs]
    dt = readout_dtype(model)
    effects = torch.full(shape, float("nan"), dtype=dt, device=target.reward.device)

    n_units_axis = max(n_units, 1)
    rel_t = torch.tensor(rel if with_pos else [0], device=target.pooled.device)
    n_forwards, n_rows, flops = 0, 0, 0.0
    rows = _grid_rows(target.pooled, pos_map, rel_t, n_units_axis, with_pos,
                      relative=isinstance(positions, str))  # the same cells in every layer
    if use_kv_cache:
        # a patch can only change positions from the first one where the runs differ on
        shared = shared_prefix(target, source if mode in ("denoise", "noise") else None,
                                pos_map)[rows.pair]
        start_of = torch.maximum(rows.pos, shared) if with_pos else shared
        unchanged = (rows.pos < shared) if with_pos else (shared > target.pooled[rows.pair])
        rows, same = rows.split(~unchanged)
        start_of = start_of[~unchanged]
    else:
        start_of, same = torch.zeros_like(rows.pos), None
    order = torch.argsort(start_of, stable=True)
    chunks = _chunks(start_of[order], n_t, max_rows, _overhead_rows(target.tokens.device))
    grid = effects.view(len(layers), n_units_axis, len(rel_t), n_pairs)
    grid[:, rows.zero_unit, rows.zero_pos, rows.zero_pair] = 0.0  # after the scoring token
    if same is not None:  # the patch writes what the target run already has there
        grid[:, same.unit, same.rel, same.pair] = 0.0
    # rows of several layers share a forward where the patch enters the residual stream
    # between blocks: each layer's rows join the run at the block after their patch
    per_forward = 1 if _shortcut(model, hook_name) is None else len(layers)
    bar = tqdm(total=len(layers) * len(chunks), desc=f"patching {hook} per {per}",
               disable=not progress, leave=False)
    for chunk in chunks:
        sel = order[chunk.to(order.device)]
        start = int(start_of[sel[0]])  # every row of the chunk patches there or later
        size = max(1, min(per_forward, max_rows // len(sel)))
        for lo in range(0, len(layers), size):
            group = list(range(lo, min(lo + size, len(layers))))  # indices into layers
            out, cost, n_fwd = _patched_forward(
                model, target, [replacements[layers[g]] for g in group],
                [layers[g] for g in group], hook_name, kind, start, rows.pair[sel],
                rows.unit[sel] if unit_axis else None, rows.pos[sel] if with_pos else None,
                pos_map,
            )
            base = target.reward[rows.pair[sel]]
            for g, o in zip(group, out, strict=True):
                grid[g, rows.unit[sel], rows.rel[sel], rows.pair[sel]] = o.to(dt) - base.to(dt)
            n_forwards += n_fwd
            n_rows += len(sel) * len(group)
            flops += cost
            bar.update(len(group))
    bar.close()
    stats = PatchStats(n_forwards, n_rows, flops, time.perf_counter() - started,
                       str(target.reward.device), model.cfg.dtype)
    return effects, tuple(axes), tuple(labels), stats


@dataclass(frozen=True)
class _Rows:
    """Cells x pairs to compute (``unit``, ``rel`` grid position index, ``pair``, absolute ``pos``)
    and those whose effect is exactly zero (a patch after the scoring token)."""

    unit: Tensor
    rel: Tensor
    pair: Tensor
    pos: Tensor
    zero_unit: Tensor
    zero_pos: Tensor
    zero_pair: Tensor

    def split(self, keep: Tensor) -> tuple["_Rows", "_Rows"]:
        """The rows where ``keep`` holds (with the zero cells), and the others as rows."""
        def part(m):
            return (self.unit[m], self.rel[m], self.pair[m], self.pos[m])
        return (_Rows(*part(keep), self.zero_unit, self.zero_pos, self.zero_pair),
                _Rows(*part(~keep), *(self.zero_unit[:0],) * 3))


def _grid_rows(pooled, pos_map, rel_t, n_units: int, with_pos: bool, relative: bool) -> _Rows:
    n_pairs, n_t = pos_map.shape
    n_rel = len(rel_t)
    if with_pos:
        p = pooled[None, :] + rel_t[:, None] if relative else rel_t[:, None].expand(n_rel, n_pairs)
        inside = (p >= 0) & (p < n_t)
        has_source = pos_map.gather(1, p.clamp(0, n_t - 1).T).T >= 0
        valid = inside & has_source
        after = valid & (p > pooled[None, :])
        todo = valid & ~after
    else:
        p = torch.zeros(1, n_pairs, dtype=torch.long, device=pooled.device)
        todo = (pos_map >= 0).any(1)[None]
        after = torch.zeros_like(todo)
    u, r, pair = torch.nonzero(todo[None].expand(n_units, -1, -1), as_tuple=True)
    zu, zr, zpair = torch.nonzero(after[None].expand(n_units, -1, -1), as_tuple=True)
    return _Rows(u, r, pair, p[r, pair], zu, zr, zpair)


def _replacements(mode, hook_name, kind, layers, source, target,
                  pos_map) -> dict[int, Tensor]:
    """Per layer, the activation to write at each target position (aligned to the target);
    ``mean``: ``source`` is the reference run, averaged over its real tokens."""
    names = [f"blocks.{l}.{hook_name}" for l in layers]
    if mode in ("denoise", "noise"):
        return {l: aligned(source.cache[n], pos_map, kind) for l, n in zip(layers, names, strict=True)}
    if mode == "zero":
        return {l: torch.zeros_like(target.cache[n]) for l, n in zip(layers, names, strict=True)}
    real = (source.mask.bool() if source.mask is not None
            else torch.ones(source.tokens.shape, dtype=torch.bool, device=source.tokens.device))
    out = {}
    for l, n in zip(layers, names, strict=True):
        mean = source.cache[n][real].mean(0)  # over every real token of the reference set
        out[l] = mean.expand_as(target.cache[n]).clone()
    return out


def _overhead_rows(device: torch.device) -> int:
    """A forward's fixed cost (Python, kernel launches, TransformerLens's per-call weight
    reshapes) in rows x positions of work: batching cells that start at different positions
    pays when it wastes less than this. A heuristic for the partition only; results are exact."""
    return 32 if torch.device(device).type == "cpu" else 1024


def _chunks(starts: Tensor, n_t: int, max_rows: int, overhead: int) -> list[Tensor]:
    """Split rows sorted by start position into forwards of at most ``max_rows`` rows (indices
    into ``starts``, ascending).

    A forward starts at its first row's position, so a row starting later computes
    ``row start - forward start`` positions for nothing; minimise that waste plus ``overhead``
    per forward (dynamic programme over runs of equal start, which each fit a forward or are
    first cut into full forwards).
    """
    values, counts = torch.unique_consecutive(starts, return_counts=True)
    chunks: list[Tensor] = []
    runs: list[tuple[int, int, int]] = []  # (first row, rows, start) of what is left to partition
    offset = 0
    for start, count in zip(values.tolist(), counts.tolist(), strict=True):
        full = count - count % max_rows
        chunks += [torch.arange(offset + lo, offset + lo + max_rows) for lo in range(0, full, max_rows)]
        if count > full:
            runs.append((offset + full, count - full, start))
        offset += count
    best = [0.0] + [float("inf")] * len(runs)  # best[j]: cost of the first j runs
    cut = [0] * (len(runs) + 1)
    for j in range(1, len(runs) + 1):
        n = 0
        for i in range(j, 0, -1):  # the last forward holds runs i-1 .. j-1
            n += runs[i - 1][1]
            if n > max_rows:
                break
            cost = best[i - 1] + overhead + n * (n_t - runs[i - 1][2])
            if cost < best[j]:
                best[j], cut[j] = cost, i
    j = len(runs)
    while j > 0:
        i = cut[j]
        chunks.append(torch.cat([torch.arange(first, first + n) for first, n, _ in runs[i - 1 : j]]))
        j = i - 1
    return sorted(chunks, key=lambda c: int(c[0]))


@torch.no_grad()
def _patched_forward(model, target: Run, repls: list[Tensor], layers: list[int], hook_name: str,
                     kind: str, start: int, pairs: Tensor, units: Tensor | None,
                     poss: Tensor | None, pos_map: Tensor
                     ) -> tuple[Float[Tensor, "layer batch"], float, int]:
    """Rewards of ``len(pairs)`` patched rows for each of ``layers`` (``repls``: each layer's
    replacement activations), run from position ``start`` on, the matmul FLOPs it took and the
    number of forwards. Several layers only where the patch changes a block's output or its
    attention's output (:func:`_shortcut`): then each layer's patched residual is computed from
    the cached run and its rows join one forward at the block after the patch. Otherwise one
    layer, patched by a hook in a forward from that layer on.

    Positions after the last scoring token of these rows are not run (they cannot change a
    reward). The last block runs at each row's scoring token alone
    (:meth:`HookedRewardModel._last_block_at_scoring_tokens`): its keys and values for the
    earlier positions come from its attention's projections, the rest of the block (queries,
    attention, MLP) is needed at the scoring token only.
    """
    last = model.cfg.n_layers - 1
    pooled = target.pooled[pairs]
    end = int(pooled.max()) + 1
    shortcut = _shortcut(model, hook_name)
    if shortcut is None:
        (layer,), (repl,) = layers, repls
        patch = _patch_fn(repl, kind, start, end, pairs, units, poss, pos_map)
        resid = target.cache[f"blocks.{layer}.hook_resid_pre"][pairs, start:end]
        hooks = [(f"blocks.{layer}.{hook_name}", patch)]
        if hook_name == "hook_resid_pre":  # the block's input: patch the cached residual itself
            resid, hooks = patch(resid, None), []
        out, flops = _run_blocks(model, target, layer, resid, pairs, start, end, hooks)
        return out[None], flops, 1
    outs: dict[int, Tensor] = {}
    joins: list[tuple[int, int, Tensor]] = []  # (index in layers, next block, its input)
    flops = 0.0
    for i, (layer, repl) in enumerate(zip(layers, repls, strict=True)):
        patch = _patch_fn(repl, kind, start, end, pairs, units, poss, pos_map)
        resid, cost = _patched_block_output(model, target, layer, hook_name, shortcut, patch,
                                            pairs, start, end)
        flops += cost
        if layer == last:  # the reward from the patched last block's output
            outs[i] = model._head(model.ln_final(resid)[:, 0], "reward")
        else:
            joins.append((i, layer + 1, resid))
    n_forwards = len(outs)
    if joins:
        joins.sort(key=lambda j: j[1])
        (_, first, resid), rest = joins[0], joins[1:]
        out, cost = _run_blocks(model, target, first, resid, pairs, start, end, [],
                                [(block, r) for _, block, r in rest])
        for (i, _, _), o in zip(joins, out.split(len(pairs)), strict=True):
            outs[i] = o
        flops += cost
        n_forwards += 1
    return torch.stack([outs[i] for i in range(len(layers))]), flops, n_forwards


def _patch_fn(repl: Tensor, kind: str, start: int, end: int, pairs: Tensor, units: Tensor | None,
              poss: Tensor | None, pos_map: Tensor):
    """The patch of rows ``pairs`` (units ``units``, positions ``poss`` or every mapped
    position) on an activation of positions ``start:end``: a TransformerLens hook function."""
    n_new = end - start
    rows = torch.arange(len(pairs), device=pairs.device)
    if poss is not None:
        pos_sel = torch.zeros(len(pairs), n_new, dtype=torch.bool, device=pairs.device)
        pos_sel[rows, poss - start] = True
    else:
        pos_sel = pos_map[pairs, start:end] >= 0
    new_values = repl[pairs][:, :, start:end, :end] if kind == "pattern" else repl[pairs, start:end]

    def patch(act: Tensor, hook) -> Tensor:
        if kind == "pattern":  # [row, head, q, k]
            sel = pos_sel[:, None, :, None]
            if units is not None:
                head_sel = torch.zeros(act.shape[:2], dtype=torch.bool, device=act.device)
                head_sel[rows, units] = True
                sel = sel & head_sel[:, :, None, None]
        else:  # [row, pos, *unit_dims]
            sel = pos_sel.reshape(*pos_sel.shape, *([1] * (act.ndim - 2)))
            if units is not None:
                unit_sel = torch.zeros(len(pairs), act.shape[2], dtype=torch.bool, device=act.device)
                unit_sel[rows, units] = True
                sel = sel & unit_sel.reshape(len(pairs), 1, act.shape[2], *([1] * (act.ndim - 3)))
        return torch.where(sel, new_values, act)

    return patch


def _patched_block_output(model, target: Run, layer: int, hook_name: str, shortcut: str, patch,
                          pairs: Tensor, start: int, end: int) -> tuple[Tensor, float]:
    """Block ``layer``'s patched output at positions ``start:end`` (the last block's at each
    row's scoring token alone: ``[rows, 1, d_model]``), from the cached run, and its FLOPs."""
    cfg = model.cfg
    last = cfg.n_layers - 1
    n_new = end - start
    pooled = target.pooled[pairs]
    rows = torch.arange(len(pairs), device=pairs.device)

    def cached(name: str) -> Tensor:
        return target.cache[f"blocks.{layer}.{name}"][pairs, start:end]

    block = model.blocks[layer]
    flops = 0.0
    with torch.no_grad():
        if shortcut == "output":  # the patch only changes what the block adds to the residual
            resid = cached("hook_resid_post")
            if hook_name == "hook_resid_post":
                resid = patch(resid, None)
            elif hook_name == "hook_mlp_out":
                resid = resid + (patch(cached(hook_name), None) - cached(hook_name))
            else:  # mlp.hook_post: the MLP's output is linear in it
                act = cached(hook_name)
                resid = resid + (patch(act, None) - act) @ block.mlp.W_out
                flops += 2.0 * len(pairs) * n_new * cfg.d_mlp * cfg.d_model
        else:  # "attention": the patch only changes the attention's output
            if hook_name == "hook_attn_out":
                delta = patch(cached(hook_name), None) - cached(hook_name)
            else:  # attn.hook_z: the attention's output is linear in it
                z = cached(hook_name)
                delta = (patch(z, None) - z).flatten(2) @ block.attn.W_O.flatten(0, 1)
                flops += 2.0 * len(pairs) * n_new * cfg.n_heads * cfg.d_head * cfg.d_model
            if cfg.parallel_attn_mlp:  # attention and MLP both read resid_pre
                resid = cached("hook_resid_post") + delta
            else:  # the MLP reads resid_mid: rerun it (at the scoring token in the last block)
                mid = cached("hook_resid_mid") + delta
                if layer == last:
                    mid = mid[rows, pooled - start][:, None]
                resid = mid + block.apply_mlp(block.ln2(mid))
                flops += (2.0 * mid.shape[0] * mid.shape[1] * cfg.d_model * cfg.d_mlp
                          * (3 if cfg.gated_mlp else 2))
        if layer == last and resid.shape[1] > 1:
            resid = resid[rows, pooled - start][:, None]
    return resid, flops


def _shortcut(model: HookedRewardModel, hook_name: str) -> str | None:
    """How much of the patched block can be skipped, exactly.

    ``"output"``: the patch changes only what the block adds to the residual stream
    (``resid_post``, ``mlp_out``; MLP neurons where the MLP ends in its output matrix): the
    patched residual is written directly, the block is not rerun. ``"attention"``: the patch
    changes only the attention's output (``attn_out``; head ``z`` where no norm follows the
    output matrix): the attention is not rerun, only the MLP on the changed ``resid_mid``.
    ``None``: the block is rerun with the patch as a hook.
    """
    from transformer_lens.components.mlps.gated_mlp import GatedMLP
    from transformer_lens.components.mlps.mlp import MLP

    cfg = model.cfg
    if cfg.attn_only or (cfg.original_architecture or "").startswith("Olmo"):
        return None  # no MLP, or post-norm blocks: not the additive layout below
    if model.reward_head.reads_prompt_end:
        return None  # the shortcuts keep the last block's output at the scoring token only
    linear_mlp = all(type(b.mlp) in (MLP, GatedMLP) for b in model.blocks)
    no_post_norm = not cfg.use_normalization_before_and_after
    if hook_name in ("hook_resid_post", "hook_mlp_out") or (
            hook_name == "mlp.hook_post" and linear_mlp and no_post_norm):
        return "output"  # resid_post = resid_mid (or resid_pre + attn_out) + mlp_out
    if hook_name == "hook_attn_out" or (
            hook_name == "attn.hook_z" and no_post_norm and not cfg.use_attn_result):
        return "attention"
    return None


def _run_blocks(model, target: Run, layer: int, resid: Tensor, pairs: Tensor, start: int,
                end: int, hooks: list, joins: Sequence[tuple[int, Tensor]] = ()
                ) -> tuple[Tensor, float]:
    """Rewards from block ``layer``'s input at positions ``start:end`` (earlier positions from
    the target run's keys and values), with ``hooks``, and the matmul FLOPs it took.

    ``joins``: ``(block, input)`` of further rows of the same ``pairs`` that enter at a later
    block (ascending); their rewards follow the first rows' in that order.
    """
    cfg = model.cfg
    last = cfg.n_layers - 1
    n_new = end - start
    # the last block at the scoring tokens alone when the run starts below it (hooks are in
    # the block it starts at), or starts at it without hooks (a patch of its input)
    split = ((layer < last or not hooks) and n_new > 1 and model._scoring_path_supported()
             and not model.reward_head.reads_prompt_end)
    x, rows = resid, pairs
    flops = 0.0
    # a gated head finds the end of the prompt in the token ids (every position is run: start 0)
    gate_tokens = model.reward_head.reads_prompt_end

    def mask_of(r: Tensor) -> Tensor | None:
        return target.mask[r, :end] if target.mask is not None else None

    def kv_of(block: int, r: Tensor):
        return kv_prefix(model, target, block, r, start) if start > 0 else None

    with torch.no_grad():
        k = layer
        for stop in sorted({b for b, _ in joins}) + [last if split else cfg.n_layers]:
            if stop > k:  # blocks k .. stop - 1 over the rows so far
                x = model.run_with_hooks(x, attention_mask=mask_of(rows), start_at_layer=k,
                                         stop_at_layer=stop if stop < cfg.n_layers else None,
                                         past_kv_cache=kv_of(k, rows), fwd_hooks=hooks,
                                         **({} if stop < cfg.n_layers
                                            else {"pool_index": target.pooled[rows] - start,
                                                  "tokens": target.tokens[rows, start:end]
                                                  if gate_tokens else None}))
                flops += len(rows) * (stop - k) * layer_flops(model, n_new, end)
                k = stop
            joining = [r for b, r in joins if b == stop]
            joins = [(b, r) for b, r in joins if b != stop]  # each joins once
            if joining:
                x = torch.cat([x, *joining])
                rows = torch.cat([rows] + [pairs] * len(joining))
        if not split:  # the last block ran everywhere: x is the reward
            return x, flops
        past = None
        if start > 0:
            prefix = kv_prefix(model, target, last, rows, start)[last]
            past = (prefix.past_keys, prefix.past_values)
        out = model._last_block_at_scoring_tokens(x, mask_of(rows), target.pooled[rows], past)
    return out, flops + len(rows) * scoring_block_flops(model, n_new, end)
