"""The statistics the studies' verdicts rest on: bootstrap intervals over seeds, paired differences
against a baseline at the same seed, area under a held-out curve, time to a fixed accuracy, and the
verdict word tied to an interval.

With 5 seeds a percentile bootstrap is coarse (it cannot reach beyond the observed values), so an
interval here is a statement about these seeds, not a population; the verdict says "better" or
"worse" only where the whole paired interval lies on one side of zero.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence

LEVEL = 0.95
RESAMPLES = 10_000


def bootstrap_interval(
    values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, low, high): the mean and the percentile bootstrap interval of the mean, resampling
    the values (one per seed) with replacement. A fixed seed makes a table reproducible."""
    if not values:
        raise ValueError("bootstrap_interval needs at least one value")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, mean, mean
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    low = means[int(tail * resamples)]
    high = means[min(resamples - 1, int((1 - tail) * resamples))]
    return mean, low, high


def paired_differences(arm: dict[int, float], baseline: dict[int, float]) -> list[float]:
    """arm - baseline for each seed both have (same warm start, same data), in seed order."""
    shared = sorted(set(arm) & set(baseline))
    if not shared:
        raise ValueError(f"no seed in common: arm has {sorted(arm)}, baseline has {sorted(baseline)}")
    return [arm[seed] - baseline[seed] for seed in shared]


def verdict(low: float, high: float, higher_is_better: bool = True) -> str:
    """The word for a paired interval: better or worse only where it excludes zero."""
    if low > 0:
        return "better" if higher_is_better else "worse"
    if high < 0:
        return "worse" if higher_is_better else "better"
    return "no difference shown"


def area_under_curve(steps: Sequence[float], values: Sequence[float]) -> float:
    """The trapezoid area under a curve divided by its step range: the curve's mean height over
    training, so a method that gets there sooner scores higher at the same final value."""
    if len(steps) != len(values) or len(steps) < 2:
        raise ValueError(
            f"need at least two points of equal length, got {len(steps)} steps and {len(values)} values"
        )
    area = sum((steps[i + 1] - steps[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])


def first_reaching(xs: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """The first x (a step or seconds of wall clock) whose value reaches `target`; None if none does."""
    for x, value in zip(xs, values, strict=True):
        if value >= target:
            return x
    return None


def per_seed(values: Sequence[float], scale: float = 100.0) -> str:
    """'35.3 / 58.7 / 32.0' (scaled, e.g. to percent), in seed order."""
    return " / ".join(f"{scale * v:.1f}" for v in values)


def mean_text(values: Sequence[float | None], missing: str = "-", digits: int = 4) -> str:
    """The mean of values that were all measured, else `missing`."""
    return missing if None in values else f"{statistics.fmean(values):.{digits}f}"


def format_interval(mean: float, low: float, high: float, scale: float = 100.0, digits: int = 1) -> str:
    """'41.2 [38.0, 44.9]' (scaled, e.g. to percent)."""
    return f"{scale * mean:.{digits}f} [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"
