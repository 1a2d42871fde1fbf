"""Patching a process reward model with a step's score or a solution's aggregate as the metric.

A process reward model scores step ``i`` of a solution at its separator token
(:mod:`tl_reward.process`); the solution's reward is an aggregate of its steps (``min``, ``last``,
``product``, ``mean``). :func:`step_patch` is activation patching with that reward as the metric.

How it stays exact and fast: attention is causal, so step ``i``'s score is the pooled reward of
the solution cut right after its separator (:func:`tl_reward.process.step_tokens`), and a patch of
the whole solution at layer ``l`` and position ``p`` changes step ``i`` exactly as the same patch
of cut ``i`` does (step ``i`` never reads the positions after its separator), and leaves the steps
that end before ``p`` unchanged. So the cuts of every solution (one row per step) go through
:func:`tl_reward.activation_patch`'s batched engine once, each cell's patched score of every step
is read from it, and the metric is computed from those scores per cell: the aggregate's effect is
the exact effect of the patch on the aggregate (``min`` of the patched steps, not a sum of
per-step effects). ``tests/test_step_analysis.py`` checks it against full forwards of the whole
solution patched with plain TransformerLens hooks.

:func:`step_attribution_patch` is attribution patching (AtP) with the same metrics: the gradient
of the metric with respect to every activation of the whole solution, times the activation's
change. By the chain rule that is each step's AtP estimate on its cut (the gradient of step ``i``'s
score lives on its cut) weighted by the metric's derivative in that step: ``min`` the weakest
step's (a subgradient: the first weakest on ties), ``product`` the product of the other steps,
``mean`` ``1 / n``, ``last`` and a step index the one step. Checked against autograd on whole
solutions in the tests.

Scores: ``score="probability"`` (a head with two outputs, e.g. Qwen2.5-Math-PRM) reads the step's
probability of output 1, ``softmax(logits)[1] = sigmoid(logit_1 - logit_0)``: the engine patches
the log-odds (the objective ``[-1, 1]``, set for the call and restored) and the probability is its
sigmoid; ``score="reward"`` the scalar head output.
"""

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from .._readout import choose
from ..errors import InvalidInputError
from ..model import HookedRewardModel, Text
from ..process import AGGREGATES, aggregate_steps, step_score, step_tokens
from ._runs import HOOKS, PERS
from .atp import AtPResult, attribution_patch
from .patching import PatchResult, activation_patch, normalized_effects

Solution = Text | Int[Tensor, "_pos"]  # one solution; solutions of a list differ in length


@dataclass(frozen=True)
class StepPatchResult:
    """Patching effects on a process reward.

    ``solutions``: the metric (a step's score, or the aggregate) per cell and solution,
    ``effects[*cells, solution]``, with the clean and corrupt metrics as its ``clean_reward`` /
    ``corrupt_reward`` and the normalised effect as in :class:`~tl_reward.causal.patching.PatchResult`.
    ``steps``: every step's score per cell, ``effects[*cells, step]`` with the steps of all
    solutions side by side; ``solution[j]`` and ``separator[j]`` say whose step column ``j`` is
    and where its separator stands.
    """

    solutions: PatchResult
    steps: PatchResult
    solution: Int[Tensor, "step"]
    separator: Int[Tensor, "step"]
    metric: str | int
    score: str

    def top(self, k: int = 10):
        """The ``k`` cells that move the metric most (mean over solutions)."""
        return self.solutions.top(k)

    def plot(self, normalized: bool = True, title: str | None = None):
        """The metric's heatmap or bars (:meth:`PatchResult.plot`)."""
        what = self.metric if isinstance(self.metric, str) else f"step {self.metric}"
        return self.solutions.plot(normalized, title or (
            f"{self.solutions.mode} patching of {self.solutions.hook} per {self.solutions.per}: "
            f"{what} of the step {self.score}"))


def _solutions(texts, name: str) -> list[Solution]:
    if isinstance(texts, str) or (isinstance(texts, list) and texts and isinstance(texts[0], dict)):
        return [texts]
    if isinstance(texts, Tensor):
        if texts.ndim != 1:
            raise InvalidInputError(
                f"{name}: one solution's token ids [pos] or a list of solutions, got a tensor of "
                f"shape {tuple(texts.shape)}; pass a list of 1-D token id tensors (no padding)"
            )
        return [texts]
    texts = list(texts)
    if not texts:
        raise InvalidInputError(f"{name}: no solutions given")
    return texts


def _cuts(model: HookedRewardModel, solutions: list[Solution], separator: int):
    """Every step's cut of every solution as token id lists, the solution of each cut, and each
    solution's length in tokens."""
    ids, owner, lengths = [], [], []
    for s, solution in enumerate(solutions):
        if not isinstance(solution, Tensor):
            solution = model.to_tokens(solution)[0]
        tokens, mask = step_tokens(model, solution, separator)
        cut_lengths = mask.sum(-1).tolist()
        ids += [tokens[i, :n].tolist() for i, n in enumerate(cut_lengths)]
        owner += [s] * len(cut_lengths)
        lengths.append(len(solution))
    return ids, torch.tensor(owner), lengths


@contextmanager
def _engine_reads(model: HookedRewardModel, score: str):
    """The scalar the patching engines read: the step's log-odds ``logit_1 - logit_0`` for
    ``score="probability"`` (its sigmoid is the probability; the objective is restored after),
    the model's scalar reward otherwise."""
    if score != "probability":
        yield
        return
    model.set_objective([-1.0, 1.0])
    try:
        yield
    finally:
        model.set_objective(None)


@dataclass(frozen=True)
class _StepPairs:
    """Each step's cut of the clean (and corrupt) solutions, right-padded, one row per step."""

    clean: tuple[Tensor, Tensor]
    corrupt: tuple[Tensor, Tensor] | None
    owner: Int[Tensor, "step"]  # the solution of each row
    separator: Int[Tensor, "step"]  # each row's separator position
    lengths: list[int]  # each clean solution's length in tokens
    same_layout: bool  # clean and corrupt separators at the same positions

    def absolute_positions(self) -> Tensor:
        """The identity position map: grid positions are the solution's token indices."""
        tokens = self.clean[0]
        return torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)


def _step_pairs(model: HookedRewardModel, clean, corrupt, separator: int,
                metric: str | int) -> _StepPairs:
    """The checked inputs of :func:`step_patch` and :func:`step_attribution_patch`."""
    if isinstance(metric, bool) or not isinstance(metric, (str, int)) or (
        isinstance(metric, str) and metric not in AGGREGATES
    ):
        raise InvalidInputError(
            f"metric {metric!r} is not an aggregate {list(AGGREGATES)} or a step index (an int)"
        )
    clean_s = _solutions(clean, "clean")
    corrupt_s = None if corrupt is None else _solutions(corrupt, "corrupt")
    if corrupt_s is not None and len(corrupt_s) != len(clean_s):
        raise InvalidInputError(
            f"{len(clean_s)} clean but {len(corrupt_s)} corrupt solutions; they must pair up"
        )
    clean_ids, owner, lengths = _cuts(model, clean_s, separator)
    if isinstance(metric, int):
        for s, n in enumerate(torch.bincount(owner).tolist()):
            if not -n <= metric < n:
                raise InvalidInputError(
                    f"metric step {metric} does not exist in solution {s}, which has {n} steps"
                )
    corrupt_pad, same_layout = None, True
    if corrupt_s is not None:
        corrupt_ids, corrupt_owner, _ = _cuts(model, corrupt_s, separator)
        if not torch.equal(corrupt_owner, owner):
            raise InvalidInputError(
                "clean and corrupt solutions have different numbers of steps (separators "
                f"{separator}): step i of each must pair up"
            )
        corrupt_pad = model.pad(corrupt_ids)
        same_layout = [len(a) for a in clean_ids] == [len(b) for b in corrupt_ids]
    return _StepPairs(clean=model.pad(clean_ids), corrupt=corrupt_pad, owner=owner,
                      separator=torch.tensor([len(ids) - 1 for ids in clean_ids]),
                      lengths=lengths, same_layout=same_layout)


def _needs_same_layout(what: str) -> InvalidInputError:
    return InvalidInputError(
        f"{what} patches absolute positions, which needs each clean and corrupt solution's "
        "separators at the same positions; these differ. Use step_patch with per='layer' or "
        "'head', or corrupt solutions of the same layout (one token replaced)"
    )


def _metric(values: Tensor, owner: Tensor, metric: str | int) -> Tensor:
    """``[*cells, step] -> [*cells, solution]``: each solution's metric from its steps' scores."""
    out = []
    for s in range(int(owner.max()) + 1):
        steps = values[..., (owner == s).nonzero().flatten().to(values.device)]
        out.append(aggregate_steps(steps, metric) if isinstance(metric, str)
                   else steps[..., metric])
    return torch.stack(out, -1)


def step_patch(
    model: HookedRewardModel,
    clean: Solution | Sequence[Solution],
    corrupt: Solution | Sequence[Solution] | None = None,
    *,
    separator: int,
    metric: str | int = "min",
    score: str | None = None,
    hook: str = "resid_pre",
    per: str = "layer_pos",
    mode: str = "denoise",
    reference: Int[Tensor, "batch _pos"] | Sequence[Text] | None = None,
    reference_mask: Int[Tensor, "batch _pos"] | None = None,
    layers: Sequence[int] | None = None,
    max_rows: int = 64,
    progress: bool = True,
) -> StepPatchResult:
    """Exact activation patching of a process reward model, the metric a step's score or the
    solution's aggregate (see the module docstring).

    Args:
        clean, corrupt: one solution or a list of them (texts, chats, or 1-D token ids without
            padding), each step ended by ``separator``; clean and corrupt solutions pair up and
            have the same number of steps. Grids with a position axis (``per="layer_pos"``,
            ``"head_pos"``) need each pair's separators at the same positions (the usual
            corruption: one token replaced); their positions are absolute (token index in the
            solution).
        separator: the step-separator token id (Qwen2.5-Math-PRM: the id of ``<extra_0>``).
        metric: ``"min"``, ``"last"``, ``"product"``, ``"mean"`` of the step scores, or a step's
            index (``0``, ``-1``, ...).
        score: ``"probability"`` or ``"reward"``, as in :func:`tl_reward.process.step_rewards`.
        hook, per, mode, reference, reference_mask, layers, max_rows, progress: as in
            :func:`tl_reward.activation_patch`.
    """
    choose("hook", hook, HOOKS)
    choose("per", per, PERS[HOOKS[hook][1]])
    score = step_score(model, score)
    pairs = _step_pairs(model, clean, corrupt, separator, metric)
    (clean_t, clean_m), (corrupt_t, corrupt_m) = pairs.clean, pairs.corrupt or (None, None)
    with_pos = per.endswith("pos")
    if with_pos and mode in ("denoise", "noise") and not pairs.same_layout:
        raise _needs_same_layout(f"per={per!r}")
    # absolute positions: the same position in every step's cut
    positions = pairs.absolute_positions() if with_pos else "align_end"

    log_odds = score == "probability"
    with _engine_reads(model, score):
        res = activation_patch(
            model, clean_t, corrupt_t, hook=hook, per=per, mode=mode, clean_mask=clean_m,
            corrupt_mask=corrupt_m, positions=positions, reference=reference,
            reference_mask=reference_mask, layers=layers, max_rows=max_rows, progress=progress,
        )

    def as_score(x: Tensor) -> Tensor:
        return x.sigmoid() if log_odds else x

    target = res.corrupt_reward if mode == "denoise" else res.clean_reward
    unrun = res.effects.isnan()  # a position the step's cut does not hold: the step is unchanged
    patched = as_score(target + res.effects.nan_to_num(0.0))
    step_clean = as_score(res.clean_reward)
    step_corrupt = None if res.corrupt_reward is None else as_score(res.corrupt_reward)
    step_effects = (patched - as_score(target)).masked_fill(unrun, float("nan"))
    steps = PatchResult(
        effects=step_effects, normalized=normalized_effects(step_effects, step_clean, step_corrupt, mode),
        clean_reward=step_clean, corrupt_reward=step_corrupt, axes=res.axes,
        axis_labels=res.axis_labels, hook=res.hook, per=res.per, mode=mode, stats=res.stats,
    )
    owner = pairs.owner.to(patched.device)
    m_clean = _metric(step_clean, owner, metric)
    m_corrupt = None if step_corrupt is None else _metric(step_corrupt, owner, metric)
    m_target = m_corrupt if mode == "denoise" else m_clean
    effects = _metric(patched, owner, metric) - m_target
    if "pos" in res.axes:  # a position past a solution's end does not exist for it (NaN)
        axis = res.axes.index("pos")
        pos = torch.tensor([int(p) for p in res.axis_labels[axis]], device=effects.device)
        length = torch.tensor(pairs.lengths, device=effects.device)
        past = pos[:, None] >= length  # [pos, solution]
        shape = [1] * effects.ndim
        shape[axis], shape[-1] = past.shape
        effects = effects.masked_fill(past.reshape(shape), float("nan"))
    solutions = PatchResult(
        effects=effects, normalized=normalized_effects(effects, m_clean, m_corrupt, mode),
        clean_reward=m_clean, corrupt_reward=m_corrupt, axes=res.axes,
        axis_labels=res.axis_labels, hook=res.hook, per=res.per, mode=mode, stats=res.stats,
    )
    return StepPatchResult(solutions=solutions, steps=steps, solution=pairs.owner,
                           separator=pairs.separator, metric=metric, score=score)


def _weights(values: Tensor, owner: Tensor, metric: str | int) -> Tensor:
    """``d metric / d step score`` of each step column (``[step]``), per its solution."""
    w = torch.zeros_like(values)
    for s in range(int(owner.max()) + 1):
        cols = (owner == s).nonzero().flatten().to(values.device)
        v = values[cols]
        if metric == "min":
            g = torch.zeros_like(v)
            g[int(v.argmin())] = 1.0
        elif metric == "mean":
            g = torch.full_like(v, 1.0 / len(v))
        elif metric == "product":
            g = torch.stack([torch.cat([v[:i], v[i + 1:]]).prod() for i in range(len(v))])
        else:  # "last" or a step index (checked by _step_pairs)
            g = torch.zeros_like(v)
            g[-1 if metric == "last" else metric] = 1.0
        w[cols] = g
    return w


def step_attribution_patch(
    model: HookedRewardModel,
    clean: Solution | Sequence[Solution],
    corrupt: Solution | Sequence[Solution],
    *,
    separator: int,
    metric: str | int = "min",
    score: str | None = None,
    hooks: Sequence[str] = ("z", "mlp_post", "resid_pre", "attn_out", "mlp_out"),
    mode: str = "denoise",
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> AtPResult:
    """Attribution patching (first-order estimates of every patch of ``hooks`` at once) of a
    process reward model, the metric a step's score or the solution's aggregate (see the module
    docstring).

    Returns an :class:`~tl_reward.causal.atp.AtPResult` with one column per solution: its
    ``clean_reward`` / ``corrupt_reward`` are the clean and corrupt metrics, its estimates the
    metric's first-order changes at absolute positions (``as_patch_result(hook, per)`` gives the
    grid of :func:`step_patch` with the same hook and per). Clean and corrupt solutions need
    their separators at the same positions.

    Args:
        clean, corrupt, separator, metric, score: as in :func:`step_patch`.
        hooks, mode, layers, batch_size, progress: as in :func:`tl_reward.attribution_patch`.
    """
    score = step_score(model, score)
    pairs = _step_pairs(model, clean, corrupt, separator, metric)
    if not pairs.same_layout:
        raise _needs_same_layout("attribution patching of step scores")
    (clean_t, clean_m), (corrupt_t, corrupt_m) = pairs.clean, pairs.corrupt
    positions = pairs.absolute_positions()
    log_odds = score == "probability"
    with _engine_reads(model, score):
        res = attribution_patch(
            model, clean_t, corrupt_t, clean_mask=clean_m, corrupt_mask=corrupt_m, hooks=hooks,
            mode=mode, positions=positions, layers=layers, batch_size=batch_size,
            progress=progress,
        )
    owner = pairs.owner.to(res.clean_reward.device)
    target = res.corrupt_reward if mode == "denoise" else res.clean_reward
    step_target = target.sigmoid() if log_odds else target
    # d metric / d step log-odds (or reward): the metric's weight times the score's derivative
    weight = _weights(step_target, owner, metric)
    if log_odds:
        weight = weight * step_target * (1 - step_target)
    n_solutions = int(owner.max()) + 1
    combine = torch.zeros(len(owner), n_solutions, dtype=weight.dtype, device=weight.device)
    combine[torch.arange(len(owner), device=weight.device), owner] = weight
    estimates = {h: e @ combine for h, e in res.estimates.items()}
    last = torch.stack([(owner == s).nonzero().max() for s in range(n_solutions)])
    as_score = torch.sigmoid if log_odds else (lambda x: x)
    return AtPResult(
        estimates=estimates, pos_map=res.pos_map[last], target_pooled=res.target_pooled[last],
        clean_reward=_metric(as_score(res.clean_reward), owner, metric),
        corrupt_reward=_metric(as_score(res.corrupt_reward), owner, metric), hooks=res.hooks,
        layers=res.layers, mode=mode, relative_positions=False, stats=res.stats,
    )
