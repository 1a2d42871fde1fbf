"""Does linear attribution rank components like causal patching does? With error bars.

The protocol (the reward-lens paper reports a mean Spearman rho without error bars; this adds
them): for each pair, Spearman's rho between the direct-attribution values and the patching
effects over the components both name; then the mean rho over pairs with a bootstrap confidence
interval (``scipy.stats.bootstrap``, seeded) and a Wilcoxon signed-rank test of the per-pair rhos
against 0 (``scipy.stats.wilcoxon``).

Sign convention: for a preference pair, :func:`tl_reward.pair_reward_attribution` gives each
component's contribution to the margin (chosen - rejected), and denoising patching with
clean = chosen, corrupt = rejected raises the rejected reward by roughly the same amount, so on a
model that is close to linear the two correlate positively.
"""

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._readout import choose
from ..errors import InvalidInputError
from ..model import HookedRewardModel, Text
from ..observational.attribution import AttributionResult, pair_reward_attribution
from .patching import PatchResult, activation_patch_grids

# attribution level -> the (hook, per) patch grids whose flat labels it shares
LEVEL_PATCHES: dict[str, tuple[tuple[str, str], ...]] = {
    "head": (("z", "head"),),
    "component": (("attn_out", "layer"), ("mlp_out", "layer")),
    "neuron": (("mlp_post", "neuron"),),
}
ESTIMATORS = ("exact", "atp")


@dataclass(frozen=True)
class AgreementReport:
    """Per-pair rank agreement of attribution and patching, and its summary statistics.

    ``rho[i]`` is Spearman's rho of pair ``i`` over ``n_components[i]`` components (the shared
    components with a finite value on both sides); it is NaN for a pair where rho is undefined
    (fewer than ``min_components`` finite values, or a constant side), and such pairs are left
    out of the statistics and counted in ``n_excluded``. ``mean`` is the mean rho over the
    ``n_pairs`` used pairs, ``ci_low``/``ci_high`` its bootstrap confidence interval, and
    ``p_value`` the two-sided Wilcoxon signed-rank test of the rhos against 0.
    """

    rho: Float[Tensor, "pair"]
    n_components: Int[Tensor, "pair"]
    components: tuple[str, ...]
    mean: float
    ci_low: float
    ci_high: float
    confidence_level: float
    wilcoxon_statistic: float
    p_value: float
    n_pairs: int
    n_excluded: int
    attribution_level: str
    patching: str

    @property
    def median(self) -> float:
        """Median rho over the used pairs."""
        return float(self.rho.nanmedian())

    def summary(self) -> str:
        """One line: mean rho, its CI, the Wilcoxon p-value and n."""
        excluded = f", {self.n_excluded} excluded" if self.n_excluded else ""
        return (
            f"Spearman rho ({self.attribution_level} attribution vs {self.patching}): mean "
            f"{self.mean:.3f}, {self.confidence_level:.0%} bootstrap CI [{self.ci_low:.3f}, "
            f"{self.ci_high:.3f}], Wilcoxon p = {self.p_value:.3g}, n = {self.n_pairs} pairs"
            f"{excluded}, {len(self.components)} components"
        )

    def to_dataframe(self):
        """One row per pair: ``pair``, ``rho``, ``n_components``, ``used``."""
        import pandas as pd

        rho = self.rho.cpu().numpy()
        return pd.DataFrame(
            {
                "pair": np.arange(len(rho)),
                "rho": rho,
                "n_components": self.n_components.cpu().numpy(),
                "used": np.isfinite(rho),
            }
        )

    def plot(self, title: str | None = None):
        """Per-pair rho as a histogram with a strip of the individual pairs, the mean (solid
        line), its confidence interval (band) and 0 (dotted)."""
        import plotly.graph_objects as go

        rho = self.rho[torch.isfinite(self.rho)].cpu().numpy()
        fig = go.Figure()
        fig.add_trace(go.Histogram(x=rho, xbins={"start": -1.0, "end": 1.0, "size": 0.1},
                                   name="pairs", opacity=0.7))
        fig.add_trace(go.Scatter(x=rho, y=np.zeros_like(rho), mode="markers", name="pair rho",
                                 marker={"symbol": "line-ns-open", "size": 14}, yaxis="y"))
        fig.add_vrect(x0=self.ci_low, x1=self.ci_high, fillcolor="orange", opacity=0.25,
                      line_width=0, annotation_text=f"{self.confidence_level:.0%} CI")
        fig.add_vline(x=self.mean, line_color="orange",
                      annotation_text=f"mean {self.mean:.2f} (p={self.p_value:.2g})")
        fig.add_vline(x=0.0, line_dash="dot", line_color="gray")
        fig.update_layout(
            title=title or f"{self.attribution_level} attribution vs {self.patching}: "
            f"Spearman rho per pair (n={self.n_pairs})",
            xaxis={"title": "Spearman rho", "range": [-1.05, 1.05]},
            yaxis={"title": "pairs"}, showlegend=False,
        )
        return fig


def agreement_report(
    attribution: AttributionResult,
    patch: PatchResult | Sequence[PatchResult],
    *,
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    bootstrap_method: str = "BCa",
    seed: int = 0,
    min_pairs: int = 5,
    min_components: int = 3,
) -> AgreementReport:
    """Rank agreement between direct attribution and patching, pair by pair, with error bars.

    Args:
        attribution: ``values [component, pair]``, usually from :func:`pair_reward_attribution`.
        patch: one or several :class:`PatchResult` (exact or ``AtPResult.as_patch_result``)
            over the same pairs; their ``flat()`` labels are matched with the attribution's
            labels (e.g. ``z`` per ``head`` gives ``"L0H1"``; ``attn_out`` and ``mlp_out`` per
            ``layer`` together match the ``component`` level). Grids per position (labels with
            ``"@pos"``) do not match attribution, which is read at the scoring token.
        confidence_level, n_resamples, bootstrap_method, seed: of ``scipy.stats.bootstrap`` for
            the mean rho (``bootstrap_method`` ``"BCa"``, ``"percentile"`` or ``"basic"``).
        min_pairs: refuse with fewer usable pairs than this (a two-sided Wilcoxon test on 5
            pairs cannot go below p = 0.0625).
        min_components: a pair needs this many finite shared components for a rho; fewer
            shared labels than this is an error.

    NaN cells (positions a pair does not have) are dropped pair by pair.
    """
    from scipy import stats

    choose("bootstrap_method", bootstrap_method, ("BCa", "percentile", "basic"))
    if not 0 < confidence_level < 1:
        raise InvalidInputError(f"confidence_level must lie in (0, 1), got {confidence_level}")
    if min_components < 3:
        raise InvalidInputError(f"min_components must be >= 3 for a rank correlation, got {min_components}")
    if min_pairs < 2:
        raise InvalidInputError(f"min_pairs must be >= 2, got {min_pairs}")
    patches = [patch] if isinstance(patch, PatchResult) else list(patch)
    if not patches:
        raise InvalidInputError("patch is an empty sequence; pass at least one PatchResult")
    values, labels = [], []
    for p in patches:
        v, lab = p.flat()
        values.append(v.detach().cpu().double())
        labels += lab
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise InvalidInputError(f"patch results name the same components twice: {dup[:5]}")
    n_pair_counts = {v.shape[1] for v in values}
    if len(n_pair_counts) > 1:
        raise InvalidInputError(f"the patch results cover different numbers of pairs: {sorted(n_pair_counts)}")
    p_values = torch.cat(values)
    a_values = attribution.values.detach().cpu().double()
    n_pairs = a_values.shape[1]
    if p_values.shape[1] != n_pairs:
        raise InvalidInputError(
            f"attribution has {n_pairs} pairs but patching has {p_values.shape[1]}; "
            "run both on the same pairs"
        )
    p_index = {lab: i for i, lab in enumerate(labels)}
    shared = [lab for lab in attribution.labels if lab in p_index]
    if len(shared) < min_components:
        hint = (" Patching per position labels cells '@pos'; use a per without '_pos'."
                if any("@" in lab for lab in labels) else "")
        raise InvalidInputError(
            f"attribution and patching share {len(shared)} component labels ({shared}); "
            f"at least {min_components} are needed. Attribution labels start "
            f"{list(attribution.labels[:4])}, patching labels {labels[:4]}.{hint}"
        )
    a_index = {lab: i for i, lab in enumerate(attribution.labels)}
    x_all = a_values[[a_index[lab] for lab in shared]].numpy()  # [component, pair]
    y_all = p_values[[p_index[lab] for lab in shared]].numpy()

    rho = np.full(n_pairs, np.nan)
    counts = np.zeros(n_pairs, dtype=np.int64)
    for i in range(n_pairs):
        ok = np.isfinite(x_all[:, i]) & np.isfinite(y_all[:, i])
        counts[i] = int(ok.sum())
        if counts[i] < min_components:
            continue
        with warnings.catch_warnings():  # a constant side gives NaN: excluded and counted
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            rho[i] = stats.spearmanr(x_all[ok, i], y_all[ok, i]).statistic
    used = rho[np.isfinite(rho)]
    n_excluded = n_pairs - len(used)
    if len(used) < min_pairs:
        raise InvalidInputError(
            f"{len(used)} pairs have a defined rho ({n_excluded} of {n_pairs} excluded: fewer "
            f"than {min_components} finite components or a constant side); at least "
            f"min_pairs={min_pairs} are needed for a bootstrap CI and a Wilcoxon test"
        )
    mean = float(used.mean())
    if np.ptp(used) == 0:  # every resample has the same mean: the interval is that point
        low = high = mean
    else:
        boot = stats.bootstrap(
            (used,), np.mean, n_resamples=n_resamples, confidence_level=confidence_level,
            method=bootstrap_method, rng=np.random.default_rng(seed),
        )
        low, high = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    with warnings.catch_warnings():  # all rhos exactly 0: scipy returns NaN, kept as NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        test = stats.wilcoxon(used)
    patching = " + ".join(f"{p.mode} {p.hook} per {p.per}" for p in patches)
    return AgreementReport(
        rho=torch.from_numpy(rho).float(),
        n_components=torch.from_numpy(counts),
        components=tuple(shared),
        mean=mean, ci_low=low, ci_high=high, confidence_level=confidence_level,
        wilcoxon_statistic=float(test.statistic), p_value=float(test.pvalue),
        n_pairs=len(used), n_excluded=n_excluded,
        attribution_level=attribution.level, patching=patching,
    )


def compare_attribution_and_patching(
    model: HookedRewardModel,
    chosen: Int[Tensor, "pair pos"] | Sequence[Text],
    rejected: Int[Tensor, "_pair _pos"] | Sequence[Text],
    chosen_mask: Int[Tensor, "pair pos"] | None = None,
    rejected_mask: Int[Tensor, "_pair _pos"] | None = None,
    *,
    level: str = "head",
    estimator: str = "exact",
    positions: str | Tensor = "align_end",
    batch_size: int = 32,
    max_rows: int = 64,
    progress: bool = True,
    **report_kwargs,
) -> AgreementReport:
    """Run both sides on preference pairs and report their rank agreement.

    Attribution: :func:`pair_reward_attribution` at ``level`` (margin contributions). Patching:
    denoising chosen (clean) into rejected (corrupt) over the matching grid (``head``: ``z`` per
    head; ``component``: ``attn_out`` and ``mlp_out`` per layer; ``neuron``: ``mlp_post`` per
    neuron), exactly (``estimator="exact"``, :func:`activation_patch_grids`) or by attribution
    patching (``estimator="atp"``, :func:`tl_reward.causal.atp.attribution_patch`). Other keyword
    arguments go to :func:`agreement_report`.
    """
    choose("level", level, LEVEL_PATCHES)
    choose("estimator", estimator, ESTIMATORS)
    grids = LEVEL_PATCHES[level]
    attribution = pair_reward_attribution(
        model, chosen, rejected, chosen_mask, rejected_mask, level=level,
        batch_size=batch_size, progress=progress,
    )
    kw = dict(clean_mask=chosen_mask, corrupt_mask=rejected_mask, positions=positions,
              progress=progress)
    if estimator == "atp":
        from .atp import attribution_patch

        atp = attribution_patch(model, chosen, rejected, hooks=tuple(h for h, _ in grids),
                                mode="denoise", **kw)
        patches = [atp.as_patch_result(h, per) for h, per in grids]
    else:
        patches = activation_patch_grids(model, chosen, rejected, grids, mode="denoise",
                                         max_rows=max_rows, **kw)
    return agreement_report(attribution, patches, **report_kwargs)
