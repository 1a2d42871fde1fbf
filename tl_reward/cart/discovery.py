"""CART circuit discovery (section 3.3): differential activation, coherence, grouping, validation.

:func:`discover` runs the whole pipeline on a reward (any
:class:`~tl_reward.text_reward.TextReward`: a :class:`~tl_reward.HookedRewardModel`, or the
policy of an :class:`~tl_reward.ImplicitRewardModel` with its reference fixed) and two text
sources (tail and head inputs):

1. **Differential activation** of every unit (all MLP neurons and attention heads by default),
   streamed: one pass over both sources accumulates running moments
   (:class:`~tl_reward.cart.RunningMoments`), so memory does not grow with the data. Gives
   ``Delta_j``, the tau-specialisation of eq. (3) and Welch's t-test per unit
   (:class:`UnitStatistics`). The ``top_k`` units by ``|Delta_j|`` (or another ``rank_by``) are
   the candidates.
2. **Coherence** of the candidates,
   ``Coh(N_i, N_j) = I(N_i; N_j | tail) - I(N_i; N_j | head)``, from a second streamed pass:
   the Gaussian estimator needs only the candidates' running covariances; the binned and KSG
   estimators use a uniform reservoir sample of at most ``max_samples`` inputs per side.
3. **Grouping**: average-linkage clustering of the candidates on the coherence matrix (scipy):
   units join while the mean pairwise coherence of the merged group is at least
   ``coherence_threshold``; a unit coherent with no other is a one-unit circuit.
4. **Causal validation** (:func:`validate_circuits`): each circuit is ablated (set to its mean
   over head inputs, or zero) on uniform samples of at most ``max_validation`` tail and head
   inputs (reservoirs filled by the second pass) through TransformerLens hooks;
   the per-input reward changes are tested with the Wilcoxon signed-rank test (tail effect != 0)
   and the Mann-Whitney U test (tail effect != head effect), each corrected for multiple
   comparisons across circuits (Benjamini-Hochberg by default).
"""

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .._readout import choose
from .._stats import CORRECTIONS, adjust_p_values
from ..errors import InvalidInputError
from ..text_reward import RewardInputs, TextReward
from .metrics import (
    ESTIMATORS,
    gaussian_mi_from_covariance,
    mutual_information,
)
from .streaming import (
    Reservoir,
    RunningMean,
    RunningMoments,
    TensorReservoir,
    TextSource,
    chunks,
    open_source,
)
from .units import (
    POSITIONS,
    Circuit,
    Unit,
    all_units,
    check_units,
    circuit_activations,
    circuit_width,
    intervention_hooks,
    read_units,
)

logger = logging.getLogger(__name__)

RANKINGS = ("abs_delta", "tau", "abs_t")
ABLATIONS = ("mean", "zero")
TESTS = ("wilcoxon", "ttest")
KEEP = ("effect", "specific")


# ----------------------------------------------------------------------------- streaming helpers
def iter_inputs(
    model: TextReward, source: TextSource, batch_size: int, name: str
) -> Iterator[tuple[list[Any], RewardInputs]]:
    """``(texts, inputs)`` batches of a text source, encoded by the reward."""
    for texts in chunks(open_source(source, name), batch_size):
        yield texts, model.encode_texts(texts)


def iter_batches(
    model: TextReward, source: TextSource, batch_size: int, name: str
) -> Iterator[tuple[list[Any], Tensor, Tensor]]:
    """``(texts, tokens, attention_mask)`` batches of a text source (tokenized, right-padded)."""
    for texts, inputs in iter_inputs(model, source, batch_size, name):
        yield texts, inputs.tokens, inputs.attention_mask


def _pooled(inputs: RewardInputs) -> Tensor:
    """What ``position="pooled"`` reads: one position per row, or the read-out weights."""
    return inputs.read_index if inputs.read_index is not None else inputs.read_weights


def _progress(source: TextSource, batch_size: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    total = -(-len(source) // batch_size) if isinstance(source, Sequence) else None
    return lambda it: tqdm(it, total=total, desc=desc, disable=not progress, leave=False)


def _sample_texts(source: TextSource, n: int, seed: int, name: str) -> list[Any]:
    """A uniform sample of at most ``n`` texts of a source (all of them when it is smaller)."""
    res = Reservoir(n, seed=seed)
    for batch in chunks(open_source(source, name), 256):
        res.add(batch)
    if not res.items:
        raise InvalidInputError(f"{name} gave no texts")
    return res.items


# ----------------------------------------------------------------------------- step 1
@dataclass(frozen=True)
class UnitStatistics:
    """Streamed per-unit moments on tail and head inputs, and the discovery scores built on them.

    ``delta`` is ``Delta_j = E_tail[a_j] - E_head[a_j]``; ``tau`` is eq. (3)'s
    ``E_tail|a_j| - E_head|a_j|``; ``t`` / ``p_value`` are Welch's two-sample t-test
    (``scipy.stats.ttest_ind_from_stats``); ``effect_size`` is Cohen's d: Delta over the pooled
    standard deviation ``sqrt(((n_t - 1) s_t^2 + (n_h - 1) s_h^2) / (n_t + n_h - 2))`` of the
    unbiased variances (sample sizes as weights; an unweighted average of the two variances
    is not Cohen's d when tail and head differ in size, as they do by construction).
    """

    units: tuple[Unit, ...]
    position: str
    n_tail: int
    n_head: int
    mean_tail: Float[Tensor, "unit"]
    mean_head: Float[Tensor, "unit"]
    var_tail: Float[Tensor, "unit"]
    var_head: Float[Tensor, "unit"]
    abs_mean_tail: Float[Tensor, "unit"]
    abs_mean_head: Float[Tensor, "unit"]

    @property
    def delta(self) -> Float[Tensor, "unit"]:
        return self.mean_tail - self.mean_head

    @property
    def tau(self) -> Float[Tensor, "unit"]:
        return self.abs_mean_tail - self.abs_mean_head

    @property
    def effect_size(self) -> Float[Tensor, "unit"]:
        nt, nh = self.n_tail, self.n_head
        pooled = (((nt - 1) * self.var_tail + (nh - 1) * self.var_head) / (nt + nh - 2)).sqrt()
        return torch.where(pooled > 0, self.delta / pooled.clamp(min=1e-300),
                           torch.sign(self.delta) * float("inf"))

    def welch(self) -> tuple[np.ndarray, np.ndarray]:
        """Welch's t statistic and two-sided p-value of every unit."""
        from scipy.stats import ttest_ind_from_stats

        with np.errstate(divide="ignore", invalid="ignore"):
            res = ttest_ind_from_stats(
                self.mean_tail.numpy(), self.var_tail.sqrt().numpy(), self.n_tail,
                self.mean_head.numpy(), self.var_head.sqrt().numpy(), self.n_head, equal_var=False,
            )
        t = np.nan_to_num(np.asarray(res.statistic, dtype=float), nan=0.0)
        p = np.nan_to_num(np.asarray(res.pvalue, dtype=float), nan=1.0)
        return t, p

    def score(self, rank_by: str = "abs_delta") -> Float[Tensor, "unit"]:
        """The candidate score: ``|Delta|`` (the paper), ``tau`` (eq. 3) or ``|t|`` (Welch)."""
        choose("rank_by", rank_by, RANKINGS)
        if rank_by == "abs_delta":
            return self.delta.abs()
        if rank_by == "tau":
            return self.tau
        return torch.as_tensor(np.abs(self.welch()[0]))

    def top(self, k: int, rank_by: str = "abs_delta") -> tuple[Unit, ...]:
        """The ``k`` units with the highest score, best first (ties keep unit order)."""
        order = torch.argsort(self.score(rank_by), descending=True, stable=True)
        return tuple(self.units[i] for i in order[:k].tolist())

    def to_dataframe(self, rank_by: str = "abs_delta"):
        """One row per unit, ranked by ``rank_by`` (rank 1 = strongest candidate)."""
        import pandas as pd

        t, p = self.welch()
        df = pd.DataFrame({
            "unit": [u.label for u in self.units],
            "kind": [u.kind for u in self.units],
            "layer": [u.layer for u in self.units],
            "index": [u.index for u in self.units],
            "hook": [u.hook for u in self.units],
            "position": self.position,
            "mean_tail": self.mean_tail.numpy(), "mean_head": self.mean_head.numpy(),
            "delta": self.delta.numpy(), "tau": self.tau.numpy(),
            "std_tail": self.var_tail.sqrt().numpy(), "std_head": self.var_head.sqrt().numpy(),
            "effect_size": self.effect_size.numpy(), "t": t, "p_value": p,
            "n_tail": self.n_tail, "n_head": self.n_head,
        })
        score = self.score(rank_by).numpy()
        df["rank"] = pd.Series(-score).rank(method="first").astype(int).to_numpy()
        return df.sort_values("rank").reset_index(drop=True)

    def plot(self, highlight: Sequence[str] = (), rank_by: str = "abs_delta"):
        """Distribution of ``Delta_j`` over units (histogram), ``highlight`` labels marked."""
        import plotly.express as px

        df = self.to_dataframe(rank_by)
        fig = px.histogram(df, x="delta", color="kind", nbins=80, log_y=True,
                           title="Differential activation Delta_j = E_tail[a_j] - E_head[a_j]")
        for label in highlight:
            row = df[df.unit == label]
            if len(row):
                fig.add_vline(x=float(row.delta.iloc[0]), line_dash="dash",
                              annotation_text=label)
        return fig


def _stream_moments(model, source, units, position, saes, batch_size, name, progress,
                    *, raw=False, track_cov=False, reservoir: int | None = None, seed=0,
                    texts: Reservoir | None = None):
    """One pass: moments of the units' scalar activations (and a raw mean, a row reservoir, a
    text reservoir)."""
    moments = RunningMoments(len(units), track_cov=track_cov)
    raw_mean = RunningMean() if raw else None
    rows = TensorReservoir(reservoir, len(units), seed=seed) if reservoir else None
    bar = _progress(source, batch_size, f"streaming {name}", progress)
    with torch.no_grad():
        for batch, inputs in bar(iter_inputs(model, source, batch_size, name)):
            if texts is not None:
                texts.add(batch)
            scal, rawv = read_units(model.unit_model, inputs.tokens, inputs.attention_mask, units,
                                    position=position, saes=saes, raw=raw,
                                    pooled=_pooled(inputs))
            moments.update(scal)
            if raw_mean is not None:
                raw_mean.update(rawv)
            if rows is not None:
                rows.add(scal)
    if moments.count < 2:
        raise InvalidInputError(f"{name} gave {moments.count} texts; discovery needs at least 2")
    return moments, raw_mean, rows


def activation_statistics(
    model: TextReward,
    tail: TextSource,
    head: TextSource,
    *,
    units: Sequence[Unit] | None = None,
    position: str = "pooled",
    saes: Mapping[str, Any] | None = None,
    batch_size: int = 128,
    progress: bool = True,
) -> UnitStatistics:
    """Step 1, streamed: per-unit moments on tail and head inputs (memory independent of their
    number).

    ``units`` defaults to every MLP neuron and attention head (:func:`~tl_reward.cart.all_units`);
    ``position`` reads them at the scoring token (``"pooled"``) or averages over real tokens.
    """
    units = tuple(all_units(model.unit_model) if units is None else units)
    check_units(model.unit_model, units, saes)
    mt = _stream_moments(model, tail, units, position, saes, batch_size, "tail", progress)[0]
    mh = _stream_moments(model, head, units, position, saes, batch_size, "head", progress)[0]
    return UnitStatistics(
        units=units, position=position, n_tail=mt.count, n_head=mh.count,
        mean_tail=mt.mean, mean_head=mh.mean, var_tail=mt.var, var_head=mh.var,
        abs_mean_tail=mt.abs_mean, abs_mean_head=mh.abs_mean,
    )


# ----------------------------------------------------------------------------- step 3
def group_circuits(
    coh: Float[Tensor, "unit unit"],
    units: Sequence[Unit],
    *,
    threshold: float = 0.1,
    aggregate: str = "mean",
    position: str = "pooled",
) -> tuple[Circuit, ...]:
    """Circuits from a coherence matrix: average-linkage clustering (``scipy.cluster.hierarchy``).

    Distances are ``max(Coh) - Coh``, so two groups merge while the mean coherence between their
    units is at least ``threshold`` (nats); units coherent with no other stay one-unit circuits.
    Circuits are ordered by their best unit's position in ``units`` (so a ranked candidate list
    gives ranked circuits).
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    k = len(units)
    if coh.shape != (k, k):
        raise InvalidInputError(f"coherence matrix is {tuple(coh.shape)} for {k} units")
    if k == 1:
        return (Circuit((units[0],), aggregate, position),)
    c = coh.detach().double().cpu().clone()
    c = 0.5 * (c + c.T)
    off = ~torch.eye(k, dtype=torch.bool)
    if not bool(torch.isfinite(c[off]).all()):
        raise InvalidInputError("the coherence matrix has non-finite off-diagonal entries")
    top = float(c[off].max())
    dist = (top - c).clamp(min=0)
    dist.fill_diagonal_(0.0)
    z = linkage(squareform(dist.numpy(), checks=False), method="average")
    if top < threshold:  # no pair is coherent enough: every unit is its own circuit
        labels = np.arange(k)
    else:
        labels = fcluster(z, t=top - threshold, criterion="distance")
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels.tolist()):
        groups.setdefault(int(lab), []).append(i)
    ordered = sorted(groups.values(), key=min)
    return tuple(Circuit(tuple(units[i] for i in g), aggregate, position) for g in ordered)


# ----------------------------------------------------------------------------- step 4
@dataclass(frozen=True)
class Validation:
    """Causal validation of circuits: ablation effects on tail and head inputs, and their tests.

    ``effects_tail[c, i]`` is the reward of tail input ``i`` with circuit ``c`` ablated minus its
    clean reward (same for head). ``p_effect`` tests tail effects != 0 (Wilcoxon signed-rank or
    one-sample t), ``p_specific`` tests tail effects != head effects (Mann-Whitney U or Welch);
    ``*_adjusted`` are corrected across circuits with ``correction``. ``kept`` marks circuits with
    adjusted ``p_effect`` (``keep="effect"``) or both adjusted p-values (``keep="specific"``)
    below ``alpha``. ``a_tail`` / ``a_head`` are the clean circuit activations ``a_c`` on the
    same inputs. A kept circuit must also matter in size: its mean tail effect is at least
    ``min_effect`` times ``reward_sd``, the standard deviation of the clean rewards of the
    validation inputs (a test on hundreds of inputs finds even a 1e-4 effect significant).
    """

    circuits: tuple[Circuit, ...]
    effects_tail: Float[Tensor, "circuit batch"]
    effects_head: Float[Tensor, "circuit _batch"]
    a_tail: Float[Tensor, "circuit batch"]
    a_head: Float[Tensor, "circuit _batch"]
    p_effect: np.ndarray
    p_effect_adjusted: np.ndarray
    p_specific: np.ndarray
    p_specific_adjusted: np.ndarray
    kept: tuple[bool, ...]
    ablation: str
    test: str
    correction: str
    alpha: float
    keep: str
    min_effect: float
    reward_sd: float

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({
            "circuit": [c.name for c in self.circuits],
            "units": [", ".join(c.labels) for c in self.circuits],
            "n_units": [len(c.units) for c in self.circuits],
            "aggregate": [c.aggregate for c in self.circuits],
            "position": [c.position for c in self.circuits],
            "delta_c": (self.a_tail.mean(1) - self.a_head.mean(1)).numpy(),
            "tau_c": (self.a_tail.abs().mean(1) - self.a_head.abs().mean(1)).numpy(),
            "effect_tail": self.effects_tail.mean(1).numpy(),
            "effect_head": self.effects_head.mean(1).numpy(),
            "p_effect": self.p_effect, "p_effect_adjusted": self.p_effect_adjusted,
            "p_specific": self.p_specific, "p_specific_adjusted": self.p_specific_adjusted,
            "test": self.test, "correction": self.correction, "ablation": self.ablation,
            "min_effect": self.min_effect * self.reward_sd,
            "kept": list(self.kept),
        })


def _ablation_values(model, circuits, head_texts, ablation, saes, batch_size,
                     known: Mapping[Unit, Tensor] | None = None) -> list[Tensor]:
    """Per circuit, the raw values an ablation writes: zeros, or the mean over head inputs."""
    out = []
    for c in circuits:
        if ablation == "zero":
            out.append(torch.zeros(circuit_width(model.unit_model, c)))
            continue
        if known is not None and all(u in known for u in c.units):
            out.append(torch.cat([known[u].reshape(-1) for u in c.units]))
            continue
        mean = RunningMean()
        with torch.no_grad():
            for _, inputs in iter_inputs(model, head_texts, batch_size, "head"):
                mean.update(read_units(model.unit_model, inputs.tokens, inputs.attention_mask,
                                       c.units, position=c.position, saes=saes, raw=True,
                                       pooled=_pooled(inputs))[1])
        out.append(mean.mean)
    return out


def _effects(model, circuits, values, texts, saes, batch_size) -> tuple[Tensor, Tensor, Tensor]:
    """Ablation effects ``[circuit, n]``, clean circuit activations ``[circuit, n]``, clean
    rewards ``[n]``."""
    effects = [[] for _ in circuits]
    acts, rewards = [], []
    with torch.no_grad():
        for _, inputs in iter_inputs(model, texts, batch_size, "texts"):
            tokens, mask, pool = inputs.tokens, inputs.attention_mask, _pooled(inputs)
            clean = model.reward_runner(inputs, 0)([])
            rewards.append(clean.cpu())
            acts.append(circuit_activations(model.unit_model, tokens, mask, circuits, saes=saes,
                                            pooled=pool))
            for k, (c, v) in enumerate(zip(circuits, values, strict=True)):
                run = model.reward_runner(inputs, c.first_layer)
                hooks = intervention_hooks(model.unit_model, c, pool, mask,
                                           values=v.to(clean.device), saes=saes)
                effects[k].append((run(hooks) - clean).detach().cpu())
    return (torch.stack([torch.cat(e) for e in effects]).double(),
            torch.cat(acts).T.detach().cpu().double(), torch.cat(rewards).double())


def _one_sample_p(x: np.ndarray, test: str) -> float:
    from scipy.stats import ttest_1samp, wilcoxon

    if np.all(x == 0):
        return 1.0  # no effect at all: nothing to reject
    if test == "wilcoxon":
        return float(wilcoxon(x).pvalue)
    if np.all(x == x[0]):
        return 0.0  # a constant nonzero effect
    return float(ttest_1samp(x, 0.0).pvalue)


def _two_sample_p(x: np.ndarray, y: np.ndarray, test: str) -> float:
    from scipy.stats import mannwhitneyu, ttest_ind

    if np.ptp(np.concatenate([x, y])) == 0:
        return 1.0  # one constant value on both sides: no difference
    if test == "wilcoxon":
        return float(mannwhitneyu(x, y, alternative="two-sided").pvalue)
    return float(ttest_ind(x, y, equal_var=False).pvalue)


def validate_circuits(
    model: TextReward,
    circuits: Sequence[Circuit],
    tail: TextSource,
    head: TextSource,
    *,
    ablation: str = "mean",
    test: str = "wilcoxon",
    correction: str = "bh",
    alpha: float = 0.05,
    keep: str = "effect",
    min_effect: float = 0.05,
    max_samples: int = 512,
    saes: Mapping[str, Any] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    reference: Mapping[Unit, Tensor] | None = None,
) -> Validation:
    """Step 4: ablate each circuit on tail and head inputs and test the reward changes.

    ``ablation="mean"`` sets the circuit's raw activations (at the positions it reads) to their
    mean over ``head`` inputs (``reference`` may supply those means per unit), ``"zero"`` to 0.
    The tests use at most ``max_samples`` uniformly sampled inputs per side; ``test="wilcoxon"``
    uses Wilcoxon's signed-rank (effect != 0) and Mann-Whitney's U (tail != head),
    ``"ttest"`` the one-sample and Welch t-tests (scipy). A test on all-zero effects has p = 1.
    A circuit is kept when its adjusted p-value(s) are below ``alpha`` and its mean tail effect
    is at least ``min_effect`` reward standard deviations (see :class:`Validation`).
    """
    choose("ablation", ablation, ABLATIONS)
    choose("test", test, TESTS)
    choose("correction", correction, CORRECTIONS)
    choose("keep", keep, KEEP)
    if not 0 < alpha < 1:
        raise InvalidInputError(f"alpha (the significance level) must be in (0, 1), got {alpha}")
    if not min_effect >= 0:
        raise InvalidInputError(
            f"min_effect must be >= 0 (in reward standard deviations), got {min_effect}")
    circuits = tuple(circuits)
    if not circuits:
        raise InvalidInputError("no circuits to validate")
    check_units(model.unit_model, [u for c in circuits for u in c.units], saes)
    tail_s = _sample_texts(tail, max_samples, seed, "tail")
    head_s = _sample_texts(head, max_samples, seed + 1, "head")
    if min(len(tail_s), len(head_s)) < 2:
        raise InvalidInputError("validation needs at least 2 tail and 2 head inputs")
    values = _ablation_values(model, circuits, head, ablation, saes, batch_size, reference)
    eff_t, a_t, r_t = _effects(model, circuits, values, tail_s, saes, batch_size)
    eff_h, a_h, r_h = _effects(model, circuits, values, head_s, saes, batch_size)
    reward_sd = float(torch.cat([r_t, r_h]).std())
    p_eff = np.array([_one_sample_p(e.numpy(), test) for e in eff_t])
    p_spec = np.array([_two_sample_p(t.numpy(), h.numpy(), test)
                       for t, h in zip(eff_t, eff_h, strict=True)])
    p_eff_adj = adjust_p_values(p_eff, correction)
    p_spec_adj = adjust_p_values(p_spec, correction)
    ok = (p_eff_adj < alpha) & (eff_t.mean(1).abs().numpy() >= min_effect * reward_sd)
    if keep == "specific":
        ok &= p_spec_adj < alpha
    return Validation(
        circuits=circuits, effects_tail=eff_t, effects_head=eff_h, a_tail=a_t, a_head=a_h,
        p_effect=p_eff, p_effect_adjusted=p_eff_adj, p_specific=p_spec,
        p_specific_adjusted=p_spec_adj, kept=tuple(bool(x) for x in ok), ablation=ablation,
        test=test, correction=correction, alpha=float(alpha), keep=keep,
        min_effect=float(min_effect), reward_sd=reward_sd,
    )


# ----------------------------------------------------------------------------- the pipeline
@dataclass(frozen=True)
class Discovery:
    """What :func:`discover` found: unit statistics, candidates, coherence, circuits, validation.

    ``to_dataframe()`` is the circuits table (one row per circuit, every metric, kept first);
    ``statistics.to_dataframe()`` the units table; ``settings`` records every choice made.
    """

    statistics: UnitStatistics
    candidates: tuple[Unit, ...]
    mi_tail: Float[Tensor, "unit unit"]
    mi_head: Float[Tensor, "unit unit"]
    circuits: tuple[Circuit, ...]
    validation: Validation
    reference: Mapping[Unit, Tensor] = field(repr=False)
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def coherence(self) -> Float[Tensor, "unit unit"]:
        """``Coh`` of the candidate pairs (NaN diagonal), in candidate order."""
        return self.mi_tail - self.mi_head

    @property
    def kept_circuits(self) -> tuple[Circuit, ...]:
        return tuple(c for c, k in zip(self.circuits, self.validation.kept, strict=True) if k)

    def to_dataframe(self):
        """Circuits with their discovery and validation metrics, kept circuits first, then by
        |tail effect|."""
        df = self.validation.to_dataframe()
        where = {u: i for i, u in enumerate(self.candidates)}
        coh = self.coherence
        mean_coh, best = [], []
        for c in self.circuits:
            idx = [where[u] for u in c.units]
            if len(idx) > 1:
                sub = coh[idx][:, idx]
                mean_coh.append(float(sub[~torch.eye(len(idx), dtype=torch.bool)].mean()))
            else:
                mean_coh.append(float("nan"))
            best.append(min(idx) + 1)
        df.insert(5, "coherence", mean_coh)
        df.insert(6, "best_unit_rank", best)
        df["estimator"] = self.settings.get("estimator")
        df = df.assign(_abs=df.effect_tail.abs()).sort_values(
            ["kept", "_abs"], ascending=[False, False]).drop(columns="_abs")
        return df.reset_index(drop=True)

    def plot_delta(self, highlight: Sequence[str] = ()):
        """Histogram of ``Delta_j`` over all units (the top candidates marked, or ``highlight``)."""
        return self.statistics.plot(highlight or [u.label for u in self.candidates[:5]],
                                    rank_by=self.settings.get("rank_by", "abs_delta"))

    def plot_coherence(self):
        """Heatmap of ``Coh`` over the candidates, grouped by circuit."""
        import plotly.express as px

        order = [u for c in self.circuits for u in c.units]
        where = {u: i for i, u in enumerate(self.candidates)}
        idx = [where[u] for u in order]
        m = self.coherence[idx][:, idx].numpy()
        labels = [u.label for u in order]
        lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0
        title = f"Coherence I(tail) - I(head) ({self.settings.get('estimator')})"
        return px.imshow(m, x=labels, y=labels, color_continuous_scale="RdBu", zmin=-lim,
                         zmax=lim, title=title,
                         labels={"color": "nats"})


def discover(
    model: TextReward,
    tail: TextSource,
    head: TextSource,
    *,
    units: Sequence[Unit] | None = None,
    saes: Mapping[str, Any] | None = None,
    position: str = "pooled",
    aggregate: str = "mean",
    top_k: int = 16,
    rank_by: str = "abs_delta",
    estimator: str = "gaussian",
    n_bins: int = 8,
    n_neighbors: int = 3,
    coherence_threshold: float = 0.1,
    max_samples: int = 4096,
    ablation: str = "mean",
    test: str = "wilcoxon",
    correction: str = "bh",
    alpha: float = 0.05,
    keep: str = "effect",
    min_effect: float = 0.05,
    max_validation: int = 512,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> Discovery:
    """CART circuit discovery (section 3.3) on tail and head inputs; see the module docstring.

    Args:
        model: any :class:`~tl_reward.text_reward.TextReward`: a
            :class:`~tl_reward.HookedRewardModel` (units read at the scoring token with
            ``position="pooled"``), or an :class:`~tl_reward.ImplicitRewardModel` (units of the
            policy, the reference held fixed; ``"pooled"`` reads the mean over the positions
            that predict response tokens, and ablations act at those positions).
        tail, head: the texts of rare (tail) and common (head) scenarios: lists, or zero-argument
            callables returning a fresh iterable (streamed twice; nothing is kept but moments and
            bounded samples).
        units: the units to score (default: every MLP neuron and attention head); ``saes``
            attaches SAEs for feature units.
        position, aggregate: how units are read and how a circuit combines them (recorded).
        top_k, rank_by: how many candidates go on to coherence, ranked by ``|Delta|`` (the
            paper), eq. (3)'s ``tau`` or Welch's ``|t|``.
        estimator: mutual-information estimator of the coherence: ``gaussian`` (from streamed
            covariances), ``binned`` (``n_bins``, Miller-Madow corrected) or ``ksg``
            (``n_neighbors``), the last two on at most ``max_samples`` sampled inputs per side.
        coherence_threshold: mean coherence (nats) at which candidates group into one circuit.
        ablation, test, correction, alpha, keep, min_effect, max_validation: causal validation (see
            :func:`validate_circuits`).
    """
    choose("position", position, POSITIONS)
    choose("estimator", estimator, ESTIMATORS)
    choose("rank_by", rank_by, RANKINGS)
    if top_k < 1:
        raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
    if max_samples < 2:
        raise InvalidInputError(f"max_samples must be >= 2, got {max_samples}")
    if max_validation < 2:
        raise InvalidInputError(f"max_validation must be >= 2, got {max_validation}")
    stats = activation_statistics(model, tail, head, units=units, position=position, saes=saes,
                                  batch_size=batch_size, progress=progress)
    candidates = stats.top(top_k, rank_by)
    logger.info("discovery candidates: %s", [u.label for u in candidates])
    sample = None if estimator == "gaussian" else max_samples
    tail_texts, head_texts = Reservoir(max_validation, seed), Reservoir(max_validation, seed + 1)
    mt, _, rt = _stream_moments(model, tail, candidates, position, saes, batch_size, "tail",
                                progress, track_cov=True, reservoir=sample, seed=seed,
                                texts=tail_texts)
    mh, raw_h, rh = _stream_moments(model, head, candidates, position, saes, batch_size, "head",
                                    progress, raw=True, track_cov=True, reservoir=sample,
                                    seed=seed + 1, texts=head_texts)
    if len(candidates) == 1:
        nan = torch.full((1, 1), float("nan"), dtype=torch.float64)
        mi_t, mi_h = nan, nan.clone()
    elif estimator == "gaussian":
        mi_t, mi_h = gaussian_mi_from_covariance(mt.cov), gaussian_mi_from_covariance(mh.cov)
    else:
        kw = dict(n_bins=n_bins, n_neighbors=n_neighbors, random_state=seed)
        mi_t = mutual_information(rt.rows, estimator, **kw)
        mi_h = mutual_information(rh.rows, estimator, **kw)
    circuits = group_circuits(mi_t - mi_h, candidates, threshold=coherence_threshold,
                              aggregate=aggregate, position=position)
    # the head mean of each candidate's raw activation, for mean ablation
    widths = [model.unit_model.cfg.d_head if u.kind == "head" else 1 for u in candidates]
    offs = np.cumsum([0, *widths])
    reference = {u: raw_h.mean[offs[i]:offs[i + 1]].float() for i, u in enumerate(candidates)}
    validation = validate_circuits(  # on the text samples kept by the second pass
        model, circuits, tail_texts.items, head_texts.items, ablation=ablation, test=test,
        correction=correction,
        alpha=alpha, keep=keep, min_effect=min_effect, max_samples=max_validation, saes=saes,
        batch_size=batch_size, seed=seed, reference=reference,
    )
    settings = dict(
        position=position, aggregate=aggregate, top_k=top_k, rank_by=rank_by,
        estimator=estimator, n_bins=n_bins, n_neighbors=n_neighbors,
        coherence_threshold=coherence_threshold, max_samples=max_samples, ablation=ablation,
        test=test, correction=correction, alpha=alpha, keep=keep, min_effect=min_effect,
        max_validation=max_validation, seed=seed, n_tail=stats.n_tail, n_head=stats.n_head,
    )
    return Discovery(
        statistics=stats, candidates=candidates, mi_tail=mi_t.double(), mi_head=mi_h.double(),
        circuits=circuits, validation=validation, reference=reference, settings=settings,
    )


def split_texts(
    texts: Sequence[Any], is_tail: Callable[[Any], bool]
) -> tuple[list[Any], list[Any]]:
    """``(tail, head)`` texts by a predicate, e.g. ``task.scenario_of(t) != "head"`` for the
    long-tail task or ``"urgent" in t.split()`` for the planted trigger."""
    tail, head = [], []
    for t in texts:
        (tail if is_tail(t) else head).append(t)
    if not tail or not head:
        raise InvalidInputError(
            f"the predicate put {len(tail)} texts in the tail and {len(head)} in the head; both "
            "need at least one"
        )
    return tail, head

