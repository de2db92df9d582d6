"""Batch arithmetic: the numbers a recipe derives from its config (rollouts per rank, minibatches,
micro-batches, accumulation), checked to divide, computed into a `BatchPlan` and never written
back into the config."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.config.checks import ConfigError
from rlhf.config.common import check_reference_sync
from rlhf.config.preference import AlignDistilConfig, DPOConfig, RewardModelConfig, SFTConfig
from rlhf.config.rl import GRPOConfig, GRPOTrainConfig, PPOConfig


@dataclass(frozen=True)
class BatchPlan:
    """Batch arithmetic derived from a config and the world size."""

    world_size: int
    prompts_per_rank: int
    rollouts_per_rank: int
    minibatch_per_rank: int
    micro_batches_per_minibatch: int
    micro_batch_size: int


def plan_rollout_batches(train: GRPOTrainConfig, group_size: int, world_size: int = 1) -> BatchPlan:
    """Checks that prompts, group size, minibatches, micro-batches and ranks divide; shows the numbers."""
    t, g = train, group_size
    for name, value in [
        ("train.prompts_per_step", t.prompts_per_step),
        ("rollout.group_size", g),
        ("train.num_minibatches", t.num_minibatches),
        ("train.micro_batch_size", t.micro_batch_size),
        ("train.updates_per_rollout", t.updates_per_rollout),
    ]:
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if t.prompts_per_step % world_size:
        raise ConfigError(
            f"train.prompts_per_step={t.prompts_per_step} does not divide over {world_size} ranks "
            f"({t.prompts_per_step} / {world_size} = {t.prompts_per_step / world_size:g}); groups stay on one rank"
        )
    prompts_per_rank = t.prompts_per_step // world_size
    rollouts_per_rank = prompts_per_rank * g
    if rollouts_per_rank % t.num_minibatches:
        raise ConfigError(
            f"rollouts per rank = train.prompts_per_step {t.prompts_per_step} / {world_size} ranks x "
            f"rollout.group_size {g} = {rollouts_per_rank}, which train.num_minibatches={t.num_minibatches} "
            f"does not divide ({rollouts_per_rank} / {t.num_minibatches} = {rollouts_per_rank / t.num_minibatches:g})"
        )
    minibatch = rollouts_per_rank // t.num_minibatches
    micro = min(t.micro_batch_size, minibatch)
    if minibatch % micro:
        raise ConfigError(
            f"minibatch per rank = {rollouts_per_rank} rollouts / train.num_minibatches {t.num_minibatches} = "
            f"{minibatch}, which train.micro_batch_size={t.micro_batch_size} does not divide "
            f"({minibatch} / {micro} = {minibatch / micro:g})"
        )
    return BatchPlan(world_size, prompts_per_rank, rollouts_per_rank, minibatch, minibatch // micro, micro)


def plan_grpo_batches(cfg: GRPOConfig, world_size: int = 1) -> BatchPlan:
    """Batch arithmetic plus GRPO's own checks, before any model loads; what an estimator allows is
    read from its registry entry (rlhf/advantages.py)."""
    from rlhf.advantages import ADVANTAGE_ESTIMATORS, get_advantage_estimator

    estimator = get_advantage_estimator(cfg.advantage.estimator, "groups")
    grouped = not estimator.single_sample or cfg.loss.policy_loss == "gtpo"
    if cfg.rollout.group_size < 2 and (grouped or cfg.advantage.dynamic_sampling):
        raise ConfigError(
            f"rollout.group_size={cfg.rollout.group_size}: advantage.estimator={cfg.advantage.estimator} "
            f"with loss.policy_loss={cfg.loss.policy_loss} needs at least 2 samples per prompt"
        )
    if cfg.reward.overlong_buffer >= cfg.rollout.max_new_tokens:
        raise ConfigError(
            f"reward.overlong_buffer={cfg.reward.overlong_buffer} must be shorter than "
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}"
        )
    if cfg.loss.policy_loss == "gtpo" and not estimator.one_per_response:
        usable = sorted(name for name, e in ADVANTAGE_ESTIMATORS.items() if e.one_per_response)
        raise ConfigError(
            f"loss.policy_loss=gtpo finds conflicts by each response's advantage sign: it needs one advantage "
            f"per response (advantage.estimator in {usable}), got {cfg.advantage.estimator}"
        )
    if estimator.normalises_each_reward and cfg.loss.kl_coef != 0.0 and cfg.loss.kl_placement == "reward":
        raise ConfigError(
            f"advantage.estimator={cfg.advantage.estimator} normalises each reward function: put the KL in the loss"
        )
    if cfg.rollout.max_staleness and cfg.advantage.dynamic_sampling:
        raise ConfigError(
            "rollout.max_staleness with advantage.dynamic_sampling: the extra sampling rounds are decided "
            "after scoring, in step with the other ranks, which rollouts generated ahead cannot be; use one"
        )
    if cfg.advantage.dynamic_sampling and cfg.advantage.drop_zero_variance_groups:
        raise ConfigError(
            "advantage.dynamic_sampling replaces zero-variance groups; drop_zero_variance_groups masks them: pick one"
        )
    check_vespo_correction(cfg)
    check_reference_sync(cfg, cfg.loss.kl_coef != 0.0, "loss.kl_coef=0 loads no reference")
    plan = plan_rollout_batches(cfg.train, cfg.rollout.group_size, world_size)
    if not cfg.reward.functions:
        raise ConfigError("reward.functions is empty: GRPO needs at least one reward function")
    return plan


def check_vespo_correction(cfg) -> None:
    """VESPO folds the rollout engine's token weights into its sequence weight (as TRL does)."""
    from rlhf.losses.policy import POLICY_LOSSES

    modes = ("token_truncate", "token_mask", "none")
    if (
        POLICY_LOSSES[cfg.loss.policy_loss].token_corrections_only
        and cfg.rollout.engine in ("vllm", "vllm_server")
        and cfg.rollout.vllm.correction not in modes
    ):
        raise ConfigError(
            f"loss.policy_loss={cfg.loss.policy_loss} takes token-level rollout corrections {modes}, got "
            f"rollout.vllm.correction={cfg.rollout.vllm.correction}"
        )


def plan_ppo_batches(cfg: PPOConfig, world_size: int = 1) -> BatchPlan:
    """Batch arithmetic plus PPO's own checks, before any model loads."""
    plan = plan_rollout_batches(cfg.train, cfg.rollout.group_size, world_size)
    if cfg.advantage.macro.ratio == "macro" and cfg.loss.policy_loss != "clipped":
        raise ConfigError(
            f"advantage.macro.ratio=macro clips each segment's ratio: it needs loss.policy_loss=clipped, "
            f"got {cfg.loss.policy_loss}"
        )
    check_vespo_correction(cfg)
    if not cfg.reward.functions and not cfg.reward_model.name_or_path:
        raise ConfigError("PPO needs a score: set reward_model.name_or_path, reward.functions, or both")
    if cfg.critic.init == "reward_model" and not cfg.reward_model.name_or_path:
        raise ConfigError(
            "critic.init=reward_model needs reward_model.name_or_path (or use critic.init=policy)"
        )
    if cfg.critic.init == "path" and not cfg.critic.name_or_path:
        raise ConfigError("critic.init=path needs critic.name_or_path")
    return plan


def plan_sft_batches(
    cfg: SFTConfig | RewardModelConfig | DPOConfig | AlignDistilConfig, world_size: int = 1
) -> BatchPlan:
    """Batch arithmetic for recipes that train on dataset rows (SFT rows, reward-model pairs)."""
    t = cfg.train
    if t.batch_size < 1 or t.micro_batch_size < 1:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) and train.micro_batch_size ({t.micro_batch_size}) must be >= 1"
        )
    if t.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size={t.batch_size} does not divide over {world_size} ranks "
            f"({t.batch_size} / {world_size} = {t.batch_size / world_size:g})"
        )
    per_rank = t.batch_size // world_size
    micro = min(t.micro_batch_size, per_rank)
    if per_rank % micro:
        raise ConfigError(
            f"batch per rank = train.batch_size {t.batch_size} / {world_size} ranks = {per_rank}, which "
            f"train.micro_batch_size={t.micro_batch_size} does not divide ({per_rank} / {micro} = {per_rank / micro:g})"
        )
    return BatchPlan(world_size, per_rank, per_rank, per_rank, per_rank // micro, micro)
