"""PPO with a critic for RLHF (InstructGPT, arXiv 2203.02155; PPO, arXiv 1707.06347).

Each step samples completions, scores them with a frozen reward model and/or reward functions,
builds token rewards (k1 KL penalty to the reference on every token, the clipped and optionally
normalised score on each row's last valid token, plus dense sources: RTO's DPO token reward
with `rto.dpo_model`, arXiv 2404.18922), runs GAE with the
critic's values (over tokens, or over macro actions with `advantage.macro.segmenter`: MA-RLHF,
arXiv 2410.02743), whitens the advantages over all ranks, and takes `num_minibatches x epochs`
clipped policy and clipped value steps on the rollout. Policy and critic have their own engines
and optimizers. The KL coefficient is fixed or adaptive (proportional control to a target KL).
Defaults follow DeepSpeed-Chat / the MA-RLHF and CD-RLHF code: gamma 1, lambda 0.95, clip 0.2,
value clip 0.2, KL 0.05. Simplification: `transformers` generate (no vLLM); the reward model must
share the policy's tokenizer.

Launch:  python -m recipes.ppo reward_model.name_or_path=<rm export> model=pretrained model.name_or_path=<sft export>
         torchrun --nproc_per_node 2 -m recipes.ppo distributed=zero2 ...
"""

from __future__ import annotations

import dataclasses
import sys
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from rlhf.advantages import gae, macro_gae
from rlhf.checkpoint import load_checkpoint, save_checkpoint
from rlhf.config import ConfigError, ModelConfig, PPOConfig, plan_ppo_batches, register_configs
from rlhf.data.load import load_task_data
from rlhf.data.sampler import EpochSampler
from rlhf.distributed import build_engine, launcher_env
from rlhf.eval.accuracy import heldout_accuracy
from rlhf.intrinsic import Curiosity, CuriosityModel
from rlhf.loggers import build_loggers
from rlhf.losses.kl import k1
from rlhf.losses.policy import policy_gradient_loss
from rlhf.losses.reduce import get_reduction
from rlhf.losses.value import clipped_value_loss
from rlhf.metrics import MetricAccumulator
from rlhf.models.forward import response_logprobs, response_logprobs_and_states, sequence_scores, token_values
from rlhf.models.load import load_causal_lm, load_policy, load_reference, load_scorer, load_tokenizer
from rlhf.models.shared_prefix import model_config
from rlhf.ops import masked_mean, masked_sum, masked_whiten
from rlhf.plots import plot_metrics
from rlhf.rollout.hf import SamplingParams, rollout_rows
from rlhf.runtime import (
    build_rewards,
    drop_launcher_arguments,
    log_rollout_sample,
    mean_over_ranks,
    open_run,
    rank_slice,
)
from rlhf.scoring import score_completions
from rlhf.segments import macro_ratio_logprobs, make_segmenter, num_segments
from rlhf.shaping import (
    AdaptiveKLController,
    DPOTokenReward,
    FixedKLController,
    RunningMoments,
    compose_token_rewards,
)


def train(cfg: PPOConfig) -> dict[str, float | str]:
    """Run PPO; returns the last step's metrics, the final checkpoint and the run directory."""
    # Setup: validate batch arithmetic, rewards and data before any model loads.
    env = launcher_env()
    plan = plan_ppo_batches(cfg, env.world_size)
    rewards = build_rewards(cfg.reward)
    reduction = get_reduction(cfg.loss.aggregation)
    train_rows, eval_rows = load_task_data(cfg.data)
    run_dir, checkpoint = open_run(cfg, env)
    tokenizer = load_tokenizer(cfg.model)
    optimizer_steps = cfg.train.steps * cfg.train.num_minibatches * cfg.train.epochs
    policy = build_engine(
        lambda: load_policy(cfg.model, tokenizer, seed=cfg.seed),
        cfg.optim,
        cfg.distributed,
        optimizer_steps,
        plan.micro_batch_size,
    )
    critic_cfg = _critic_model_config(cfg)
    critic = build_engine(
        lambda: load_scorer(critic_cfg, tokenizer, seed=cfg.seed, per_token=True),
        cfg.critic.optim,
        cfg.distributed,
        optimizer_steps,
        plan.micro_batch_size,
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
    dense_sources = _dense_sources(cfg, policy, tokenizer, plan.micro_batch_size, warp_of(cfg))
    curiosity = _curiosity(cfg, policy, reference)
    if curiosity:
        dense_sources.append(curiosity)
    try:
        segmenter = make_segmenter(cfg.advantage.macro, tokenizer, seed=cfg.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if cfg.loss.kl_controller == "adaptive":
        kl_controller = AdaptiveKLController(cfg.loss.kl_coef, cfg.loss.kl_target, cfg.loss.kl_horizon)
    else:
        kl_controller = FixedKLController(cfg.loss.kl_coef)
    score_moments = RunningMoments()
    sampling = SamplingParams(
        cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p
    )
    warp = warp_of(cfg)
    sampler = EpochSampler(len(train_rows), seed=cfg.seed)
    start_step = 0
    if checkpoint:
        state = load_checkpoint(checkpoint, policy, {"critic": critic})
        sampler.load_state_dict(state["sampler"])
        kl_controller.load_state_dict(state["kl_controller"])
        score_moments.load_state_dict(state["score_moments"])
        if curiosity:
            curiosity.load_state_dict(state["curiosity"])
        start_step = state["step"]
    loggers = build_loggers(
        cfg.logger if env.is_main else None,
        run_dir,
        "ppo",
        dataclasses.asdict(cfg),
        cfg.train.steps,
        start_step,
    )
    d, g = cfg.data, cfg.rollout.group_size
    accuracy_fn = next((r.fn for r in rewards if r.name == cfg.reward.accuracy_reward), None)
    can_evaluate = accuracy_fn is not None and eval_rows is not None

    def evaluate() -> float:
        return heldout_accuracy(policy, tokenizer, eval_rows, accuracy_fn, d, cfg.eval, cfg.eval.num_samples)

    def save(step: int) -> str:
        state = {
            "sampler": sampler.state_dict(),
            "kl_controller": kl_controller.state_dict(),
            "score_moments": score_moments.state_dict(),
            **({"curiosity": curiosity.state_dict()} if curiosity else {}),
        }
        return save_checkpoint(
            run_dir, step, policy, tokenizer, state, cfg.checkpoint.keep_last, {"critic": critic}
        )

    result: dict[str, float | str] = {}
    if can_evaluate and start_step == 0:
        result["eval/accuracy_before"] = evaluate()
        loggers.log({"eval/accuracy": result["eval/accuracy_before"]}, 0)
    last_checkpoint, step, metrics = checkpoint or "", start_step, {}
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            started = time.perf_counter()
            # 1 rollout: this rank's prompts, G samples each (ZeRO-3 parameters gathered once)
            rows = train_rows.select(
                rank_slice(sampler.next_indices(cfg.train.prompts_per_step), env.rank, env.world_size)
            )
            batch, metrics = rollout_rows(
                policy,
                tokenizer,
                rows,
                prompt_column=d.prompt_column,
                group_size=g,
                sampling=sampling,
                apply_chat_template=d.apply_chat_template,
                record_topk=cfg.curiosity.top_k if curiosity else None,
            )
            metrics["time/generate"] = time.perf_counter() - started
            metrics.pop("rollout/tokens")
            mask = batch.response_mask

            # 2 score: reward functions and/or the reward model, then normalise and clip
            passes_started = time.perf_counter()
            scores = torch.zeros(batch.batch_size, device=policy.device)
            if rewards:
                function_scores, _, per_reward, reward_metrics = score_completions(
                    rewards, batch.prompts, batch.completions, batch.columns, on_error=cfg.reward.on_error
                )
                scores += function_scores.to(policy.device)
                metrics.update(reward_metrics)
                if cfg.reward.accuracy_reward in per_reward:
                    metrics["accuracy"] = float(
                        (per_reward[cfg.reward.accuracy_reward] >= 1.0).float().mean()
                    )
            with torch.no_grad():
                if reward_model is not None:
                    rm_scores = _batched(
                        lambda *rows: sequence_scores(reward_model, *rows),
                        batch,
                        plan.micro_batch_size,
                    )
                    scores += cfg.reward_model.weight * rm_scores
                    metrics["reward/model_mean"] = float(rm_scores.mean())
                metrics["reward/mean"] = float(scores.mean())
                raw_scores = scores
                if cfg.shaping.normalize:
                    score_moments.update(engine_gather_scores(scores, policy))
                    scores = score_moments.normalize(scores)

                # 3 logprob and value passes (no grad): old policy, reference, critic
                batch.old_logprobs = _batched(
                    lambda *rows: response_logprobs(policy.model, *rows, **warp)[0],
                    batch,
                    plan.micro_batch_size,
                )
                if curiosity:  # the reference pass also yields the curiosity module's states
                    parts = [
                        response_logprobs_and_states(reference, *_tensors(batch, rows), **warp)
                        for rows in torch.arange(batch.batch_size).split(plan.micro_batch_size)
                    ]
                    batch.ref_logprobs, batch.ref_states, batch.ref_next_states = (
                        torch.cat(part) for part in zip(*parts, strict=True)
                    )
                else:
                    batch.ref_logprobs = _batched(
                        lambda *rows: response_logprobs(reference, *rows, **warp)[0],
                        batch,
                        plan.micro_batch_size,
                    )
                old_values = _batched(
                    lambda *rows: token_values(critic.model, *rows),
                    batch,
                    plan.micro_batch_size,
                )

                dense = {}
                for source in dense_sources:  # RTO's DPO token reward, CD-RLHF's curiosity
                    dense[source.name], source_metrics = source(batch)
                    metrics.update(source_metrics)
            metrics["time/logprob_passes"] = time.perf_counter() - passes_started

            # 4 token rewards (KL on every token, score on the last, dense sources) and GAE advantages
            kl = k1(batch.old_logprobs, batch.ref_logprobs)
            token_rewards, shaping_metrics = compose_token_rewards(
                scores,
                mask,
                kl=kl,
                kl_coef=kl_controller.value,
                dense=dense,
                score_clip=cfg.shaping.score_clip,
            )
            segment_ids = None
            if segmenter is None:
                advantages, returns = gae(
                    token_rewards, old_values, mask, gamma=cfg.advantage.gamma, lam=cfg.advantage.lam
                )
            else:  # MA-RLHF: GAE over macro actions, each token takes its segment's values
                segment_ids = segmenter(batch, step * policy.world_size + policy.rank)
                advantages, returns = macro_gae(
                    token_rewards,
                    old_values,
                    segment_ids,
                    gamma=cfg.advantage.gamma,
                    lam=cfg.advantage.lam,
                    aggregation=cfg.advantage.macro.aggregation,
                    reward_aggregation=cfg.advantage.macro.reward_aggregation,
                )
                segments = num_segments(segment_ids).float()
                metrics["macro/segments_mean"] = float(segments.mean())
                metrics["macro/segment_length_mean"] = float(mask.sum(1).float().sum() / segments.sum())
            if cfg.advantage.whiten:
                advantages = masked_whiten(
                    advantages, mask, all_reduce_sum=policy.all_reduce_sum if policy.world_size > 1 else None
                )
            batch.advantages = advantages
            sequence_kl = masked_sum(kl, mask, dim=-1)
            metrics.update({k: float(v) for k, v in shaping_metrics.items()})
            metrics["kl/sequence_mean"] = float(sequence_kl.mean())
            metrics["kl/mean"] = float(masked_mean(kl, mask))
            metrics["kl/coef"] = kl_controller.value
            metrics["value/returns_mean"] = float(masked_mean(returns, mask))

            # 5 update: policy and critic, minibatches x epochs, micro-batches accumulate
            update_started = time.perf_counter()
            metrics.update(
                _update(policy, critic, batch, old_values, returns, plan, cfg, reduction, warp, segment_ids)
            )
            if curiosity:  # after the rewards were read from it, as the authors order it
                metrics.update(curiosity.update(batch))
                batch.ref_states = batch.ref_next_states = None
            metrics["time/update"] = time.perf_counter() - update_started

            # 6 log, adapt the KL coefficient, evaluate, checkpoint
            metrics["time/step"] = time.perf_counter() - started
            metrics = mean_over_ranks(metrics, policy)
            kl_controller.update(metrics["kl/sequence_mean"], cfg.train.prompts_per_step * g)
            if can_evaluate and cfg.eval.every and step % cfg.eval.every == 0:
                metrics["eval/accuracy"] = evaluate()
            if step % cfg.logger.log_every == 0 or "eval/accuracy" in metrics:
                loggers.log(metrics, step)
                log_rollout_sample(
                    loggers,
                    cfg.logger,
                    batch,
                    tokenizer,
                    step,
                    raw_scores,
                    {
                        "logprobs": batch.old_logprobs,
                        "ref_logprobs": batch.ref_logprobs,
                        "kl": kl,
                        "rewards": token_rewards,
                        "values": old_values,
                        "advantages": batch.advantages,
                        "segment_ids": segment_ids,
                    },
                )
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                last_checkpoint = save(step)
        if cfg.checkpoint.save_final and not last_checkpoint.endswith(f"step-{step:06d}"):
            last_checkpoint = save(step)
        if can_evaluate:
            result["eval/accuracy"] = metrics["eval/accuracy"] if "eval/accuracy" in metrics else evaluate()
            loggers.log({"eval/accuracy": result["eval/accuracy"]}, step)
    finally:
        loggers.close()
    if policy.is_main:
        plot_metrics(
            run_dir,
            [
                "reward/mean",
                "reward/model_mean",
                "accuracy",
                "kl/sequence_mean",
                "response/length_mean",
                "value/error",
                "eval/accuracy",
            ],
            "ppo_curves.png",
            "PPO",
        )
    return {**metrics, **result, "step": step, "checkpoint": last_checkpoint, "run_dir": run_dir}


def _critic_model_config(cfg: PPOConfig) -> ModelConfig:
    if cfg.critic.init == "policy":
        return dataclasses.replace(cfg.model, lora=dataclasses.replace(cfg.model.lora, enabled=False))
    path = cfg.reward_model.name_or_path if cfg.critic.init == "reward_model" else cfg.critic.name_or_path
    return cfg.model.pretrained_like(path)


def warp_of(cfg: PPOConfig) -> dict:
    """The sampling warp, applied identically in every logprob pass."""
    return {"temperature": cfg.rollout.temperature, "top_k": cfg.rollout.top_k, "top_p": cfg.rollout.top_p}


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


def _dense_sources(cfg: PPOConfig, policy, tokenizer, micro_batch_size: int, warp: dict) -> list:
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
        return lambda batch: _batched(
            lambda *rows: response_logprobs(model, *rows, **warp)[0], batch, micro_batch_size
        )

    reference = frozen_logprobs(cfg.rto.dpo_reference_model) if cfg.rto.reference == "dpo_reference" else None
    return [DPOTokenReward(frozen_logprobs(cfg.rto.dpo_model), reference, cfg.rto.scale, cfg.rto.clip)]


def engine_gather_scores(scores: torch.Tensor, engine) -> torch.Tensor:
    """Every rank's scores (for running statistics that agree across ranks)."""
    if engine.world_size == 1:
        return scores
    padded = torch.zeros(engine.world_size, scores.numel(), device=scores.device)
    padded[engine.rank] = scores
    return engine.all_reduce_sum(padded).flatten()


def _tensors(batch, rows):
    return (
        batch.prompt_ids[rows],
        batch.prompt_mask[rows],
        batch.response_ids[rows],
        batch.response_mask[rows],
    )


def _batched(compute, batch, micro_batch_size: int) -> torch.Tensor:
    """compute(prompt_ids, prompt_mask, response_ids, response_mask) over micro-batches, concatenated."""
    return torch.cat(
        [compute(*_tensors(batch, rows)) for rows in torch.arange(batch.batch_size).split(micro_batch_size)]
    )


def _update(
    policy, critic, batch, old_values, returns, plan, cfg: PPOConfig, reduction, warp: dict, segment_ids=None
) -> dict[str, float]:
    """Clipped policy and value steps; each normalizer counts its whole minibatch on all ranks.
    With macro segments and `advantage.macro.ratio=macro`, the ratio clipped is the segment's product."""
    macro_ratio = segment_ids is not None and cfg.advantage.macro.ratio == "macro"
    accumulator = MetricAccumulator()
    stats: dict[str, float] = {}
    losses: list[float] = []
    value_losses: list[float] = []
    for _ in range(cfg.train.epochs):
        for minibatch in torch.randperm(batch.batch_size).split(plan.minibatch_per_rank):
            normalizer = policy.all_reduce_sum(reduction.count(batch.response_mask[minibatch]).float()).clamp(
                min=1
            )
            policy_loss = torch.zeros((), device=policy.device)
            value_loss = torch.zeros((), device=policy.device)
            for micro in minibatch.split(plan.micro_batch_size):
                tensors = _tensors(batch, micro)
                mask = batch.response_mask[micro]
                logprobs, entropy = response_logprobs(
                    policy.model, *tensors, with_entropy=True, entropy_grad=cfg.loss.entropy_coef != 0, **warp
                )
                out = policy_gradient_loss(
                    macro_ratio_logprobs(logprobs, batch.old_logprobs[micro], segment_ids[micro])
                    if macro_ratio
                    else logprobs,
                    batch.old_logprobs[micro],
                    batch.advantages[micro],
                    mask,
                    reduction=reduction,
                    normalizer=normalizer,
                    clip_low=cfg.loss.clip_low,
                    clip_high=cfg.loss.clip_high,
                    dual_clip=cfg.loss.dual_clip,
                )
                loss = out.loss
                if cfg.loss.entropy_coef:
                    loss = loss - cfg.loss.entropy_coef * reduction.reduce(
                        entropy, mask, normalizer=normalizer
                    )
                policy.backward(loss)
                value_out = clipped_value_loss(
                    token_values(critic.model, *tensors),
                    old_values[micro],
                    returns[micro],
                    mask,
                    reduction=reduction,
                    normalizer=normalizer,
                    clip_range=cfg.critic.value_clip,
                )
                critic.backward(value_out.loss)
                policy_loss += loss.detach()
                value_loss += value_out.loss.detach()
                tokens = float(mask.sum())
                accumulator.add({**out.metrics, **value_out.metrics}, weight=tokens)
                accumulator.add({"entropy": masked_mean(entropy.detach(), mask)}, weight=tokens)
            stats = policy.step()
            stats.update({f"critic/{k.split('/')[-1]}": v for k, v in critic.step().items()})
            losses.append(float(policy.all_reduce_sum(policy_loss)))
            value_losses.append(float(policy.all_reduce_sum(value_loss)))
    return {
        **accumulator.compute(),
        **stats,
        "loss": sum(losses) / len(losses),
        "loss/value": sum(value_losses) / len(value_losses),
    }


@hydra.main(config_path="../configs", config_name="ppo", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: PPOConfig = OmegaConf.to_object(dict_cfg)
    result = train(cfg)
    if launcher_env().is_main:
        print(f"PPO finished at step {result['step']}; checkpoint: {result['checkpoint']}")


register_configs()

if __name__ == "__main__":
    sys.argv = drop_launcher_arguments(sys.argv)
    main()
