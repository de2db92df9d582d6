"""Advantage estimators and their registry (`advantage.estimator`): outcome baselines for the
critic-free GRPO recipe, and GAE over tokens or macro-action segments for PPO.

GRPO (arXiv 2402.03300): A_i = (r_i - mean_g r) / (std_g r + eps), std unbiased as in TRL.
Dr.GRPO (arXiv 2503.20783): A_i = r_i - mean_g r (no std scaling).
RLOO (arXiv 2402.14740): A_i = r_i - mean of the other valid rewards of the group.
REINFORCE++ (Hu, arXiv 2501.03262): the return-to-go of the token rewards (the score on the last
token minus beta * KL_t on each token when the KL is in the reward; gamma = 1), whitened over every
valid token of the global batch (all ranks). REINFORCE++-baseline: the group mean subtracted from
each score first, then the same global whitening (no group std: the paper's fix for small groups).
GDPO (arXiv 2601.05242; TRL's multi_objective_aggregation=normalize_then_sum): each reward function
normalised within its group first (mean, unbiased std), the weighted sum then normalised over the
batch (all ranks).
Rows whose score is invalid (a reward returned None) are left out of their group's statistics and
get advantage 0. Groups are contiguous blocks of `group_size` rows.
Also here: GTPO's conflict-token weights (arXiv 2508.03772), computed once per rollout, and NTHR's
token hidden reward scores and advantage multipliers (no code by the authors is known; from a
third-party implementation note, unverified).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.ops import masked_mean, masked_var, masked_whiten
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
    batch_std: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO (scale_by_std=True) or Dr.GRPO (False) advantages, one per row [B]. `batch_std`: divide
    by this one std instead of each group's (PPO-Lite, arXiv 2508.08221; TRL's scale_rewards=batch)."""
    grouped, grouped_valid = _grouped(scores, valid, group_size)
    mean = masked_mean(grouped, grouped_valid, dim=1).unsqueeze(1)
    advantages = grouped - mean
    if scale_by_std:
        std = masked_var(grouped, grouped_valid, dim=1, unbiased=True).sqrt().unsqueeze(1)
        advantages = advantages / ((std if batch_std is None else batch_std) + eps)
    return torch.where(grouped_valid, advantages, torch.zeros_like(advantages)).view(-1)


def batch_std(
    scores: torch.Tensor,
    valid: torch.Tensor | None = None,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The unbiased std of every valid score of the batch (of all ranks with `all_reduce_sum`)."""
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid
    kept = torch.where(valid, scores.double(), 0.0)
    totals = torch.stack([kept.sum(), (kept**2).sum(), valid.sum().double()])
    if all_reduce_sum is not None:
        totals = all_reduce_sum(totals)
    count = totals[2]
    var = (totals[1] - totals[0] ** 2 / count.clamp(min=1)) / (count - 1).clamp(min=1)
    return var.clamp(min=0).sqrt().float()


def gdpo(
    per_reward: torch.Tensor,
    valid: torch.Tensor | None,
    *,
    group_size: int,
    weights: torch.Tensor,
    eps: float = 1e-4,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """GDPO advantages [B] from per-reward values [B, K] (NaN where a reward returned None) and the
    rewards' weights [K]: per reward and group (x - mean) / (std + eps), NaN counted as 0 in the
    weighted sum, then (r - mean) / (std + eps) over the batch's valid rows; invalid rows get 0."""
    rows, rewards = per_reward.shape
    grouped = per_reward.float().view(-1, group_size, rewards)
    present = ~torch.isnan(grouped)
    mean = masked_mean(grouped, present, dim=1).unsqueeze(1)
    std = masked_var(grouped, present, dim=1, unbiased=True).sqrt().unsqueeze(1)
    normalized = torch.where(present, (grouped - mean) / (std + eps), 0.0)
    summed = (normalized * weights.float().to(normalized.device)).sum(-1).view(rows)
    valid = present.view(rows, rewards).any(-1) if valid is None else valid
    spread = batch_std(summed, valid, all_reduce_sum)
    kept = torch.where(valid, summed.double(), 0.0)
    totals = torch.stack([kept.sum(), valid.sum().double()])
    if all_reduce_sum is not None:
        totals = all_reduce_sum(totals)
    centre = (totals[0] / totals[1].clamp(min=1)).float()
    return torch.where(valid, (summed - centre) / (spread + eps), 0.0)


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
    rewards, values [B, T]; rows may have different lengths. Masked positions get 0 in both
    outputs. A mask with gaps (a multi-turn episode: tool tokens between the model's turns) is one
    trajectory of its True positions: t+1 is the next trained token, so credit flows across turns.
    The loop runs over T and is vectorised over the batch.
    """
    mask = response_mask.bool()
    if not _is_prefix(mask):  # gather each row's trained tokens to its front, and back after
        order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices
        compact_mask = torch.gather(mask, -1, order)
        compact = gae(
            torch.gather(rewards, -1, order),
            torch.gather(values, -1, order),
            compact_mask,
            gamma=gamma,
            lam=lam,
        )
        return tuple(torch.zeros_like(c).scatter(-1, order, c) for c in compact)
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


def _is_prefix(mask: torch.Tensor) -> bool:
    """Each row True up to its length and False after (right padding only)."""
    return bool(
        torch.equal(mask, torch.arange(mask.shape[-1], device=mask.device) < mask.sum(-1, keepdim=True))
    )


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


def reinforce_pp(
    scores: torch.Tensor,
    valid: torch.Tensor | None,
    response_mask: torch.Tensor,
    *,
    token_penalty: torch.Tensor | None = None,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """REINFORCE++ advantages [B, T]: return-to-go of (score at the last token - token_penalty),
    whitened over all valid tokens (of every rank with `all_reduce_sum`). Invalid rows get 0."""
    mask = response_mask.bool()
    if valid is not None:
        mask = mask & valid.unsqueeze(-1)
    scores = torch.where(valid, scores.float(), 0.0) if valid is not None else scores.float()
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if token_penalty is not None:
        rewards = rewards - torch.where(mask, token_penalty.float(), 0.0)
    last = (mask.long().cumsum(-1) == mask.sum(-1, keepdim=True)) & mask
    rewards = rewards + torch.where(last, scores.unsqueeze(-1), 0.0)
    returns = rewards.flip(-1).cumsum(-1).flip(-1)
    return masked_whiten(torch.where(mask, returns, 0.0), mask, all_reduce_sum=all_reduce_sum)


def reinforce_pp_baseline(
    scores: torch.Tensor,
    valid: torch.Tensor | None,
    response_mask: torch.Tensor,
    *,
    group_size: int,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """REINFORCE++-baseline advantages [B, T]: score minus its group's mean, broadcast over the
    row's tokens and whitened over all valid tokens (of every rank with `all_reduce_sum`)."""
    centred = group_relative(scores, valid, group_size=group_size, scale_by_std=False)
    mask = response_mask.bool()
    if valid is not None:
        mask = mask & valid.unsqueeze(-1)
    broadcast = torch.where(mask, centred.unsqueeze(-1), 0.0)
    return masked_whiten(broadcast, mask, all_reduce_sum=all_reduce_sum)


def _conflicts(ids: torch.Tensor, mask: torch.Tensor, sign: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B, T] bool: the token at (row, t) also appears at t in a completion of the group whose
    advantage has the opposite sign (rows with advantage 0 have no conflicts)."""
    rows, length = ids.shape
    ids_g = ids.view(-1, group_size, length)
    mask_g = mask.view(-1, group_size, length)
    sign_g = sign.view(-1, group_size)
    same = (ids_g.unsqueeze(2) == ids_g.unsqueeze(1)) & mask_g.unsqueeze(2) & mask_g.unsqueeze(1)
    opposite = (sign_g.unsqueeze(2) * sign_g.unsqueeze(1)) < 0  # [groups, i, j]
    return (same & opposite.unsqueeze(-1)).any(2).view(rows, length)


def _end_aligned(values: torch.Tensor, lengths: torch.Tensor, fill) -> torch.Tensor:
    """Each row shifted right so its last valid position lands at the last column."""
    length = values.shape[1]
    source = torch.arange(length, device=values.device) - (length - lengths).unsqueeze(-1)
    gathered = values.gather(1, source.clamp(min=0))
    return torch.where(source >= 0, gathered, torch.full_like(gathered, fill))


def gtpo_conflict_weights(
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    group_size: int,
    amplify: float = 2.0,
    runs: str = "edges",
    divide_by_conflicts: bool = True,
) -> torch.Tensor:
    """GTPO lambda [B, T]: conflict tokens (same id at the same position in a positive- and a
    negative-advantage completion of the group) get `amplify` in positive completions and 0 in
    negative ones; other tokens 1.

    runs="edges" (authors' code): only the contiguous run of conflicts from the start, and the run
    from the end on end-aligned rows, count; a positive token in both runs gets amplify**2.
    runs="all" (the paper): every conflict position counts once. `divide_by_conflicts` (authors'
    code) divides a row's weights by its number of conflict tokens (min 1).
    """
    mask = response_mask.bool()
    sign = torch.sign(advantages.float())
    forward = _conflicts(response_ids, mask, sign, group_size)
    if runs == "all":
        hits = forward.long()
        conflict = forward
    elif runs == "edges":
        lengths = mask.sum(-1)
        leading = forward.long().cumprod(-1)
        aligned = _conflicts(
            _end_aligned(response_ids, lengths, -1), _end_aligned(mask, lengths, False), sign, group_size
        )
        trailing_aligned = aligned.long().flip(-1).cumprod(-1).flip(-1)
        # back to the original positions: aligned column c holds original position c - (T - length)
        length = mask.shape[1]
        source = torch.arange(length, device=mask.device) + (length - lengths).unsqueeze(-1)
        trailing = torch.where(source < length, trailing_aligned.gather(1, source.clamp(max=length - 1)), 0)
        trailing = trailing * mask.long()
        hits = leading + trailing
        conflict = hits > 0
    else:
        raise ValueError(f"gtpo runs must be 'edges' or 'all', got {runs!r}")
    positive = (sign > 0).unsqueeze(-1)
    negative = (sign < 0).unsqueeze(-1)
    weights = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
    weights = torch.where(positive & conflict, amplify ** hits.float(), weights)
    weights = torch.where(negative & conflict, torch.zeros_like(weights), weights)
    if divide_by_conflicts:
        weights = weights / conflict.sum(-1, keepdim=True).clamp(min=1).float()
    return torch.where(mask, weights, torch.zeros_like(weights))


def nthr_scores(
    prediction_errors: torch.Tensor, hidden: torch.Tensor, response_mask: torch.Tensor, positive: torch.Tensor
) -> torch.Tensor:
    """Token hidden reward of one group (NTHR, arXiv 2505.18830; from a third-party implementation note,
    unverified): s_jk = g_jk^T M+ h_jk with M+ = sum over positive rows i and their tokens k of
    g_ik h_ik^T; g_jk = e_{y_jk} - pi_old(.|s_jk) restricted to the group's vocabulary [G, T, V_g],
    h_jk the final hidden state [G, T, h]. Returns [G, T] (0 where masked), in float32."""
    mask = response_mask.unsqueeze(-1)
    g = torch.where(mask, prediction_errors.float(), 0.0)
    h = torch.where(mask, hidden.float(), 0.0)
    rows = positive.view(-1, 1, 1)
    influence = torch.einsum("gtv,gth->vh", torch.where(rows, g, 0.0), torch.where(rows, h, 0.0))
    scores = torch.einsum("gtv,vh,gth->gt", g, influence, h)
    return torch.where(response_mask, scores, 0.0)


def nthr_advantage_scale(
    scores: torch.Tensor, response_mask: torch.Tensor, advantages: torch.Tensor, *, beta: float = 1.0
) -> torch.Tensor:
    """NTHR's per-token advantage multipliers [G, T] for one group: in rows with a negative advantage,
    tokens whose score exceeds tau = beta * min over positive rows of their mean score get
    eta = 2 |0.5 - p| with p the fraction of positive rows; every other token 1. Groups without
    both positive and negative rows are left alone."""
    positive, negative = advantages > 0, advantages < 0
    scale = torch.ones(scores.shape, dtype=torch.float32, device=scores.device)
    if not positive.any() or not negative.any():
        return scale
    row_means = torch.where(response_mask, scores, 0.0).sum(-1) / response_mask.sum(-1).clamp(min=1)
    tau = beta * row_means[positive].min()
    eta = 2 * abs(0.5 - float(positive.float().mean()))
    damped = negative.unsqueeze(-1) & response_mask & (scores > tau)
    return torch.where(damped, torch.full_like(scale, eta), scale)


@dataclass(frozen=True)
class AdvantageEstimator:
    """A registered estimator. `needs`: "groups" (critic-free; the GRPO recipe) or "critic" (PPO).
    `compute(inputs, options)` adapts the common inputs (`OutcomeInputs` or `CriticInputs`) and the
    `advantage` config to the function: advantages [B] or [B, T], or (advantages, returns) with a critic.
    What the config checks read (rlhf/config/plans.py): `single_sample`, a baseline that needs no
    group (one sample per prompt works); `one_per_response`, one advantage per response whose sign
    GTPO reads; `normalises_each_reward`, scores normalised per reward function (a KL in the
    reward would be normalised away)."""

    name: str
    needs: str
    compute: Callable[[Any, Any], Any]
    single_sample: bool = False
    one_per_response: bool = False
    normalises_each_reward: bool = False


@dataclass
class OutcomeInputs:
    """What the critic-free estimators read: scores [B], valid [B], response_mask [B, T], the group
    size, the per-token KL penalty beta * KL_t when the KL is in the reward (else None), and a sum
    over data-parallel ranks (None in one process)."""

    scores: torch.Tensor
    valid: torch.Tensor
    response_mask: torch.Tensor
    group_size: int
    token_penalty: torch.Tensor | None = None
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    per_reward: torch.Tensor | None = None  # [B, K] each reward function's values (NaN: None)
    reward_weights: torch.Tensor | None = None  # [K]


@dataclass
class CriticInputs:
    """What PPO's estimators read: token rewards and the critic's values [B, T], the response mask,
    and macro-action segment ids [B, T] (MA-RLHF) or None for token-level GAE."""

    rewards: torch.Tensor
    values: torch.Tensor
    response_mask: torch.Tensor
    segment_ids: torch.Tensor | None = None


def _gae_or_macro(x: CriticInputs, o) -> tuple[torch.Tensor, torch.Tensor]:
    if x.segment_ids is None:
        return gae(x.rewards, x.values, x.response_mask, gamma=o.gamma, lam=o.lam)
    return macro_gae(
        x.rewards,
        x.values,
        x.segment_ids,
        gamma=o.gamma,
        lam=o.lam,
        aggregation=o.macro.aggregation,
        reward_aggregation=o.macro.reward_aggregation,
    )


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    e.name: e
    for e in (
        AdvantageEstimator(
            "group_relative",
            "groups",
            lambda x, o: group_relative(
                x.scores,
                x.valid,
                group_size=x.group_size,
                scale_by_std=o.scale_by_std,
                eps=o.eps,
                batch_std=batch_std(x.scores, x.valid, x.all_reduce_sum) if o.std_scope == "batch" else None,
            ),
            one_per_response=True,
        ),
        AdvantageEstimator(
            "rloo",
            "groups",
            lambda x, o: rloo(x.scores, x.valid, group_size=x.group_size),
            one_per_response=True,
        ),
        AdvantageEstimator(
            "reinforce_pp",
            "groups",
            lambda x, o: reinforce_pp(
                x.scores,
                x.valid,
                x.response_mask,
                token_penalty=x.token_penalty,
                all_reduce_sum=x.all_reduce_sum,
            ),
            single_sample=True,
        ),
        AdvantageEstimator(
            "gdpo",
            "groups",
            lambda x, o: gdpo(
                x.per_reward,
                x.valid,
                group_size=x.group_size,
                weights=x.reward_weights,
                eps=o.eps,
                all_reduce_sum=x.all_reduce_sum,
            ),
            normalises_each_reward=True,
        ),
        AdvantageEstimator(
            "reinforce_pp_baseline",
            "groups",
            lambda x, o: reinforce_pp_baseline(
                x.scores, x.valid, x.response_mask, group_size=x.group_size, all_reduce_sum=x.all_reduce_sum
            ),
        ),
        AdvantageEstimator("gae", "critic", lambda x, o: _gae_or_macro(x, o)),
    )
}


def get_advantage_estimator(name: str, needs: str) -> AdvantageEstimator:
    """The estimator `name`; an error listing the known ones, or naming the recipe it belongs to."""
    usable = sorted(n for n, e in ADVANTAGE_ESTIMATORS.items() if e.needs == needs)
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage.estimator={name!r} is not one of {usable}")
    estimator = ADVANTAGE_ESTIMATORS[name]
    if estimator.needs != needs:
        where = "a critic (PPO)" if estimator.needs == "critic" else "groups of samples (the GRPO recipe)"
        raise ValueError(f"advantage.estimator={name!r} needs {where}; this recipe takes {usable}")
    return estimator
