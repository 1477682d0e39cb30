"""Statistics of replicated runs (no torch, no scipy): sample standard deviation, paired differences, a
95 % Student-t interval and a percentile bootstrap interval of their mean, win / tie / loss counts.

A method is compared with a baseline seed by seed (same seed: same SFT model, pairs and data order), so
the difference of the two runs of a seed removes what the seed shares. :func:`compare` summarises those
differences; a difference is called significant when its t interval excludes 0 (a two-sided paired t-test
at 1 − confidence). With few seeds the intervals are wide: that is the information, not a defect.

The t quantile is computed here (regularised incomplete beta function by its continued fraction, then
bisection), so the package needs no scipy; ``tests/unit/test_statistics.py`` checks it against scipy.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

__all__ = ["Comparison", "bootstrap_interval", "compare", "mean", "paired_differences", "sample_sd",
           "t_interval", "t_quantile", "win_tie_loss"]

BOOTSTRAP_RESAMPLES = 10_000


def mean(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    return math.fsum(values) / len(values)


def sample_sd(values: Sequence[float]) -> float:
    """Standard deviation with n − 1 in the denominator; NaN for fewer than two values."""
    n = len(values)
    if n < 2:
        return math.nan
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) (Lentz's continued fraction, the faster-converging side)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _incomplete_beta(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a) - (math.lgamma(a) + math.lgamma(b)
                                                                        - math.lgamma(a + b))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction


def _t_cdf(t: float, df: float) -> float:
    tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (to ~1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if _t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


def t_interval(values: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean: mean ± t_{(1+c)/2, n-1} · sd / sqrt(n); (NaN, NaN) for n < 2."""
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    m, sd = mean(values), sample_sd(values)
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return (m - half, m + half)


def bootstrap_interval(values: Sequence[float], *, confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling the values with replacement, ``seed``
    fixed so a table is reproducible); (NaN, NaN) for n < 2."""
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    means = sorted(math.fsum(rng.choice(values) for _ in range(n)) / n for _ in range(resamples))
    tail = (1.0 - confidence) / 2.0
    # the order statistics nearest the tail quantiles (type-1 empirical quantile)
    low = means[max(0, math.ceil(tail * resamples) - 1)]
    high = means[min(resamples - 1, math.ceil((1.0 - tail) * resamples) - 1)]
    return (low, high)


def paired_differences(method: Mapping[object, float], baseline: Mapping[object, float]) -> list[float]:
    """``method[k] - baseline[k]`` for every key (seed) both have, in key order."""
    keys = [k for k in method if k in baseline]
    return [method[k] - baseline[k] for k in sorted(keys, key=str)]


def win_tie_loss(differences: Sequence[float], *, tolerance: float = 0.0) -> tuple[int, int, int]:
    """Counts of differences above ``tolerance``, within it, and below ``-tolerance``."""
    wins = sum(d > tolerance for d in differences)
    losses = sum(d < -tolerance for d in differences)
    return wins, len(differences) - wins - losses, losses


@dataclass(frozen=True)
class Comparison:
    """A method's paired differences to a baseline, summarised."""

    n: int
    mean: float
    sd: float
    t_low: float
    t_high: float
    boot_low: float
    boot_high: float
    wins: int
    ties: int
    losses: int

    @property
    def significant(self) -> Optional[bool]:
        """Whether the t interval excludes 0; None when it cannot be computed (n < 2)."""
        if math.isnan(self.t_low):
            return None
        return self.t_low > 0.0 or self.t_high < 0.0

    def describe(self) -> str:
        """``+0.012 [-0.004, +0.028] 5/2/1`` (mean, 95 % t interval, wins/ties/losses); ``*`` when significant."""
        if self.n < 2:
            return f"{self.mean:+.3f} (n=1) {self.wins}/{self.ties}/{self.losses}"
        mark = " *" if self.significant else ""
        return f"{self.mean:+.3f} [{self.t_low:+.3f}, {self.t_high:+.3f}] {self.wins}/{self.ties}/{self.losses}{mark}"


def compare(differences: Sequence[float], *, confidence: float = 0.95, seed: int = 0) -> Comparison:
    values = [float(d) for d in differences]
    t_low, t_high = t_interval(values, confidence=confidence)
    boot_low, boot_high = bootstrap_interval(values, confidence=confidence, seed=seed)
    wins, ties, losses = win_tie_loss(values)
    return Comparison(n=len(values), mean=mean(values), sd=sample_sd(values), t_low=t_low, t_high=t_high,
                      boot_low=boot_low, boot_high=boot_high, wins=wins, ties=ties, losses=losses)
