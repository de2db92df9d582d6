"""GRPO: group-relative policy optimisation with verifiable rewards (no critic).

Papers: GRPO, DeepSeekMath (arXiv 2402.03300); Dr.GRPO (arXiv 2503.20783); DAPO clip-higher and
token-mean aggregation (arXiv 2503.14476). Each step samples G completions for each of P prompts,
scores them with the reward functions, baselines every score against its group, and takes
`num_minibatches x epochs` clipped policy-gradient steps on the rollout (old logprobs kept).
Options (all in config): std scaling of advantages (GRPO) or not (Dr.GRPO), RLOO baseline; loss
aggregation token_mean / sequence_mean_token_mean / sequence_mean_token_sum_norm; asymmetric
clipping; KL estimators k1/k2/k3 in the loss or in the reward (no reference model is loaded when
kl_coef is 0); dropping zero-variance groups. Temperature, top-k and top-p are applied identically
in sampling and in every logprob pass.
Simplifications: generation uses `transformers` generate (no vLLM); one process.

Launch:  python -m recipes.grpo [overrides...]
         python -m recipes.grpo +experiment=grpo_dr_grpo model=pretrained model.name_or_path=<dir>
"""

from __future__ import annotations

import dataclasses
import os
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from rlhf import advantages as adv
from rlhf.checkpoint import load_training_state, save_checkpoint
from rlhf.config import GRPOConfig, plan_grpo_batches, register_configs
from rlhf.data.load import load_task_data
from rlhf.data.sampler import EpochSampler
from rlhf.distributed import build_engine
from rlhf.eval.accuracy import greedy_accuracy
from rlhf.loggers import build_loggers
from rlhf.losses.kl import get_kl_estimator
from rlhf.losses.policy import policy_gradient_loss
from rlhf.losses.reduce import get_reduction
from rlhf.metrics import MetricAccumulator
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.plots import plot_metrics
from rlhf.rollout.hf import SamplingParams, generate_rollouts
from rlhf.runtime import (
    build_rewards,
    model_config_from_checkpoint,
    prepare_run_dir,
    resume_target,
    seed_everything,
)
from rlhf.scoring import score_completions
from rlhf.shaping import kl_penalized_scores


def train(cfg: GRPOConfig) -> dict[str, float | str]:
    """Run GRPO; returns the last step's metrics, the final checkpoint and the run directory."""
    # Setup: validate batch arithmetic and data before any model loads.
    plan = plan_grpo_batches(cfg)
    rewards = build_rewards(cfg.reward)
    reduction = get_reduction(cfg.loss.aggregation)
    kl_estimator = get_kl_estimator(cfg.loss.kl_estimator)
    train_rows, eval_rows = load_task_data(cfg.data)
    checkpoint, resumed_run_dir = resume_target(cfg.resume)
    run_dir = prepare_run_dir(resumed_run_dir or cfg.run_dir, cfg)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    policy_cfg = model_config_from_checkpoint(cfg.model, checkpoint) if checkpoint else cfg.model
    engine = build_engine(
        load_causal_lm(policy_cfg, tokenizer, seed=cfg.seed),
        cfg.optim,
        cfg.distributed,
        cfg.train.steps * cfg.train.num_minibatches * cfg.train.epochs,
    )
    reference = None
    if cfg.loss.kl_coef != 0.0:  # the reference is the initial policy, even when resuming
        reference = (
            load_causal_lm(cfg.model, tokenizer, seed=cfg.seed).to(engine.device).eval().requires_grad_(False)
        )
    sampling = SamplingParams(
        cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p
    )
    warp = {"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}
    sampler = EpochSampler(len(train_rows), seed=cfg.seed)
    start_step, elapsed = 0, 0.0
    if checkpoint:
        state = load_training_state(checkpoint)
        engine.load_state_dict(state["engine"])
        sampler.load_state_dict(state["sampler"])
        start_step, elapsed = state["step"], state.get("elapsed_s", 0.0)
    loggers = build_loggers(cfg.logger, run_dir, "grpo", dataclasses.asdict(cfg), cfg.train.steps, start_step)
    d, g = cfg.data, cfg.rollout.group_size
    updates_per_rollout = cfg.train.num_minibatches * cfg.train.epochs
    accuracy_fn = next((r.fn for r in rewards if r.name == cfg.reward.accuracy_reward), None)
    token_budget = cfg.rollout.max_new_tokens

    def evaluate() -> float:
        sample = eval_rows.select(range(min(cfg.eval.num_samples, len(eval_rows))))
        return greedy_accuracy(
            engine.model,
            tokenizer,
            sample,
            accuracy_fn,
            prompt_column=d.prompt_column,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            apply_chat_template=d.apply_chat_template,
        )

    def save(step: int) -> str:
        state = {"engine": engine.state_dict(), "sampler": sampler.state_dict(), "elapsed_s": elapsed}
        return save_checkpoint(run_dir, step, engine.model, tokenizer, state, cfg.checkpoint.keep_last)

    can_evaluate = accuracy_fn is not None and eval_rows is not None
    result: dict[str, float | str] = {}
    if can_evaluate and start_step == 0:
        result["eval/accuracy_before"] = evaluate()
        loggers.log({"eval/accuracy": result["eval/accuracy_before"]}, 0)
    last_checkpoint, step, metrics = checkpoint or "", start_step, {}
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            started = time.perf_counter()
            metrics = {}
            # 1 rollout: G samples for each of the step's prompts
            rows = train_rows.select(sampler.next_indices(plan.prompts_per_rank))
            columns = {k: list(rows[k]) for k in rows.column_names if k != d.prompt_column}
            batch = generate_rollouts(
                engine.model,
                tokenizer,
                list(rows[d.prompt_column]),
                columns,
                group_size=g,
                sampling=sampling,
                apply_chat_template=d.apply_chat_template,
            )
            metrics["time/generate"] = time.perf_counter() - started
            lengths = batch.response_mask.sum(-1).float()
            metrics["response/length_mean"] = float(lengths.mean())
            metrics["response/truncated_fraction"] = float(batch.truncated.float().mean())
            rollout_tokens = float(batch.prompt_mask.sum() + lengths.sum())

            # 2 score: weighted reward functions; None rows are excluded
            scores, valid, per_reward, reward_metrics = score_completions(
                rewards, batch.prompts, batch.completions, batch.columns, on_error=cfg.reward.on_error
            )
            scores, valid = scores.to(engine.device), valid.to(engine.device)
            metrics.update(reward_metrics)
            metrics["reward/mean"] = float(scores[valid].mean()) if valid.any() else float("nan")
            metrics["reward/std"] = float(scores[valid].std()) if valid.sum() > 1 else 0.0
            if cfg.reward.accuracy_reward in per_reward:
                metrics["accuracy"] = float((per_reward[cfg.reward.accuracy_reward] >= 1.0).float().mean())

            # 3 logprob passes (no grad): old policy when it will drift, reference when KL is on
            passes_started = time.perf_counter()
            with torch.no_grad():
                if updates_per_rollout > 1:
                    batch.old_logprobs = _batched_logprobs(engine.model, batch, plan.micro_batch_size, warp)
                if reference is not None:
                    batch.ref_logprobs = _batched_logprobs(reference, batch, plan.micro_batch_size, warp)
            if reference is not None and cfg.loss.kl_placement == "reward":
                behaviour = (
                    batch.old_logprobs
                    if batch.old_logprobs is not None
                    else _batched_logprobs(engine.model, batch, plan.micro_batch_size, warp)
                )
                scores, kl_metrics = kl_penalized_scores(
                    scores,
                    behaviour,
                    batch.ref_logprobs,
                    batch.response_mask,
                    kl_coef=cfg.loss.kl_coef,
                    estimator=kl_estimator,
                    log_ratio_clamp=cfg.loss.kl_log_ratio_clamp,
                )
                metrics.update({f"reward_{k}": float(v) for k, v in kl_metrics.items()})
            metrics["time/logprob_passes"] = time.perf_counter() - passes_started

            # 4 advantages: group-relative baseline; optionally drop groups with no signal
            if cfg.advantage.estimator == "rloo":
                batch.advantages = adv.rloo(scores, valid, group_size=g)
            else:
                batch.advantages = adv.group_relative(
                    scores,
                    valid,
                    group_size=g,
                    scale_by_std=cfg.advantage.scale_by_std,
                    eps=cfg.advantage.eps,
                )
            keep = valid.clone()
            if cfg.advantage.drop_zero_variance_groups:
                flat = adv.zero_variance_groups(scores, valid, group_size=g)
                metrics["groups/zero_variance_fraction"] = float(flat.float().mean())
                keep &= ~flat
            batch.response_mask = batch.response_mask & keep.unsqueeze(-1)

            # 5 update: minibatches x epochs optimizer steps, micro-batches accumulate
            update_started = time.perf_counter()
            update_metrics = _update(
                engine,
                batch,
                keep,
                plan,
                cfg,
                reduction,
                kl_estimator if cfg.loss.kl_placement == "loss" else None,
                warp,
                token_budget,
            )
            metrics.update(update_metrics)
            metrics["time/update"] = time.perf_counter() - update_started

            # 6 log, evaluate, checkpoint
            step_time = time.perf_counter() - started
            elapsed += step_time
            metrics["time/step"] = step_time
            metrics["tokens_per_s"] = rollout_tokens / step_time
            if can_evaluate and cfg.eval.every and step % cfg.eval.every == 0:
                metrics["eval/accuracy"] = evaluate()
            if step % cfg.logger.log_every == 0 or "eval/accuracy" in metrics:
                loggers.log(metrics, step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                last_checkpoint = save(step)
            if cfg.train.time_limit_s is not None and elapsed >= cfg.train.time_limit_s:
                loggers.message(f"time limit {cfg.train.time_limit_s:g}s reached after step {step}")
                break
        if cfg.checkpoint.save_final and not last_checkpoint.endswith(f"step-{step:06d}"):
            last_checkpoint = save(step)
        if can_evaluate:
            result["eval/accuracy"] = metrics["eval/accuracy"] if "eval/accuracy" in metrics else evaluate()
            loggers.log({"eval/accuracy": result["eval/accuracy"]}, step)
    finally:
        loggers.close()
    plot_metrics(
        run_dir,
        ["reward/mean", "accuracy", "eval/accuracy", "kl/mean", "response/length_mean"],
        "grpo_curves.png",
        "GRPO",
    )
    return {**metrics, **result, "step": step, "checkpoint": last_checkpoint, "run_dir": run_dir}


def _batched_logprobs(model, batch, micro_batch_size: int, warp: dict) -> torch.Tensor:
    """No-grad per-token logprobs of the whole rollout, micro-batch by micro-batch."""
    parts = []
    for rows in torch.arange(batch.batch_size).split(micro_batch_size):
        logprobs, _ = response_logprobs(
            model,
            batch.prompt_ids[rows],
            batch.prompt_mask[rows],
            batch.response_ids[rows],
            batch.response_mask[rows],
            **warp,
        )
        parts.append(logprobs)
    return torch.cat(parts)


def _update(
    engine, batch, keep, plan, cfg: GRPOConfig, reduction, kl_estimator, warp: dict, token_budget: int
) -> dict[str, float]:
    """Optimizer steps over the rollout; each normalizer counts its whole minibatch."""
    accumulator = MetricAccumulator()
    step_stats: dict[str, float] = {}
    step_losses: list[torch.Tensor] = []
    kept_rows = keep.nonzero().squeeze(-1).cpu()
    if kept_rows.numel() == 0:
        return {"update/skipped": 1.0}
    for _ in range(cfg.train.epochs):
        order = kept_rows[torch.randperm(kept_rows.numel())]
        for minibatch in order.tensor_split(cfg.train.num_minibatches):
            if minibatch.numel() == 0:
                continue
            normalizer = engine.all_reduce_sum(reduction.count(batch.response_mask[minibatch]).float()).clamp(
                min=1
            )
            step_loss = torch.zeros((), device=engine.device)
            for micro in minibatch.split(plan.micro_batch_size):
                mb = batch.select(micro)
                logprobs, entropy = response_logprobs(
                    engine.model,
                    mb.prompt_ids,
                    mb.prompt_mask,
                    mb.response_ids,
                    mb.response_mask,
                    with_entropy=True,
                    **warp,
                )
                old = mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach()
                out = policy_gradient_loss(
                    logprobs,
                    old,
                    mb.advantages,
                    mb.response_mask,
                    reduction=reduction,
                    normalizer=normalizer,
                    clip_low=cfg.loss.clip_low,
                    clip_high=cfg.loss.clip_high,
                    dual_clip=cfg.loss.dual_clip,
                    ref_logprobs=mb.ref_logprobs,
                    kl_coef=cfg.loss.kl_coef if kl_estimator is not None else 0.0,
                    kl_estimator=kl_estimator,
                    kl_log_ratio_clamp=cfg.loss.kl_log_ratio_clamp,
                    token_budget=token_budget,
                )
                engine.backward(out.loss)
                tokens = float(mb.response_mask.sum())
                step_loss += out.loss.detach()
                accumulator.add(out.metrics, weight=tokens)
                accumulator.add(
                    {"entropy": (entropy * mb.response_mask).sum() / max(tokens, 1.0)}, weight=tokens
                )
            step_stats = engine.step()
            step_losses.append(step_loss)
    return {**accumulator.compute(), **step_stats, "loss": float(torch.stack(step_losses).mean())}


@hydra.main(config_path="../configs", config_name="grpo", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: GRPOConfig = OmegaConf.to_object(dict_cfg)
    result = train(cfg)
    print(f"GRPO finished at step {result['step']}; checkpoint: {result['checkpoint']}")
    if "eval/accuracy" in result:
        print(
            f"held-out accuracy: {result.get('eval/accuracy_before', float('nan')):.3f} -> {result['eval/accuracy']:.3f}"
        )


register_configs()

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
