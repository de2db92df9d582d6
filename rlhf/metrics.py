"""Metric accumulation over the micro-batches of a step, turned into floats once per step."""

from __future__ import annotations

from collections import defaultdict

import torch


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
