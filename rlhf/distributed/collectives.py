"""Collectives the training loops need beyond a sum: metrics averaged over ranks and values gathered
from every rank, through an engine's `all_reduce_sum` and `all_gather_object` (identity in one
process). Every rank must call them together."""

from __future__ import annotations

from typing import Any

import torch


def mean_over_ranks(
    metrics: dict[str, float], engine: Any, weights: dict[str, float] | None = None
) -> dict[str, float]:
    """Average scalar metrics over ranks, except maxima (`*_max`, as MetricAccumulator keeps them),
    which take the largest rank's value, and the metrics named in `weights` (this rank's weight of
    each: its token count for a token mean), which are weighted means over ranks. Ranks must report
    the same keys: a rank missing a key would silently shift every value after it, so differing
    keys are refused, naming them."""
    if engine.world_size == 1:
        return metrics
    keys = sorted(metrics)
    every_rank = engine.all_gather_object(keys)
    for rank, theirs in enumerate(every_rank):
        if theirs != keys:
            only_here, only_there = sorted(set(keys) - set(theirs)), sorted(set(theirs) - set(keys))
            raise RuntimeError(
                f"metrics differ between rank {engine.rank} and rank {rank}: only on rank {engine.rank}: "
                f"{only_here}; only on rank {rank}: {only_there} (every rank must log the same keys)"
            )
    if not keys:
        return metrics
    weights = weights or {}
    # each rank fills its own row of zeros: the sum over ranks holds every rank's values (and, after
    # them, its weight for each key: 1 where none is given)
    row = [float(metrics[k]) for k in keys] + [float(weights.get(k, 1.0)) for k in keys]
    per_rank = torch.zeros(engine.world_size, 2 * len(keys), dtype=torch.float64, device=engine.device)
    per_rank[engine.rank] = torch.tensor(row, dtype=torch.float64)
    per_rank = engine.all_reduce_sum(per_rank)
    values, weight = per_rank[:, : len(keys)], per_rank[:, len(keys) :]
    means = ((values * weight).sum(0) / weight.sum(0).clamp(min=1e-12)).tolist()
    maxima = values.max(0).values.tolist()
    return {k: maxima[i] if k.endswith("_max") else means[i] for i, k in enumerate(keys)}


def gathered_values(values: torch.Tensor, engine: Any) -> torch.Tensor:
    """Every rank's 1-D `values` (lengths may differ) concatenated in rank order, on every rank."""
    if engine.world_size == 1:
        return values
    counts = torch.zeros(engine.world_size, dtype=torch.float64, device=engine.device)
    counts[engine.rank] = values.numel()
    counts = engine.all_reduce_sum(counts).long().tolist()
    # each rank fills its own row of zeros: the sum over ranks is every row, exactly
    rows = torch.zeros(engine.world_size, max(max(counts), 1), dtype=values.dtype, device=engine.device)
    rows[engine.rank, : values.numel()] = values
    rows = engine.all_reduce_sum(rows)
    return torch.cat([rows[rank, :count] for rank, count in enumerate(counts)])
