"""Preference losses on pairs (chosen, rejected).

Bradley-Terry reward model loss (Ouyang et al. arXiv 2203.02155; the margin as in Llama 2,
arXiv 2307.09288):
    l_i = -log sigmoid(r_chosen_i - r_rejected_i - m_i)
averaged over pairs with a step-wide normalizer (the pair count). `center_coef` adds
c * (r_chosen + r_rejected)^2 to keep scores centred near 0 (Eisenstein et al., arXiv 2312.09244),
as TRL's `center_rewards_coefficient`. The DPO family lands here too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.types import LossOutput


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    normalizer: float | torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> LossOutput:
    """Sum over this micro-batch's pairs of the BT loss, divided by the step's pair count."""
    chosen, rejected = chosen_scores.float(), rejected_scores.float()
    difference = chosen - rejected
    logits = difference - margin.float() if margin is not None else difference
    per_pair = -F.logsigmoid(logits)
    if center_coef:
        per_pair = per_pair + center_coef * (chosen + rejected) ** 2
    metrics = {
        "rm/accuracy": (difference > 0).float().mean().detach(),
        "rm/margin": difference.mean().detach(),
        "rm/chosen_score": chosen.mean().detach(),
        "rm/rejected_score": rejected.mean().detach(),
    }
    return LossOutput(loss=per_pair.sum() / normalizer, metrics=metrics)
