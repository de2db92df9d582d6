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


def _rank0_of_two(other_rank: dict[str, float], other_weights: dict[str, float] | None = None):
    """Rank 0 of two; rank 1's row (its values, then its weights) arrives from the reduction."""

    def all_reduce_sum(rows: torch.Tensor) -> torch.Tensor:
        keys = sorted(other_rank)
        theirs = torch.zeros_like(rows)
        weights = [(other_weights or {}).get(k, 1.0) for k in keys]
        theirs[1] = torch.tensor([other_rank[k] for k in keys] + weights, dtype=rows.dtype)
        return rows + theirs

    return SimpleNamespace(
        world_size=2,
        rank=0,
        device=torch.device("cpu"),
        all_reduce_sum=all_reduce_sum,
        all_gather_object=lambda keys: [keys, sorted(other_rank)],
    )


def test_ranks_average_means_and_keep_the_largest_maximum():
    engine = _rank0_of_two({"loss": 3.0, "rollout/logprob_diff_max": 0.9})
    out = mean_over_ranks({"loss": 1.0, "rollout/logprob_diff_max": 0.2}, engine)
    assert out == {"loss": 2.0, "rollout/logprob_diff_max": 0.9}  # not the mean 0.55


def test_token_means_are_weighted_by_each_ranks_tokens():
    """kl/mean is a mean over tokens: rank 0 has 10 tokens at 1.0, rank 1 30 at 3.0, so 2.5 (the
    mean of the two ranks' means would be 2.0); loss has no weight and is the plain mean."""
    engine = _rank0_of_two({"kl/mean": 3.0, "loss": 3.0}, {"kl/mean": 30.0})
    out = mean_over_ranks({"kl/mean": 1.0, "loss": 1.0}, engine, weights={"kl/mean": 10.0})
    assert out == {"kl/mean": pytest.approx(2.5), "loss": 2.0}


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


class _TwoRanks:
    """Rank 0 of two, the other rank's additions replayed: all_reduce_sum adds its tensors."""

    world_size, rank, device = 2, 0, torch.device("cpu")

    def __init__(self, other: MetricAccumulator):
        self.other, self.calls = other, 0

    def all_gather_object(self, keys):
        theirs = sorted(self.other._sums) if self.calls == 0 else sorted(self.other._maxima)
        self.calls += 1
        return [keys, theirs]

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if value.dim() == 2 and value.shape[1] == 2 and value.shape[0] != self.world_size:  # [sum, weight]
            names = sorted(set(self.other._sums) | {"kl/mean"})
            theirs = [
                [float(self.other._sums.get(n, 0.0)), float(self.other._weights.get(n, 0.0))] for n in names
            ]
            return value + torch.tensor(theirs, dtype=value.dtype)
        theirs = torch.zeros_like(value)
        theirs[1] = torch.tensor([float(v) for _, v in sorted(self.other._maxima.items())], dtype=value.dtype)
        return value + theirs


def test_means_over_ranks_are_token_means_of_the_whole_step():
    """Rank 0 holds 10 tokens of KL 1.0, rank 1 holds 30 tokens of KL 3.0: the step's token mean is
    2.5, not the mean of the ranks' means (2.0)."""
    ours, theirs = MetricAccumulator(), MetricAccumulator()
    ours.add({"kl/mean": 1.0, "ratio_max": 1.1}, weight=10)
    theirs.add({"kl/mean": 3.0, "ratio_max": 1.7}, weight=30)
    out = ours.compute_over_ranks(_TwoRanks(theirs))
    assert out["kl/mean"] == pytest.approx((1.0 * 10 + 3.0 * 30) / 40)
    assert out["ratio_max"] == pytest.approx(1.7)
