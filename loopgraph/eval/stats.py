"""Statistics for comparing two models on the same items.

Two models scored on the same items are compared *paired*: most items are right (or wrong)
for both, and only the discordant ones carry information about the difference. Comparing
two independent stderr bars wastes that and misses gains of the size looping gives (about a
point).

- :func:`stderr`: sample standard deviation (n - 1) / sqrt(n), lm-eval's ``mean_stderr``.
- :func:`mcnemar_exact`: two-sided exact McNemar test = binomial test of the discordant
  counts against p = 1/2 (computed with exact integers).
- :func:`paired_bootstrap`: percentile 95 % interval of the mean per-item difference,
  resampling items with replacement (fixed seed, vectorised in chunks).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def stderr(values: np.ndarray) -> float:
    """Standard error of the mean with the n - 1 sample std; NaN below two values."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float("nan")
    return float(values.std(ddof=1) / math.sqrt(len(values)))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs:
    ``min(1, 2 * P[X <= min(b, c)])`` with ``X ~ Binomial(b + c, 1/2)``; 1.0 when there are none."""
    if b < 0 or c < 0:
        raise ValueError("discordant counts must be >= 0")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    term, tail = 1, 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / 2**n)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int = 10_000, seed: int = 1234,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``mean(b - a)`` over ``resamples`` resamplings of the items."""
    d = np.asarray(b, np.float64) - np.asarray(a, np.float64)
    if d.ndim != 1 or len(d) == 0:
        raise ValueError("need two equal-length, non-empty 1-d arrays")
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // len(d))
    means = np.concatenate([d[rng.integers(0, len(d), (min(chunk, resamples - s), len(d)))].mean(1)
                            for s in range(0, resamples, chunk)])
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


@dataclasses.dataclass(frozen=True)
class Paired:
    """``other`` against ``base`` on one binary metric over the same items."""
    delta: float  # mean(other) - mean(base)
    ci95: tuple[float, float]  # paired bootstrap
    p_mcnemar: float
    gained: int  # items base got wrong and other got right
    lost: int  # items base got right and other got wrong
    n: int


def compare_paired(base: np.ndarray, other: np.ndarray, *, seed: int = 1234, resamples: int = 10_000) -> Paired:
    base, other = np.asarray(base, np.float64), np.asarray(other, np.float64)
    if base.shape != other.shape:
        raise ValueError(f"paired comparison needs the same items, got {base.shape} and {other.shape}")
    gained = int(((base == 0) & (other == 1)).sum())
    lost = int(((base == 1) & (other == 0)).sum())
    return Paired(float(other.mean() - base.mean()), paired_bootstrap(base, other, resamples=resamples, seed=seed),
                  mcnemar_exact(gained, lost), gained, lost, len(base))
