"""Importance-sampling correction for the mismatch between the rollout engine and the trainer.

An inference engine (vLLM) samples from pi_rollout, which differs slightly from the trainer's
pi_old even with the same weights (other kernels, precision, batching). Yao et al. 2025 ("Your
efficient RL framework secretly brings you off-policy RL training") reweight the policy-gradient
term by rho = pi_old / pi_rollout, bounded:

  token level:     rho_t = exp(old_t - rollout_t)                  per token
  sequence level:  rho   = exp(sum_t (old_t - rollout_t))          one per sequence
  *_truncate:      rho clipped to [clip_min, clip_max]               (TIS)
  *_mask:          rho set to 0 outside [clip_min, clip_max]         (MIS)

The same four modes and bounds as TRL 1.16's `vllm_importance_sampling_mode` (default
sequence_mask, clip_max 3, no clip_min); the weight multiplies the clipped surrogate per token,
before any KL term, as TRL does. Masked positions never contribute (masked before the exp); a
rollout logprob that is NaN (unavailable) counts as no difference.
"""

from __future__ import annotations

import math

import torch

from rlhf.ops import masked_mean

MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def rollout_importance_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weights [B, T] for token modes or [B, 1] for sequence modes, metrics). Inputs [B, T]."""
    if mode not in MODES:
        raise ValueError(f"rollout correction mode {mode!r} is not one of {list(MODES)}")
    diff = torch.where(response_mask, old_logprobs.float() - rollout_logprobs.float(), 0.0)
    diff = torch.nan_to_num(diff, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    outside = (ratio < low) | (ratio > high)
    weights = (
        ratio.clamp(min=clip_min, max=clip_max)
        if mode.endswith("truncate")
        else ratio.masked_fill(outside, 0.0)
    )
    per_token = ratio.expand_as(response_mask)
    metrics = {
        "rollout_correction/ratio_mean": masked_mean(per_token, response_mask).detach(),
        "rollout_correction/ratio_max": torch.where(response_mask, per_token, 0.0).max().detach(),
        "rollout_correction/clipped_fraction": masked_mean(
            outside.expand_as(response_mask).float(), response_mask
        ),
    }
    return weights, metrics


def rollout_mismatch_metrics(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """How far the engine's sampled-token logprobs are from the trainer's: mean and max absolute
    difference, and the k3 estimate of KL(pi_rollout || pi_old) on the sampled tokens."""
    valid = response_mask & ~torch.isnan(rollout_logprobs)
    diff = torch.where(valid, old_logprobs.float() - rollout_logprobs.float(), 0.0)
    return {
        "rollout/logprob_diff_mean": masked_mean(diff.abs(), valid).detach(),
        "rollout/logprob_diff_max": diff.abs().max().detach(),
        "rollout/kl": masked_mean(torch.exp(diff) - diff - 1, valid).detach(),
    }
