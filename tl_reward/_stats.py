"""Statistics shared by the probe suite and its extensions, all from scipy.

Bootstrap confidence intervals (``scipy.stats.bootstrap``), minimum-effect paired tests
(``scipy.stats.wilcoxon`` / ``permutation_test``), multiple-comparison correction
(``scipy.stats.false_discovery_control``) and vectorised correlations for the bootstrap.
"""

from collections.abc import Callable, Sequence

import numpy as np

from ._readout import choose
from .errors import InvalidInputError

TESTS = ("wilcoxon", "permutation")
CORRECTIONS = ("bh", "by", "none")
CORRELATIONS = ("spearman", "pearson")


def bootstrap_ci(
    x: np.ndarray,
    *,
    statistic: Callable = np.mean,
    confidence_level: float = 0.95,
    n_resamples: int = 9999,
    method: str = "BCa",
    seed: int = 0,
) -> tuple[float, float]:
    """Bootstrap CI of ``statistic`` of one sample (``scipy.stats.bootstrap``, seeded); a
    sample with no spread gives the point itself (every resample is equal)."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        return float("nan"), float("nan")
    if np.ptp(x) == 0:
        value = float(statistic(x))
        return value, value
    res = stats.bootstrap((x,), statistic, n_resamples=n_resamples,
                          confidence_level=confidence_level, method=method,
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def minimum_effect_test(
    x: np.ndarray,
    delta: float = 0.0,
    *,
    test: str = "wilcoxon",
    n_resamples: int = 9999,
    seed: int = 0,
) -> tuple[float, float]:
    """``(statistic, p)`` of H0: ``|location of x| <= delta`` against ``|location| > delta``.

    ``delta = 0``: the two-sided test itself (``scipy.stats.wilcoxon(x)``, or the sign-flip
    ``scipy.stats.permutation_test`` of the mean). ``delta > 0``: the one-sided tests of
    ``x - delta > 0`` and ``x + delta < 0``; ``p = min(1, 2 * min(p_greater, p_less))`` and the
    statistic is the one of the smaller p-value.
    """
    from scipy import stats

    choose("test", test, TESTS)
    x = np.asarray(x, dtype=np.float64)
    if delta < 0:
        raise InvalidInputError(f"delta must be >= 0, got {delta}")

    def one(values: np.ndarray, alternative: str) -> tuple[float, float]:
        if not np.any(values):  # every difference is exactly 0: no evidence at all
            return 0.0, 1.0
        if test == "wilcoxon":
            r = stats.wilcoxon(values, alternative=alternative)
        else:
            r = stats.permutation_test(
                (values,), np.mean, permutation_type="samples", alternative=alternative,
                n_resamples=n_resamples, vectorized=True, axis=-1, rng=np.random.default_rng(seed),
            )
        return float(r.statistic), float(r.pvalue)

    if delta == 0:
        return one(x, "two-sided")
    s_up, p_up = one(x - delta, "greater")
    s_lo, p_lo = one(x + delta, "less")
    return (s_up, min(1.0, 2 * p_up)) if p_up <= p_lo else (s_lo, min(1.0, 2 * p_lo))


def adjust_p_values(p: Sequence[float] | np.ndarray, correction: str = "bh") -> np.ndarray:
    """Multiple-comparison adjusted p-values (``scipy.stats.false_discovery_control``); NaN
    entries (tests that were refused) are left out of the family and stay NaN."""
    from scipy import stats

    choose("correction", correction, CORRECTIONS)
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = p[ok] if correction == "none" else stats.false_discovery_control(p[ok], method=correction)
    return out


def correlation_statistic(method: str):
    """Vectorised correlation along the last axis (Spearman = Pearson of ranks), for the
    bootstrap; equal to ``scipy.stats.spearmanr`` / ``pearsonr`` on one sample."""
    from scipy import stats

    def statistic(x, y, axis=-1):
        if method == "spearman":
            x, y = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
        return stats.pearsonr(x, y, axis=axis).statistic

    return statistic
