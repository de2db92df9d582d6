"""MetricAccumulator: weighted means over micro-batches, maxima for metrics named *_max; the same
rule across ranks (mean_over_ranks)."""

from types import SimpleNamespace

import pytest
import torch

from rlhf.distributed.collectives import mean_over_ranks
from rlhf.metrics import MetricAccumulator


def test_means_are_weighted_and_maxima_are_maxima():
    accumulator = MetricAccumulator()
    accumulator.add({"loss": torch.tensor(1.0), "diff_max": torch.tensor(0.5)}, weight=1.0)
    accumulator.add({"loss": 4.0, "diff_max": torch.tensor(0.2)}, weight=3.0)
    out = accumulator.compute()
    assert out["loss"] == (1.0 * 1 + 4.0 * 3) / 4
    assert out["diff_max"] == 0.5  # not the weighted mean 0.275


def test_ranks_average_means_and_keep_the_largest_maximum():
    other_rank = {"loss": 3.0, "rollout/logprob_diff_max": 0.9}

    def all_reduce_sum(rows: torch.Tensor) -> torch.Tensor:  # rank 1's row arrives from the reduction
        theirs = torch.zeros_like(rows)
        theirs[1] = torch.tensor([other_rank[k] for k in sorted(other_rank)], dtype=rows.dtype)
        return rows + theirs

    engine = SimpleNamespace(
        world_size=2,
        rank=0,
        device=torch.device("cpu"),
        all_reduce_sum=all_reduce_sum,
        all_gather_object=lambda keys: [keys, sorted(other_rank)],
    )
    out = mean_over_ranks({"loss": 1.0, "rollout/logprob_diff_max": 0.2}, engine)
    assert out == {"loss": 2.0, "rollout/logprob_diff_max": 0.9}  # not the mean 0.55


def test_ranks_with_different_metric_keys_are_refused():
    """A key missing on one rank would shift every value after it in the stacked rows."""
    engine = SimpleNamespace(
        world_size=2,
        rank=0,
        device=torch.device("cpu"),
        all_reduce_sum=lambda rows: rows,
        all_gather_object=lambda keys: [keys, ["eval/accuracy", "loss"]],
    )
    with pytest.raises(RuntimeError, match=r"only on rank 1: \['eval/accuracy'\]"):
        mean_over_ranks({"loss": 1.0}, engine)
