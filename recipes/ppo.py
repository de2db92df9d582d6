"""PPO with a critic for RLHF (InstructGPT, arXiv 2203.02155; PPO, arXiv 1707.06347).

Each step samples completions, scores them with a frozen reward model and/or reward functions,
builds token rewards (k1 KL penalty to the reference on every token, the clipped and optionally
normalised score on each row's last valid token, plus dense sources: RTO's DPO token reward
with `rto.dpo_model`, arXiv 2404.18922), runs GAE with the
critic's values (`advantage.estimator=gae`; over tokens, or over macro actions with
`advantage.macro.segmenter`: MA-RLHF, arXiv 2410.02743), whitens the advantages over all ranks,
and takes `num_minibatches x updates_per_rollout` policy steps (the registered `loss.policy_loss`, clipped by
default; rlhf/losses/policy.py) and clipped value steps on the rollout. Policy and critic have their own engines
and optimizers. The KL coefficient is fixed or adaptive (proportional control to a target KL).
Defaults follow DeepSpeed-Chat / the MA-RLHF and CD-RLHF code: gamma 1, lambda 0.95, clip 0.2,
value clip 0.2, KL 0.05. Generation: `transformers` generate or a colocated vLLM engine
(rollout.engine=vllm). Simplification: the reward model must share the policy's tokenizer.

Launch:  python -m recipes.ppo reward_model.name_or_path=<rm export> model=pretrained model.name_or_path=<sft export>
         torchrun --nproc_per_node 2 -m recipes.ppo distributed=zero2 ...
"""

from __future__ import annotations

from rlhf.overrides import check_recipe_command_line

if __name__ == "__main__":  # a wrong key is refused in seconds, before the heavy imports below
    check_recipe_command_line("ppo", __file__)


import dataclasses
import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from rlhf.advantages import CriticInputs, get_advantage_estimator
from rlhf.agents.agent import build_agent
from rlhf.config import ConfigError, ModelConfig, PPOConfig, plan_ppo_batches, register_configs
from rlhf.data.load import load_task_data
from rlhf.data.sampler import EpochSampler, rank_slice
from rlhf.distributed import build_engine, launcher_env, run_entry_point
from rlhf.distributed.collectives import gathered_values, mean_over_ranks
from rlhf.eval.heldout import HeldoutEvaluation
from rlhf.intrinsic import Curiosity, CuriosityModel
from rlhf.losses.kl import k1
from rlhf.losses.reduce import get_reduction
from rlhf.metrics import token_mean_weights
from rlhf.models.forward import response_logprobs, response_logprobs_and_states, sequence_scores, token_values
from rlhf.models.load import (
    load_causal_lm,
    load_policy,
    load_reference,
    load_scorer,
)
from rlhf.models.options import ForwardOptions
from rlhf.models.shared_prefix import model_config
from rlhf.ops import masked_mean, masked_sum, masked_whiten
from rlhf.plots import plot_metrics
from rlhf.rollout.ahead import rollout_of_step, start_rollouts_ahead, take_rollout
from rlhf.rollout.engine import build_rollout_engine
from rlhf.rollout.prompts import rl_prompts
from rlhf.rollout.records import log_rollout_sample
from rlhf.rollout.sampling import SamplingParams
from rlhf.run import Run, recipe_config
from rlhf.scoring import build_rewards, score_rollout
from rlhf.segments import macro_ratio_logprobs, make_segmenter, num_segments
from rlhf.shaping import (
    DPOTokenReward,
    RunningMoments,
    compose_token_rewards,
    make_kl_controller,
)
from rlhf.update import ActorCriticObjective, UpdatePlan, apply_rollout_correction, micro_batches, run_update


@dataclasses.dataclass
class PPOModels:
    """Everything PPO runs besides the policy: critic, reference, reward model, token sources."""

    critic: Any
    reference: Any
    reward_model: Any
    dense_sources: list
    curiosity: Curiosity | None
    segmenter: Any
    split: Any  # batch -> its rows in micro-batches (`_splitter`)
    options: ForwardOptions  # every pass's layout (model.*) and the sampling warp (rollout.*)


def train(cfg: PPOConfig) -> dict[str, float | str]:
    """Run PPO; returns the last step's metrics, the final checkpoint and the run directory."""
    # Setup: validate batch arithmetic, rewards and data before any model loads.
    env = launcher_env()
    plan = plan_ppo_batches(cfg, env.world_size)
    reduction = get_reduction(cfg.loss.aggregation)
    train_rows, eval_rows = load_task_data(cfg.data)
    rewards = build_rewards(cfg.reward, cfg.data, {"train": train_rows, "eval": eval_rows})
    run = Run.open("ppo", cfg, env, cfg.train.total_steps(len(train_rows)))
    tokenizer, train_rows, eval_rows = rl_prompts(cfg, train_rows, eval_rows)
    agent = build_agent(cfg, tokenizer, train_rows, rewards)  # tools and environments: episodes
    optimizer_steps = run.total_steps * cfg.train.num_minibatches * cfg.train.updates_per_rollout
    policy = build_engine(
        lambda: load_policy(cfg.model, tokenizer, seed=cfg.seed),
        cfg.optim,
        cfg.distributed,
        optimizer_steps,
        plan.micro_batch_size,
        cfg.train.precision,
    )
    models = _build_models(cfg, policy, tokenizer, plan, optimizer_steps)
    kl_controller = make_kl_controller(
        cfg.loss.kl_controller, cfg.loss.kl_coef, cfg.loss.kl_target, cfg.loss.kl_horizon
    )
    score_moments = RunningMoments()
    sampling = SamplingParams.from_config(cfg.rollout)
    sampler = EpochSampler(len(train_rows), seed=cfg.seed)
    stateful = {"sampler": sampler, "kl_controller": kl_controller, "score_moments": score_moments}
    stateful.update({"curiosity": models.curiosity} if models.curiosity else {})
    run.attach(policy, tokenizer, stateful, {"critic": models.critic})  # restores them when resuming
    g = cfg.rollout.group_size
    rollout = build_rollout_engine(cfg, policy, tokenizer, env.rank)  # rollout.engine
    heldout = HeldoutEvaluation(
        eval_rows,
        cfg,
        rollout,
        lambda batch: _score(cfg, rewards, models, batch, policy, {}),
        [r.name for r in rewards] + (["reward_model"] if models.reward_model is not None else []),
        agent,
    )
    run.evaluate_with(heldout if heldout.enabled else None, cfg.eval.every)
    metrics: dict[str, float] = {}
    with run:
        run.on_close(rollout.close)
        run.message(heldout.description)
        result = run.evaluate_before()
        record_topk = cfg.curiosity.top_k if models.curiosity else None
        ahead = start_rollouts_ahead(cfg, run, rollout, train_rows, sampler, sampling, agent, record_topk)
        for step in run.steps():
            started = time.perf_counter()
            # 1 rollout: this rank's prompts, G samples each, with the policy's weights after the
            #   last update (or, generated ahead, at most rollout.max_staleness updates older)
            indices = sampler.next_indices(cfg.train.prompts_per_step)
            if ahead is not None:
                batch, metrics = take_rollout(ahead, step, indices)
            else:
                rows = train_rows.select(rank_slice(indices, env.rank, env.world_size))
                batch, metrics = rollout_of_step(
                    cfg, run, rollout, rows, sampling, agent, step, step - 1, record_topk
                )
            metrics["time/generate"] = time.perf_counter() - started
            metrics.pop("rollout/tokens")

            # 2 score: reward functions and/or the reward model, normalised; unscored rows not trained
            passes_started = time.perf_counter()
            raw_scores, valid, _ = _score(cfg, rewards, models, batch, policy, metrics)
            scores = raw_scores
            if cfg.shaping.normalize:
                score_moments.update(gathered_values(raw_scores[valid], policy))
                scores = score_moments.normalize(raw_scores)
            batch.response_mask = batch.response_mask & valid.unsqueeze(-1)

            # 3 logprob and value passes (no grad): old policy, reference, critic, dense token sources
            old_values, dense = _passes(cfg, policy, models, batch, metrics)
            metrics["time/logprob_passes"] = time.perf_counter() - passes_started

            # 4 token rewards (KL on every token, score on the last, dense sources) and GAE advantages
            token_rewards, kl = _token_rewards(cfg, batch, scores, dense, kl_controller.value, metrics)
            batch.returns, batch.segment_ids = _advantages(
                cfg, models.segmenter, batch, token_rewards, old_values, policy, step, metrics
            )
            batch.old_values = old_values

            # 5 update: policy and critic, minibatches x updates_per_rollout, micro-batches accumulate
            update_started = time.perf_counter()
            objective = ActorCriticObjective(
                cfg,
                policy,
                reduction,
                models.options,
                ratio_logprobs=_macro_ratio
                if cfg.advantage.macro.ratio == "macro" and models.segmenter
                else None,
                critic=models.critic,
                value_clip=cfg.critic.value_clip,
            )
            metrics.update(run_update(batch, objective, UpdatePlan.from_config(cfg, plan), reduction))
            if models.curiosity:  # after the rewards were read from it, as the authors order it
                metrics.update(models.curiosity.update(batch))
                batch.ref_states = batch.ref_next_states = None
            metrics["time/update"] = time.perf_counter() - update_started
            if ahead is not None:  # the servers get the new weights now, while they generate
                metrics["time/weight_sync"] = rollout.sync_weights(step)
                ahead.publish(step)

            # 6 log, adapt the KL coefficient, evaluate (checkpoints and stops: in run.steps)
            metrics["time/step"] = time.perf_counter() - started
            metrics = mean_over_ranks(metrics, policy, token_mean_weights(metrics, batch.response_mask.sum()))
            kl_controller.update(metrics["kl/sequence_mean"], cfg.train.prompts_per_step * g)
            if run.end_step(step, metrics):  # evaluated every eval.every steps, logged by logger.log_every
                per_token = {"logprobs": batch.old_logprobs, "ref_logprobs": batch.ref_logprobs, "kl": kl}
                per_token.update(rewards=token_rewards, values=old_values, advantages=batch.advantages)
                per_token["segment_ids"] = batch.segment_ids
                log_rollout_sample(run.loggers, cfg.logger, batch, tokenizer, step, raw_scores, per_token)
        run.finish()
        result.update(run.evaluate_after(metrics))
    if policy.is_main:
        plot_metrics(run.dir, PLOTTED, "ppo_curves.png", "PPO")
    return run.result(metrics, result)


PLOTTED = [
    "reward/mean",
    "reward/model_mean",
    "accuracy",
    "kl/sequence_mean",
    "response/length_mean",
    "value/error",
    "eval/accuracy",
]


def _build_models(cfg: PPOConfig, policy, tokenizer, plan, optimizer_steps: int) -> PPOModels:
    """Critic (own engine and optimizer), frozen reference and reward model, token sources, segmenter."""
    critic_cfg = _critic_model_config(cfg)
    critic = build_engine(
        lambda: load_scorer(critic_cfg, tokenizer, seed=cfg.seed, per_token=True),
        cfg.critic.optim,
        cfg.distributed,
        optimizer_steps,
        plan.micro_batch_size,
        cfg.train.precision,
    )
    reference = load_reference(cfg.model, tokenizer, policy, seed=cfg.seed)
    reward_model = None
    if cfg.reward_model.name_or_path:
        rm_cfg = cfg.model.pretrained_like(cfg.reward_model.name_or_path, cfg.reward_model.dtype)
        reward_model = policy.prepare_frozen(lambda: load_scorer(rm_cfg, tokenizer))
        if reward_model.config.vocab_size < len(tokenizer):
            raise ConfigError(
                f"reward_model.name_or_path={cfg.reward_model.name_or_path!r} has a vocabulary of {reward_model.config.vocab_size}; the policy tokenizer has {len(tokenizer)} tokens: they must share a tokenizer"
            )
    split = _splitter(cfg, policy, plan.micro_batch_size)
    options = ForwardOptions.from_config(cfg.model, SamplingParams.from_config(cfg.rollout).warp())
    dense_sources = _dense_sources(cfg, policy, tokenizer, split, options)
    curiosity = _curiosity(cfg, policy, reference)
    if curiosity:
        dense_sources.append(curiosity)
    segmenter = make_segmenter(cfg.advantage.macro, tokenizer, seed=cfg.seed)
    return PPOModels(critic, reference, reward_model, dense_sources, curiosity, segmenter, split, options)


def _score(
    cfg: PPOConfig, rewards, models: PPOModels, batch, policy, metrics: dict
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(scores [B], valid [B], each reward's values [B] with `reward_model`'s): reward functions
    plus the weighted reward model. A row is valid when the reward model or at least one reward
    function scored it; the others are not trained on."""
    reward_model = models.reward_model
    scores = torch.zeros(batch.batch_size, device=policy.device)
    valid = torch.ones(batch.batch_size, dtype=torch.bool, device=policy.device)
    per_reward: dict[str, torch.Tensor] = {}
    if rewards:
        function_scores, scored, per_reward, reward_metrics = score_rollout(rewards, batch, cfg.reward)
        scores += function_scores.to(policy.device)
        valid = scored.to(policy.device) | (reward_model is not None)
        metrics.update(reward_metrics)
        if cfg.reward.accuracy_reward in per_reward:
            metrics["accuracy"] = float((per_reward[cfg.reward.accuracy_reward] >= 1.0).float().mean())
    if reward_model is not None:
        with torch.no_grad():
            rm_scores = _batched(
                lambda *rows: sequence_scores(reward_model, *rows, models.options), batch, models.split
            )
        scores += cfg.reward_model.weight * rm_scores
        per_reward["reward_model"] = rm_scores.float()
        metrics["reward/model_mean"] = float(rm_scores.mean())
    metrics["reward/mean"] = float(scores[valid].mean()) if valid.any() else 0.0
    metrics["reward/unscored_fraction"] = float((~valid).float().mean())
    return scores, valid, per_reward


@torch.no_grad()
def _passes(cfg: PPOConfig, policy, models: PPOModels, batch, metrics: dict):
    """Old and reference logprobs into the batch (with the curiosity states when on); returns the
    critic's values and the dense token rewards by source name."""
    options = models.options
    batch.old_logprobs = _batched(
        lambda *rows: response_logprobs(policy.model, *rows, options)[0], batch, models.split
    )
    apply_rollout_correction(cfg.rollout.vllm, batch, metrics)  # with the engine's own logprobs
    if models.curiosity:  # the reference pass also yields the curiosity module's states
        parts = [
            response_logprobs_and_states(models.reference, *_tensors(batch, rows), options)
            for rows in models.split(batch)
        ]
        batch.ref_logprobs, batch.ref_states, batch.ref_next_states = (
            torch.cat(part) for part in zip(*parts, strict=True)
        )
    else:
        batch.ref_logprobs = _batched(
            lambda *rows: response_logprobs(models.reference, *rows, options)[0], batch, models.split
        )
    old_values = _batched(
        lambda *rows: token_values(models.critic.model, *rows, options), batch, models.split
    )
    dense = {}
    for source in models.dense_sources:  # RTO's DPO token reward, CD-RLHF's curiosity
        dense[source.name], source_metrics = source(batch)
        metrics.update(source_metrics)
    return old_values, dense


def _token_rewards(cfg: PPOConfig, batch, scores, dense: dict, kl_coef: float, metrics: dict):
    """(token rewards [B, T], k1 KL [B, T]): -kl_coef * KL on every token, the clipped score on each
    row's last token, the dense sources; with the KL metrics."""
    mask = batch.response_mask
    kl = k1(batch.old_logprobs, batch.ref_logprobs)
    if batch.turn_rewards is not None:  # an environment's per-turn rewards, at each turn's end
        dense = {**dense, "turns": batch.turn_rewards}
    token_rewards, shaping_metrics = compose_token_rewards(
        scores, mask, kl=kl, kl_coef=kl_coef, dense=dense, score_clip=cfg.shaping.score_clip
    )
    metrics.update({k: float(v) for k, v in shaping_metrics.items()})
    metrics["kl/sequence_mean"] = float(masked_sum(kl, mask, dim=-1).mean())
    metrics["kl/mean"] = float(masked_mean(kl, mask))
    metrics["kl/coef"] = kl_coef
    return token_rewards, kl


def _advantages(
    cfg: PPOConfig, segmenter, batch, token_rewards, old_values, policy, step: int, metrics: dict
):
    """GAE over tokens, or over macro actions (MA-RLHF), whitened over all ranks into
    batch.advantages; returns (returns, segment ids or None)."""
    mask = batch.response_mask
    segment_ids = None if segmenter is None else segmenter(batch, step * policy.world_size + policy.rank)
    estimator = get_advantage_estimator(cfg.advantage.estimator, "critic")
    inputs = CriticInputs(token_rewards, old_values, mask, segment_ids)
    advantages, returns = estimator.compute(inputs, cfg.advantage)  # each token takes its segment's values
    if segment_ids is not None:
        segments = num_segments(segment_ids).float()
        metrics["macro/segments_mean"] = float(segments.mean())
        metrics["macro/segment_length_mean"] = float(mask.sum(1).float().sum() / segments.sum().clamp(min=1))
    if cfg.advantage.whiten:
        reduce = policy.all_reduce_sum if policy.world_size > 1 else None
        advantages = masked_whiten(advantages, mask, all_reduce_sum=reduce)
    batch.advantages = advantages
    metrics["value/returns_mean"] = float(masked_mean(returns, mask))
    return returns, segment_ids


def _critic_model_config(cfg: PPOConfig) -> ModelConfig:
    if cfg.critic.init == "policy":
        return dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, enabled=False))
    path = cfg.reward_model.name_or_path if cfg.critic.init == "reward_model" else cfg.critic.name_or_path
    return cfg.model.pretrained_like(path)


def _curiosity(cfg: PPOConfig, policy, reference) -> Curiosity | None:
    """CD-RLHF's curiosity module on the reference's hidden states and the policy's embeddings."""
    c = cfg.curiosity
    if c.eta == 0:
        return None
    if c.top_k < 1:
        raise ConfigError(f"curiosity.top_k={c.top_k} must be at least 1")
    config = model_config(reference)
    policy_config = model_config(policy.module)
    embeddings = policy.module.get_input_embeddings()

    def embed(ids: torch.Tensor) -> torch.Tensor:  # under ZeRO-3 the table is partitioned: gather it
        with policy.gathered_parameters(embeddings.parameters()):
            return embeddings(ids)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the same module on every rank
        module = CuriosityModel(
            config.hidden_size,
            embeddings.embedding_dim,
            c.intermediate_size or policy_config.intermediate_size,
        ).to(policy.device)
    return Curiosity(
        module,
        embed,
        eta=c.eta,
        lr=c.lr,
        weight_decay=c.weight_decay,
        all_reduce_sum=policy.all_reduce_sum,
        world_size=policy.world_size,
    )


def _dense_sources(cfg: PPOConfig, policy, tokenizer, split, options: ForwardOptions) -> list:
    """Dense token-reward sources for the shaping step: RTO's DPO token reward when configured."""
    if not cfg.rto.dpo_model:
        return []
    if cfg.rto.reference not in ("policy", "dpo_reference"):
        raise ConfigError(f"rto.reference={cfg.rto.reference!r}; choose policy or dpo_reference")
    if cfg.rto.reference == "dpo_reference" and not cfg.rto.dpo_reference_model:
        raise ConfigError("rto.reference=dpo_reference needs rto.dpo_reference_model")

    def frozen_logprobs(path: str):
        model_cfg = cfg.model.pretrained_like(path)
        model = policy.prepare_frozen(lambda: load_causal_lm(model_cfg, tokenizer))
        return lambda batch: _batched(lambda *rows: response_logprobs(model, *rows, options)[0], batch, split)

    reference = frozen_logprobs(cfg.rto.dpo_reference_model) if cfg.rto.reference == "dpo_reference" else None
    return [DPOTokenReward(frozen_logprobs(cfg.rto.dpo_model), reference, cfg.rto.scale, cfg.rto.clip)]


def _tensors(batch, rows):
    return (
        batch.prompt_ids[rows],
        batch.prompt_mask[rows],
        batch.response_ids[rows],
        batch.attended_mask[rows],
    )


def _splitter(cfg: PPOConfig, policy, micro_batch_size: int):
    """batch -> its rows in micro-batches, in order: `micro_batch_size` rows each, or with
    `train.max_tokens_per_micro_batch` by token budget, as many on every rank as the most any needs."""

    def split(batch, rows: torch.Tensor | None = None) -> list[torch.Tensor]:
        rows = torch.arange(batch.batch_size) if rows is None else rows
        tokens = (batch.prompt_mask.sum(-1) + batch.attended_mask.sum(-1)).cpu()[rows.cpu()]
        return micro_batches(policy, rows, micro_batch_size, cfg.train.max_tokens_per_micro_batch, tokens)

    return split


def _batched(compute, batch, split) -> torch.Tensor:
    """compute(prompt_ids, prompt_mask, response_ids, response_mask) over `split`'s micro-batches,
    concatenated in row order."""
    return torch.cat([compute(*_tensors(batch, rows)) for rows in split(batch)])


def _macro_ratio(logprobs: torch.Tensor, mb) -> torch.Tensor:
    """MA-RLHF with `advantage.macro.ratio=macro`: the ratio clipped is each segment's product."""
    return macro_ratio_logprobs(logprobs, mb.old_logprobs, mb.segment_ids)


@hydra.main(config_path="../configs", config_name="ppo", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: PPOConfig = recipe_config(PPOConfig, dict_cfg)
    result = train(cfg)
    if launcher_env().is_main:
        print(f"PPO finished at step {result['step']}; checkpoint: {result['checkpoint']}")


register_configs()

if __name__ == "__main__":
    run_entry_point(main)
