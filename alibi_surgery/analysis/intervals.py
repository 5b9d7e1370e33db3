"""Confidence intervals for the project's verdicts: one implementation of each rule.

- :func:`clopper_pearson`: the exact (conservative) binomial interval for ``k`` successes in ``n`` trials, found by
  bisection on the binomial tail sums (no scipy); ``k = 0`` gives a lower bound of 0 and ``k = n`` an upper of 1.
- :func:`bootstrap_ci`: the percentile bootstrap of any statistic of one sample (texts, seeds), seeded, with
  ``resamples`` draws; :func:`paired_bootstrap_ci` resamples the same indices from two (or more) aligned samples,
  for a statistic of their difference or ratio (before/after on the same texts).
- :func:`verdict`: "holds" when the whole interval clears the line on the claimed side (by ``margin``), "does not
  hold" when it clears the other side, "inconclusive" otherwise.

Limits: the bootstrap draws with ``numpy.random.default_rng(seed)``; a sample of one value has a zero-width interval
(there is nothing to resample), which callers should report as such rather than as certainty.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..errors import UsageError

__all__ = ["clopper_pearson", "bootstrap_ci", "paired_bootstrap_ci", "verdict", "check_level", "check_resamples"]


def check_level(level: float) -> float:
    if not (isinstance(level, (int, float)) and math.isfinite(level) and 0 < level < 1):
        raise UsageError(f"level={level!r}: must be a fraction in (0, 1), e.g. 0.95")
    return float(level)


def check_resamples(resamples: int) -> int:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 0:
        raise UsageError(f"resamples={resamples!r}: must be a whole number >= 0 (0 skips the bootstrap)")
    return resamples


def _log_pmf(i: int, n: int, p: float) -> float:
    return (math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p))


def _tail_at_least(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), 0 < p < 1."""
    return min(1.0, sum(math.exp(_log_pmf(i, n, p)) for i in range(k, n + 1)))


def _bisect(f: Callable[[float], float], target: float, increasing: bool) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact two-sided ``level`` interval for a proportion ``k / n`` (each tail ``(1 - level) / 2``)."""
    check_level(level)
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n or n < 1 or not 0 <= k <= n:
        raise UsageError(f"k={k!r}, n={n!r}: need whole numbers with 0 <= k <= n and n >= 1")
    k, n = int(k), int(n)
    alpha = (1 - level) / 2
    # lower: P(X >= k | p) = alpha, increasing in p; upper: P(X <= k | p) = alpha, i.e. P(X >= k + 1 | p) = 1 - alpha
    lower = 0.0 if k == 0 else _bisect(lambda p: _tail_at_least(k, n, p), alpha, increasing=True)
    upper = 1.0 if k == n else _bisect(lambda p: _tail_at_least(k + 1, n, p), 1 - alpha, increasing=True)
    return lower, upper


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_ci(values: Sequence[float], statistic: Callable[[np.ndarray], float] = np.mean, *,
                 resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile-bootstrap ``level`` interval of ``statistic`` over ``values`` (resampled with replacement);
    None when ``resamples`` is 0."""
    return paired_bootstrap_ci([values], lambda sample: statistic(sample[0]), resamples=resamples, seed=seed,
                               level=level)


def paired_bootstrap_ci(samples: Sequence[Sequence[float]], statistic: Callable[[list[np.ndarray]], float], *,
                        resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of ``statistic(list_of_resampled_arrays)``: every array is resampled at the
    same indices (the samples are aligned: the same texts under two models). None when ``resamples`` is 0."""
    check_level(level)
    if check_resamples(resamples) == 0:
        return None
    arrays = [np.asarray(s, dtype=np.float64) for s in samples]
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        raise UsageError(f"bootstrap: need aligned, non-empty samples (lengths {[len(a) for a in arrays]})")
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for r in range(resamples):
        index = rng.integers(0, n, size=n)
        stats[r] = statistic([a[index] for a in arrays])
    return _percentiles(stats, level)


def verdict(interval: tuple[float, float] | None, line: float, side: str, margin: float = 0.0) -> str:
    """The rule every reproduction verdict follows. ``side``: "above" (the claim holds when the whole interval lies
    above ``line + margin``) or "below" (below ``line - margin``). The claim "does not hold" when the interval lies
    wholly on the other side of the line (beyond ``margin``), and is "inconclusive" otherwise (or with no interval)."""
    if side not in ("above", "below"):
        raise UsageError(f"side={side!r}: choose above or below")
    if interval is None:
        return "inconclusive"
    low, high = interval
    if side == "above":
        return "holds" if low > line + margin else "does not hold" if high < line - margin else "inconclusive"
    return "holds" if high < line - margin else "does not hold" if low > line + margin else "inconclusive"
