"""Concept vectors: where a labelled concept lives in the residual stream, how it relates to the
reward direction, and what steering along it does to the reward.

For texts labelled with a concept (``positive`` have it, ``negative`` do not),
:func:`concept_vector` reads the residual stream after a layer at the scoring token and fits two
directions:

- *difference of means*: ``mu_pos - mu_neg``;
- *linear probe*: the weight vector of ``sklearn.linear_model.LogisticRegression`` (L2,
  liblinear) on standardised features, mapped back to residual coordinates; the scaler and the
  regression are one ``sklearn.pipeline.Pipeline``, so in cross-validation the scaler is fitted
  on each training fold only (no statistics of the held-out texts leak into the fit).

Each comes with its cosine with the reward read-out direction (``w_eff = ln_final.w * w_r``, the
direction a residual-stream vector is read along; mean-centred for LayerNorm models) and a
*held-out* separability: cross-validated AUROC (each text scored by a direction fitted without
it, ``sklearn.model_selection.cross_val_predict`` with stratified folds) and a permutation
p-value (labels shuffled and the whole cross-validation redone,
``sklearn.model_selection.permutation_test_score``). A concept whose labels are noise gets an
AUROC near 0.5 and a large p-value, not the in-sample separability of 1 that any direction fitted
to a few points in ``d_model`` dimensions reaches.

:func:`concept_dose_response` steers along a concept direction through a hook (adding
``dose * ||mu_pos - mu_neg||`` times the unit direction to the residual stream after the layer)
and reports the reward change per dose with bootstrap CIs and the slope.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.utilities import get_act_name

from .._readout import centers, choose, read_out
from .._stats import bootstrap_ci
from ..errors import InvalidInputError, ObjectiveError
from ..model import HookedRewardModel, Text

DIRECTIONS = ("mean_diff", "probe")


def _diff_means_classifier():
    """A difference-of-means classifier as an sklearn estimator (for cross-validation and the
    permutation test): score = x . (mu_pos - mu_neg) - midpoint."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    class DiffMeans(ClassifierMixin, BaseEstimator):
        def fit(self, x, y):
            y = np.asarray(y)
            self.classes_ = np.array([0, 1])
            self.direction_ = x[y == 1].mean(0) - x[y == 0].mean(0)
            self.offset_ = 0.5 * (x[y == 1].mean(0) + x[y == 0].mean(0)) @ self.direction_
            return self

        def decision_function(self, x):
            return x @ self.direction_ - self.offset_

        def predict(self, x):
            return (self.decision_function(x) > 0).astype(int)

    return DiffMeans()


@dataclass(frozen=True)
class ConceptVector:
    """A concept's directions at one layer and how they relate to the reward.

    ``mean_diff`` and ``probe`` are unit vectors; ``mean_gap`` is ``||mu_pos - mu_neg||``.
    ``cos_reward``: cosine of each with the effective reward read-out direction (keys
    ``"mean_diff"``, ``"probe"``); ``auroc``: cross-validated AUROC of each, ``p_value``: its
    permutation p-value (``n_permutations`` label shuffles), ``cos_between``: cosine of the two
    directions.
    """

    name: str
    layer: int
    mean_diff: Float[Tensor, "d_model"]
    probe: Float[Tensor, "d_model"]
    mean_gap: float
    cos_reward: dict
    auroc: dict
    p_value: dict
    cos_between: float
    n_positive: int
    n_negative: int
    n_folds: int
    n_permutations: int

    def direction(self, which: str = "mean_diff") -> Float[Tensor, "d_model"]:
        choose("direction", which, DIRECTIONS)
        return self.mean_diff if which == "mean_diff" else self.probe

    def to_dataframe(self):
        """One row per direction."""
        import pandas as pd

        return pd.DataFrame([{
            "concept": self.name, "layer": self.layer, "direction": d,
            "cos_reward": self.cos_reward[d], "cv_auroc": self.auroc[d],
            "permutation_p": self.p_value[d],
        } for d in DIRECTIONS])

    def plot(self, title: str | None = None):
        """Cosine with the reward direction and held-out AUROC of both directions."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_trace(go.Bar(x=list(DIRECTIONS), y=[self.cos_reward[d] for d in DIRECTIONS],
                             name="cos with reward direction"))
        fig.add_trace(go.Bar(x=list(DIRECTIONS), y=[self.auroc[d] for d in DIRECTIONS],
                             name="cross-validated AUROC",
                             hovertext=[f"p={self.p_value[d]:.3g}" for d in DIRECTIONS]))
        fig.add_hline(y=0.5, line_dash="dot", annotation_text="chance AUROC")
        fig.update_layout(barmode="group", title=title or
                          f"Concept '{self.name}' after layer {self.layer}")
        return fig


@torch.no_grad()
def _states(model: HookedRewardModel, texts: Sequence[Text], layer: int,
            batch_size: int) -> np.ndarray:
    name = get_act_name("resid_post", layer)
    out = []
    for start in range(0, len(texts), batch_size):
        tokens, mask = model.pad(model.tokenize(list(texts[start:start + batch_size])))
        pooled = model.pooled_index(tokens, mask)
        _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=name,
                                        pool_index=pooled)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        out.append(cache[name][rows, pooled].detach().cpu().double().numpy())
    return np.concatenate(out)


def _reward_read_direction(model: HookedRewardModel) -> Tensor:
    if not model.is_scalar:
        raise ObjectiveError(f"this head has {model.n_rewards} objectives: choose one with "
                             "model.set_objective(...)")
    w = read_out(model)[0][:, 0].detach().cpu().double()
    return w - w.mean() if centers(model) else w


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    if n == 0:
        raise InvalidInputError("the concept direction is zero: positive and negative texts have "
                                "the same activations")
    return v / n


def concept_vector(
    model: HookedRewardModel,
    positive: Sequence[Text],
    negative: Sequence[Text],
    *,
    layer: int,
    name: str = "concept",
    n_folds: int = 5,
    n_permutations: int = 50,
    C: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
) -> ConceptVector:
    """Difference-of-means and linear-probe directions of a concept after ``layer`` (scoring
    token), their cosine with the reward read-out, and their held-out separability.

    Args:
        positive, negative: texts with and without the concept.
        layer: read ``blocks.{layer}.hook_resid_post``.
        n_folds: stratified cross-validation folds for the AUROC.
        n_permutations: label shuffles for the permutation p-value (each redoes the
            cross-validation); the smallest attainable p is ``1 / (n_permutations + 1)``.
        C: inverse L2 strength of the logistic regression.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict, permutation_test_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not 0 <= layer < model.cfg.n_layers:
        raise InvalidInputError(f"layer {layer} is not in 0..{model.cfg.n_layers - 1}")
    n_pos, n_neg = len(positive), len(negative)
    if min(n_pos, n_neg) < n_folds:
        raise InvalidInputError(
            f"{n_pos} positive and {n_neg} negative texts: each class needs at least n_folds="
            f"{n_folds} texts for a cross-validated AUROC"
        )
    if n_permutations < 1:
        raise InvalidInputError(f"n_permutations must be >= 1, got {n_permutations}")
    x = np.concatenate([_states(model, positive, layer, batch_size),
                        _states(model, negative, layer, batch_size)])
    y = np.concatenate([np.ones(n_pos, dtype=int), np.zeros(n_neg, dtype=int)])
    w_r = _reward_read_direction(model).numpy()

    diff = x[y == 1].mean(0) - x[y == 0].mean(0)
    mean_diff = _unit(diff)
    # the probe standardises its features (fitted with it: inside each fold in cross-validation),
    # then its weights are mapped back to residual coordinates
    def make_probe():
        return make_pipeline(StandardScaler(),
                             LogisticRegression(C=C, solver="liblinear", max_iter=1000))

    fitted = make_probe().fit(x, y)
    scaler, logistic = fitted[0], fitted[-1]
    probe = _unit(logistic.coef_[0] / scaler.scale_)  # scale_ is 1 for constant features

    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    auroc, p_value = {}, {}
    for key, est in (("mean_diff", _diff_means_classifier()), ("probe", make_probe())):
        scores = cross_val_predict(est, x, y, cv=folds, method="decision_function")
        auroc[key] = float(roc_auc_score(y, scores))
        _, _, p = permutation_test_score(est, x, y, cv=folds, scoring="roc_auc",
                                         n_permutations=n_permutations, random_state=seed)
        p_value[key] = float(p)
    cos = {k: float(v @ w_r / np.linalg.norm(w_r)) for k, v in
           (("mean_diff", mean_diff), ("probe", probe))}
    t = torch.from_numpy
    return ConceptVector(
        name=name, layer=layer, mean_diff=t(mean_diff).float(), probe=t(probe).float(),
        mean_gap=float(np.linalg.norm(diff)), cos_reward=cos, auroc=auroc, p_value=p_value,
        cos_between=float(mean_diff @ probe), n_positive=n_pos, n_negative=n_neg,
        n_folds=n_folds, n_permutations=n_permutations,
    )


@dataclass(frozen=True)
class DoseResponse:
    """Reward change when steering along a concept: ``deltas[d, i]`` for dose ``doses[d]`` and
    text ``i`` (reward with the steering minus without). ``mean``, ``ci_low``, ``ci_high`` per
    dose (bootstrap over texts); ``slope`` (mean over texts of the per-text least-squares slope,
    ``scipy.stats.linregress``) with its bootstrap CI; ``spearman`` of dose against the mean
    change (monotonicity)."""

    concept: str
    layer: int
    direction: str
    positions: str
    doses: Float[Tensor, "dose"]
    step: float
    deltas: Float[Tensor, "dose batch"]
    mean: Float[Tensor, "dose"]
    ci_low: Float[Tensor, "dose"]
    ci_high: Float[Tensor, "dose"]
    slope: float
    slope_ci: tuple[float, float]
    spearman: float

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame({"dose": self.doses.numpy(), "mean_change": self.mean.numpy(),
                             "ci_low": self.ci_low.numpy(), "ci_high": self.ci_high.numpy()})

    def plot(self, title: str | None = None):
        """Mean reward change against dose with its CI band."""
        import plotly.graph_objects as go

        x = self.doses.numpy()
        fig = go.Figure([
            go.Scatter(x=np.concatenate([x, x[::-1]]),
                       y=np.concatenate([self.ci_high.numpy(), self.ci_low.numpy()[::-1]]),
                       fill="toself", line={"width": 0}, opacity=0.3, name="CI"),
            go.Scatter(x=x, y=self.mean.numpy(), mode="lines+markers", name="mean change"),
        ])
        fig.update_layout(
            title=title or f"Steering along '{self.concept}' ({self.direction}) after layer "
            f"{self.layer}: slope {self.slope:+.3f} per unit dose",
            xaxis_title=f"dose (x {self.step:.3g} along the unit direction)",
            yaxis_title="reward change")
        return fig


def concept_dose_response(
    model: HookedRewardModel,
    concept: ConceptVector,
    texts: Sequence[Text],
    *,
    doses: Sequence[float] = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0),
    direction: str = "mean_diff",
    positions: str = "all",
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
    batch_size: int = 32,
) -> DoseResponse:
    """Steer along a concept direction through a hook and measure the reward change.

    At ``blocks.{layer}.hook_resid_post`` the hook adds ``dose * concept.mean_gap`` times the
    unit ``direction`` (``"mean_diff"`` or ``"probe"``) at every real position
    (``positions="all"``) or at the scoring token only (``"pooled"``); dose 1 with
    ``mean_diff`` moves a text by the full difference between the class means.
    """
    from scipy import stats

    choose("direction", direction, DIRECTIONS)
    choose("positions", positions, ("all", "pooled"))
    if not model.is_scalar:
        raise ObjectiveError("steering measures a scalar reward; choose an objective first")
    doses_t = torch.tensor(list(doses), dtype=torch.float64)
    if len(doses_t) < 3:
        raise InvalidInputError(f"a dose-response curve needs at least 3 doses, got {list(doses)}")
    if len(texts) < 2:
        raise InvalidInputError("pass at least 2 texts")
    step = concept.mean_gap
    v = concept.direction(direction).to(model.cfg.device, model.cfg.dtype)
    name = get_act_name("resid_post", concept.layer)
    rewards = []
    for start in range(0, len(texts), batch_size):
        tokens, mask = model.pad(model.tokenize(list(texts[start:start + batch_size])))
        pooled = model.pooled_index(tokens, mask)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        where = mask.bool().clone()
        if positions == "pooled":
            where = torch.zeros_like(where)
            where[rows, pooled] = True
        per_dose = []
        for dose in doses_t.tolist():
            add = (dose * step) * v

            def steer(act, hook, add=add, where=where):
                return act + where[..., None].to(act.dtype) * add

            with torch.no_grad():
                per_dose.append(model.run_with_hooks(tokens, attention_mask=mask, pool_index=pooled,
                                                     fwd_hooks=[(name, steer)]).detach().cpu().double())
        rewards.append(torch.stack(per_dose))
    r = torch.cat(rewards, dim=1)  # [dose, text]
    with torch.no_grad():
        base = model.score(list(texts), batch_size=batch_size, progress=False).cpu().double()
    deltas = (r - base).numpy()
    lo, hi = zip(*(bootstrap_ci(d, confidence_level=confidence_level, n_resamples=n_resamples,
                                seed=seed) for d in deltas), strict=True)
    x = doses_t.numpy()
    slopes = np.array([stats.linregress(x, deltas[:, i]).slope for i in range(deltas.shape[1])])
    slope_ci = bootstrap_ci(slopes, confidence_level=confidence_level, n_resamples=n_resamples,
                            seed=seed)
    mean = deltas.mean(1)
    rho = float(stats.spearmanr(x, mean).statistic) if np.ptp(mean) > 0 else float("nan")
    t = torch.from_numpy
    return DoseResponse(
        concept=concept.name, layer=concept.layer, direction=direction, positions=positions,
        doses=doses_t.float(), step=step, deltas=t(deltas).float(), mean=t(mean).float(),
        ci_low=torch.tensor(lo).float(), ci_high=torch.tensor(hi).float(),
        slope=float(slopes.mean()), slope_ci=slope_ci, spearman=rho,
    )
