"""Policy-gradient objectives shared by PPO and GRPO, and their registry (`loss.policy_loss`).

Each objective is one per-token function
    (logprobs, old_logprobs, advantages, response_mask, *, hyperparameters) -> ([B, T] loss, metrics)
registered by name in `POLICY_LOSSES`; `policy_gradient_loss` picks one, adds the KL term and
reduces with the caller's reduction (`rlhf.losses.reduce`) and a normalizer counted over the whole
optimizer step. r = exp(log pi - log pi_old) is the importance ratio; advantages are [B]
(broadcast over tokens) or [B, T]. Masked positions may hold anything (-inf, 1e4, NaN): every
function masks the log-ratio before it reaches an exp.

- clipped: PPO (arXiv 1707.06347) / GRPO (arXiv 2402.03300), clip-higher from DAPO (2503.14476):
      l_t = -min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A)
  with optional dual clipping (arXiv 1912.09729): for A < 0 the loss is capped at -dual_clip * A.
- gspo: GSPO (Zheng et al., arXiv 2507.18071, eq. 5-7): the same clip on the sequence ratio
      s_i = exp(mean_t log(pi / pi_old)), every token of a row sharing s_i (paper clip 3e-4 / 4e-4).
- gspo_token: GSPO-token (ibid., eq. 13): s_it = sg[s_i] * pi_t / sg[pi_t]; equal to gspo in value
  and, with one advantage per row, in gradient; per-token advantages weight each token's gradient.
- luspo: LUSPO (arXiv 2602.05261): GSPO's per-token loss with each row's loss summed over its tokens
  rather than averaged (aggregation sequence_mean_token_sum), removing GSPO's length bias.
- cispo: CISPO (MiniMax-M1, arXiv 2506.13585, eq. 4-5): l_t = -sg[clip(r_t, min_weight, max_weight)]
  A log pi_t, every token kept (the weight, not the token, is clipped). TRL/ScaleRL bound only from
  above (max_weight, recommended 5.0); min_weight 0 means no lower bound.
- sapo: SAPO (arXiv 2511.20347): a soft gate instead of the hard clip,
      l_t = -(4 / tau) sigmoid(tau (r_t - 1)) A,  tau = tau_pos if A > 0 else tau_neg,
  whose gradient at r = 1 equals the plain policy gradient and decays smoothly off-policy.
- vespo: VESPO (arXiv 2602.10693): l_t = -sg[phi(w_i)] A log pi_t with the sequence weight
  w_i = exp(sum_t log r_t) and the normalised Gamma shape phi(w) = exp(lambda + k log w - lambda w)
  (phi(1) = 1); (k, lambda) per advantage sign. A rollout engine's token importance weights are
  folded into w (in log space) instead of multiplying the loss, as TRL does.
- gtpo: GTPO (Simoni et al., arXiv 2508.03772, as the authors' gtpo_training.py runs it): unclipped
      l_t = -r_t * delta_i * (A_i - entropy_penalty * H_i) * lambda_t
  with H_i the row's mean token entropy (detached), delta_i = [H_i <= entropy_threshold] (the
  authors' code: the filter is always on, threshold 0.7 ~ ln 2) and lambda_t the conflict-token
  weights from `rlhf.advantages.gtpo_conflict_weights`, computed once per rollout. No KL term.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from rlhf.losses.kl import kl_penalty
from rlhf.losses.reduce import Reduction
from rlhf.ops import masked_mean, masked_sum
from rlhf.types import LossOutput

PerTokenLoss = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _prepared(logprobs, old_logprobs, advantages, response_mask):
    """Float advantages ([B, 1] or [B, T], 0 where masked) and the log-ratio, 0 where masked, so no
    garbage at a masked position reaches an exp (or its gradient)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.float()
    if advantages.shape == response_mask.shape:
        advantages = torch.where(response_mask, advantages, torch.zeros_like(advantages))
    log_ratio = logprobs.float() - old_logprobs.float()
    log_ratio = torch.where(response_mask, log_ratio, torch.zeros_like(log_ratio))
    return advantages, log_ratio


def _masked_logprobs(logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(response_mask, logprobs.float(), torch.zeros_like(logprobs, dtype=torch.float32))


def _sequence_log_ratio(log_ratio: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B, 1] mean log-ratio over each row's valid tokens (GSPO's length-normalised log s_i)."""
    lengths = response_mask.sum(-1, keepdim=True).clamp(min=1).to(log_ratio.dtype)
    return masked_sum(log_ratio, response_mask, dim=-1).unsqueeze(-1) / lengths


def _clip(ratio, advantages, response_mask, clip_low, clip_high, dual_clip, delta=None):
    """The clipped surrogate on a given ratio ([B, T] or [B, 1]) and its statistics; with `delta`,
    the unclipped term's ratio is capped at delta too (two-sided clipping, INTELLECT-2, arXiv
    2505.07291: a large ratio with a negative advantage no longer gives an unbounded loss)."""
    clipped_ratio = ratio.clamp(1 - clip_low, 1 + clip_high)
    capped = ratio if delta is None else ratio.clamp(max=delta)
    per_token = -torch.min(capped * advantages, clipped_ratio * advantages)
    per_token = per_token.expand(response_mask.shape)
    low = ((ratio < 1 - clip_low) & (advantages < 0)).expand(response_mask.shape)
    high = ((ratio > 1 + clip_high) & (advantages > 0)).expand(response_mask.shape)
    metrics = {
        "clip/low_fraction": masked_mean(low.float(), response_mask).detach(),
        "clip/high_fraction": masked_mean(high.float(), response_mask).detach(),
        "clip/fraction": masked_mean((low | high).float(), response_mask).detach(),
        "ratio/mean": masked_mean(ratio.expand(response_mask.shape), response_mask).detach(),
    }
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        capped = torch.min(per_token, -dual_clip * advantages)
        dual_hit = (advantages < 0) & (capped < per_token)
        per_token = torch.where(advantages < 0, capped, per_token)
        metrics["clip/dual_fraction"] = masked_mean(dual_hit.float(), response_mask).detach()
    return torch.where(response_mask, per_token, torch.zeros_like(per_token)), metrics


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO/GRPO per-token clipped loss [B, T] and clip statistics."""
    advantages, log_ratio = _prepared(logprobs, old_logprobs, advantages, response_mask)
    return _clip(torch.exp(log_ratio), advantages, response_mask, clip_low, clip_high, dual_clip, delta)


def gspo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip: float | None = None,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO: the clipped surrogate on the sequence ratio s_i (one per row, shared by its tokens)."""
    advantages, log_ratio = _prepared(logprobs, old_logprobs, advantages, response_mask)
    ratio = torch.exp(_sequence_log_ratio(log_ratio, response_mask))
    return _clip(ratio, advantages, response_mask, clip_low, clip_high, dual_clip, delta)


def gspo_token(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    dual_clip: float | None = None,
    delta: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token: s_it = sg[s_i] * pi_t / sg[pi_t] (value s_i, gradient through token t only)."""
    advantages, log_ratio = _prepared(logprobs, old_logprobs, advantages, response_mask)
    current = _masked_logprobs(logprobs, response_mask)
    sequence = _sequence_log_ratio(log_ratio, response_mask).detach()
    ratio = torch.exp(current - current.detach() + sequence)
    return _clip(ratio, advantages, response_mask, clip_low, clip_high, dual_clip, delta)


def cispo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    max_weight: float = 5.0,
    min_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: -sg[clip(r, min_weight, max_weight)] * A * log pi per token; no token dropped."""
    if not 0.0 <= min_weight < max_weight:
        raise ValueError(f"cispo needs 0 <= min_weight < max_weight, got {min_weight} and {max_weight}")
    advantages, log_ratio = _prepared(logprobs, old_logprobs, advantages, response_mask)
    ratio = torch.exp(log_ratio)
    weight = ratio.clamp(min=min_weight, max=max_weight).detach()
    per_token = -weight * advantages * _masked_logprobs(logprobs, response_mask)
    high = (ratio > max_weight) & (advantages > 0)
    low = (ratio < min_weight) & (advantages < 0)
    metrics = {
        "clip/high_fraction": masked_mean(high.float(), response_mask).detach(),
        "clip/low_fraction": masked_mean(low.float(), response_mask).detach(),
        "clip/fraction": masked_mean((high | low).float(), response_mask).detach(),
        "ratio/mean": masked_mean(ratio, response_mask).detach(),
    }
    return torch.where(response_mask, per_token, torch.zeros_like(per_token)), metrics


def sapo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAPO: -(4 / tau) * sigmoid(tau * (r - 1)) * A, tau by the advantage's sign."""
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"sapo temperatures must be positive, got tau_pos={tau_pos}, tau_neg={tau_neg}")
    advantages, log_ratio = _prepared(logprobs, old_logprobs, advantages, response_mask)
    ratio = torch.exp(log_ratio)
    tau = torch.where(advantages > 0, tau_pos, tau_neg)
    gate = torch.sigmoid(tau * (ratio - 1)) * 4 / tau
    per_token = (-gate * advantages).expand(response_mask.shape)
    metrics = {
        "ratio/mean": masked_mean(ratio, response_mask).detach(),
        # the gate's slope relative to the plain gradient: 1 on-policy, toward 0 far off-policy
        "sapo/gate_slope_mean": masked_mean(
            (4 * torch.sigmoid(tau * (ratio - 1)) * torch.sigmoid(-tau * (ratio - 1))).expand(
                response_mask.shape
            ),
            response_mask,
        ).detach(),
    }
    return torch.where(response_mask, per_token, torch.zeros_like(per_token)), metrics


def vespo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
    rollout_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VESPO: -sg[phi(w_i)] * A * log pi per token, phi the normalised Gamma weight of the sequence
    ratio w_i. Log-ratios are clamped to +-20 per token and log w_i to [log 1e-8, 20] (the authors'
    and TRL's bounds)."""
    advantages, log_ratio = _prepared(logprobs, old_logprobs, advantages, response_mask)
    log_floor = math.log(1e-8)
    with torch.no_grad():
        log_w = masked_sum(log_ratio.clamp(-20.0, 20.0), response_mask, dim=-1).unsqueeze(-1)
        if rollout_weights is not None:
            if rollout_weights.shape != response_mask.shape:
                raise ValueError(
                    "vespo folds per-token rollout weights into its sequence weight: use a token mode"
                )
            log_is = torch.log(rollout_weights.float()).clamp(log_floor, 20.0)
            log_w = log_w + masked_sum(log_is, response_mask, dim=-1).unsqueeze(-1)
        log_w = log_w.clamp(log_floor, 20.0)
        positive = advantages >= 0
        k = torch.where(positive, k_pos, k_neg)
        lam = torch.where(positive, lambda_pos, lambda_neg).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    per_token = -phi * advantages * _masked_logprobs(logprobs, response_mask)
    metrics = {
        "ratio/mean": masked_mean(torch.exp(log_ratio), response_mask).detach(),
        "vespo/phi_mean": masked_mean(phi.expand(response_mask.shape), response_mask),
    }
    return torch.where(response_mask, per_token, torch.zeros_like(per_token)), metrics


def gtpo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    token_weights: torch.Tensor,
    entropy: torch.Tensor,
    entropy_threshold: float = 0.7,
    entropy_penalty: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GTPO: unclipped r * delta_i * (A_i - gamma H_i) * lambda_t, negated (see the module doc)."""
    advantages, log_ratio = _prepared(logprobs, old_logprobs, advantages, response_mask)
    ratio = torch.exp(log_ratio)
    mean_entropy = masked_mean(entropy.detach().float(), response_mask, dim=-1).unsqueeze(-1)
    kept = mean_entropy <= entropy_threshold
    shifted = torch.where(kept, advantages - entropy_penalty * mean_entropy, torch.zeros_like(advantages))
    weights = torch.where(response_mask, token_weights.float(), torch.zeros_like(ratio))
    per_token = -ratio * shifted * weights
    rows = response_mask.any(-1, keepdim=True)
    metrics = {
        "ratio/mean": masked_mean(ratio, response_mask).detach(),
        "gtpo/entropy_filtered_fraction": masked_mean((~kept).float(), rows).detach(),
        "gtpo/amplified_fraction": masked_mean((weights > 1).float(), response_mask).detach(),
        "gtpo/protected_fraction": masked_mean((weights == 0).float(), response_mask).detach(),
    }
    return torch.where(response_mask, per_token, torch.zeros_like(per_token)), metrics


@dataclass(frozen=True)
class PolicyLoss:
    """A registered objective. `aggregation`: the reduction it is defined with, if it needs one.
    What the config checks read (rlhf/config/): `needs_groups`, it reads a group of samples per
    prompt (the GRPO recipe only); `has_kl`, whether it takes a KL term to a reference;
    `token_corrections_only`, it folds the rollout engine's per-token correction weights into its
    own (sequence-level correction modes do not apply). Whether it caps a clipped ratio
    (`loss.delta`) is read from its signature."""

    name: str
    per_token: PerTokenLoss
    aggregation: str | None = None
    needs_groups: bool = False
    has_kl: bool = True
    token_corrections_only: bool = False
    parameters: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        signature = inspect.signature(self.per_token).parameters.values()
        names = tuple(p.name for p in signature if p.kind is inspect.Parameter.KEYWORD_ONLY)
        object.__setattr__(self, "parameters", names)

    @property
    def options(self) -> tuple[str, ...]:
        """The float hyperparameters set through `loss.policy_loss_args` (not tensors or the clip band)."""
        return tuple(n for n in self.parameters if n not in TENSOR_INPUTS + CLIP_BAND)


TENSOR_INPUTS = ("token_weights", "entropy", "rollout_weights")
CLIP_BAND = (
    "clip_low",
    "clip_high",
    "dual_clip",
    "delta",
)  # from loss.clip_low / clip_high / dual_clip / delta

POLICY_LOSSES: dict[str, PolicyLoss] = {
    loss.name: loss
    for loss in (
        PolicyLoss("clipped", clipped_surrogate),
        PolicyLoss("gspo", gspo),
        PolicyLoss("gspo_token", gspo_token),
        PolicyLoss("luspo", gspo, aggregation="sequence_mean_token_sum"),
        PolicyLoss("cispo", cispo),
        PolicyLoss("sapo", sapo),
        PolicyLoss("vespo", vespo, token_corrections_only=True),
        PolicyLoss("gtpo", gtpo, needs_groups=True, has_kl=False),
    )
}


def get_policy_loss(name: str) -> PolicyLoss:
    if name not in POLICY_LOSSES:
        raise ValueError(f"loss.policy_loss={name!r} is not one of {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def check_policy_loss_args(name: str, args: Mapping[str, float]) -> None:
    """Config-time check: every key of `loss.policy_loss_args` is a hyperparameter of the loss."""
    loss = get_policy_loss(name)
    unknown = sorted(set(args) - set(loss.options))
    if unknown:
        known = ", ".join(loss.options) or "none"
        raise ValueError(
            f"loss.policy_loss_args {unknown} are not options of {name!r} (its options: {known})"
        )


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    reduction: Reduction,
    normalizer: float | torch.Tensor,
    policy_loss: str = "clipped",
    policy_loss_args: Mapping[str, float] | None = None,
    clip_low: float | None = None,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    delta: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    kl_log_ratio_clamp: float | None = None,
    kl_ratio_correction: bool = False,
    token_budget: int | None = None,
    rollout_weights: torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
) -> LossOutput:
    """The registered objective `policy_loss` plus optional KL-in-loss, reduced with `reduction` /
    `normalizer`. `clip_low` / `clip_high` None: the objective's own band (its signature's defaults).

    `token_budget` is the constant denominator of `sequence_mean_token_sum_norm` (Dr.GRPO: the max
    response length). `rollout_weights` ([B, T] or [B, 1], no gradient) multiply the objective before
    the KL term: the importance-sampling correction for a rollout engine's mismatch
    (rlhf/losses/rollout_correction.py); an objective that takes them itself (vespo) gets them.
    `token_weights` and `entropy` ([B, T]) go to the objectives that read them (gtpo).
    `kl_ratio_correction` multiplies each token's KL by pi / pi_old (with gradient), TRL's
    `use_bias_correction_kl`. `loss_weights` ([B, T] or [B, 1], no gradient) multiply the objective first, before the rollout
    weights and the KL term (TRL's order): the masks of `high_entropy_mask` and
    `off_policy_sequence_mask`.
    """
    loss = get_policy_loss(policy_loss)
    given = {
        "clip_low": clip_low,
        "clip_high": clip_high,
        "dual_clip": dual_clip,
        "delta": delta,
        "token_weights": token_weights,
        "entropy": entropy,
        "rollout_weights": rollout_weights,
    }
    # a clip bound left None takes the objective's own default (GSPO's band is not PPO's)
    kwargs = {
        name: value
        for name, value in given.items()
        if name in loss.parameters and not (name in CLIP_BAND and value is None)
    }
    for name in ("token_weights", "entropy"):
        if name in kwargs and kwargs[name] is None:
            raise ValueError(f"policy loss {policy_loss!r} needs {name}")
    kwargs.update(policy_loss_args or {})
    per_token, metrics = loss.per_token(logprobs, old_logprobs, advantages, response_mask, **kwargs)
    if loss_weights is not None:
        per_token = per_token * torch.where(response_mask, loss_weights.detach().float(), 0.0)
    if rollout_weights is not None and "rollout_weights" not in loss.parameters:
        per_token = per_token * rollout_weights.detach()
    metrics["loss/policy_token_mean"] = masked_mean(per_token, response_mask).detach()
    if kl_coef != 0.0:
        if ref_logprobs is None or kl_estimator is None:
            raise ValueError("kl_coef != 0 needs ref_logprobs and kl_estimator")
        per_token_kl, kl_metrics = kl_penalty(
            logprobs, ref_logprobs, response_mask, estimator=kl_estimator, log_ratio_clamp=kl_log_ratio_clamp
        )
        if (
            kl_ratio_correction
        ):  # the KL of samples from pi_old, reweighted to pi (DeepSeek-V3.2; TRL's default)
            log_ratio = torch.where(response_mask, logprobs.float() - old_logprobs.float(), 0.0)
            per_token_kl = per_token_kl * torch.exp(log_ratio)
        per_token = per_token + kl_coef * per_token_kl
        metrics.update(kl_metrics)
    extra = {"token_budget": token_budget} if reduction.needs_token_budget else {}
    reduced = reduction.reduce(per_token, response_mask, normalizer=normalizer, **extra)
    return LossOutput(loss=reduced, metrics=metrics)


def high_entropy_mask(
    entropy: torch.Tensor, response_mask: torch.Tensor, *, quantile: float, pool: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, T] 1.0 for tokens whose entropy is at least the (1 - quantile) quantile of the valid
    tokens' entropies, else 0 (Wang et al., "Beyond the 80/20 rule", arXiv 2506.01939: train on the
    top-quantile "forking" tokens only; 0.2 in the paper). quantile 1 keeps every token. `pool`: the
    entropies the quantile is taken over when they are more than these (every rank's, as TRL does)."""
    if quantile >= 1.0:
        return response_mask.float()
    values = entropy.detach().float()[response_mask] if pool is None else pool.float()
    if values.numel() == 0:
        return torch.zeros_like(entropy, dtype=torch.float32)
    threshold = torch.quantile(values, 1.0 - quantile)
    return ((entropy.detach().float() >= threshold) & response_mask).float()


def off_policy_sequence_mask(
    advantages: torch.Tensor,
    logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    threshold: float,
) -> torch.Tensor:
    """[B, 1] DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, eq. 9): a sequence with a
    negative advantage whose mean log(pi_behaviour / pi_theta) over its tokens exceeds `threshold`
    is dropped (0.0); every other sequence is kept (1.0)."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    gap = torch.where(response_mask, behaviour_logprobs.float() - logprobs.detach().float(), 0.0)
    gap = torch.nan_to_num(gap, nan=0.0)
    mean_gap = gap.sum(-1, keepdim=True) / response_mask.sum(-1, keepdim=True).clamp(min=1)
    row_advantage = advantages[:, :1] if advantages.shape[-1] > 1 else advantages
    return ((row_advantage >= 0) | (mean_gap <= threshold)).float()
