"""MetricAccumulator: weighted means over micro-batches, maxima for metrics named *_max."""

import torch

from rlhf.metrics import MetricAccumulator


def test_means_are_weighted_and_maxima_are_maxima():
    accumulator = MetricAccumulator()
    accumulator.add({"loss": torch.tensor(1.0), "diff_max": torch.tensor(0.5)}, weight=1.0)
    accumulator.add({"loss": 4.0, "diff_max": torch.tensor(0.2)}, weight=3.0)
    out = accumulator.compute()
    assert out["loss"] == (1.0 * 1 + 4.0 * 3) / 4
    assert out["diff_max"] == 0.5  # not the weighted mean 0.275
