"""Advantage estimators: group-relative baselines for GRPO-style training, and GAE over tokens or
macro-action segments for PPO.

GRPO (arXiv 2402.03300): A_i = (r_i - mean_g r) / (std_g r + eps), std unbiased as in TRL.
Dr.GRPO (arXiv 2503.20783): A_i = r_i - mean_g r (no std scaling).
RLOO (arXiv 2402.14740): A_i = r_i - mean of the other valid rewards of the group.
Rows whose score is invalid (a reward returned None) are left out of their group's statistics and
get advantage 0. Groups are contiguous blocks of `group_size` rows.
"""

from __future__ import annotations

import torch

from rlhf.ops import masked_mean, masked_var
from rlhf.segments import broadcast_to_tokens, segment_mask, segment_reduce


def _grouped(scores: torch.Tensor, valid: torch.Tensor | None, group_size: int):
    if scores.dim() != 1 or scores.numel() % group_size != 0:
        raise ValueError(
            f"scores must be 1-D with a multiple of group_size={group_size} rows, got shape {tuple(scores.shape)}"
        )
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    grouped = torch.where(valid, scores.float(), torch.zeros_like(scores, dtype=torch.float32))
    return grouped.view(-1, group_size), valid.view(-1, group_size)


def group_relative(
    scores: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO (scale_by_std=True) or Dr.GRPO (False) advantages, one per row [B]."""
    grouped, grouped_valid = _grouped(scores, valid, group_size)
    mean = masked_mean(grouped, grouped_valid, dim=1).unsqueeze(1)
    advantages = grouped - mean
    if scale_by_std:
        std = masked_var(grouped, grouped_valid, dim=1, unbiased=True).sqrt().unsqueeze(1)
        advantages = advantages / (std + eps)
    return torch.where(grouped_valid, advantages, torch.zeros_like(advantages)).view(-1)


def rloo(scores: torch.Tensor, valid: torch.Tensor | None = None, *, group_size: int) -> torch.Tensor:
    """Leave-one-out baseline; rows of groups with fewer than 2 valid scores get 0."""
    grouped, grouped_valid = _grouped(scores, valid, group_size)
    count = grouped_valid.sum(1, keepdim=True)
    total = grouped.sum(1, keepdim=True)
    others = (total - grouped) / (count - 1).clamp(min=1)
    advantages = torch.where(grouped_valid & (count > 1), grouped - others, torch.zeros_like(grouped))
    return advantages.view(-1)


def zero_variance_groups(
    scores: torch.Tensor, valid: torch.Tensor | None = None, *, group_size: int
) -> torch.Tensor:
    """[B] bool: True for rows whose group's valid scores are all equal (no learning signal)."""
    grouped, grouped_valid = _grouped(scores, valid, group_size)
    big = torch.finfo(torch.float32).max
    high = torch.where(grouped_valid, grouped, torch.full_like(grouped, -big)).max(1).values
    low = torch.where(grouped_valid, grouped, torch.full_like(grouped, big)).min(1).values
    flat = (high - low <= 0) | (grouped_valid.sum(1) < 2)
    return flat.repeat_interleave(group_size)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (arXiv 1506.02438) per token, batched, right-padded.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V after the last valid token = 0;
    A_t = delta_t + gamma * lam * A_{t+1};  returns R_t = A_t + V_t.
    rewards, values [B, T]; rows may have different lengths (True-prefix masks). Masked positions
    get 0 in both outputs. The loop runs over T and is vectorised over the batch.
    """
    mask = response_mask.bool()
    zeros = torch.zeros_like(values, dtype=torch.float32)
    rewards = torch.where(mask, rewards.float(), zeros)
    values = torch.where(mask, values.float(), zeros)
    length = rewards.shape[1]
    advantages = torch.zeros_like(zeros)
    running = torch.zeros_like(zeros[:, 0])
    for t in reversed(range(length)):
        next_valid = mask[:, t + 1] if t + 1 < length else torch.zeros_like(mask[:, t])
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        next_value = torch.where(next_valid, next_value, torch.zeros_like(next_value))
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * torch.where(next_valid, running, torch.zeros_like(running))
        advantages[:, t] = torch.where(mask[:, t], running, torch.zeros_like(running))
    returns = torch.where(mask, advantages + values, zeros)
    return advantages, returns


def macro_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    segment_ids: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    aggregation: str = "mean",
    reward_aggregation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over macro actions (MA-RLHF), broadcast back to tokens: token rewards and values [B, T]
    are reduced per segment (`rlhf.segments.segment_reduce`; rewards with `reward_aggregation`,
    default the same as values), GAE runs over each row's segments, and every token of a segment
    gets that segment's advantage and return. One token per segment is token-level GAE."""
    macro_rewards = segment_reduce(rewards, segment_ids, reward_aggregation or aggregation)
    macro_values = segment_reduce(values, segment_ids, aggregation)
    advantages, returns = gae(macro_rewards, macro_values, segment_mask(segment_ids), gamma=gamma, lam=lam)
    return broadcast_to_tokens(advantages, segment_ids), broadcast_to_tokens(returns, segment_ids)
