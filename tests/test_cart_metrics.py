"""CART metrics (eqs. 1-9): hand-computed values, closed forms, properties (hypothesis)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

FAST = settings(max_examples=40, deadline=None)


def floats(lo=-100.0, hi=100.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


def matrix(rows=(2, 12), cols=(1, 5), lo=-100.0, hi=100.0):
    return st.integers(*rows).flatmap(
        lambda n: st.integers(*cols).flatmap(
            lambda k: arrays(np.float64, (n, k), elements=floats(lo, hi))
        )
    )


@pytest.fixture(scope="module")
def cart():
    from tl_reward import cart

    return cart


# --------------------------------------------------------------------------- hand-computed values
def test_circuit_activation_hand_values(cart):
    a = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    assert cart.circuit_activation(a, "mean").tolist() == [1.5, -0.5]
    assert cart.circuit_activation(a, "sum").tolist() == [3.0, -1.0]
    torch.testing.assert_close(cart.circuit_activation(a, "norm"), torch.tensor([math.sqrt(5), 5.0]))


def test_delta_and_tau_hand_values(cart):
    tail = torch.tensor([[1.0, -2.0], [3.0, -4.0]])
    head = torch.tensor([[0.0, 1.0], [2.0, 1.0], [1.0, 1.0]])
    assert cart.differential_activation(tail, head).tolist() == [1.0, -4.0]  # [2 - 1, -3 - 1]
    assert cart.tau_specialization(tail, head).tolist() == [1.0, 2.0]  # [2 - 1, 3 - 1]


def test_consistency_hand_value(cart):
    # mean 2, mean |a - 2| = 2/3, max |a| = 3: 1 - (2/3)/3 = 7/9
    torch.testing.assert_close(cart.consistency(torch.tensor([1.0, 2.0, 3.0])), torch.tensor(7 / 9))
    # two circuits at once along a trailing axis; [1, -1]: deviation 1, max 1 -> 0
    both = cart.consistency(torch.tensor([[1.0, 1.0], [2.0, -1.0], [3.0, 1.0], [2.0, -1.0]]))
    torch.testing.assert_close(both, torch.tensor([1 - 0.5 / 3, 0.0]))


def test_grouped_consistency_weights_groups_by_size(cart):
    a = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    expected = (3 * (7 / 9) + 2 * 1.0) / 5
    torch.testing.assert_close(cart.grouped_consistency(a, groups), torch.tensor(expected))


def test_coverage_hand_value(cart):
    a = torch.tensor([-2.0, 0.5, 1.0, 3.0])
    assert float(cart.coverage(a, 1.0)) == 0.5  # |-2| and |3| exceed 1; 1 does not
    per_circuit = cart.coverage(torch.tensor([[1.0, 0.0], [3.0, 2.0]]), torch.tensor([2.0, 1.0]))
    assert per_circuit.tolist() == [0.5, 0.5]


def test_sensitivity_first_order_hand_values(cart):
    g = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert float(cart.sensitivity_first_order(g, 2.0, "l2")) == pytest.approx(2 * (5 + 1) / 2)
    assert float(cart.sensitivity_first_order(g, 2.0, "linf")) == pytest.approx(2 * (7 + 1) / 2)


def test_vulnerability_hand_value(cart):
    v = cart.vulnerability(torch.tensor(0.8), torch.tensor(0.5), torch.tensor(0.25), 1.0, 2.0, 3.0)
    assert float(v) == pytest.approx(0.2 + 1.0 + 2.25)


def test_vulnerability_follows_eq_9_not_the_sentence_after_eq_6(cart):
    """Lower consistency must raise Vuln (eq. 9), whatever the prose after eq. (6) says."""
    low = cart.vulnerability(torch.tensor(0.2), torch.tensor(0.0), torch.tensor(1.0))
    high = cart.vulnerability(torch.tensor(0.9), torch.tensor(0.0), torch.tensor(1.0))
    assert float(low) > float(high)


def test_a_circuit_that_never_fires_on_the_tail_is_the_most_vulnerable(cart):
    """Eq. (9): Cov = 0 (no activating tail input, so eq. (6) has no inputs) gives
    1 - Cov = 1 and the largest consistency term, not a NaN that sorts last."""
    consist = torch.tensor([1.0, 0.5, float("nan")])
    v = cart.vulnerability(consist, torch.tensor([0.1, 0.1, 0.1]), torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(v, torch.tensor([0.1, 1.1, 2.1]))
    assert int(v.argmax()) == 2
    from tl_reward.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="coverage > 0"):
        cart.vulnerability(torch.tensor([float("nan")]), torch.tensor([0.0]), torch.tensor([0.5]))


def test_tail_bound_hand_value(cart):
    b = cart.tail_generalization_bound(0.1, 4, 100, 0.4, constant=2.0, beta=0.5, delta=math.exp(-1))
    assert b.complexity == pytest.approx(2 * math.sqrt(4 * 1 / 100))
    assert b.divergence == pytest.approx(0.2)
    assert b.value == pytest.approx(0.1 + 0.4 + 0.2)
    # more tail data tightens it; more tail circuits loosens it
    assert cart.tail_generalization_bound(0.1, 4, 400, 0.4).value < cart.tail_generalization_bound(0.1, 4, 100, 0.4).value
    assert cart.tail_generalization_bound(0.1, 8, 100, 0.4).value > cart.tail_generalization_bound(0.1, 4, 100, 0.4).value


def test_divergence_hand_values(cart):
    t = torch.tensor([[0.0], [2.0]])
    h = torch.tensor([[1.0], [3.0]])
    # 1-D W1 between {0, 2} and {1, 3}: 1
    assert cart.circuit_divergence(t, h, "wasserstein") == pytest.approx(1.0)
    # Gaussians N(1, 2) and N(2, 2): Jeffreys = 1/2 [1 + 1 - 2 + 1 * (1/2 + 1/2) * 1] = 1/2
    assert cart.circuit_divergence(t, h, "jeffreys", ridge=0.0) == pytest.approx(0.5)
    same = torch.randn(50, 3)
    assert cart.circuit_divergence(same, same, "wasserstein") == 0.0
    assert cart.circuit_divergence(same, same, "jeffreys") == pytest.approx(0.0, abs=1e-9)


def test_reward_decomposition_recovers_weights(cart):
    a = torch.randn(40, 3, dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    reward = a @ w + 3.0
    w_hat, eps = cart.reward_decomposition(a, reward)
    torch.testing.assert_close(w_hat, w)
    torch.testing.assert_close(eps, torch.full((40,), 3.0, dtype=torch.float64))
    torch.testing.assert_close(a @ w_hat + eps, reward)


def test_adjust_p_values(cart):
    from scipy.stats import false_discovery_control

    p = np.array([0.01, 0.04, 0.03])
    np.testing.assert_allclose(cart.adjust_p_values(p, "holm"), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(cart.adjust_p_values(p, "bonferroni"), [0.03, 0.12, 0.09])
    np.testing.assert_allclose(cart.adjust_p_values(p, "bh"), false_discovery_control(p))
    np.testing.assert_allclose(cart.adjust_p_values(p, "bh"), [0.03, 0.04, 0.04])
    # one function for the package: the probes' NaN-aware family (refused tests stay NaN) and BY
    from tl_reward import _stats

    assert cart.adjust_p_values is _stats.adjust_p_values
    gaps = np.array([0.01, np.nan, 0.04, 0.03])
    np.testing.assert_allclose(cart.adjust_p_values(gaps, "holm"), [0.03, np.nan, 0.06, 0.06])
    np.testing.assert_allclose(cart.adjust_p_values(p, "by"), false_discovery_control(p, method="by"))
    with pytest.raises(ValueError, match="lie in"):
        cart.adjust_p_values([0.5, 1.5])


# --------------------------------------------------------------------------- mutual information
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.8, -0.9])
def test_gaussian_mi_matches_closed_form_on_correlated_gaussians(cart, rho):
    gen = torch.Generator().manual_seed(1)
    n = 20000
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=gen, dtype=torch.float64)
    mi = cart.gaussian_mutual_information(torch.stack([x, y], 1))
    exact = -0.5 * math.log(1 - rho**2)
    assert float(mi[0, 1]) == pytest.approx(exact, abs=0.01)
    assert bool(mi.diagonal().isnan().all())


def test_gaussian_mi_from_exact_covariance_is_exact(cart):
    cov = torch.tensor([[2.0, 1.2, 0.0], [1.2, 1.0, -0.3], [0.0, -0.3, 4.0]], dtype=torch.float64)
    mi = cart.gaussian_mi_from_covariance(cov)
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        rho = cov[i, j] / (cov[i, i] * cov[j, j]).sqrt()
        assert float(mi[i, j]) == pytest.approx(float(-0.5 * torch.log(1 - rho**2)), rel=1e-12)
    assert float(mi[0, 2]) == 0.0


@pytest.mark.parametrize("estimator,n_bins,tol", [("binned", 8, 0.10), ("binned", 12, 0.08),
                                                   ("ksg", 8, 0.06)])
def test_other_estimators_approach_the_closed_form(cart, estimator, n_bins, tol):
    """Of the 0.51 nats of rho = 0.8 on 3,000 samples: binned within 0.10 at the default 8
    bins (0.08 at 12; it underestimates), KSG within 0.06 (README's figures)."""
    gen = torch.Generator().manual_seed(2)
    n, rho = 3000, 0.8
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=gen, dtype=torch.float64)
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    mi = cart.mutual_information(torch.stack([x, y, z], 1), estimator, n_bins=n_bins)
    assert float(mi[0, 1]) == pytest.approx(-0.5 * math.log(1 - rho**2), abs=tol)
    assert abs(float(mi[0, 2])) < 0.02
    assert abs(float(mi[1, 2])) < 0.02


def test_binned_mi_hand_value(cart):
    x = torch.tensor([0.0, 0.0, 1.0, 1.0])
    same = torch.stack([x, x], 1)
    mi = cart.binned_mutual_information(same, n_bins=2, bias_correction=False)
    assert float(mi[0, 1]) == pytest.approx(math.log(2))
    indep = torch.stack([x, torch.tensor([0.0, 1.0, 0.0, 1.0])], 1)
    assert float(cart.binned_mutual_information(indep, n_bins=2, bias_correction=False)[0, 1]) == pytest.approx(0.0)
    # Miller-Madow: (K_xy - K_x - K_y + 1) / (2n) = (2 - 2 - 2 + 1) / 8 is subtracted
    mm = cart.binned_mutual_information(same, n_bins=2, bias_correction=True)
    assert float(mm[0, 1]) == pytest.approx(math.log(2) + 1 / 8)


def test_constant_unit_has_zero_mutual_information(cart):
    a = torch.stack([torch.randn(100), torch.full((100,), 3.0)], 1)
    for est in ("gaussian", "binned"):
        assert float(cart.mutual_information(a, est)[0, 1]) == pytest.approx(0.0, abs=1e-12)


@FAST
@given(matrix(rows=(5, 30), cols=(2, 5)), matrix(rows=(5, 30), cols=(2, 5)),
       st.sampled_from(["gaussian", "binned"]))
def test_coherence_is_symmetric(cart, tail, head, estimator):
    k = min(tail.shape[1], head.shape[1])
    coh = cart.coherence(torch.tensor(tail[:, :k]), torch.tensor(head[:, :k]), estimator)
    torch.testing.assert_close(coh, coh.T, equal_nan=True)
    assert bool(coh.diagonal().isnan().all())
    off = ~torch.eye(k, dtype=torch.bool)
    assert bool(torch.isfinite(coh[off]).all())


def test_coherence_is_tail_minus_head_and_zero_for_equal_samples(cart):
    gen = torch.Generator().manual_seed(3)
    tail = torch.randn(500, 3, generator=gen, dtype=torch.float64)
    tail[:, 1] += 2 * tail[:, 0]  # units 0 and 1 coupled in the tail only
    head = torch.randn(500, 3, generator=gen, dtype=torch.float64)
    coh = cart.coherence(tail, head)
    torch.testing.assert_close(coh, cart.gaussian_mutual_information(tail) - cart.gaussian_mutual_information(head), equal_nan=True)
    assert float(coh[0, 1]) > 0.5 > abs(float(coh[0, 2]))
    assert float(cart.coherence(tail, tail)[0, 1]) == 0.0
    # streamed covariances give the same matrix
    cov_t, cov_h = torch.cov(tail.T), torch.cov(head.T)
    torch.testing.assert_close(cart.coherence_from_covariance(cov_t, cov_h), coh, equal_nan=True)


# --------------------------------------------------------------------------- properties
@FAST
@given(matrix(rows=(1, 20), cols=(1, 4)))
def test_consistency_lies_in_unit_interval(cart, a):
    c = cart.consistency(torch.tensor(a))
    assert bool(((c >= 0) & (c <= 1)).all())


@FAST
@given(floats(), st.integers(1, 20), st.integers(1, 4))
def test_consistency_is_one_for_identical_activations(cart, value, n, k):
    c = cart.consistency(torch.full((n, k), value, dtype=torch.float64))
    assert bool((c == 1).all())


@FAST
@given(matrix(rows=(2, 20), cols=(1, 3), lo=-10, hi=10), floats(0.1, 10), st.booleans())
def test_consistency_is_invariant_to_scale_and_sign(cart, a, scale, flip):
    a = torch.tensor(a)
    k = -scale if flip else scale
    torch.testing.assert_close(cart.consistency(k * a), cart.consistency(a), atol=1e-9, rtol=1e-9)


@FAST
@given(matrix(rows=(1, 20), cols=(1, 4)), floats(0, 50), floats(0, 50))
def test_coverage_lies_in_unit_interval_and_falls_with_the_threshold(cart, a, t1, t2):
    a = torch.tensor(a)
    lo, hi = min(t1, t2), max(t1, t2)
    c_lo, c_hi = cart.coverage(a, lo), cart.coverage(a, hi)
    assert bool(((c_lo >= 0) & (c_lo <= 1)).all())
    assert bool((c_hi <= c_lo).all())


@FAST
@given(arrays(np.float64, (3, 4), elements=floats(-5, 5)), floats(0.01, 5), floats(1.5, 4),
       st.sampled_from(["l2", "linf"]))
def test_sensitivity_scales_linearly_with_eps_for_a_linear_head(cart, w, eps, factor, norm):
    """R(a + delta) = R(a) + w . delta: first order and PGD both give eps ||w||_*, linear in eps."""
    w = torch.tensor(w, dtype=torch.float64)

    def reward_fn(delta):
        return 7.0 + (delta * w).sum(-1)

    dual = w.norm(dim=-1) if norm == "l2" else w.abs().sum(-1)
    for e in (eps, factor * eps):
        first = cart.sensitivity_first_order(w, e, norm)
        pgd = cart.sensitivity_pgd(reward_fn, 3, 4, e, norm=norm, steps=5, dtype=torch.float64)
        assert float(first) == pytest.approx(float(e * dual.mean()), rel=1e-9, abs=1e-12)
        assert float(pgd) == pytest.approx(float(first), rel=1e-6, abs=1e-9)
    big = cart.sensitivity_pgd(reward_fn, 3, 4, factor * eps, norm=norm, steps=5, dtype=torch.float64)
    small = cart.sensitivity_pgd(reward_fn, 3, 4, eps, norm=norm, steps=5, dtype=torch.float64)
    assert float(big) == pytest.approx(factor * float(small), rel=1e-6, abs=1e-9)


def test_pgd_beats_first_order_point_and_stays_below_the_true_max(cart):
    """A nonlinear reward in 2-D: PGD lies between the exact change at the first-order optimum
    and the brute-force maximum over the eps-ball."""
    w, u = torch.tensor([1.0, 0.3]), torch.tensor([0.2, 1.0])

    def reward_fn(delta):
        return torch.tanh(delta @ w) + 0.8 * (delta @ u) ** 2

    eps = 1.5
    pgd = cart.max_perturbation_effect(reward_fn, 1, 2, eps, steps=50)
    g = torch.tensor([[1.0, 0.3]])  # gradient at 0
    at_first_order = (reward_fn(eps * g / g.norm()) - reward_fn(torch.zeros(1, 2))).abs()
    theta = torch.linspace(0, 2 * math.pi, 20001)
    r = torch.linspace(0, eps, 301)
    grid = (r[:, None, None] * torch.stack([theta.cos(), theta.sin()], -1)[None]).reshape(-1, 2)
    true_max = (reward_fn(grid) - reward_fn(torch.zeros(1, 2))).abs().max()
    assert float(at_first_order) <= float(pgd[0]) + 1e-6
    assert float(pgd[0]) <= float(true_max) + 1e-4
    assert float(pgd[0]) > float(at_first_order) + 0.1  # the curvature term is found


def test_pgd_leaves_a_stationary_point(cart):
    """Zero gradient at 0 (R = ||delta||^2): the random start still reaches the boundary value."""
    out = cart.max_perturbation_effect(lambda d: (d**2).sum(-1), 2, 3, 0.5, steps=10)
    torch.testing.assert_close(out, torch.full((2,), 0.25))


@FAST
@given(floats(0, 1), floats(0, 10), floats(0, 1), floats(0, 3), floats(0, 3), floats(0, 3))
def test_vulnerability_is_monotone_in_each_term(cart, consist, sens, cov, a, b, g):
    base = cart.vulnerability(torch.tensor(consist), torch.tensor(sens), torch.tensor(cov), a, b, g)
    worse = cart.vulnerability(torch.tensor(consist * 0.5), torch.tensor(sens + 1), torch.tensor(cov * 0.5), a, b, g)
    assert float(worse) >= float(base) - 1e-6


# --------------------------------------------------------------------------- streaming
def test_running_moments_equal_batch_statistics(cart):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1000, 5, generator=gen, dtype=torch.float64) * torch.tensor([1, 10, 0.1, 3, 1.0]) + 5
    m = cart.RunningMoments(5, track_cov=True)
    for chunk in torch.split(x, [1, 7, 300, 2, 690]):
        m.update(chunk)
    assert m.count == 1000
    torch.testing.assert_close(m.mean, x.mean(0))
    torch.testing.assert_close(m.var, x.var(0))
    torch.testing.assert_close(m.abs_mean, x.abs().mean(0))
    torch.testing.assert_close(m.cov, torch.cov(x.T))
    assert m.minimum.tolist() == x.min(0).values.tolist()


def test_reservoir_is_a_uniform_sample(cart):
    counts = np.zeros(20)
    for seed in range(2000):
        r = cart.Reservoir(5, seed=seed)
        for chunk in (list(range(0, 7)), list(range(7, 20))):
            r.add(chunk)
        assert len(r.items) == 5 and len(set(r.items)) == 5
        counts[r.items] += 1
    # each item is kept with probability 5/20: 500 expected of 2000
    assert np.all(np.abs(counts - 500) < 5 * math.sqrt(2000 * 0.25 * 0.75))


# --------------------------------------------------------------------------- errors and typing
def test_bad_values_are_named(cart):
    from tl_reward.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="-1"):
        cart.coverage(torch.ones(3), -1.0)
    with pytest.raises(InvalidInputError, match="eps must be >= 0, got -0.5"):
        cart.sensitivity_first_order(torch.ones(2, 2), -0.5)
    with pytest.raises(InvalidInputError, match="gaussian"):
        cart.mutual_information(torch.ones(4, 2), "gausian")
    with pytest.raises(InvalidInputError, match="delta"):
        cart.tail_generalization_bound(0.1, 2, 10, 0.0, delta=1.0)
    with pytest.raises(InvalidInputError, match="beta must be >= 0"):
        cart.vulnerability(torch.ones(1), torch.ones(1), torch.ones(1), 1.0, -1.0, 1.0)
    with pytest.raises(InvalidInputError, match="no inputs"):
        cart.consistency(torch.ones(0, 2))


def test_canary_wrong_shape_raises(cart):
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError):
        cart.gaussian_mi_from_covariance(torch.ones(2, 3))
    with pytest.raises(TypeCheckError):  # tail and head must have the same units
        cart.differential_activation(torch.ones(4, 3), torch.ones(5, 2))
