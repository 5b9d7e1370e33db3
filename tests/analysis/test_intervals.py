"""Intervals against published values and normal theory (never against the module's own output)."""

import numpy as np
import pytest

from alibi_surgery.analysis.intervals import bootstrap_ci, clopper_pearson, paired_bootstrap_ci, verdict
from alibi_surgery.errors import UsageError


@pytest.mark.parametrize("k, n, low, high", [
    (0, 10, 0.0, 0.30850),        # the classic "rule of three"-like bound: 1 - 0.025 ** (1 / 10)
    (5, 10, 0.18709, 0.81291),    # Clopper and Pearson's symmetric case (R: binom.test(5, 10))
    (2, 33, 0.00743, 0.20226),    # the control arm: 2 of 33 (checked below by integrating the beta density)
    (10, 10, 0.69150, 1.0),
    (11, 11, 0.71508, 1.0),
])
def test_clopper_pearson_matches_published_values(k, n, low, high):
    got = clopper_pearson(k, n)
    assert got == pytest.approx((low, high), abs=2e-5)


def test_clopper_pearson_closed_forms():
    n = 37
    # k = 0: upper = 1 - (alpha/2) ** (1/n); k = n: lower = (alpha/2) ** (1/n)
    assert clopper_pearson(0, n)[1] == pytest.approx(1 - 0.025 ** (1 / n), rel=1e-9)
    assert clopper_pearson(n, n)[0] == pytest.approx(0.025 ** (1 / n), rel=1e-9)


def _beta_cdf(x, a, b, steps=200_000):
    """Beta(a, b) CDF by the midpoint rule on its density: independent of the binomial sums under test."""
    from math import lgamma
    t = (np.arange(steps) + 0.5) / steps * x
    log_pdf = (a - 1) * np.log(t) + (b - 1) * np.log1p(-t) + lgamma(a + b) - lgamma(a) - lgamma(b)
    return float(np.exp(log_pdf).sum() * x / steps)


@pytest.mark.parametrize("k, n", [(2, 33), (7, 19), (30, 31)])
def test_clopper_pearson_is_the_beta_quantile_pair(k, n):
    low, high = clopper_pearson(k, n)
    assert _beta_cdf(low, k, n - k + 1) == pytest.approx(0.025, abs=1e-5)
    assert _beta_cdf(high, k + 1, n - k) == pytest.approx(0.975, abs=1e-5)


@pytest.mark.parametrize("args", [(3, 2), (-1, 4), (1, 0), (1.5, 4)])
def test_clopper_pearson_refuses_bad_counts(args):
    with pytest.raises(UsageError, match="k=.*n="):
        clopper_pearson(*args)


def test_bootstrap_mean_matches_normal_theory():
    rng = np.random.default_rng(7)
    sample = rng.normal(3.0, 2.0, size=400)
    low, high = bootstrap_ci(sample, resamples=4000, seed=1)
    se = sample.std(ddof=1) / np.sqrt(len(sample))
    assert low == pytest.approx(sample.mean() - 1.96 * se, abs=0.25 * se)
    assert high == pytest.approx(sample.mean() + 1.96 * se, abs=0.25 * se)


def test_bootstrap_is_seeded_and_skippable():
    values = [1.0, 2.0, 4.0, 8.0]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, resamples=0) is None
    with pytest.raises(UsageError, match="resamples="):
        bootstrap_ci(values, resamples=-1)


def test_paired_bootstrap_keeps_pairs_together():
    # b = a + 1 exactly: any paired resample of the difference is 1; an unpaired one would not be
    a = np.arange(50, dtype=float)
    low, high = paired_bootstrap_ci([a, a + 1], lambda s: float(np.mean(s[1] - s[0])))
    assert (low, high) == (1.0, 1.0)


@pytest.mark.parametrize("interval, side, expected", [
    ((0.91, 0.99), "above", "holds"), ((0.2, 0.5), "above", "does not hold"), ((0.8, 0.95), "above", "inconclusive"),
    ((0.0075, 0.20), "below", "inconclusive"), ((0.0, 0.08), "below", "holds"), (None, "below", "inconclusive"),
])
def test_verdict_rule(interval, side, expected):
    assert verdict(interval, 0.9 if side == "above" else 0.1, side) == expected
