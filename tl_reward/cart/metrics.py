"""The CART metrics (Liu 2025, arXiv 2509.24713, section 3) as pure typed functions.

Every function here takes tensors (or numbers) and returns tensors (or numbers); nothing reads a
model. Shapes use the package glossary (:mod:`tl_reward._types`): ``batch`` inputs, ``unit``
circuit units, ``circuit`` circuits, ``d_circuit`` a circuit's raw activation width.

Equations, as implemented:

- (1) ``R(x) = sum_i w_i a_i(x) + eps(x)``: :func:`reward_decomposition` (least squares).
- (2) ``p = alpha p_head + (1 - alpha) p_tail``: the head and tail samples every function takes.
- (3) tau-specialisation ``E_tail|a| - E_head|a| > tau``: :func:`tau_specialization`.
- Discovery: ``Delta_j = E_tail[a_j] - E_head[a_j]`` (:func:`differential_activation`);
  ``Coh(N_i, N_j) = I(N_i; N_j | tail) - I(N_i; N_j | head)`` (:func:`coherence`, with
  :func:`gaussian_mutual_information`, :func:`binned_mutual_information`,
  :func:`ksg_mutual_information`).
- (4)-(5) the tail generalisation bound and ``Div(C_tail, C_head)``:
  :func:`tail_generalization_bound`, :func:`circuit_divergence` (the paper's conjecture; it
  defines neither ``Div`` nor the constants).
- (6) :func:`consistency`, (7) :func:`sensitivity_first_order` and :func:`sensitivity_pgd`,
  (8) :func:`coverage`, (9) :func:`vulnerability`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Float, Int, jaxtyped
from torch import Tensor

from .._readout import choose
from ..errors import InvalidInputError

Number = int | float

AGGREGATES = ("mean", "sum", "norm")
ESTIMATORS = ("gaussian", "binned", "ksg")
NORMS = ("l2", "linf")
DIVERGENCES = ("wasserstein", "jeffreys")


def _check_nonempty(name: str, x: Tensor) -> None:
    if x.shape[0] == 0:
        raise InvalidInputError(
            f"{name} holds no inputs (shape {tuple(x.shape)}); pass at least one")


def _check_finite(name: str, value: Number) -> None:
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be finite, got {value}")


# ------------------------------------------------------------------------- circuit activation
@jaxtyped(typechecker=beartype)
def circuit_activation(
    unit_activations: Float[Tensor, "batch unit"], aggregate: str = "mean"
) -> Float[Tensor, "batch"]:
    """``a_c(x)``: the circuit's activation from its units' activations.

    ``mean`` or ``sum`` of the unit activations, or their Euclidean ``norm``. The choice is part
    of a :class:`~tl_reward.cart.Circuit` and recorded in every table.
    """
    choose("aggregate", aggregate, AGGREGATES)
    if unit_activations.shape[1] == 0:
        raise InvalidInputError("a circuit needs at least one unit; got an empty unit axis")
    if aggregate == "mean":
        return unit_activations.mean(-1)
    if aggregate == "sum":
        return unit_activations.sum(-1)
    return unit_activations.norm(dim=-1)


# ------------------------------------------------------------------------- discovery
@jaxtyped(typechecker=beartype)
def differential_activation(
    a_tail: Float[Tensor, "batch *unit"], a_head: Float[Tensor, "_batch *unit"]
) -> Float[Tensor, "*unit"]:
    """``Delta_j = E_tail[a_j] - E_head[a_j]`` for every unit (section 3.3).

    For data sets that do not fit in memory, :class:`~tl_reward.cart.RunningMoments` computes
    the same means in one streamed pass (:func:`tl_reward.cart.activation_statistics`).
    """
    _check_nonempty("a_tail", a_tail)
    _check_nonempty("a_head", a_head)
    return a_tail.mean(0) - a_head.mean(0)


@jaxtyped(typechecker=beartype)
def tau_specialization(
    a_tail: Float[Tensor, "batch *unit"], a_head: Float[Tensor, "_batch *unit"]
) -> Float[Tensor, "*unit"]:
    """Left side of eq. (3): ``E_tail[|a|] - E_head[|a|]``.

    A unit (or circuit) is *tau-specialised for the tail* when this exceeds ``tau``.
    """
    _check_nonempty("a_tail", a_tail)
    _check_nonempty("a_head", a_head)
    return a_tail.abs().mean(0) - a_head.abs().mean(0)


# ------------------------------------------------------------------------- mutual information
def _finish_mi(mi: Tensor) -> Tensor:
    """Symmetrise and mark the diagonal (a unit with itself) as undefined."""
    mi = 0.5 * (mi + mi.T)
    mi.fill_diagonal_(float("nan"))
    return mi


@jaxtyped(typechecker=beartype)
def correlation_matrix(
    covariance: Float[Tensor, "unit unit"],
) -> Float[Tensor, "unit unit"]:
    """Pearson correlations from a covariance matrix.

    A unit with zero variance is constant, hence independent of every other unit: its
    correlations are 0 (not NaN), and its mutual information with any unit is exactly 0.
    """
    std = covariance.diagonal().clamp(min=0).sqrt()
    outer = std[:, None] * std[None, :]
    corr = torch.where(outer > 0, covariance / torch.where(outer > 0, outer, 1.0), 0.0)
    return corr.clamp(-1.0, 1.0)


@jaxtyped(typechecker=beartype)
def gaussian_mi_from_covariance(
    covariance: Float[Tensor, "unit unit"],
) -> Float[Tensor, "unit unit"]:
    """Pairwise Gaussian mutual information ``I = -1/2 log(1 - rho^2)`` (nats) from a covariance.

    Exact for jointly Gaussian units; for others it is the information carried by their linear
    correlation. The diagonal (a unit with itself) is NaN: it is not defined.
    """
    rho2 = correlation_matrix(covariance.double()).pow(2)
    mi = -0.5 * torch.log1p(-rho2.clamp(max=1.0 - 1e-15))
    return _finish_mi(mi).to(covariance.dtype)


@jaxtyped(typechecker=beartype)
def gaussian_mutual_information(
    a: Float[Tensor, "batch unit"],
) -> Float[Tensor, "unit unit"]:
    """Pairwise Gaussian mutual information of every pair of units, from samples (nats)."""
    if a.shape[0] < 2:
        raise InvalidInputError(f"mutual information needs at least 2 samples, got {a.shape[0]}")
    x = a.double() - a.double().mean(0)
    cov = x.T @ x / (a.shape[0] - 1)
    return gaussian_mi_from_covariance(cov).to(a.dtype)


@jaxtyped(typechecker=beartype)
def binned_mutual_information(
    a: Float[Tensor, "batch unit"],
    n_bins: int = 8,
    strategy: str = "quantile",
    bias_correction: bool = True,
) -> Float[Tensor, "unit unit"]:
    """Plug-in mutual information of every pair of units after binning each unit (nats).

    Each unit is cut into ``n_bins`` bins (``quantile``: equal counts, so ties put a constant
    unit in one bin; ``uniform``: equal widths over its range); the joint histograms of all
    pairs come from one ``einsum`` over one-hot codes. ``bias_correction`` subtracts the
    Miller-Madow term ``(K_ij - K_i - K_j + 1) / (2 n)`` (``K``: occupied cells), which removes
    most of the plug-in estimator's positive bias, so estimates near 0 may be slightly negative
    and tail/head samples of different sizes compare fairly.
    """
    if n_bins < 2:
        raise InvalidInputError(f"n_bins must be >= 2, got {n_bins}")
    choose("strategy", strategy, ("quantile", "uniform"))
    n, _ = a.shape
    if n < 2:
        raise InvalidInputError(f"mutual information needs at least 2 samples, got {n}")
    x = a.double()
    if strategy == "quantile":
        qs = torch.linspace(0, 1, n_bins + 1, dtype=x.dtype)[1:-1]
        edges = torch.quantile(x, qs, dim=0).T.contiguous()  # [unit, n_bins - 1]
    else:
        lo, hi = x.min(0).values, x.max(0).values
        frac = torch.linspace(0, 1, n_bins + 1, dtype=x.dtype)[1:-1]
        edges = (lo[:, None] + (hi - lo)[:, None] * frac[None]).contiguous()
    codes = torch.searchsorted(edges, x.T.contiguous(), right=True).T  # [batch, unit]
    onehot = torch.nn.functional.one_hot(codes, n_bins).double()  # [batch, unit, bin]
    joint = torch.einsum("nia,njb->ijab", onehot, onehot) / n
    marg = onehot.mean(0)  # [unit, bin]
    indep = marg[:, None, :, None] * marg[None, :, None, :]
    ratio = torch.where(joint > 0, joint / torch.where(indep > 0, indep, 1.0), 1.0)
    mi = (joint * ratio.log()).sum((-1, -2))
    if bias_correction:
        k_joint = (joint > 0).sum((-1, -2)).double()
        k_marg = (marg > 0).sum(-1).double()
        mi = mi - (k_joint - k_marg[:, None] - k_marg[None, :] + 1) / (2 * n)
    return _finish_mi(mi).to(a.dtype)


@jaxtyped(typechecker=beartype)
def ksg_mutual_information(
    a: Float[Tensor, "batch unit"], n_neighbors: int = 3, random_state: int = 0
) -> Float[Tensor, "unit unit"]:
    """Kraskov-Stoegbauer-Grassberger (KSG) mutual information of every pair of units (nats).

    scikit-learn's ``mutual_info_regression`` (KSG estimator, scaled inputs, a 1e-10 jitter
    seeded by ``random_state``): one call per unit gives its row against every unit. The
    estimator is not exactly symmetric, so the matrix is symmetrised; it is clipped at 0 by
    scikit-learn.
    """
    from sklearn.feature_selection import mutual_info_regression

    n, units = a.shape
    if n <= n_neighbors:
        raise InvalidInputError(
            f"KSG needs more samples than n_neighbors={n_neighbors}, got {n}; pass more inputs"
        )
    if n_neighbors < 1:
        raise InvalidInputError(f"n_neighbors must be >= 1, got {n_neighbors}")
    x = a.detach().double().cpu().numpy()
    rows = [
        mutual_info_regression(x, x[:, j], discrete_features=False, n_neighbors=n_neighbors,
                               random_state=random_state)
        for j in range(units)
    ]
    mi = torch.as_tensor(np.stack(rows), dtype=torch.float64)
    return _finish_mi(mi).to(dtype=a.dtype, device=a.device)


@jaxtyped(typechecker=beartype)
def mutual_information(
    a: Float[Tensor, "batch unit"],
    estimator: str = "gaussian",
    *,
    n_bins: int = 8,
    n_neighbors: int = 3,
    random_state: int = 0,
) -> Float[Tensor, "unit unit"]:
    """Pairwise mutual information by ``estimator``: ``gaussian``, ``binned`` or ``ksg``."""
    choose("estimator", estimator, ESTIMATORS)
    if estimator == "gaussian":
        return gaussian_mutual_information(a)
    if estimator == "binned":
        return binned_mutual_information(a, n_bins=n_bins)
    return ksg_mutual_information(a, n_neighbors=n_neighbors, random_state=random_state)


@jaxtyped(typechecker=beartype)
def coherence(
    a_tail: Float[Tensor, "batch unit"],
    a_head: Float[Tensor, "_batch unit"],
    estimator: str = "gaussian",
    *,
    n_bins: int = 8,
    n_neighbors: int = 3,
    random_state: int = 0,
) -> Float[Tensor, "unit unit"]:
    """``Coh(N_i, N_j) = I(N_i; N_j | tail) - I(N_i; N_j | head)`` for every pair (section 3.3).

    Symmetric, in nats; the diagonal is NaN (a unit with itself is not a pair). Positive values
    mark units that share more information on tail inputs than on head inputs.
    """
    kw = dict(n_bins=n_bins, n_neighbors=n_neighbors, random_state=random_state)
    return mutual_information(a_tail, estimator, **kw) - mutual_information(a_head, estimator, **kw)


@jaxtyped(typechecker=beartype)
def coherence_from_covariance(
    cov_tail: Float[Tensor, "unit unit"], cov_head: Float[Tensor, "unit unit"]
) -> Float[Tensor, "unit unit"]:
    """Gaussian :func:`coherence` from streamed covariances (no samples kept)."""
    return gaussian_mi_from_covariance(cov_tail) - gaussian_mi_from_covariance(cov_head)


# ------------------------------------------------------------------------- vulnerability
@jaxtyped(typechecker=beartype)
def consistency(a: Float[Tensor, "batch *circuit"]) -> Float[Tensor, "*circuit"]:
    """Eq. (6): ``Consist(c) = 1 - mean_i |a_c(x_i) - mean(a_c)| / max_j |a_c(x_j)|``.

    ``a`` holds the circuit's activations on one group of semantically similar tail inputs
    (several circuits at once along the trailing axes). The mean absolute deviation of values in
    ``[-M, M]`` is at most ``M``, so the score lies in ``[0, 1]``; it is 1 for identical
    activations (all-zero activations included: no deviation). The paper says after eq. (6)
    that *high* consistency indicates exploitable uncertainty, which contradicts eq. (9);
    :func:`vulnerability` follows eq. (9) (low consistency is the vulnerability).
    """
    _check_nonempty("a", a)
    deviation = (a - a.mean(0)).abs().mean(0)
    constant = a.max(0).values == a.min(0).values  # exactly 0, not a rounding residue of the mean
    deviation = torch.where(constant, torch.zeros_like(deviation), deviation)
    scale = a.abs().max(0).values
    ratio = torch.where(scale > 0, deviation / torch.where(scale > 0, scale, 1.0), 0.0)
    return (1.0 - ratio).clamp(0.0, 1.0)


@jaxtyped(typechecker=beartype)
def grouped_consistency(
    a: Float[Tensor, "batch"], groups: Int[Tensor, "batch"]
) -> Float[Tensor, ""]:
    """Eq. (6) per group of similar inputs, averaged with the group sizes as weights."""
    _check_nonempty("a", a)
    values, sizes = [], []
    for g in torch.unique(groups):
        sel = a[groups == g]
        values.append(consistency(sel))
        sizes.append(sel.shape[0])
    w = torch.tensor(sizes, dtype=a.dtype, device=a.device)
    return (torch.stack(values) * w).sum() / w.sum()


def _dual_norm(g: Tensor, norm: str) -> Tensor:
    return g.norm(dim=-1) if norm == "l2" else g.abs().sum(-1)


@jaxtyped(typechecker=beartype)
def sensitivity_first_order(
    grad: Float[Tensor, "batch d_circuit"], eps: Number, norm: str = "l2"
) -> Float[Tensor, ""]:
    """Eq. (7) to first order: ``E_tail[eps * ||dR/da_c||_*]``.

    ``grad`` is the reward's gradient with respect to the circuit's raw activations for each
    tail input. To first order ``R(a_c + delta) - R(a_c) = grad . delta``, whose largest absolute
    value over ``||delta|| <= eps`` is ``eps`` times the dual norm of ``grad`` (``l2`` for an l2
    ball, ``l1`` for an ``linf`` box). Exact when the reward is linear in the activations.
    """
    choose("norm", norm, NORMS)
    _check_finite("eps", eps)
    if eps < 0:
        raise InvalidInputError(f"eps must be >= 0, got {eps}")
    _check_nonempty("grad", grad)
    return (eps * _dual_norm(grad, norm)).mean()


def _project(delta: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = delta.norm(dim=-1, keepdim=True)
    return delta * torch.where(n > eps, eps / n.clamp(min=1e-30), 1.0)


def _steepest(g: Tensor, norm: str) -> Tensor:
    if norm == "linf":
        return g.sign()
    return g / g.norm(dim=-1, keepdim=True).clamp(min=1e-30)


@jaxtyped(typechecker=beartype)
def max_perturbation_effect(
    reward_fn: Callable[[Tensor], Tensor],
    batch: int,
    d_circuit: int,
    eps: Number,
    *,
    norm: str = "l2",
    steps: int = 20,
    step_size: Number | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Float[Tensor, "batch"]:
    """Eq. (7)'s inner maximum ``max_{||delta|| <= eps} |R(a_c + delta) - R(a_c)|``, per input.

    ``reward_fn(delta)`` returns the rewards ``[batch]`` with the circuit's activations shifted by
    ``delta`` ``[batch, d_circuit]`` (rows independent). Projected gradient ascent on
    ``|R(delta) - R(0)|``: it starts from the better of the two first-order optima
    ``+-eps * steepest(grad R(0))``, takes ``steps`` normalised-gradient steps of ``step_size``
    (default ``2.5 eps / steps``) projected on the ball, and keeps the best value seen per input,
    so the result is never below the exact change at the first-order optimum. Where the gradient
    at 0 vanishes (a stationary point), the start is a random direction (seeded by ``seed``). It
    is a lower bound on the true maximum (a local search).
    """
    choose("norm", norm, NORMS)
    _check_finite("eps", eps)
    if eps < 0:
        raise InvalidInputError(f"eps must be >= 0, got {eps}")
    if steps < 0:
        raise InvalidInputError(f"steps must be >= 0, got {steps}")
    eps = float(eps)
    step = 2.5 * eps / max(steps, 1) if step_size is None else float(step_size)
    zero = torch.zeros(batch, d_circuit, dtype=dtype, device=device, requires_grad=True)
    base = reward_fn(zero)
    (g,) = torch.autograd.grad(base.sum(), zero)
    base = base.detach()
    if eps == 0:
        return torch.zeros_like(base)
    flat = (g == 0).all(-1)
    if bool(flat.any()):
        gen = torch.Generator().manual_seed(seed)
        rand = torch.randn(batch, d_circuit, generator=gen, dtype=dtype).to(device)
        g = torch.where(flat[:, None], rand, g)
    best = torch.zeros_like(base)
    start = torch.zeros(batch, d_circuit, dtype=dtype, device=device)
    with torch.no_grad():
        for sign in (1.0, -1.0):
            cand = _project(sign * eps * _steepest(g, norm), eps, norm)
            val = (reward_fn(cand) - base).abs()
            better = val > best
            best = torch.where(better, val, best)
            start = torch.where(better[:, None], cand, start)
    delta = start
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        change = reward_fn(delta) - base
        (gd,) = torch.autograd.grad(change.abs().sum(), delta)
        with torch.no_grad():
            best = torch.maximum(best, change.detach().abs())
            delta = _project(delta + step * _steepest(gd, norm), eps, norm)
    with torch.no_grad():
        best = torch.maximum(best, (reward_fn(delta) - base).abs())
    return best


@jaxtyped(typechecker=beartype)
def sensitivity_pgd(
    reward_fn: Callable[[Tensor], Tensor],
    batch: int,
    d_circuit: int,
    eps: Number,
    *,
    norm: str = "l2",
    steps: int = 20,
    step_size: Number | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Float[Tensor, ""]:
    """Eq. (7) by projected gradient ascent: the mean of :func:`max_perturbation_effect`."""
    return max_perturbation_effect(
        reward_fn, batch, d_circuit, eps, norm=norm, steps=steps, step_size=step_size,
        dtype=dtype, device=device, seed=seed,
    ).mean()


@jaxtyped(typechecker=beartype)
def coverage(
    a: Float[Tensor, "batch *circuit"], tau_act: Number | Float[Tensor, "*circuit"]
) -> Float[Tensor, "*circuit"]:
    """Eq. (8): ``Cov(c) = P_tail(|a_c(x)| > tau_act)``, the share of tail inputs activating c."""
    _check_nonempty("a", a)
    tau = torch.as_tensor(tau_act, dtype=a.dtype, device=a.device)
    if bool((tau < 0).any()) or not bool(torch.isfinite(tau).all()):
        raise InvalidInputError(f"tau_act must be finite and >= 0, got {tau.tolist()}")
    return (a.abs() > tau).to(a.dtype).mean(0)


@jaxtyped(typechecker=beartype)
def vulnerability(
    consist: Float[Tensor, "*circuit"],
    sens: Float[Tensor, "*circuit"],
    cov: Float[Tensor, "*circuit"],
    alpha: Number = 1.0,
    beta: Number = 1.0,
    gamma: Number = 1.0,
) -> Float[Tensor, "*circuit"]:
    """Eq. (9): ``Vuln(c) = alpha (1 - Consist(c)) + beta Sens(c) + gamma (1 - Cov(c))``.

    Low consistency, high sensitivity and low coverage all raise the score. The paper's
    sentence after eq. (6) ("high consistency indicates exploitable uncertainty") contradicts
    this equation; the equation is what is implemented. ``Sens`` is in reward units while the
    other two terms lie in ``[0, 1]``: the weights set the exchange rate.

    Blind spots. A circuit that no tail input activates (``Cov = 0``) has no inputs for eq. (6)
    (``X_tail^(c)`` is empty), so its consistency is undefined (NaN). Eq. (9) makes such a
    circuit the most exposed (``1 - Cov = 1``: "circuits with low coverage create blind spots
    exploitable by policies"), so its consistency term takes its largest value,
    ``1 - Consist = 1``: nothing on the tail shows the circuit to be consistent. A NaN
    consistency with ``Cov > 0`` is an error (it cannot come from eq. (6)).
    """
    for name, w in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        _check_finite(name, w)
        if w < 0:
            raise InvalidInputError(f"{name} must be >= 0 (a weight), got {w}")
    undefined = torch.isnan(consist)
    if bool((undefined & (cov > 0)).any()):
        raise InvalidInputError(
            "consistency is NaN for a circuit with coverage > 0: eq. (6) is defined whenever "
            "some tail input activates the circuit; compute it on those inputs"
        )
    inconsistency = torch.where(undefined, torch.ones_like(consist), 1.0 - consist)
    return alpha * inconsistency + beta * sens + gamma * (1.0 - cov)


# ------------------------------------------------------------------------- eq. (1), (4)-(5)
@jaxtyped(typechecker=beartype)
def reward_decomposition(
    a: Float[Tensor, "batch circuit"], reward: Float[Tensor, "batch"]
) -> tuple[Float[Tensor, "circuit"], Float[Tensor, "batch"]]:
    """Eq. (1): least-squares weights ``w`` and residual computation ``eps(x)``.

    ``reward = a @ w + eps``; ``eps`` includes the constant part (the fit has an intercept,
    folded back into ``eps``), so ``a @ w + eps`` equals ``reward`` exactly.
    """
    if a.shape[0] <= a.shape[1]:
        raise InvalidInputError(
            f"eq. (1) needs more inputs than circuits to fit the weights: {a.shape[0]} inputs, "
            f"{a.shape[1]} circuits"
        )
    x = torch.cat([a.double(), torch.ones(a.shape[0], 1, dtype=torch.float64, device=a.device)], 1)
    sol = torch.linalg.lstsq(x, reward.double()[:, None]).solution[:, 0]
    w = sol[:-1].to(a.dtype)
    return w, reward - a @ w


@jaxtyped(typechecker=beartype)
def circuit_divergence(
    a_tail: Float[Tensor, "batch circuit"],
    a_head: Float[Tensor, "_batch circuit"],
    kind: str = "wasserstein",
    ridge: Number = 1e-6,
) -> float:
    """``Div(C_tail, C_head)`` of eq. (5): how differently the circuits behave on tail and head.

    The paper does not define ``Div``; two choices, both zero when tail and head activations
    have the same distribution:

    - ``wasserstein``: the sum over circuits of the 1-D Wasserstein-1 distance between the tail
      and head distributions of ``a_c`` (``scipy.stats.wasserstein_distance``), in activation
      units; robust to constant circuits.
    - ``jeffreys``: the symmetric Kullback-Leibler divergence between Gaussians fitted to the
      tail and head circuit-activation vectors, with ``ridge`` (relative to the mean variance)
      added to both covariances so constant circuits stay finite.
    """
    choose("kind", kind, DIVERGENCES)
    _check_nonempty("a_tail", a_tail)
    _check_nonempty("a_head", a_head)
    if kind == "wasserstein":
        from scipy.stats import wasserstein_distance

        t = a_tail.detach().double().cpu().numpy()
        h = a_head.detach().double().cpu().numpy()
        return float(sum(wasserstein_distance(t[:, c], h[:, c]) for c in range(t.shape[1])))
    if min(a_tail.shape[0], a_head.shape[0]) < 2:
        raise InvalidInputError("the jeffreys divergence needs at least 2 tail and 2 head inputs")
    t, h = a_tail.double(), a_head.double()
    k = t.shape[1]
    mt, mh = t.mean(0), h.mean(0)
    ct = torch.atleast_2d(torch.cov(t.T))
    ch = torch.atleast_2d(torch.cov(h.T))
    scale = float((ct.diagonal().mean() + ch.diagonal().mean()) / 2) or 1.0
    eye = torch.eye(k, dtype=torch.float64, device=t.device) * float(ridge) * scale
    ct, ch = ct + eye, ch + eye
    it, ih = torch.linalg.inv(ct), torch.linalg.inv(ch)
    d = mt - mh
    j = 0.5 * (torch.trace(ih @ ct) + torch.trace(it @ ch) - 2 * k + d @ (it + ih) @ d)
    return float(j)


@dataclass(frozen=True)
class TailBound:
    """The right side of eqs. (4)-(5), term by term (the paper's conjecture, not a theorem)."""

    head_loss: float
    complexity: float  # C sqrt(|C_tail| log(1/delta) / N_tail)
    divergence: float  # beta Div(C_tail, C_head)

    @property
    def value(self) -> float:
        return self.head_loss + self.complexity + self.divergence


@jaxtyped(typechecker=beartype)
def tail_generalization_bound(
    head_loss: Number,
    n_tail_circuits: int,
    n_tail: int,
    divergence: Number,
    *,
    constant: Number = 1.0,
    beta: Number = 1.0,
    delta: Number = 0.05,
) -> TailBound:
    """Eqs. (4)-(5): ``L_tail <= L_head + C sqrt(|C_tail| log(1/delta) / N_tail) + beta Div``.

    This is the paper's *conjecture*: it gives no proof and no value for ``C`` or ``beta``, so
    the result is a formula to compare settings with, not a certified bound. ``n_tail_circuits``
    is ``|C_tail|``, ``n_tail`` the number of tail training examples, ``divergence`` a value of
    :func:`circuit_divergence`; the bound holds with probability ``1 - delta``. (The square root
    is read from the standard form of such bounds: the extracted paper text lost it.)
    """
    if n_tail < 1:
        raise InvalidInputError(f"n_tail (tail training examples) must be >= 1, got {n_tail}")
    if n_tail_circuits < 0:
        raise InvalidInputError(f"n_tail_circuits must be >= 0, got {n_tail_circuits}")
    if not 0 < delta < 1:
        raise InvalidInputError(f"delta (the failure probability) must be in (0, 1), got {delta}")
    for name, v in (("head_loss", head_loss), ("divergence", divergence), ("constant", constant),
                    ("beta", beta)):
        _check_finite(name, v)
        if v < 0:
            raise InvalidInputError(f"{name} must be >= 0, got {v}")
    complexity = constant * math.sqrt(n_tail_circuits * math.log(1 / delta) / n_tail)
    return TailBound(float(head_loss), float(complexity), float(beta * divergence))
