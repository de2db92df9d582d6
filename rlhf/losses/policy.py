"""Policy-gradient objectives: the clipped surrogate shared by PPO and GRPO.

Clipped surrogate (PPO, arXiv 1707.06347; GRPO, arXiv 2402.03300; clip-higher from DAPO,
arXiv 2503.14476), per token t of sequence b with ratio r = exp(log pi - log pi_old):
    l_bt = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)
optionally with dual clipping (arXiv 1912.09729): for A < 0 the loss is capped at -dual_clip * A.
A KL term beta * k(log pi, log pi_ref) is added per token when a reference is given (KL in the loss).
Reduction over tokens and sequences is the caller's choice (`rlhf.losses.reduce`), with a
normalizer counted over the whole optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.losses.kl import kl_penalty
from rlhf.losses.reduce import Reduction
from rlhf.ops import masked_mean
from rlhf.types import LossOutput


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped policy loss [B, T] and clip statistics.

    advantages: [B] (one per sequence, broadcast over tokens) or [B, T].
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.float()
    if advantages.shape == response_mask.shape:  # per-token advantages may hold garbage when masked
        advantages = torch.where(response_mask, advantages, torch.zeros_like(advantages))
    log_ratio = logprobs.float() - old_logprobs.float()
    # Masked positions may hold garbage; keep them out of exp so no inf reaches the gradient.
    log_ratio = torch.where(response_mask, log_ratio, torch.zeros_like(log_ratio))
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = -torch.min(ratio * advantages, clipped_ratio * advantages)
    low = (ratio < 1 - clip_low) & (advantages < 0)
    high = (ratio > 1 + clip_high) & (advantages > 0)
    metrics = {
        "clip/low_fraction": masked_mean(low.float(), response_mask).detach(),
        "clip/high_fraction": masked_mean(high.float(), response_mask).detach(),
        "clip/fraction": masked_mean((low | high).float(), response_mask).detach(),
        "ratio/mean": masked_mean(ratio, response_mask).detach(),
    }
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        capped = torch.min(per_token, -dual_clip * advantages)
        dual_hit = (advantages < 0) & (capped < per_token)
        per_token = torch.where(advantages < 0, capped, per_token)
        metrics["clip/dual_fraction"] = masked_mean(dual_hit.float(), response_mask).detach()
    per_token = torch.where(response_mask, per_token, torch.zeros_like(per_token))
    return per_token, metrics


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    reduction: Reduction,
    normalizer: float | torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    kl_log_ratio_clamp: float | None = None,
    token_budget: int | None = None,
    rollout_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Clipped surrogate plus optional KL-in-loss, reduced with `reduction` / `normalizer`.

    This is GRPO's objective (and PPO's actor loss with per-token advantages). `token_budget` is the
    constant denominator of `sequence_mean_token_sum_norm` (Dr.GRPO: the max response length).
    `rollout_weights` ([B, T] or [B, 1], no gradient) multiply the surrogate before the KL term: the
    importance-sampling correction for a rollout engine's mismatch (rlhf/losses/rollout_correction.py).
    """
    per_token, metrics = clipped_surrogate(
        logprobs,
        old_logprobs,
        advantages,
        response_mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=dual_clip,
    )
    if rollout_weights is not None:
        per_token = per_token * rollout_weights.detach()
    metrics["loss/policy_token_mean"] = masked_mean(per_token, response_mask).detach()
    if kl_coef != 0.0:
        if ref_logprobs is None or kl_estimator is None:
            raise ValueError("kl_coef != 0 needs ref_logprobs and kl_estimator")
        per_token_kl, kl_metrics = kl_penalty(
            logprobs, ref_logprobs, response_mask, estimator=kl_estimator, log_ratio_clamp=kl_log_ratio_clamp
        )
        per_token = per_token + kl_coef * per_token_kl
        metrics.update(kl_metrics)
    extra = {"token_budget": token_budget} if reduction.needs_token_budget else {}
    loss = reduction.reduce(per_token, response_mask, normalizer=normalizer, **extra)
    return LossOutput(loss=loss, metrics=metrics)
