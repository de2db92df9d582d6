"""Metric accumulation over the micro-batches of a step, turned into floats once per step; over the
ranks of a data-parallel step, means weighted as they were accumulated (a token mean is the token
mean of the whole step, not the mean of each rank's token mean)."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

# Metrics that are means over a step's response tokens: averaged over ranks, each rank's value
# counts by its tokens (mean_over_ranks' weights), so the logged value is the step's token mean.
TOKEN_MEAN_METRICS = (
    "kl/mean",
    "kl/clamp_fraction",
    "reward_kl/mean",
    "reward_kl/clamp_fraction",
    "value/returns_mean",
    "rollout/logprob_diff_mean",
    "rollout/kl",
)


def token_mean_weights(metrics: dict[str, float], tokens: float) -> dict[str, float]:
    """`mean_over_ranks` weights: this rank's token count for each token-mean metric it logs."""
    return {name: float(tokens) for name in TOKEN_MEAN_METRICS if name in metrics}


class MetricAccumulator:
    """Weighted means of scalar metrics, and maxima of those named `*_max`; tensors stay on device
    until `compute()`."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self._weights: dict[str, float] = defaultdict(float)
        self._maxima: dict[str, torch.Tensor | float] = {}

    def add(self, metrics: dict[str, torch.Tensor | float], weight: float = 1.0) -> None:
        for name, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
            if name.endswith("_max"):
                seen = self._maxima.get(name)
                self._maxima[name] = (
                    value if seen is None else torch.maximum(torch.as_tensor(seen), torch.as_tensor(value))
                )
                continue
            self._sums[name] = self._sums[name] + value * weight
            self._weights[name] += weight

    def compute(self) -> dict[str, float]:
        out = {name: float(value) for name, value in self._maxima.items()}
        for name, total in self._sums.items():
            value = total / max(self._weights[name], 1e-12)
            out[name] = float(value.item() if isinstance(value, torch.Tensor) else value)
        return out

    def compute_over_ranks(self, engine: Any) -> dict[str, float]:
        """`compute()` over every rank's additions (collective): each weighted mean is the sum of all
        ranks' weighted values over the sum of their weights, each maximum the largest of any rank.
        A metric some ranks never added counts only where it was added; every rank returns every
        rank's keys."""
        if engine.world_size == 1:
            return self.compute()
        names = sorted(set().union(*engine.all_gather_object(sorted(self._sums))))
        peaks = sorted(set().union(*engine.all_gather_object(sorted(self._maxima))))
        totals = torch.tensor(
            [[float(self._sums.get(n, 0.0)), float(self._weights.get(n, 0.0))] for n in names],
            dtype=torch.float64,
            device=engine.device,
        ).reshape(len(names), 2)
        totals = engine.all_reduce_sum(totals)
        out = {n: float(totals[i, 0] / totals[i, 1].clamp(min=1e-12)) for i, n in enumerate(names)}
        # each rank fills its own row (-inf where it has no value): the sum holds every rank's
        rows = torch.zeros(engine.world_size, len(peaks), dtype=torch.float64, device=engine.device)
        rows[engine.rank] = torch.tensor(
            [float(self._maxima.get(n, -math.inf)) for n in peaks], dtype=torch.float64
        )
        rows = engine.all_reduce_sum(rows)
        out.update({n: float(rows[:, i].max()) for i, n in enumerate(peaks)})
        return out
