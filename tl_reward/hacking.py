"""Across-dimension analyses of reward hacking: the misalignment cascade and two distortion
measures.

- :func:`probe_cascade` (takes a :class:`~tl_reward.probes.ProbeReport`): do a model's probe
  effects go together content by content (correlations with bootstrap CIs, refused below
  ``min_units`` shared contents), and do the probes' localisations share components?
- :func:`distortion_index`: **the reward-lens paper's distortion index**, which predicts the
  quality dimensions at risk of being hacked from the evaluation suite's coverage alone:
  per dimension ``d``, ``C_eff(d) = 1 - prod_i (1 - c_i)`` over the min-max normalised margins
  ``c_i`` of the dimension's evaluation pairs, and ``D(d) = 1 - C_eff(d) / max_d C_eff``.
- :func:`effort_distortion` (takes a ``ProbeReport`` and a value per dimension): a different
  quantity of this library's own, not in the paper: how a policy optimising the reward model
  would misallocate a fixed effort budget across the probed dimensions relative to their true
  value (``1 - cos(s, v)``, with bootstrap CIs).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ._readout import choose
from ._stats import CORRELATIONS, adjust_p_values, correlation_statistic
from .errors import InvalidInputError
from .probes import ProbeLocalisation, ProbeReport, ProbeResult


@dataclass(frozen=True)
class CascadeResult:
    """Do probe effects go together, content by content? And do the probes share components?

    For probes ``a`` and ``b``: ``r[a, b]`` is the correlation (``method``) of their unit
    changes over the ``n[a, b]`` contents both probed, ``ci_low``/``ci_high`` its paired
    bootstrap CI, ``p`` the test of no correlation (``scipy.stats.spearmanr``/``pearsonr``),
    ``p_adjusted`` corrected across the probe pairs. Cells with ``n < min_units`` are NaN (no
    correlation from too few contents). With localisations: ``jaccard[a, b]`` is the overlap of
    their top components (see ``min_fraction``) and ``profile_cosine[a, b]`` the cosine of their mean
    component profiles (``localisation_method`` values over the shared labels).
    """

    probes: tuple[str, ...]
    method: str
    r: Float[Tensor, "probe probe"]
    ci_low: Float[Tensor, "probe probe"]
    ci_high: Float[Tensor, "probe probe"]
    p: Float[Tensor, "probe probe"]
    p_adjusted: Float[Tensor, "probe probe"]
    n: Float[Tensor, "probe probe"]
    jaccard: Float[Tensor, "probe probe"] | None
    profile_cosine: Float[Tensor, "probe probe"] | None
    shared_components: dict
    alpha: float
    min_units: int

    def to_dataframe(self):
        """One row per probe pair (upper triangle)."""
        import pandas as pd

        rows = []
        k = len(self.probes)
        for i in range(k):
            for j in range(i + 1, k):
                row = {"probe_a": self.probes[i], "probe_b": self.probes[j],
                       "n": int(self.n[i, j]), "r": float(self.r[i, j]),
                       "ci_low": float(self.ci_low[i, j]), "ci_high": float(self.ci_high[i, j]),
                       "p": float(self.p[i, j]), "p_adjusted": float(self.p_adjusted[i, j]),
                       "significant": bool(self.p_adjusted[i, j] < self.alpha)}
                if self.jaccard is not None:
                    row["jaccard_top"] = float(self.jaccard[i, j])
                    row["profile_cosine"] = float(self.profile_cosine[i, j])
                    row["shared_top"] = ", ".join(self.shared_components[(self.probes[i], self.probes[j])])
                rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, title: str | None = None):
        """Heatmap of the correlations (NaN: too few shared contents), p_adjusted on hover."""
        import plotly.graph_objects as go

        text = [[f"r={float(self.r[i, j]):.2f}<br>n={int(self.n[i, j])}<br>"
                 f"p_adj={float(self.p_adjusted[i, j]):.2g}" for j in range(len(self.probes))]
                for i in range(len(self.probes))]
        fig = go.Figure(go.Heatmap(z=self.r.numpy(), x=list(self.probes), y=list(self.probes),
                                   zmin=-1, zmax=1, colorscale="RdBu", text=text,
                                   hoverinfo="text"))
        fig.update_layout(title=title or f"Probe effects across contents ({self.method})")
        return fig


def probe_cascade(
    report: ProbeReport | Sequence[ProbeResult],
    *,
    method: str = "spearman",
    min_units: int = 10,
    alpha: float = 0.05,
    correction: str = "bh",
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
    localisations: Sequence[ProbeLocalisation] | None = None,
    localisation_method: str = "attribution",
    top_k: int = 5,
    min_fraction: float = 0.1,
) -> CascadeResult:
    """Misalignment cascade: correlation of probe effects across dimensions, and shared
    components between the probes' localisations.

    Contents are matched by ``content_id`` (the built-in probe sets share their items); each
    correlation uses the contents both probes measured, with a paired bootstrap CI
    (``scipy.stats.bootstrap``, BCa) and a test from scipy, corrected across probe pairs. A
    pair of probes sharing fewer than ``min_units`` contents gets NaN, not a number from too few
    points (two points always correlate at +-1). Localisations are compared through each
    probe's top ``top_k`` components that carry at least ``min_fraction`` of its mean effect.
    """
    from scipy import stats

    choose("method", method, CORRELATIONS)
    if min_units < 5:
        raise InvalidInputError(f"min_units must be >= 5 for a correlation with a CI, got {min_units}")
    results = list(report)
    names = tuple(r.name for r in results)
    k = len(results)
    if k < 2:
        raise InvalidInputError(f"a cascade needs at least 2 probes, got {k}")
    shape = (k, k)
    r = np.full(shape, np.nan)
    lo, hi, p, n = (np.full(shape, np.nan) for _ in range(4))
    np.fill_diagonal(r, 1.0)
    stat = correlation_statistic(method)
    for i in range(k):
        a = dict(zip(results[i].unit_ids, results[i].unit_deltas.double().tolist(), strict=True))
        n[i, i] = len(a)
        for j in range(i + 1, k):
            b = dict(zip(results[j].unit_ids, results[j].unit_deltas.double().tolist(), strict=True))
            shared = [c for c in a if c in b]
            n[i, j] = n[j, i] = len(shared)
            if len(shared) < min_units:
                continue
            x = np.array([a[c] for c in shared])
            y = np.array([b[c] for c in shared])
            if np.ptp(x) == 0 or np.ptp(y) == 0:
                raise InvalidInputError(
                    f"probe {names[i] if np.ptp(x) == 0 else names[j]!r} has the same change "
                    "on every shared content: its correlation with anything is undefined"
                )
            test = stats.spearmanr(x, y) if method == "spearman" else stats.pearsonr(x, y)
            boot = stats.bootstrap((x, y), stat, paired=True, vectorized=True,
                                   n_resamples=n_resamples, confidence_level=confidence_level,
                                   method="BCa", rng=np.random.default_rng(seed))
            r[i, j] = r[j, i] = float(test.statistic)
            p[i, j] = p[j, i] = float(test.pvalue)
            lo[i, j] = lo[j, i] = float(boot.confidence_interval.low)
            hi[i, j] = hi[j, i] = float(boot.confidence_interval.high)
    iu = np.triu_indices(k, 1)
    adj = np.full(shape, np.nan)
    adj[iu] = adjust_p_values(p[iu], correction)
    adj.T[iu] = adj[iu]

    jaccard = cosine = None
    shared_components: dict = {}
    if localisations is not None:
        locs = {loc.probe: loc for loc in localisations}
        missing = [nm for nm in names if nm not in locs]
        if missing:
            raise InvalidInputError(f"no localisation for probes {missing}; localise every probe")
        jaccard, cosine = np.full(shape, np.nan), np.full(shape, np.nan)
        for i in range(k):
            for j in range(k):
                la, lb = locs[names[i]], locs[names[j]]
                top_a = la.top_components(top_k, localisation_method, min_fraction=min_fraction)
                tb = set(lb.top_components(top_k, localisation_method, min_fraction=min_fraction))
                ta = set(top_a)
                jaccard[i, j] = len(ta & tb) / len(ta | tb) if ta | tb else np.nan
                common = [c for c in la.labels if c in lb.labels]
                va = la.mean(localisation_method)[[la.labels.index(c) for c in common]].double()
                vb = lb.mean(localisation_method)[[lb.labels.index(c) for c in common]].double()
                ok = torch.isfinite(va) & torch.isfinite(vb)
                denom = float(va[ok].norm() * vb[ok].norm())
                cosine[i, j] = float(va[ok] @ vb[ok]) / denom if denom > 0 else np.nan
                if i < j:
                    shared_components[(names[i], names[j])] = tuple(c for c in top_a if c in tb)

    def t(a):
        return None if a is None else torch.from_numpy(a).float()

    return CascadeResult(probes=names, method=method, r=t(r), ci_low=t(lo), ci_high=t(hi),
                         p=t(p), p_adjusted=t(adj), n=t(n), jaccard=t(jaccard),
                         profile_cosine=t(cosine), shared_components=shared_components,
                         alpha=alpha, min_units=min_units)


# ------------------------------------------------------------------------------ distortion index
@dataclass(frozen=True)
class DistortionIndexResult:
    """The reward-lens paper's distortion index (see :func:`distortion_index`).

    Per dimension: ``n_pairs`` evaluation pairs, ``coverage`` (``C_eff``, in [0, 1]) and
    ``distortion`` (``D = 1 - C_eff / max C_eff``, in [0, 1]; 1: not covered at all, 0: the
    best-covered dimension). ``severity`` is the mean of ``D`` over the dimensions (the paper's
    predicted hacking severity); ``under_covered`` the dimensions with ``D > threshold``.
    """

    dimensions: tuple[str, ...]
    n_pairs: tuple[int, ...]
    coverage: Float[Tensor, "dim"]
    distortion: Float[Tensor, "dim"]
    severity: float
    threshold: float

    @property
    def under_covered(self) -> tuple[str, ...]:
        return tuple(d for d, x in zip(self.dimensions, self.distortion.tolist(), strict=True)
                     if x > self.threshold)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({
            "dimension": self.dimensions, "n_pairs": self.n_pairs,
            "coverage": self.coverage.numpy(), "distortion": self.distortion.numpy(),
            "under_covered": [x > self.threshold for x in self.distortion.tolist()],
        })

    def plot(self, title: str | None = None):
        """Distortion per dimension (1: not covered by the evaluation suite)."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Bar(x=list(self.dimensions), y=self.distortion.numpy()))
        fig.add_hline(y=self.threshold, line_dash="dot", annotation_text="threshold")
        fig.update_layout(title=title or f"Distortion index per dimension (severity {self.severity:.3f})",
                          yaxis_title="D = 1 - C_eff / max C_eff", yaxis_range=[0, 1])
        return fig


def distortion_index(
    margins: Mapping[str, Sequence[float] | np.ndarray | Tensor],
    *,
    threshold: float = 0.5,
) -> DistortionIndexResult:
    """The reward-lens paper's distortion index: which quality dimensions an evaluation suite
    leaves under-covered, hence at risk of being hacked (after "Reward hacking as equilibrium
    under finite evaluation").

    ``margins[d]`` holds the reward margins ``r(preferred) - r(dispreferred)`` of the evaluation
    pairs that probe dimension ``d`` (e.g. ``model.score_pairs(chosen, rejected).margin``); an
    empty sequence is a dimension with no evaluation at all. Then, as in the paper:

    - every margin, over all dimensions together, is min-max normalised to ``c_i`` in [0, 1]
      (all margins equal: every ``c_i = 0.5``);
    - ``C_eff(d) = 1 - prod_{i in d} (1 - c_i)`` (diminishing returns; 0 with no pairs);
    - ``D(d) = 1 - C_eff(d) / max_d C_eff`` (every ``D = 1`` when no dimension is covered);
    - the severity is the mean of ``D``; ``under_covered`` lists ``D > threshold``.

    It is a relative index: the best-covered dimension always gets 0, whatever its margins,
    and it counts pairs (more pairs raise ``C_eff``) rather than testing anything. For a
    statistical test of a bias use :func:`tl_reward.run_probes`; for the incentive geometry
    against a value vector, :func:`effort_distortion` (this library's own measure).
    """
    if not margins:
        raise InvalidInputError("margins is empty: give at least one quality dimension")
    if not 0 <= threshold <= 1:
        raise InvalidInputError(f"threshold must lie in [0, 1], got {threshold}")
    names = tuple(margins)
    values = []
    for name in names:
        m = margins[name]
        m = m.detach().cpu().double().numpy() if isinstance(m, Tensor) else np.asarray(m, dtype=np.float64)
        if m.ndim != 1:
            raise InvalidInputError(
                f"margins[{name!r}] must be one margin per pair (1-D), got shape {m.shape}; "
                "choose an objective of a multi-objective head first"
            )
        if not np.all(np.isfinite(m)):
            raise InvalidInputError(f"margins[{name!r}] holds non-finite values")
        values.append(m)
    flat = np.concatenate(values)
    if flat.size == 0:
        c = [np.zeros(0) for _ in values]
    elif np.ptp(flat) > 0:
        c = [(m - flat.min()) / np.ptp(flat) for m in values]
    else:
        c = [np.full_like(m, 0.5) for m in values]
    coverage = np.array([1.0 - np.prod(1.0 - x) if x.size else 0.0 for x in c])
    best = coverage.max()
    distortion = 1.0 - coverage / best if best > 0 else np.ones_like(coverage)
    return DistortionIndexResult(
        dimensions=names, n_pairs=tuple(len(m) for m in values),
        coverage=torch.from_numpy(coverage).float(), distortion=torch.from_numpy(distortion).float(),
        severity=float(distortion.mean()), threshold=float(threshold),
    )


@dataclass(frozen=True)
class EffortDistortionResult:
    """Effort distortion of a policy that optimises the reward model (see
    :func:`effort_distortion`, this library's measure, not the paper's distortion index): per
    dimension and overall, with bootstrap CIs."""

    dimensions: tuple[str, ...]
    sensitivity: Float[Tensor, "dim"]
    value: Float[Tensor, "dim"]
    distortion: Float[Tensor, "dim"]
    ci_low: Float[Tensor, "dim"]
    ci_high: Float[Tensor, "dim"]
    index: float
    index_ci_low: float
    index_ci_high: float
    confidence_level: float

    @property
    def angle_degrees(self) -> float:
        """Angle between the reward model's incentive vector and the true value vector."""
        return float(np.degrees(np.arccos(np.clip(1.0 - self.index, -1.0, 1.0))))

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({
            "dimension": self.dimensions, "sensitivity": self.sensitivity.numpy(),
            "value": self.value.numpy(), "distortion": self.distortion.numpy(),
            "ci_low": self.ci_low.numpy(), "ci_high": self.ci_high.numpy(),
            "direction": ["over-invested" if lo > 0 else "under-invested" if hi < 0 else "-"
                          for lo, hi in zip(self.ci_low.tolist(), self.ci_high.tolist(), strict=True)],
        })

    def plot(self, title: str | None = None):
        """Distortion per dimension with its CI (positive: a policy over-invests)."""
        import plotly.graph_objects as go

        d = self.distortion.numpy()
        fig = go.Figure(go.Bar(
            x=list(self.dimensions), y=d,
            error_y={"type": "data", "symmetric": False, "array": self.ci_high.numpy() - d,
                     "arrayminus": d - self.ci_low.numpy()}))
        fig.update_layout(
            title=title or f"Distortion per dimension (index {self.index:.3f}, "
            f"{self.angle_degrees:.1f} deg between incentive and value)",
            yaxis_title="effort share under the reward model - under the true value")
        return fig


def effort_distortion(
    report: ProbeReport | Sequence[ProbeResult],
    value: Mapping[str, float],
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> EffortDistortionResult:
    """Effort distortion: how a policy optimising this reward model would misallocate effort
    across quality dimensions, relative to what the true objective wants.

    This is *not* the reward-lens paper's distortion index (that is :func:`distortion_index`,
    computed from the evaluation suite's coverage alone); it is this library's own measure,
    which needs a value per dimension that the paper never asks for.

    Definition (the multitask principal-agent model of Holmstrom & Milgrom 1991). Each probe is a quality dimension ``k``; one probe perturbation
    is one unit of effort on it. The reward model pays ``s_k`` per unit (the probe's mean
    reward change: its *sensitivity*); the principal values a unit at ``v_k`` (``value[k]``:
    e.g. 0 for length or formatting, negative for sycophancy, positive for correctness). An
    agent with a fixed effort budget ``||e|| = B`` maximising ``s . e`` puts ``e = B s / ||s||``;
    the principal's optimum is ``e* = B v / ||v||``. Then

    - per dimension: ``D_k = s_k / ||s|| - v_k / ||v||`` (share of the budget put on ``k``
      minus the share the principal wants; > 0: over-investment, the hacking direction;
      < 0: under-investment, e.g. a valued dimension the reward model does not cover);
    - overall: ``index = ||e - e*||^2 / (2 B^2) = 1 - cos(s, v)`` (0: aligned incentives, 1:
      orthogonal, 2: opposed); ``1 - index`` is the fraction of the attainable value the
      agent achieves.

    Both are invariant to the scale of the reward and of ``v``. CIs come from the bootstrap
    (``scipy.stats.bootstrap``, BCa) over each probe's content units, resampled jointly when
    every probe measured the same contents (paired) and independently otherwise.
    """
    from scipy import stats

    results = list(report)
    names = tuple(r.name for r in results)
    missing = [nm for nm in names if nm not in value]
    extra = [nm for nm in value if nm not in names]
    if missing or extra:
        raise InvalidInputError(
            f"value must give one number per probe: missing {missing}, unknown {extra}; "
            f"probes are {list(names)}"
        )
    if len(results) < 2:
        raise InvalidInputError("a distortion index needs at least 2 dimensions (probes)")
    v = np.array([float(value[nm]) for nm in names])
    if not np.any(v):
        raise InvalidInputError("value is 0 on every dimension: the principal's optimum is undefined")
    small = [r.name for r in results if r.n_units < 2]
    if small:
        raise InvalidInputError(f"probes {small} have fewer than 2 units: no bootstrap possible")
    v_hat = v / np.linalg.norm(v)

    def statistic(*samples, axis=-1):
        s = np.stack([np.mean(x, axis=axis) for x in samples], axis=-1)  # [..., dim]
        norm = np.linalg.norm(s, axis=-1, keepdims=True)
        s_hat = s / np.where(norm > 0, norm, np.nan)
        d = s_hat - v_hat
        index = 1.0 - (s_hat * v_hat).sum(-1, keepdims=True)
        return np.moveaxis(np.concatenate([d, index], axis=-1), -1, 0)

    ids = [r.unit_ids for r in results]
    paired = all(set(i) == set(ids[0]) for i in ids)
    if paired:
        order = list(ids[0])
        samples = [np.array([dict(zip(r.unit_ids, r.unit_deltas.double().tolist(), strict=True))[c]
                             for c in order]) for r in results]
    else:
        samples = [r.unit_deltas.double().numpy() for r in results]
    point = statistic(*[x[None] for x in samples])[:, 0]
    if not np.all(np.isfinite(point)):
        raise InvalidInputError("every probe has a mean change of exactly 0: no incentive direction")
    boot = stats.bootstrap(tuple(samples), statistic, paired=paired, vectorized=True,
                           n_resamples=n_resamples, confidence_level=confidence_level,
                           method="BCa", rng=np.random.default_rng(seed))
    low, high = boot.confidence_interval.low, boot.confidence_interval.high
    s = np.array([r.mean if not paired else float(x.mean()) for r, x in zip(results, samples, strict=True)])
    t = torch.from_numpy
    return EffortDistortionResult(
        dimensions=names, sensitivity=t(s).float(), value=t(v).float(),
        distortion=t(point[:-1]).float(), ci_low=t(low[:-1]).float(), ci_high=t(high[:-1]).float(),
        index=float(point[-1]), index_ci_low=float(low[-1]), index_ci_high=float(high[-1]),
        confidence_level=confidence_level,
    )
