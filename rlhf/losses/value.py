"""Critic loss: clipped value regression (PPO, arXiv 1707.06347; as in OpenAI baselines).

    l_t = 0.5 * max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2)
reduced with a step-wide normalizer (token_mean in PPO). `clip_range=None` disables clipping.
"""

from __future__ import annotations

import torch

from rlhf.losses.reduce import Reduction
from rlhf.ops import masked_mean
from rlhf.types import LossOutput


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    reduction: Reduction,
    normalizer: float | torch.Tensor,
    clip_range: float | None = 0.2,
) -> LossOutput:
    # zero masked positions first: garbage there would turn into NaN gradients through the square
    zeros = torch.zeros_like(values, dtype=torch.float32)
    values = torch.where(response_mask, values.float(), zeros)
    old_values = torch.where(response_mask, old_values.float(), zeros)
    returns = torch.where(response_mask, returns.float(), zeros)
    unclipped = (values - returns) ** 2
    metrics: dict[str, torch.Tensor] = {}
    if clip_range is None:
        per_token = 0.5 * unclipped
    else:
        clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (clipped_values - returns) ** 2
        per_token = 0.5 * torch.max(unclipped, clipped)
        metrics["value/clip_fraction"] = masked_mean((clipped > unclipped).float(), response_mask).detach()
    per_token = torch.where(response_mask, per_token, torch.zeros_like(per_token))
    metrics["value/mean"] = masked_mean(values, response_mask).detach()
    metrics["value/error"] = masked_mean(unclipped, response_mask).detach()
    loss = reduction.reduce(per_token, response_mask, normalizer=normalizer)
    return LossOutput(loss=loss, metrics=metrics)
