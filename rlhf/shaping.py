"""Reward shaping: sequence scores, KL penalties and dense token sources into the rewards that an
advantage estimator uses.

Token level (PPO, as in Ziegler et al. arXiv 1909.08593 and DeepSpeed-Chat):
    r_bt = -beta * kl_bt  +  [t = last valid token of row b] * clip(score_b)  +  sum_s dense_s,bt
with kl_bt the k1 estimate log pi_old - log pi_ref. The score lands on the last *valid* token of
each row (rows have different lengths and are right-padded). Dense sources (the DPO-implicit reward
of RTO, the curiosity of CD-RLHF in `rlhf.intrinsic.Curiosity`) are [B, T] tensors behind the
`DenseRewardSource` interface.

Outcome level (GRPO, RLOO): the KL-in-reward placement subtracts each row's summed KL estimate
from its score before the group baseline (verl's `use_kl_in_reward`).

RTO (Zhong et al., arXiv 2404.18922; the authors' OpenRLHF code): the dense source
    r_bt = clip(beta1 * (log pi_dpo - log pi_ref)(y_bt), -c, c)
scaled first, then clipped (defaults beta1 = c = 0.05). pi_ref is the PPO reference by default, as
the authors' code does (right only when the DPO model was trained from that same model); the DPO
model's own reference is an option.

Also here: fixed and adaptive KL coefficients (adaptive: Ziegler et al., proportional control to a
target KL) and running score statistics for reward normalisation; both are checkpointed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rlhf.losses.kl import kl_penalty
from rlhf.ops import masked_mean, masked_sum


class DenseRewardSource(Protocol):
    """A per-token reward [B, T] for a rollout (0 at masked positions), plus metrics to log."""

    name: str

    def __call__(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]: ...


def last_valid_index(response_mask: torch.Tensor) -> torch.Tensor:
    """[B] index of each row's last True position (0 for an empty row)."""
    positions = torch.arange(response_mask.shape[1], device=response_mask.device).expand_as(response_mask)
    return torch.where(response_mask, positions, torch.zeros_like(positions)).max(-1).values


def compose_token_rewards(
    scores: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    dense: dict[str, torch.Tensor] | None = None,
    score_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token rewards [B, T] (0 at masked positions) and per-term metrics."""
    mask = response_mask.bool()
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    metrics: dict[str, torch.Tensor] = {}
    if kl is not None and kl_coef != 0.0:
        penalty = -kl_coef * torch.where(mask, kl.float(), torch.zeros_like(rewards))
        rewards = rewards + penalty
        metrics["reward/kl_penalty_sum"] = masked_sum(penalty, mask, dim=-1).mean()
    placed = scores.float()
    if score_clip is not None:
        metrics["reward/score_clip_fraction"] = (placed.abs() > score_clip).float().mean()
        placed = placed.clamp(-score_clip, score_clip)
    rows = torch.arange(mask.shape[0], device=mask.device)
    has_tokens = mask.any(-1)
    rewards[rows, last_valid_index(mask)] += torch.where(has_tokens, placed, torch.zeros_like(placed))
    for name, values in (dense or {}).items():
        term = torch.where(mask, values.float(), torch.zeros_like(rewards))
        rewards = rewards + term
        metrics[f"reward/{name}_sum"] = masked_sum(term, mask, dim=-1).mean()
        metrics[f"reward/{name}_token_mean"] = masked_mean(term, mask)
    return rewards, metrics


def dpo_token_reward(
    dpo_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    scale: float,
    clip: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RTO's token reward clip(scale * (log pi_dpo - log pi_ref), -clip, clip), 0 at masked positions,
    and the clip's hit rate."""
    mask = response_mask.bool()
    raw = scale * (dpo_logprobs.float() - ref_logprobs.float())
    reward = raw.clamp(-clip, clip) if clip is not None else raw
    metrics = {
        "rto/raw_token_mean": masked_mean(torch.where(mask, raw, 0.0), mask),
        "rto/clip_fraction": masked_mean(
            ((raw.abs() > clip) if clip is not None else raw != raw).float(), mask
        ),
    }
    return torch.where(mask, reward, 0.0), metrics


@dataclass
class DPOTokenReward:
    """RTO as a `DenseRewardSource`: `dpo_logprobs(batch)` runs the frozen DPO model over the
    rollout; `ref_logprobs(batch)` its own reference, or None to use the PPO reference pass
    (`batch.ref_logprobs`)."""

    dpo_logprobs: Callable[[Any], torch.Tensor]
    ref_logprobs: Callable[[Any], torch.Tensor] | None = None
    scale: float = 0.05
    clip: float | None = 0.05
    name: str = "rto"

    def __call__(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        reference = batch.ref_logprobs if self.ref_logprobs is None else self.ref_logprobs(batch)
        reward, metrics = dpo_token_reward(
            self.dpo_logprobs(batch), reference, batch.response_mask, scale=self.scale, clip=self.clip
        )
        return reward, {k: float(v) for k, v in metrics.items()}


def kl_token_penalty(
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    kl_coef: float,
    estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    log_ratio_clamp: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """kl_coef * KL_t [B, T] (0 where masked), the KL-in-reward penalty of each token; no gradient."""
    with torch.no_grad():
        per_token, metrics = kl_penalty(
            old_logprobs, ref_logprobs, response_mask, estimator=estimator, log_ratio_clamp=log_ratio_clamp
        )
    metrics["kl/sequence_mean"] = masked_sum(per_token, response_mask, dim=-1).mean()
    return kl_coef * per_token, metrics


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
    penalty, metrics = kl_token_penalty(
        old_logprobs,
        ref_logprobs,
        response_mask,
        kl_coef=kl_coef,
        estimator=estimator,
        log_ratio_clamp=log_ratio_clamp,
    )
    return scores.float() - masked_sum(penalty, response_mask, dim=-1), metrics


def overlong_penalty(
    response_lengths: torch.Tensor, *, max_new_tokens: int, buffer: int, penalty: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), [B], added to the scores:
    0 up to max_new_tokens - buffer tokens, then falling linearly to -penalty at max_new_tokens."""
    if buffer <= 0:
        return torch.zeros_like(response_lengths, dtype=torch.float32)
    over = (response_lengths.float() - (max_new_tokens - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1.0)


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, num_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (arXiv 1909.08593)."""

    def __init__(self, kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, num_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * num_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


def make_kl_controller(kind: str, coef: float, target: float, horizon: float):
    """`fixed` keeps kl_coef; `adaptive` steers it towards a target KL (Ziegler et al., arXiv 1909.08593)."""
    if kind == "adaptive":
        return AdaptiveKLController(coef, target, horizon)
    if kind == "fixed":
        return FixedKLController(coef)
    raise ValueError(f"loss.kl_controller={kind!r} is not one of ['adaptive', 'fixed']")


class RunningMoments:
    """Running mean and std of scores (Chan et al. parallel update), for reward normalisation."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().double().flatten()
        if values.numel() == 0:
            return
        batch_mean = float(values.mean())
        batch_var = float(values.var(unbiased=False))
        n = float(values.numel())
        total = self.count + n
        delta = batch_mean - self.mean
        new_mean = self.mean + delta * n / total
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = new_mean, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]


class EntropyCoefficient:
    """The entropy bonus's coefficient: fixed, or with `target` adaptive as in Skywork-OR1 (arXiv
    2505.22312; TRL's use_adaptive_entropy): after each optimizer step it rises by `delta` when the
    step's mean token entropy is at or below `target` and falls by `delta` otherwise, within
    [minimum, maximum], and it applies only while the last step's entropy is at or below `target`
    (not on the first step). Checkpointed."""

    def __init__(
        self,
        coef: float,
        target: float | None = None,
        delta: float = 0.005,
        minimum: float = 0.0,
        maximum: float = 1.0,
    ):
        self.value, self.target, self.delta, self.minimum, self.maximum = (
            coef,
            target,
            delta,
            minimum,
            maximum,
        )
        self.last_entropy = math.inf

    @classmethod
    def from_config(cls, loss: Any) -> EntropyCoefficient:
        """From a loss config's entropy_coef, entropy_target, entropy_coef_delta / _min / _max."""
        return cls(
            loss.entropy_coef,
            loss.entropy_target,
            loss.entropy_coef_delta,
            loss.entropy_coef_min,
            loss.entropy_coef_max,
        )

    @property
    def applied(self) -> float:
        if self.target is None:
            return self.value
        return self.value if self.last_entropy <= self.target else 0.0

    def update(self, entropy: float) -> None:
        if self.target is None:
            return
        step = self.delta if entropy <= self.target else -self.delta
        self.value = min(max(self.value + step, self.minimum), self.maximum)
        self.last_entropy = entropy

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.last_entropy = state["value"], state["last_entropy"]
