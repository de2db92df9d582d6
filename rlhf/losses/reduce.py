"""Loss aggregation: per-token terms to one scalar, divided by a step-wide normalizer.

A reduction returns the *sum* of this micro-batch's contribution divided by `normalizer`, where the
normalizer counts the units of the whole optimizer step (all micro-batches, all ranks). Summing the
micro-batch losses then gives exactly the loss of the whole batch, so gradient accumulation and data
parallelism need no further rescaling of the loss (the engine undoes data-parallel averaging).

Modes (names as in verl; TRL's loss types in brackets):
- token_mean: sum over all valid tokens / tokens in the step [dapo; bnpo on a single micro-batch].
- sequence_mean_token_mean: each sequence's token mean, summed / sequences in the step [grpo].
- sequence_mean_token_sum_norm: token sums / a constant token budget / sequences in the step [dr_grpo].
- sequence_mean_token_sum: each sequence's token sum / sequences in the step [luspo].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rlhf.ops import masked_sum


def token_mean(
    per_token: torch.Tensor, mask: torch.Tensor, *, normalizer: float | torch.Tensor
) -> torch.Tensor:
    return masked_sum(per_token, mask) / normalizer


def sequence_mean_token_mean(
    per_token: torch.Tensor, mask: torch.Tensor, *, normalizer: float | torch.Tensor
) -> torch.Tensor:
    lengths = mask.sum(-1).clamp(min=1).to(per_token.dtype)
    return (masked_sum(per_token, mask, dim=-1) / lengths).sum() / normalizer


def sequence_mean_token_sum_norm(
    per_token: torch.Tensor, mask: torch.Tensor, *, normalizer: float | torch.Tensor, token_budget: int
) -> torch.Tensor:
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive (the max response length), got {token_budget}")
    return masked_sum(per_token, mask) / token_budget / normalizer


def sequence_mean_token_sum(
    per_token: torch.Tensor, mask: torch.Tensor, *, normalizer: float | torch.Tensor
) -> torch.Tensor:
    return masked_sum(per_token, mask) / normalizer


def count_tokens(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum()


def count_sequences(mask: torch.Tensor) -> torch.Tensor:
    """Sequences with at least one trained token (rows masked out entirely do not count)."""
    return mask.any(-1).sum()


@dataclass(frozen=True)
class Reduction:
    """A reduction and the unit its normalizer counts (tokens or sequences)."""

    name: str
    reduce: Callable[..., torch.Tensor]
    count: Callable[[torch.Tensor], torch.Tensor]
    needs_token_budget: bool = False


REDUCTIONS: dict[str, Reduction] = {
    "token_mean": Reduction("token_mean", token_mean, count_tokens),
    "sequence_mean_token_mean": Reduction(
        "sequence_mean_token_mean", sequence_mean_token_mean, count_sequences
    ),
    "sequence_mean_token_sum_norm": Reduction(
        "sequence_mean_token_sum_norm", sequence_mean_token_sum_norm, count_sequences, needs_token_budget=True
    ),
    "sequence_mean_token_sum": Reduction("sequence_mean_token_sum", sequence_mean_token_sum, count_sequences),
}


def get_reduction(name: str) -> Reduction:
    if name not in REDUCTIONS:
        raise ValueError(f"loss.aggregation={name!r} is not one of {sorted(REDUCTIONS)}")
    return REDUCTIONS[name]
