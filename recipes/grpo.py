"""GRPO: group-relative policy optimisation with verifiable rewards (no critic).

Papers: GRPO, DeepSeekMath (arXiv 2402.03300); Dr.GRPO (arXiv 2503.20783); DAPO clip-higher and
token-mean aggregation (arXiv 2503.14476). Each step samples G completions for each of P prompts,
scores them with the reward functions, baselines every score against its group, and takes
`num_minibatches x epochs` clipped policy-gradient steps on the rollout (old logprobs kept).
Options (all in config): std scaling of advantages (GRPO) or not (Dr.GRPO), RLOO baseline; loss
aggregation token_mean / sequence_mean_token_mean / sequence_mean_token_sum_norm; asymmetric
clipping; KL estimators k1/k2/k3 in the loss or in the reward (no reference model is loaded when
kl_coef is 0); dropping zero-variance groups (their rows stay in the batch with an empty mask, so
every rank runs the same micro-batches). Temperature, top-k and top-p are applied identically in
sampling and in every logprob pass.
Simplification: generation uses `transformers` generate (no vLLM).

Launch:  python -m recipes.grpo [overrides...]
         torchrun --nproc_per_node 2 -m recipes.grpo distributed=zero2
         deepspeed --num_gpus 2 --module recipes.grpo distributed=zero3 +experiment=grpo_dr_grpo
"""

from __future__ import annotations

import dataclasses
import sys
import time

import hydra
import torch
from omegaconf import DictConfig

from rlhf import advantages as adv
from rlhf.config import GRPOConfig, plan_grpo_batches, register_configs
from rlhf.data.load import load_task_data
from rlhf.data.sampler import EpochSampler
from rlhf.distributed import build_engine, launcher_env, run_entry_point
from rlhf.losses.kl import get_kl_estimator
from rlhf.losses.policy import policy_gradient_loss
from rlhf.losses.reduce import get_reduction
from rlhf.metrics import MetricAccumulator
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_policy, load_reference
from rlhf.plots import plot_metrics
from rlhf.rollout.hf import SamplingParams, rollout_rows
from rlhf.rollout.records import sample_rows
from rlhf.rollout.vllm import apply_rollout_correction, rollout_correction, start_engine
from rlhf.run import Run, recipe_config
from rlhf.runtime import (
    HeldoutAccuracy,
    build_rewards,
    drop_launcher_arguments,
    log_rollout_sample,
    mean_over_ranks,
    rank_slice,
    rl_prompts,
)
from rlhf.scoring import score_completions, score_metrics
from rlhf.shaping import kl_penalized_scores


def train(cfg: GRPOConfig) -> dict[str, float | str]:
    """Run GRPO; returns the last step's metrics, the final checkpoint and the run directory."""
    # Setup: validate batch arithmetic, rewards and data before any model loads.
    env = launcher_env()
    plan = plan_grpo_batches(cfg, env.world_size)
    rewards = build_rewards(cfg.reward)
    reduction = get_reduction(cfg.loss.aggregation)
    kl_estimator = get_kl_estimator(cfg.loss.kl_estimator)
    train_rows, eval_rows = load_task_data(cfg.data)
    run = Run.open("grpo", cfg, env)
    tokenizer, train_rows, eval_rows = rl_prompts(cfg, train_rows, eval_rows)
    optimizer_steps = cfg.train.steps * cfg.train.num_minibatches * cfg.train.epochs
    engine = build_engine(
        lambda: load_policy(cfg.model, tokenizer, seed=cfg.seed),  # built partitioned under ZeRO-3
        cfg.optim,
        cfg.distributed,
        optimizer_steps,
        plan.micro_batch_size,
        cfg.train.precision,
    )
    reference = None
    if cfg.loss.kl_coef != 0.0:  # the initial policy (adapters off under LoRA), also when resuming
        reference = load_reference(cfg.model, tokenizer, engine, seed=cfg.seed)
    sampling = SamplingParams.from_config(cfg.rollout)
    warp = sampling.warp()
    sampler = EpochSampler(len(train_rows), seed=cfg.seed)
    state = run.attach(engine, tokenizer, lambda: {"sampler": sampler.state_dict()})
    if state:
        sampler.load_state_dict(state["sampler"])
    d, g = cfg.data, cfg.rollout.group_size
    vllm = start_engine(cfg, engine, tokenizer, env.rank)  # None with rollout.engine=hf
    heldout = HeldoutAccuracy(engine, tokenizer, eval_rows, rewards, cfg, vllm)
    metrics: dict[str, float] = {}
    with run:
        if vllm is not None:
            run.on_close(vllm.shutdown)
        result = heldout.before(run)
        for step in run.steps():
            started = time.perf_counter()
            # 1 rollout: G samples for each of this rank's prompts (HF: parameters gathered once;
            #   vLLM: the engine's weights synced to the last update first)
            rows = train_rows.select(
                rank_slice(sampler.next_indices(cfg.train.prompts_per_step), env.rank, env.world_size)
            )
            batch, metrics = rollout_rows(
                engine,
                tokenizer,
                rows,
                prompt_column=d.prompt_column,
                group_size=g,
                sampling=sampling,
                vllm=vllm,
                weights_version=step - 1,
                seed=(cfg.seed * 1_000_003 + step) * env.world_size + env.rank,
            )
            metrics["time/generate"] = time.perf_counter() - started
            rollout_tokens = metrics.pop("rollout/tokens")

            # 2 score: weighted reward functions; rows no reward could score are excluded
            scores, valid, per_reward, reward_metrics = score_completions(
                rewards,
                batch.prompts,
                batch.reward_completions(),
                batch.columns,
                on_error=cfg.reward.on_error,
            )
            scores, valid = scores.to(engine.device), valid.to(engine.device)
            metrics.update(reward_metrics)
            metrics.update(score_metrics(scores, valid, per_reward, cfg.reward.accuracy_reward))
            raw_scores = torch.where(valid, scores, torch.nan)

            # 3 logprob passes (no grad): old policy when it will drift, reference when KL is on
            passes_started = time.perf_counter()
            scores = _logprob_passes(cfg, engine, reference, batch, scores, plan, kl_estimator, metrics)
            metrics["time/logprob_passes"] = time.perf_counter() - passes_started

            # 4 advantages: group-relative baseline; groups with no signal can be masked out
            rollout_mask = batch.response_mask  # the sample log shows dropped groups' tokens too
            _advantages(cfg, batch, scores, valid, metrics)

            # 5 update: minibatches x epochs optimizer steps, micro-batches accumulate
            update_started = time.perf_counter()
            loss_kl = kl_estimator if cfg.loss.kl_placement == "loss" else None
            metrics.update(_update(engine, batch, plan, cfg, reduction, loss_kl, warp))
            metrics["time/update"] = time.perf_counter() - update_started

            # 6 log, evaluate (checkpoints, time limit and preemption: between steps, in run.steps)
            metrics["time/step"] = time.perf_counter() - started
            metrics["tokens_per_s"] = rollout_tokens * env.world_size / metrics["time/step"]
            metrics = mean_over_ranks(metrics, engine)
            heldout.during(run, step, metrics)
            if step % cfg.logger.log_every == 0 or "eval/accuracy" in metrics:
                run.log(metrics, step)
                sampled = dataclasses.replace(batch, response_mask=rollout_mask)
                _log_sample(run.loggers, cfg, sampled, tokenizer, step, raw_scores, engine, warp)
        run.finish()
        result.update(heldout.after(run, metrics))
    if env.is_main:
        plot_metrics(
            run.dir,
            ["reward/mean", "accuracy", "eval/accuracy", "kl/mean", "response/length_mean"],
            "grpo_curves.png",
            "GRPO",
        )
    return run.result(metrics, result)


@torch.no_grad()
def _logprob_passes(cfg: GRPOConfig, engine, reference, batch, scores, plan, kl_estimator, metrics: dict):
    """Old logprobs when the rollout is trained on more than once (then a vLLM engine's mismatch is
    measured and corrected here; with one update, in the update itself), reference logprobs when KL
    is on; with the KL in the reward, returns the KL-penalised scores (else the scores unchanged)."""
    warp = SamplingParams.from_config(cfg.rollout).warp()
    if cfg.train.num_minibatches * cfg.train.epochs > 1:
        batch.old_logprobs = _batched_logprobs(engine.model, batch, plan.micro_batch_size, warp)
        apply_rollout_correction(cfg.rollout.vllm, batch, metrics)
    if reference is None:
        return scores
    batch.ref_logprobs = _batched_logprobs(reference, batch, plan.micro_batch_size, warp)
    if cfg.loss.kl_placement != "reward":
        return scores
    behaviour = batch.old_logprobs
    if behaviour is None:
        behaviour = _batched_logprobs(engine.model, batch, plan.micro_batch_size, warp)
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
    return scores


def _advantages(cfg: GRPOConfig, batch, scores, valid, metrics: dict) -> None:
    """Group-relative (or RLOO) advantages into the batch; rows no reward scored, and with
    `advantage.drop_zero_variance_groups` groups whose scores are all equal, leave the loss mask."""
    g = cfg.rollout.group_size
    if cfg.advantage.estimator == "rloo":
        batch.advantages = adv.rloo(scores, valid, group_size=g)
    else:
        batch.advantages = adv.group_relative(
            scores, valid, group_size=g, scale_by_std=cfg.advantage.scale_by_std, eps=cfg.advantage.eps
        )
    keep = valid.clone()
    if cfg.advantage.drop_zero_variance_groups:
        flat = adv.zero_variance_groups(scores, valid, group_size=g)
        metrics["groups/zero_variance_fraction"] = float(flat.float().mean())
        keep &= ~flat
    batch.response_mask = batch.response_mask & keep.unsqueeze(-1)


def _log_sample(loggers, cfg: GRPOConfig, batch, tokenizer, step: int, scores, engine, warp: dict) -> None:
    """A sample of the rollout for rollouts.jsonl and wandb, with per-token logprobs: those of the
    rollout when they were computed, else a pass over the sampled rows on every rank (ZeRO-3 gathers
    need all of them)."""
    if cfg.logger.rollout_samples <= 0:
        return
    logprobs = batch.old_logprobs
    if logprobs is None:
        rows = sample_rows(batch.batch_size, cfg.logger.rollout_samples, step)
        with torch.no_grad():
            sampled = _batched_logprobs(engine.model, batch.select(rows), len(rows), warp)
        logprobs = torch.zeros_like(batch.response_mask, dtype=sampled.dtype)
        logprobs[torch.as_tensor(rows, device=logprobs.device)] = sampled
    kl = None if batch.ref_logprobs is None else logprobs - batch.ref_logprobs
    per_token = {
        "logprobs": logprobs,
        "ref_logprobs": batch.ref_logprobs,
        "kl": kl,
        "advantage": batch.advantages,
        # the same per-token field as PPO's, so one heatmap call works on both recipes' rollouts
        "advantages": None
        if batch.advantages is None
        else batch.advantages.reshape(-1, 1).expand_as(logprobs),
    }
    log_rollout_sample(loggers, cfg.logger, batch, tokenizer, step, scores, per_token)


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


def _update(engine, batch, plan, cfg: GRPOConfig, reduction, kl_estimator, warp: dict) -> dict[str, float]:
    """Optimizer steps over the rollout; each normalizer counts its whole minibatch on all ranks."""
    accumulator = MetricAccumulator()
    step_stats: dict[str, float] = {}
    losses: list[float] = []
    skipped = 0
    for _ in range(cfg.train.epochs):
        order = torch.randperm(batch.batch_size)
        for minibatch in order.split(plan.minibatch_per_rank):
            normalizer = engine.all_reduce_sum(reduction.count(batch.response_mask[minibatch]).float())
            if normalizer.item() == 0:  # nothing to train on any rank: skip together
                skipped += 1
                continue
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
                weights = mb.rollout_weights
                if mb.rollout_logprobs is not None and mb.old_logprobs is None:
                    # one on-policy update: the detached logprobs are the old ones, no extra pass
                    weights, found = rollout_correction(
                        cfg.rollout.vllm, logprobs.detach(), mb.rollout_logprobs, mb.response_mask
                    )
                    accumulator.add(found, weight=float(mb.response_mask.sum()))
                out = policy_gradient_loss(
                    logprobs,
                    mb.old_logprobs if mb.old_logprobs is not None else logprobs.detach(),
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
                    token_budget=cfg.rollout.max_new_tokens,
                    rollout_weights=weights,
                )
                engine.backward(out.loss)
                step_loss += out.loss.detach()
                tokens = float(mb.response_mask.sum())
                accumulator.add(out.metrics, weight=tokens)
                accumulator.add(
                    {"entropy": (entropy * mb.response_mask).sum() / max(tokens, 1.0)}, weight=tokens
                )
            step_stats = engine.step()
            losses.append(float(engine.all_reduce_sum(step_loss)))
    metrics = {**accumulator.compute(), **step_stats, "update/skipped_steps": float(skipped)}
    # every rank reports the same keys, so they can be averaged over ranks
    for key in (
        "clip/low_fraction",
        "clip/high_fraction",
        "clip/fraction",
        "ratio/mean",
        "loss/policy_token_mean",
        "entropy",
        "optim/lr",
        "optim/grad_norm",
    ):
        metrics.setdefault(key, 0.0)
    if cfg.loss.kl_coef != 0.0 and kl_estimator is not None:
        metrics.setdefault("kl/mean", 0.0)
        if cfg.loss.kl_log_ratio_clamp is not None:
            metrics.setdefault("kl/clamp_fraction", 0.0)
    metrics["loss"] = sum(losses) / len(losses) if losses else 0.0
    return metrics


@hydra.main(config_path="../configs", config_name="grpo", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: GRPOConfig = recipe_config(GRPOConfig, dict_cfg)
    result = train(cfg)
    if launcher_env().is_main:
        print(f"GRPO finished at step {result['step']}; checkpoint: {result['checkpoint']}")
        if "eval/accuracy" in result:
            print(
                f"held-out accuracy: {result.get('eval/accuracy_before', float('nan')):.3f} -> {result['eval/accuracy']:.3f}"
            )


register_configs()

if __name__ == "__main__":
    sys.argv = drop_launcher_arguments(sys.argv)
    run_entry_point(main)
