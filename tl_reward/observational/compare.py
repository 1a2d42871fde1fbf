"""Comparing reward directions: across reward models, and across the terms of one reward.

Two residual streams are two bases: the same function can be written in rotated coordinates, so
a cosine between raw coordinates of two models' reward directions means nothing. Everything here
works in a *shared frame* fitted on shared inputs:

- :func:`align_residuals`: each model's pooled state (the normalised residual at the scoring
  token, which the head reads: ``reward = h . W_R + b_R``) on the same texts; an orthogonal
  Procrustes map (``scipy.linalg.orthogonal_procrustes``, the smaller width zero-padded) from
  model B's centred states to model A's, fitted on a training split and scored on held-out
  texts (R^2), and linear CKA (basis-free similarity of the two sets of states).
- :func:`compare_reward_models`: the reward directions' cosine in the shared frame (with the
  probability that two random directions are as close, from the exact Beta law of a random
  cosine), agreement on preference pairs (fraction of pairs ranked alike with a Clopper-Pearson
  CI; Spearman of the margins with a bootstrap CI), the margin lens of both models side by side,
  and the overlap of their top components when the two models have the same shape.
- :func:`reward_term_conflict`: several reward terms (the objectives of a multi-objective head,
  or several reward models): the angle matrix of their reward directions, the fraction of pairs
  on which two terms pick different winners (with a CI), and where in the model the
  disagreement arises (the layer at which the terms' margins part, and the components that write
  the difference).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .._readout import choose
from ..errors import InvalidInputError, ObjectiveError
from ..model import HookedRewardModel, Text


# ------------------------------------------------------------------------------ shared frame
@torch.no_grad()
def pooled_states(
    model: HookedRewardModel, texts: Sequence[Text], *, batch_size: int = 32
) -> Float[Tensor, "batch d_model"]:
    """The state each reward is read from: ``reward_head.hook_pooled`` (the normalised residual
    at the scoring token), one row per text."""
    if isinstance(texts, str) or len(texts) == 0:
        raise InvalidInputError("pooled_states takes a non-empty list of texts")
    out = []
    for start in range(0, len(texts), batch_size):
        tokens, mask = model.pad(model.tokenize(list(texts[start:start + batch_size])))
        _, cache = model.run_with_cache(tokens, attention_mask=mask,
                                        names_filter="reward_head.hook_pooled")
        out.append(cache["reward_head.hook_pooled"].detach().cpu().double())
    return torch.cat(out)


def linear_cka(x: Float[Tensor, "batch d_model"], y: Float[Tensor, "batch _d"]) -> float:
    """Linear CKA of two sets of states of the same inputs (Kornblith et al. 2019):
    ``||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``.
    Invariant to rotations and scaling of either basis; 1 for identical geometry."""
    if x.shape[0] != y.shape[0]:
        raise InvalidInputError(f"CKA needs the same inputs: {x.shape[0]} vs {y.shape[0]} rows")
    xc = (x - x.mean(0)).double()
    yc = (y - y.mean(0)).double()
    num = (xc.T @ yc).norm() ** 2
    den = (xc.T @ xc).norm() * (yc.T @ yc).norm()
    return float(num / den)


@dataclass(frozen=True)
class ResidualAlignment:
    """An orthogonal map from model B's pooled-state frame to model A's.

    ``(h_b - mean_b) @ rotation * scale + mean_a`` approximates ``h_a`` (both zero-padded to
    ``max(d_a, d_b)``). ``train_r2``/``test_r2``: fraction of A's centred variance the mapped
    B states explain on the fitting and the held-out texts; ``cka``: linear CKA on all texts.
    """

    rotation: Float[Tensor, "d_model d_model"]
    scale: float
    mean_a: Float[Tensor, "d_model"]
    mean_b: Float[Tensor, "d_model"]
    d_a: int
    d_b: int
    train_r2: float
    test_r2: float
    cka: float
    n_train: int
    n_test: int

    def _pad(self, v: Tensor) -> Tensor:
        d = self.rotation.shape[0]
        return torch.nn.functional.pad(v.double(), (0, d - v.shape[-1]))

    def map_states(self, h_b: Float[Tensor, "batch _d"]) -> Float[Tensor, "batch d_model"]:
        """B's states written in A's frame."""
        return ((self._pad(h_b) - self.mean_b) @ self.rotation) * self.scale + self.mean_a

    def map_direction(self, w_b: Float[Tensor, "_d"]) -> Float[Tensor, "d_model"]:
        """A read-out direction of B written in A's frame: ``w_b . h_b == map(w_b) . map(h_b)``
        up to the offset (the rotation is orthogonal)."""
        return self.rotation.T @ self._pad(w_b) / self.scale


def _r2(pred: np.ndarray, target: np.ndarray) -> float:
    return float(1.0 - ((pred - target) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())


def align_residuals(
    model_a: HookedRewardModel,
    model_b: HookedRewardModel,
    texts: Sequence[Text],
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    batch_size: int = 32,
) -> ResidualAlignment:
    """Fit the shared frame of two reward models on shared texts (each model tokenizes them
    itself): orthogonal Procrustes from B's centred pooled states to A's, with a least-squares
    scale, fitted on ``1 - test_fraction`` of the texts and scored on the rest."""
    from scipy.linalg import orthogonal_procrustes

    if not 0 < test_fraction < 1:
        raise InvalidInputError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    n = len(texts)
    n_test = int(round(n * test_fraction))
    if n - n_test < 10 or n_test < 5:
        raise InvalidInputError(
            f"{n} shared texts give {n - n_test} to fit and {n_test} to test the alignment; "
            "pass at least 10 + 5 (and many more than d_model for a faithful map)"
        )
    h_a = pooled_states(model_a, texts, batch_size=batch_size)
    h_b = pooled_states(model_b, texts, batch_size=batch_size)
    d = max(h_a.shape[1], h_b.shape[1])
    pa = torch.nn.functional.pad(h_a, (0, d - h_a.shape[1])).numpy()
    pb = torch.nn.functional.pad(h_b, (0, d - h_b.shape[1])).numpy()
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    mean_a, mean_b = pa[train].mean(0), pb[train].mean(0)
    xa, xb = pa[train] - mean_a, pb[train] - mean_b
    rotation, _ = orthogonal_procrustes(xb, xa)
    mapped = xb @ rotation
    scale = float((mapped * xa).sum() / (mapped ** 2).sum()) if (mapped ** 2).sum() > 0 else 1.0
    train_r2 = _r2(mapped * scale, xa)
    test_r2 = _r2(((pb[test] - mean_b) @ rotation) * scale + mean_a, pa[test])
    t = torch.from_numpy
    return ResidualAlignment(
        rotation=t(rotation), scale=scale, mean_a=t(mean_a), mean_b=t(mean_b),
        d_a=h_a.shape[1], d_b=h_b.shape[1], train_r2=train_r2, test_r2=test_r2,
        cka=linear_cka(h_a, h_b), n_train=len(train), n_test=n_test,
    )


def random_cosine_p_value(cosine: float, dim: int) -> float:
    """P(|cos| >= |cosine|) for two independent uniformly random directions in ``dim``
    dimensions: ``(cos + 1) / 2`` follows Beta((dim - 1) / 2, (dim - 1) / 2)
    (``scipy.stats.beta``)."""
    from scipy import stats

    if dim < 2:
        raise InvalidInputError(f"dim must be >= 2, got {dim}")
    a = (dim - 1) / 2
    return float(2 * stats.beta.sf((abs(cosine) + 1) / 2, a, a))


def _cos(u: Tensor, v: Tensor) -> float:
    u, v = u.double().flatten(), v.double().flatten()
    denom = float(u.norm() * v.norm())
    if denom == 0:
        raise InvalidInputError("a reward direction is zero: its angle is undefined")
    return float(u @ v) / denom


def _scalar_direction(model: HookedRewardModel) -> Tensor:
    if not model.is_scalar:
        raise ObjectiveError(
            f"this head has {model.n_rewards} objectives {list(model.label_names)}: choose one "
            "with model.set_objective(...) (or compare its terms with reward_term_conflict)"
        )
    return model.reward_direction.detach().cpu().double()


# ------------------------------------------------------------------------------ two models
@dataclass(frozen=True)
class ModelComparison:
    """Two reward models compared in a shared frame and on the same preference pairs.

    ``direction_cosine``: cosine of A's reward direction and B's mapped into A's frame (see
    :class:`ResidualAlignment`); ``direction_p_value``: probability that two random directions
    are at least as close. ``reward_correlation``: Spearman of the two rewards over the shared
    texts. With pairs: ``agreement`` (fraction of pairs both models rank the same way, with a
    Clopper-Pearson CI), ``margin_spearman`` (with a bootstrap CI), ``lens`` (mean margin per
    read-out point of each model, at fractional depth). ``top_components`` and
    ``component_jaccard`` / ``component_spearman``: only for two models of the same shape
    (same component labels), else None.
    """

    names: tuple[str, str]
    alignment: ResidualAlignment
    direction_cosine: float
    direction_p_value: float
    reward_correlation: float
    n_pairs: int
    agreement: float
    agreement_ci: tuple[float, float]
    margin_spearman: float
    margin_spearman_ci: tuple[float, float]
    lens_depth: tuple[Float[Tensor, "layer"], Float[Tensor, "_layer"]] | None
    lens: tuple[Float[Tensor, "layer"], Float[Tensor, "_layer"]] | None
    top_components: tuple[tuple[str, ...], tuple[str, ...]] | None
    component_jaccard: float | None
    component_spearman: float | None

    def summary(self) -> str:
        a, b = self.names
        lines = [
            f"{a} vs {b}: shared frame R^2 {self.alignment.test_r2:.3f} (held out), linear CKA "
            f"{self.alignment.cka:.3f}",
            f"reward directions: cosine {self.direction_cosine:+.3f} in the shared frame "
            f"(random directions: p = {self.direction_p_value:.2g}); rewards' Spearman "
            f"{self.reward_correlation:+.3f}",
        ]
        if self.n_pairs:
            lo, hi = self.agreement_ci
            slo, shi = self.margin_spearman_ci
            lines.append(f"{self.n_pairs} pairs: same winner on {self.agreement:.1%} [{lo:.1%}, "
                         f"{hi:.1%}], margin Spearman {self.margin_spearman:+.3f} [{slo:+.3f}, {shi:+.3f}]")
        if self.component_jaccard is not None:
            lines.append(f"top components: {a} {list(self.top_components[0])}, {b} "
                         f"{list(self.top_components[1])} (Jaccard {self.component_jaccard:.2f}, "
                         f"profile Spearman {self.component_spearman:+.3f})")
        return "\n".join(lines)

    def to_dataframe(self):
        """The headline numbers, one row per measure."""
        import pandas as pd

        rows = [("alignment_test_r2", self.alignment.test_r2), ("cka", self.alignment.cka),
                ("direction_cosine", self.direction_cosine),
                ("direction_p_value", self.direction_p_value),
                ("reward_correlation", self.reward_correlation), ("agreement", self.agreement),
                ("margin_spearman", self.margin_spearman)]
        if self.component_jaccard is not None:
            rows += [("component_jaccard", self.component_jaccard),
                     ("component_spearman", self.component_spearman)]
        return pd.DataFrame(rows, columns=["measure", "value"])

    def plot(self, title: str | None = None):
        """The two models' margin lens curves side by side (mean margin against depth)."""
        import plotly.graph_objects as go

        if self.lens is None:
            raise InvalidInputError("no lens curves: compare_reward_models was run without pairs")
        fig = go.Figure()
        for name, depth, curve in zip(self.names, self.lens_depth, self.lens, strict=True):
            fig.add_trace(go.Scatter(x=depth.numpy(), y=curve.numpy(), mode="lines+markers",
                                     name=name))
        fig.update_layout(title=title or "Margin lens of both models", xaxis_title="depth "
                          "(fraction of layers)", yaxis_title="mean margin (chosen - rejected)")
        return fig


def _check_pairs(chosen, rejected) -> int:
    if chosen is None and rejected is None:
        return 0
    if chosen is None or rejected is None or len(chosen) != len(rejected):
        raise InvalidInputError("pass chosen and rejected texts of the same length, or neither")
    return len(chosen)


def compare_reward_models(
    model_a: HookedRewardModel,
    model_b: HookedRewardModel,
    texts: Sequence[Text],
    *,
    chosen: Sequence[Text] | None = None,
    rejected: Sequence[Text] | None = None,
    names: tuple[str, str] = ("A", "B"),
    level: str = "head",
    top_k: int = 5,
    test_fraction: float = 0.3,
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> ModelComparison:
    """Compare two scalar reward models in a shared frame and on the same pairs.

    Args:
        texts: shared inputs for the frame (each model tokenizes them with its own tokenizer);
            many more than ``d_model`` for a faithful map.
        chosen, rejected: preference pairs for agreement, lens curves and components.
        level: attribution level of the component overlap (``"component"``, ``"head"``).
    """
    from scipy import stats

    from .attribution import pair_reward_attribution
    from .lens import pair_reward_lens

    choose("level", level, ("component", "head"))
    n_pairs = _check_pairs(chosen, rejected)
    w_a, w_b = _scalar_direction(model_a), _scalar_direction(model_b)
    alignment = align_residuals(model_a, model_b, texts, test_fraction=test_fraction, seed=seed,
                                batch_size=batch_size)
    # A's states live in its first d_a coordinates of the (padded) shared frame
    cosine = _cos(w_a, alignment.map_direction(w_b)[: alignment.d_a])
    p_dir = random_cosine_p_value(cosine, alignment.d_a)
    with torch.no_grad():
        ra = model_a.score(list(texts), batch_size=batch_size, progress=progress)
        rb = model_b.score(list(texts), batch_size=batch_size, progress=progress)
    reward_corr = float(stats.spearmanr(ra.cpu().numpy(), rb.cpu().numpy()).statistic)

    agreement, agreement_ci = float("nan"), (float("nan"), float("nan"))
    m_rho, m_ci = float("nan"), (float("nan"), float("nan"))
    lens = depth = tops = None
    jaccard = spearman = None
    if n_pairs:
        if n_pairs < 5:
            raise InvalidInputError(f"{n_pairs} pairs are too few for agreement statistics; pass >= 5")
        ma = model_a.score_pairs(chosen, rejected, batch_size=batch_size, progress=progress).margin
        mb = model_b.score_pairs(chosen, rejected, batch_size=batch_size, progress=progress).margin
        ma, mb = ma.cpu().double().numpy(), mb.cpu().double().numpy()
        same = int(((ma > 0) == (mb > 0)).sum())
        test = stats.binomtest(same, n_pairs)
        ci = test.proportion_ci(confidence_level=confidence_level, method="exact")
        agreement, agreement_ci = same / n_pairs, (float(ci.low), float(ci.high))
        m_rho = float(stats.spearmanr(ma, mb).statistic)
        from .._stats import correlation_statistic

        if np.ptp(ma) > 0 and np.ptp(mb) > 0:
            boot = stats.bootstrap((ma, mb), correlation_statistic("spearman"), paired=True,
                                   vectorized=True, n_resamples=n_resamples,
                                   confidence_level=confidence_level, method="BCa",
                                   rng=np.random.default_rng(seed))
            m_ci = (float(boot.confidence_interval.low), float(boot.confidence_interval.high))
        curves, depths = [], []
        for model in (model_a, model_b):
            pl = pair_reward_lens(model, chosen, rejected, batch_size=batch_size, progress=progress)
            curve = pl.margins.mean(-1).detach().cpu().float()
            curves.append(curve)
            depths.append(torch.linspace(0, 1, len(curve)))
        lens, depth = tuple(curves), tuple(depths)
        attrs = [pair_reward_attribution(model, chosen, rejected, level=level,
                                         batch_size=batch_size, progress=progress)
                 for model in (model_a, model_b)]
        if attrs[0].labels == attrs[1].labels:  # same shape: the components correspond
            means = [a.values.detach().cpu().double().mean(1) for a in attrs]
            tops = tuple(tuple(attrs[0].labels[i] for i in m.abs().argsort(descending=True)[:top_k].tolist())
                         for m in means)
            jaccard = len(set(tops[0]) & set(tops[1])) / len(set(tops[0]) | set(tops[1]))
            spearman = float(stats.spearmanr(means[0].numpy(), means[1].numpy()).statistic)
    return ModelComparison(
        names=tuple(names), alignment=alignment, direction_cosine=cosine,
        direction_p_value=p_dir, reward_correlation=reward_corr, n_pairs=n_pairs,
        agreement=agreement, agreement_ci=agreement_ci, margin_spearman=m_rho,
        margin_spearman_ci=m_ci, lens_depth=depth, lens=lens, top_components=tops,
        component_jaccard=jaccard, component_spearman=spearman,
    )


# ------------------------------------------------------------------------------ reward terms
@dataclass(frozen=True)
class ConflictResult:
    """Where the terms of a reward disagree.

    ``cosine[a, b]``: cosine of the reward directions of terms ``a`` and ``b`` in the pooled
    state the head reads (the columns of ``W_R`` of a multi-objective head, or several models'
    directions mapped into the first model's frame by :func:`align_residuals`).
    ``disagreement[a, b]``: fraction of the ``n_compared[a, b]`` pairs (both margins non-zero)
    on which the two terms pick different winners, with a Clopper-Pearson CI. ``margins[i, t]``:
    term ``t``'s margin on pair ``i``. ``lens_disagreement[(a, b)]``: at each read-out point
    (``lens_labels``), the fraction of the conflicting pairs whose running margins already
    disagree in sign (where the disagreement arises along depth). ``components[(a, b)]``: the
    top components of the conflict (multi-objective head: direct attribution of the margin of
    ``term a - term b`` over the conflicting pairs; several models: each model's own top
    components on those pairs), as ``(label, mean)`` tuples.
    """

    terms: tuple[str, ...]
    cosine: Float[Tensor, "term term"]
    disagreement: Float[Tensor, "term term"]
    ci_low: Float[Tensor, "term term"]
    ci_high: Float[Tensor, "term term"]
    n_compared: Float[Tensor, "term term"]
    margins: Float[Tensor, "pair term"]
    lens_labels: tuple[str, ...]
    lens_disagreement: dict
    components: dict
    confidence_level: float

    @property
    def angles(self) -> Float[Tensor, "term term"]:
        """Angles between the reward directions, in degrees."""
        return torch.rad2deg(torch.arccos(self.cosine.clamp(-1, 1)))

    def to_dataframe(self):
        """One row per pair of terms."""
        import pandas as pd

        rows = []
        k = len(self.terms)
        for i in range(k):
            for j in range(i + 1, k):
                key = (self.terms[i], self.terms[j])
                curve = self.lens_disagreement.get(key)
                rows.append({
                    "term_a": key[0], "term_b": key[1], "angle": float(self.angles[i, j]),
                    "cosine": float(self.cosine[i, j]),
                    "disagreement": float(self.disagreement[i, j]),
                    "ci_low": float(self.ci_low[i, j]), "ci_high": float(self.ci_high[i, j]),
                    "n": int(self.n_compared[i, j]),
                    "first_layer_half_disagree": (
                        None if curve is None or not bool((curve >= 0.5).any())
                        else self.lens_labels[int((curve >= 0.5).float().argmax())]),
                    "top_components": ", ".join(f"{c} ({v:+.2f})" for c, v in self.components.get(key, ())[:3]),
                })
        return pd.DataFrame(rows)

    def plot(self, title: str | None = None):
        """Angle matrix of the terms' reward directions, disagreement rates on hover."""
        import plotly.graph_objects as go

        k = len(self.terms)
        text = [[f"{float(self.angles[i, j]):.0f} deg<br>disagree "
                 f"{float(self.disagreement[i, j]):.0%}" for j in range(k)] for i in range(k)]
        fig = go.Figure(go.Heatmap(z=self.angles.numpy(), x=list(self.terms), y=list(self.terms),
                                   zmin=0, zmax=180, colorscale="RdBu_r", text=text,
                                   hoverinfo="text", texttemplate="%{text}"))
        fig.update_layout(title=title or "Reward terms: angle between directions, disagreement")
        return fig


def _term_models(model, terms, names):
    if isinstance(model, HookedRewardModel):
        n = model.n_rewards
        if n < 2:
            raise InvalidInputError("a single-output head has one term; pass several models or a "
                                    "multi-objective head")
        idx = list(range(n)) if terms is None else list(terms)
        bad = [t for t in idx if not -n <= t < n]
        if bad or len(idx) < 2:
            raise InvalidInputError(f"terms must be >= 2 indices in 0..{n - 1}, got {idx}")
        labels = tuple(names) if names else tuple(model.label_names[t] for t in idx)
        return "objectives", idx, labels
    models = list(model)
    if len(models) < 2 or not all(isinstance(m, HookedRewardModel) for m in models):
        raise InvalidInputError("pass one multi-objective HookedRewardModel or >= 2 HookedRewardModels")
    if terms is not None:
        raise InvalidInputError("terms= selects objectives of one head; with several models pass names=")
    labels = tuple(names) if names else tuple(f"model_{i}" for i in range(len(models)))
    return "models", models, labels


def reward_term_conflict(
    model: HookedRewardModel | Sequence[HookedRewardModel],
    chosen: Sequence[Text],
    rejected: Sequence[Text],
    *,
    terms: Sequence[int] | None = None,
    names: Sequence[str] | None = None,
    alignment_texts: Sequence[Text] | None = None,
    level: str = "head",
    top_k: int = 5,
    confidence_level: float = 0.95,
    batch_size: int = 32,
    progress: bool = True,
) -> ConflictResult:
    """Reward-term conflict analysis.

    Args:
        model: a multi-objective :class:`HookedRewardModel` (its objectives are the terms;
            ``terms`` picks some) or several scalar reward models (one term each).
        chosen, rejected: the pairs on which the terms are compared.
        alignment_texts: shared texts for the frame of several models (default: the pair texts).
        level: attribution level of the components (``"component"``, ``"head"``, ``"neuron"``).
    """
    from scipy import stats

    from .attribution import pair_reward_attribution
    from .lens import pair_reward_lens

    choose("level", level, ("component", "head", "neuron"))
    n_pairs = _check_pairs(chosen, rejected)
    if n_pairs < 5:
        raise InvalidInputError(f"{n_pairs} pairs are too few to compare terms; pass >= 5")
    kind, handle, labels = _term_models(model, terms, names)
    k = len(labels)
    lens_margins = []  # per term: [layer, pair]
    if kind == "objectives":
        saved = model.objective_weights
        try:
            model.set_objective(None)
            weights = model.W_R.detach().cpu().double()[:, handle]  # [d_model, term]
            scores = model.score_pairs(chosen, rejected, batch_size=batch_size, progress=progress)
            margins = scores.margin.detach().cpu().double()[:, handle]
            pl = pair_reward_lens(model, chosen, rejected, batch_size=batch_size, progress=progress)
            lens_labels = pl.chosen.labels
            lens_margins = [pl.margins.detach().cpu().double()[..., t] for t in handle]
        finally:
            model.objective_weights = saved
        directions = [weights[:, t] for t in range(k)]
    else:
        models = handle
        for m in models:
            _scalar_direction(m)
        texts = list(alignment_texts) if alignment_texts is not None else list(chosen) + list(rejected)
        directions, cols, lens_labels = [], [], None
        for i, m in enumerate(models):
            w = _scalar_direction(m)
            if i == 0:
                directions.append(w)
            else:  # in the first model's frame (its d_model coordinates)
                al = align_residuals(models[0], m, texts, batch_size=batch_size)
                directions.append(al.map_direction(w)[: al.d_a])
            cols.append(m.score_pairs(chosen, rejected, batch_size=batch_size,
                                      progress=progress).margin.detach().cpu().double())
            pl = pair_reward_lens(m, chosen, rejected, batch_size=batch_size, progress=progress)
            lens_margins.append(pl.margins.detach().cpu().double())
            lens_labels = pl.chosen.labels if lens_labels is None else lens_labels
        margins = torch.stack(cols, 1)

    cosine = torch.eye(k, dtype=torch.float64)
    dis = torch.zeros(k, k, dtype=torch.float64)
    lo, hi, n_cmp = dis.clone(), dis.clone(), dis.clone()
    lens_dis, components = {}, {}
    for i in range(k):
        n_cmp[i, i] = int((margins[:, i] != 0).sum())
        for j in range(i + 1, k):
            cosine[i, j] = cosine[j, i] = _cos(directions[i], directions[j])
            ok = (margins[:, i] != 0) & (margins[:, j] != 0)
            n = int(ok.sum())
            conflict = ok & ((margins[:, i] > 0) != (margins[:, j] > 0))
            c = int(conflict.sum())
            n_cmp[i, j] = n_cmp[j, i] = n
            if n == 0:
                raise InvalidInputError(f"terms {labels[i]!r} and {labels[j]!r}: every pair has a zero margin")
            ci = stats.binomtest(c, n).proportion_ci(confidence_level=confidence_level, method="exact")
            dis[i, j] = dis[j, i] = c / n
            lo[i, j] = lo[j, i] = float(ci.low)
            hi[i, j] = hi[j, i] = float(ci.high)
            key = (labels[i], labels[j])
            if c == 0:
                continue
            idx = conflict.nonzero()[:, 0]
            if len(lens_margins[i]) == len(lens_margins[j]):
                li, lj = lens_margins[i][:, idx], lens_margins[j][:, idx]
                lens_dis[key] = ((li > 0) != (lj > 0)).float().mean(1).float()
            sub_c = [chosen[t] for t in idx.tolist()]
            sub_r = [rejected[t] for t in idx.tolist()]
            if kind == "objectives":
                diff = torch.zeros(model.n_rewards)
                diff[handle[i]], diff[handle[j]] = 1.0, -1.0
                saved = model.objective_weights
                try:
                    model.set_objective(diff)
                    attr = pair_reward_attribution(model, sub_c, sub_r, level=level,
                                                   batch_size=batch_size, progress=progress)
                finally:
                    model.objective_weights = saved
                mean = attr.values.detach().cpu().double().mean(1)
                order = mean.abs().argsort(descending=True)[:top_k].tolist()
                components[key] = tuple((attr.labels[o], float(mean[o])) for o in order)
            else:
                tops = []
                for m, name in ((handle[i], labels[i]), (handle[j], labels[j])):
                    attr = pair_reward_attribution(m, sub_c, sub_r, level=level,
                                                   batch_size=batch_size, progress=progress)
                    mean = attr.values.detach().cpu().double().mean(1)
                    order = mean.abs().argsort(descending=True)[:top_k].tolist()
                    tops += [(f"{name}:{attr.labels[o]}", float(mean[o])) for o in order]
                components[key] = tuple(tops)
    return ConflictResult(
        terms=labels, cosine=cosine.float(), disagreement=dis.float(), ci_low=lo.float(),
        ci_high=hi.float(), n_compared=n_cmp.float(), margins=margins.float(),
        lens_labels=tuple(lens_labels), lens_disagreement=lens_dis, components=components,
        confidence_level=confidence_level,
    )
