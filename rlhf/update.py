"""Step 5 of the RL loop: one policy-update loop, shared by GRPO and PPO.

`run_update` takes the optimizer steps over a rollout: `updates_per_rollout` passes, each a random order of the
rows cut into minibatches of `minibatch_rows` (one optimizer step each), each minibatch cut into
micro-batches of at most `micro_batch_rows` rows or, with a token budget, of at most that many
tokens (as many on every rank as the most any rank needs). Per minibatch it computes, once and
over all ranks, the reduction's normalizer and the trained-token count; a minibatch with no trained
token on any rank is skipped on every rank (no optimizer step, so Adam's momentum and weight decay
do not move the weights on a zero gradient). What differs between methods is the
`UpdateObjective`: the losses of one micro-batch, each backpropagated through its own engine
(GRPO: the policy; PPO: the policy and the critic).

`PolicyGradientObjective` is the policy side both recipes use: the registered `loss.policy_loss`
with the KL term, token masks, GTPO's weights and the entropy bonus; the old logprobs are the
rollout's when it has them, else (one on-policy update) the detached current ones; the rollout
engine's mismatch is corrected here (`rollout_correction`) when the old logprobs were not computed
in a separate pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rlhf.data.collate import token_budget_micro_batches
from rlhf.distributed.collectives import gathered_values
from rlhf.losses.policy import high_entropy_mask, off_policy_sequence_mask, policy_gradient_loss
from rlhf.losses.reduce import Reduction
from rlhf.losses.rollout_correction import rollout_importance_weights, rollout_mismatch_metrics
from rlhf.losses.value import clipped_value_loss
from rlhf.metrics import MetricAccumulator
from rlhf.models.forward import response_logprobs, token_values
from rlhf.models.options import ForwardOptions
from rlhf.ops import masked_mean, masked_sum
from rlhf.shaping import EntropyCoefficient
from rlhf.types import RolloutBatch


@dataclass
class Minibatch:
    """One optimizer step's rows and its step-wide counts (over all ranks)."""

    rows: torch.Tensor
    normalizer: torch.Tensor  # the reduction's count: tokens or sequences
    tokens: torch.Tensor  # trained tokens, at least 1


@dataclass
class UpdatePlan:
    """The loop's shape on this rank."""

    updates_per_rollout: int
    minibatch_rows: int
    micro_batch_rows: int
    max_tokens_per_micro_batch: int = 0

    @classmethod
    def from_config(cls, cfg: Any, batch_plan: Any) -> UpdatePlan:
        """From an RL recipe's config (`train.updates_per_rollout` passes, `train.max_tokens_per_micro_batch`)
        and its batch plan (rows per minibatch and micro-batch on this rank)."""
        return cls(
            cfg.train.updates_per_rollout,
            batch_plan.minibatch_per_rank,
            batch_plan.micro_batch_size,
            cfg.train.max_tokens_per_micro_batch,
        )


@dataclass
class TrainedEngine:
    """An engine the objective trains: the loss of that name goes through its backward, it steps
    after every minibatch, and its optimizer statistics are reported under `stats_prefix` (the
    first engine's as they are)."""

    loss_name: str
    engine: Any
    stats_prefix: str = ""


class UpdateObjective(Protocol):
    engines: list[TrainedEngine]
    reported: tuple[str, ...]  # metrics every rank reports, 0.0 when no step produced them

    def begin_step(self, step: Minibatch, accumulator: MetricAccumulator) -> None: ...

    def micro_batch(
        self, mb: RolloutBatch, step: Minibatch, accumulator: MetricAccumulator
    ) -> dict[str, torch.Tensor]: ...

    def end_step(self, step: Minibatch) -> None: ...


def run_update(
    batch: RolloutBatch, objective: UpdateObjective, plan: UpdatePlan, reduction: Reduction
) -> dict[str, float]:
    """The optimizer steps over `batch` (see the module docstring); returns the update's metrics:
    the objective's, each engine's optimizer statistics of the last step, `update/skipped_steps`
    and each loss's mean over the steps taken."""
    main = objective.engines[0].engine
    accumulator = MetricAccumulator()
    step_stats: dict[str, float] = {}
    losses: dict[str, list[float]] = {e.loss_name: [] for e in objective.engines}
    skipped = 0
    for _ in range(plan.updates_per_rollout):
        for rows in torch.randperm(batch.batch_size).split(plan.minibatch_rows):
            mask = batch.response_mask[rows]
            normalizer = main.all_reduce_sum(reduction.count(mask).float())
            if normalizer.item() == 0:  # nothing to train on any rank: every rank skips together
                skipped += 1
                continue
            step = Minibatch(rows, normalizer, main.all_reduce_sum(mask.sum().float()).clamp(min=1))
            micro = rollout_micro_batches(
                main, batch, rows, plan.micro_batch_rows, plan.max_tokens_per_micro_batch
            )
            accumulator.add({"update/micro_batches": float(len(micro))})
            objective.begin_step(step, accumulator)
            sums = {e.loss_name: torch.zeros((), device=main.device) for e in objective.engines}
            for micro_rows in micro:
                step_losses = objective.micro_batch(batch.select(micro_rows), step, accumulator)
                for trained in objective.engines:
                    trained.engine.backward(step_losses[trained.loss_name])
                    sums[trained.loss_name] += step_losses[trained.loss_name].detach()
            step_stats = {}
            for trained in objective.engines:
                stats = trained.engine.step()
                if trained.stats_prefix:
                    stats = {f"{trained.stats_prefix}{k.split('/')[-1]}": v for k, v in stats.items()}
                step_stats.update(stats)
            for name, total in sums.items():
                losses[name].append(float(main.all_reduce_sum(total)))
            objective.end_step(step)
    # token-weighted means over the whole step on every rank, not each rank's mean
    metrics = {**accumulator.compute_over_ranks(main), **step_stats, "update/skipped_steps": float(skipped)}
    for key in objective.reported:
        metrics.setdefault(key, 0.0)
    metrics.update({name: sum(values) / len(values) if values else 0.0 for name, values in losses.items()})
    return metrics


def micro_batches(
    engine: Any, rows: torch.Tensor, max_rows: int, budget: int = 0, tokens: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """`rows` (indices into this rank's batch) in micro-batches of `max_rows`, or with a token
    `budget` (`tokens`: each row's valid tokens) micro-batches that stay within it, as many on every
    rank as the most any needs (collective then: every rank must call it)."""
    if not budget:
        return list(rows.split(max_rows))
    rows, tokens = rows.cpu(), torch.as_tensor(tokens).cpu()
    parts = token_budget_micro_batches(rows, tokens, budget=budget, max_rows=max_rows)
    counts = torch.zeros(engine.world_size, device=engine.device)
    counts[engine.rank] = len(parts)
    count = int(engine.all_reduce_sum(counts).max())
    return token_budget_micro_batches(rows, tokens, budget=budget, max_rows=max_rows, count=count)


def rollout_micro_batches(
    engine: Any, batch: RolloutBatch, rows: torch.Tensor, max_rows: int, budget: int = 0
) -> list[torch.Tensor]:
    """`micro_batches` of a rollout's `rows`, each row counting its prompt and response tokens."""
    tokens = (batch.prompt_mask.sum(-1) + batch.attended_mask.sum(-1)).cpu()[rows.cpu()]
    return micro_batches(engine, rows, max_rows, budget, tokens)


def rollout_correction(
    correction: Any, old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """(importance weights or None when `correction.correction` is "none", metrics): the rollout
    engine/trainer mismatch of these rows and its correction (rlhf/losses/rollout_correction.py).
    `correction`: the rollout.vllm settings (correction, correction_clip_min, correction_clip_max)."""
    metrics = rollout_mismatch_metrics(old_logprobs, rollout_logprobs, response_mask)
    if correction.correction == "none":
        return None, metrics
    weights, found = rollout_importance_weights(
        old_logprobs,
        rollout_logprobs,
        response_mask,
        mode=correction.correction,
        clip_min=correction.correction_clip_min,
        clip_max=correction.correction_clip_max,
    )
    return weights, {**metrics, **found}


def apply_rollout_correction(correction: Any, batch: RolloutBatch, metrics: dict[str, float]) -> None:
    """With the engine's logprobs and the trainer's old logprobs in the batch: log their mismatch,
    and set `batch.rollout_weights` (the importance-sampling correction) unless it is off. (A
    single on-policy update needs no old-logprob pass: `behaviour_logprobs` corrects there.)"""
    if batch.rollout_logprobs is None or batch.old_logprobs is None:
        return
    batch.rollout_weights, found = rollout_correction(
        correction, batch.old_logprobs, batch.rollout_logprobs, batch.response_mask
    )
    metrics.update({k: float(v) for k, v in found.items()})


def behaviour_logprobs(
    correction: Any, mb: RolloutBatch, logprobs: torch.Tensor, accumulator: MetricAccumulator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(old logprobs, rollout importance weights) for a micro-batch: the rollout's old logprobs
    and weights when they were computed in a pass of their own; else (one on-policy update) the
    detached current logprobs, with the engine's mismatch measured and corrected here."""
    if mb.old_logprobs is not None:
        return mb.old_logprobs, mb.rollout_weights
    old = logprobs.detach()
    if mb.rollout_logprobs is None:
        return old, mb.rollout_weights
    weights, found = rollout_correction(correction, old, mb.rollout_logprobs, mb.response_mask)
    accumulator.add(found, weight=float(mb.response_mask.sum()))
    return old, weights


@dataclass
class PolicyGradientObjective:
    """The policy side of GRPO and PPO from a recipe config (`loss.*`, `rollout.*`): per
    micro-batch, the current logprobs (with entropy) under the forward `options` (layout and
    sampling warp), and the registered
    policy loss with KL, token masks and weights; the entropy bonus (GRPO's adaptive coefficient, a
    share of the step's mean token entropy) or PPO's entropy term. `ratio_logprobs` (PPO's macro
    ratio) maps (logprobs, micro-batch rows) to the logprobs the ratio is taken of."""

    cfg: Any
    engine: Any
    reduction: Reduction
    options: ForwardOptions
    kl_estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    loss_args: dict[str, float] | None = None
    entropy_coef: EntropyCoefficient | None = None
    ratio_logprobs: Callable[[torch.Tensor, RolloutBatch], torch.Tensor] | None = None
    engines: list[TrainedEngine] = field(default_factory=list)
    reported: tuple[str, ...] = (
        "clip/low_fraction",
        "clip/high_fraction",
        "clip/fraction",
        "ratio/mean",
        "loss/policy_token_mean",
        "entropy",
        "optim/lr",
        "optim/grad_norm",
    )

    def __post_init__(self) -> None:
        loss = self.cfg.loss
        self.loss_args = loss.policy_loss_options() if self.loss_args is None else self.loss_args
        self.entropy_coef = self.entropy_coef or EntropyCoefficient(loss.entropy_coef)
        self.engines = self.engines or [TrainedEngine("loss", self.engine)]
        if loss.kl_coef != 0.0 and self.kl_estimator is not None:
            clamped = getattr(loss, "kl_log_ratio_clamp", None) is not None
            self.reported += ("kl/mean",) + (("kl/clamp_fraction",) if clamped else ())
        self._entropy_sum = torch.zeros((), device=self.engine.device)

    def begin_step(self, step: Minibatch, accumulator: MetricAccumulator) -> None:
        accumulator.add({"loss/entropy_coef": self.entropy_coef.applied})
        self._entropy_sum = torch.zeros((), device=self.engine.device)

    def end_step(self, step: Minibatch) -> None:
        self.entropy_coef.update(float(self.engine.all_reduce_sum(self._entropy_sum) / step.tokens))

    def micro_batch(
        self, mb: RolloutBatch, step: Minibatch, accumulator: MetricAccumulator
    ) -> dict[str, torch.Tensor]:
        bonus = self.entropy_coef.applied / step.tokens
        loss, entropy = self.policy_loss(mb, step, accumulator, entropy_grad=bool(bonus))
        if bonus:  # the step's mean token entropy, whatever the aggregation (TRL's definition)
            loss = loss - bonus * masked_sum(entropy, mb.response_mask)
        self._entropy_sum += masked_sum(entropy.detach(), mb.response_mask)
        return {"loss": loss}

    def policy_loss(
        self, mb: RolloutBatch, step: Minibatch, accumulator: MetricAccumulator, entropy_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this micro-batch's share of the step's policy loss, its token entropies [B, T])."""
        cfg = self.cfg.loss
        logprobs, entropy = response_logprobs(
            self.engine.model,
            mb.prompt_ids,
            mb.prompt_mask,
            mb.response_ids,
            mb.attended_mask,  # an episode's tool tokens are read, not trained
            self.options,
            with_entropy=True,
            entropy_grad=entropy_grad,
        )
        tokens = float(mb.response_mask.sum())
        old, rollout_weights = behaviour_logprobs(self.cfg.rollout.vllm, mb, logprobs, accumulator)
        masks, mask_metrics = token_masks(cfg, self.engine, mb, logprobs, entropy)
        accumulator.add(mask_metrics, weight=tokens)
        ratio_logprobs = logprobs if self.ratio_logprobs is None else self.ratio_logprobs(logprobs, mb)
        out = policy_gradient_loss(
            ratio_logprobs,
            old,
            mb.advantages,
            mb.response_mask,
            reduction=self.reduction,
            normalizer=step.normalizer,
            policy_loss=cfg.policy_loss,
            policy_loss_args=self.loss_args,
            token_weights=mb.token_weights,
            entropy=entropy.detach(),
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            dual_clip=cfg.dual_clip,
            delta=getattr(cfg, "delta", None),
            loss_weights=masks,
            ref_logprobs=mb.ref_logprobs if self.kl_estimator is not None else None,
            kl_coef=cfg.kl_coef if self.kl_estimator is not None else 0.0,
            kl_estimator=self.kl_estimator,
            kl_log_ratio_clamp=getattr(cfg, "kl_log_ratio_clamp", None),
            kl_ratio_correction=getattr(cfg, "kl_ratio_correction", False),
            token_budget=self.cfg.rollout.max_new_tokens,
            rollout_weights=rollout_weights,
        )
        accumulator.add(out.metrics, weight=tokens)
        accumulator.add({"entropy": masked_sum(entropy, mb.response_mask) / max(tokens, 1.0)}, weight=tokens)
        return out.loss, entropy


def token_masks(
    loss_cfg: Any, engine: Any, mb: RolloutBatch, logprobs: torch.Tensor, entropy: torch.Tensor
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """(loss weights or None, metrics): the top-entropy-quantile token mask (the quantile of this
    micro-batch's tokens on all ranks, as TRL takes it; collective) and DeepSeek-V3.2's off-policy
    sequence mask (against the sampling engine's logprobs, else the old policy's)."""
    weights, metrics = None, {}
    quantile = getattr(loss_cfg, "top_entropy_quantile", 1.0)
    if quantile < 1.0:
        pool = gathered_values(entropy.detach().float()[mb.response_mask], engine)
        weights = high_entropy_mask(entropy, mb.response_mask, quantile=quantile, pool=pool)
        metrics["loss/entropy_kept_fraction"] = masked_mean(weights, mb.response_mask)
    threshold = getattr(loss_cfg, "off_policy_mask_threshold", None)
    if threshold is not None:
        behaviour = mb.rollout_logprobs if mb.rollout_logprobs is not None else mb.old_logprobs
        behaviour = logprobs.detach() if behaviour is None else behaviour
        kept = off_policy_sequence_mask(
            mb.advantages, logprobs, behaviour, mb.response_mask, threshold=threshold
        )
        metrics["loss/off_policy_masked_fraction"] = 1.0 - masked_mean(
            kept.expand_as(logprobs), mb.response_mask
        )
        weights = kept if weights is None else weights * kept
    return weights, metrics


@dataclass
class ActorCriticObjective(PolicyGradientObjective):
    """PPO's update: the policy loss (with `loss.entropy_coef` times the reduced token entropy
    subtracted, PPO's own entropy term) and the critic's clipped value loss against `returns`, each
    through its own engine, regressing on the batch's `returns` from its `old_values`."""

    critic: Any = None
    value_clip: float | None = None

    def __post_init__(self) -> None:
        self.ppo_entropy_coef = self.cfg.loss.entropy_coef
        self.entropy_coef = EntropyCoefficient(0.0)  # not GRPO's step-mean bonus
        self.engines = [
            TrainedEngine("loss", self.engine),
            TrainedEngine("loss/value", self.critic, "critic/"),
        ]
        super().__post_init__()

    def begin_step(self, step: Minibatch, accumulator: MetricAccumulator) -> None:
        accumulator.add({"loss/entropy_coef": self.ppo_entropy_coef})

    def end_step(self, step: Minibatch) -> None:
        """PPO's entropy coefficient is fixed."""

    def micro_batch(
        self, mb: RolloutBatch, step: Minibatch, accumulator: MetricAccumulator
    ) -> dict[str, torch.Tensor]:
        loss, entropy = self.policy_loss(mb, step, accumulator, entropy_grad=self.ppo_entropy_coef != 0)
        if self.ppo_entropy_coef:
            loss = loss - self.ppo_entropy_coef * self.reduction.reduce(
                entropy, mb.response_mask, normalizer=step.normalizer
            )
        value_out = clipped_value_loss(
            token_values(
                self.critic.model,
                mb.prompt_ids,
                mb.prompt_mask,
                mb.response_ids,
                mb.attended_mask,
                self.options,
            ),
            mb.old_values,
            mb.returns,
            mb.response_mask,
            reduction=self.reduction,
            normalizer=step.normalizer,
            clip_range=self.value_clip,
        )
        accumulator.add(value_out.metrics, weight=float(mb.response_mask.sum()))
        return {"loss": loss, "loss/value": value_out.loss}
