"""Supervised fine-tuning loss: negative log-likelihood of the target (completion) tokens only.

    L = -sum_{b,t} mask_bt * log pi(y_bt | x_b, y_b,<t) / normalizer
with the normalizer counting target tokens over the whole optimizer step (token_mean).
"""

from __future__ import annotations

import torch

from rlhf.losses.reduce import Reduction
from rlhf.ops import masked_mean
from rlhf.types import LossOutput


def nll_loss(
    logprobs: torch.Tensor,
    target_mask: torch.Tensor,
    *,
    reduction: Reduction,
    normalizer: float | torch.Tensor,
) -> LossOutput:
    per_token = torch.where(target_mask, -logprobs.float(), torch.zeros_like(logprobs, dtype=torch.float32))
    loss = reduction.reduce(per_token, target_mask, normalizer=normalizer)
    return LossOutput(
        loss=loss, metrics={"loss/nll_token_mean": masked_mean(per_token, target_mask).detach()}
    )
