"""Intervals and paired tests for comparing cache strategies.

Promises: pure numpy/`math` functions, deterministic for a seed.
- `wilson(k, n)`: the Wilson score 95% interval of a proportion (never
  outside [0, 1], sensible at 0/n and n/n where the normal interval is not).
- `mcnemar(a, b)`: exact two-sided McNemar test for two strategies graded on
  the same episodes (only the discordant pairs count).
- `bootstrap_mean`, `bootstrap_ratio`: percentile bootstrap intervals over
  episodes for a mean and for a ratio of sums (e.g. the share of a logit
  difference a patch recovers).

Knows nothing about models, caches or episodes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054
N_BOOT = 2000


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% interval and the number of episodes behind it."""

    value: float
    lo: float
    hi: float
    n: int

    def fmt(self, pct: bool = True, digits: int = 0) -> str:
        """`62% [52–71]` or `0.41 [0.30–0.52]`; `—` when undefined."""
        if self.n == 0 or math.isnan(self.value):
            return "—"
        if pct:
            return f"{100 * self.value:.{digits}f}% [{100 * self.lo:.{digits}f}–{100 * self.hi:.{digits}f}]"
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}–{self.hi:.{digits}f}]"


def wilson(k: int, n: int, z: float = Z95) -> Estimate:
    """Share k/n with its Wilson score interval."""
    if n <= 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Estimate(p, max(0.0, centre - half), min(1.0, centre + half), n)


def accuracy(outcomes: Sequence[bool]) -> Estimate:
    """Wilson estimate of the share of True outcomes."""
    return wilson(int(sum(bool(x) for x in outcomes)), len(outcomes))


@dataclass(frozen=True)
class McNemar:
    """Paired comparison of strategies A and B on the same episodes."""

    only_a: int  # episodes A got right and B wrong
    only_b: int
    p_value: float

    def fmt(self) -> str:
        return f"{self.only_a} vs {self.only_b}, p = {self.p_value:.2g}"


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """Exact two-sided McNemar test (binomial on the discordant pairs)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return McNemar(0, 0, 1.0)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return McNemar(only_a, only_b, min(1.0, 2 * tail))


def bootstrap_mean(values: Sequence[float], seed: int = 0, n_boot: int = N_BOOT) -> Estimate:
    """Mean with a percentile bootstrap 95% interval (episodes resampled)."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (n_boot, x.size))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return Estimate(float(x.mean()), float(lo), float(hi), int(x.size))


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], seed: int = 0, n_boot: int = N_BOOT) -> Estimate:
    """sum(num) / sum(den) with a percentile bootstrap 95% interval over paired episodes."""
    a, b = np.asarray(num, np.float64), np.asarray(den, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    if a.size == 0 or b.sum() == 0:
        return Estimate(math.nan, math.nan, math.nan, int(a.size))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, (n_boot, a.size))
    sb = b[idx].sum(axis=1)
    ratios = a[idx].sum(axis=1) / np.where(sb == 0, np.nan, sb)
    lo, hi = np.nanpercentile(ratios, [2.5, 97.5])
    return Estimate(float(a.sum() / b.sum()), float(lo), float(hi), int(a.size))
