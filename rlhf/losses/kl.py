"""Per-token KL estimators between the policy and the reference (Schulman's k1, k2, k3).

With log-ratio lr = log pi - log pi_ref on tokens sampled from pi:
  k1 = lr                      (unbiased, high variance, can be negative)
  k2 = lr^2 / 2                (biased, low variance; its gradient is the KL's gradient on-policy)
  k3 = exp(-lr) + lr - 1       (unbiased, non-negative; GRPO, arXiv 2402.03300)
All in float32. `log_ratio_clamp` bounds lr before exponentiation (verl clamps k3's input to +-20);
the fraction of clamped tokens is reported by `kl_penalty`, which zeroes masked positions' inputs
before any estimator runs: an exp of garbage there (a logprob 89 below the reference overflows
float32) would otherwise give a NaN gradient even though the masked value is dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rlhf.ops import masked_mean


def k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return logprobs.float() - ref_logprobs.float()


def k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logprobs.float() - ref_logprobs.float()) ** 2


def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    ref_minus_policy = ref_logprobs.float() - logprobs.float()
    return torch.exp(ref_minus_policy) - ref_minus_policy - 1


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": k1,
    "k2": k2,
    "k3": k3,
}


def get_kl_estimator(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator {name!r} is not one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[name]


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    log_ratio_clamp: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token KL estimate [B, T] (0 at masked positions) and its metrics."""
    zero = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    policy = torch.where(response_mask, logprobs.float(), zero)
    ref = torch.where(response_mask, ref_logprobs.float(), zero)
    metrics: dict[str, torch.Tensor] = {}
    if log_ratio_clamp is not None:
        log_ratio = policy - ref
        clamped = log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
        metrics["kl/clamp_fraction"] = masked_mean((clamped != log_ratio).float(), response_mask).detach()
        ref = policy - clamped
    per_token = estimator(policy, ref)
    per_token = torch.where(response_mask, per_token, torch.zeros_like(per_token))
    metrics["kl/mean"] = masked_mean(per_token, response_mask).detach()
    return per_token, metrics
