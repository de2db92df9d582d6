"""Reward shaping: turning sequence scores and per-token terms into the rewards an estimator uses.

For outcome-level estimators (GRPO, Dr.GRPO, RLOO) the KL-in-reward placement subtracts the summed
per-token KL estimate of each response from its score before the group baseline, as verl's
`use_kl_in_reward` does:  score_b <- score_b - beta * sum_t k(log pi_old, log pi_ref)_bt.
(The token-level reward composer for PPO, with dense sources, builds on the same terms.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.losses.kl import kl_penalty
from rlhf.ops import masked_sum


def kl_penalized_scores(
    scores: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    log_ratio_clamp: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scores [B] minus kl_coef times each row's summed KL estimate; no gradient flows."""
    with torch.no_grad():
        per_token, metrics = kl_penalty(
            old_logprobs, ref_logprobs, response_mask, estimator=estimator, log_ratio_clamp=log_ratio_clamp
        )
        sequence_kl = masked_sum(per_token, response_mask, dim=-1)
    metrics["kl/sequence_mean"] = sequence_kl.mean()
    return scores.float() - kl_coef * sequence_kl, metrics
