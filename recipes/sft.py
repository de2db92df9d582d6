"""Supervised fine-tuning (SFT): the warm start before RL.

Maximises the likelihood of the dataset's completion column given the prompt, with the loss on
completion tokens only (prompt tokens are context, never targets). Optionally stops as soon as
greedy accuracy on a check set drawn from the training rows reaches `train.stop_at_accuracy`,
because a tiny model learns arithmetic in a sharp phase transition and a fixed step count would
give an unpredictable starting accuracy for RL.

Launch:  python -m recipes.sft [overrides...]
         torchrun --nproc_per_node 2 -m recipes.sft distributed=zero2
         deepspeed --num_gpus 2 --module recipes.sft distributed=zero3
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from rewards import REWARD_FUNCTIONS
from rlhf.checkpoint import load_checkpoint, save_checkpoint
from rlhf.config import SFTConfig, plan_sft_batches, register_configs
from rlhf.data.collate import collate_sft
from rlhf.data.load import load_task_data
from rlhf.data.sampler import EpochSampler
from rlhf.distributed import build_engine, launcher_env
from rlhf.eval.accuracy import heldout_accuracy
from rlhf.loggers import build_loggers
from rlhf.losses.reduce import get_reduction
from rlhf.losses.sft import nll_loss
from rlhf.metrics import MetricAccumulator
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_policy, load_tokenizer
from rlhf.plots import plot_metrics
from rlhf.runtime import (
    drop_launcher_arguments,
    mean_over_ranks,
    open_run,
    rank_slice,
)
from rlhf.scoring import resolve_reward


def train(cfg: SFTConfig) -> dict[str, float | str]:
    """Run SFT; returns the final metrics and the path of the last checkpoint."""
    # Setup: validate before loading anything heavy.
    env = launcher_env()
    plan = plan_sft_batches(cfg, env.world_size)
    train_rows, eval_rows = load_task_data(cfg.data, needs_completion=True)
    run_dir, checkpoint = open_run(cfg, env)
    tokenizer = load_tokenizer(cfg.model)
    engine = build_engine(
        lambda: load_policy(cfg.model, tokenizer, seed=cfg.seed),  # built partitioned under ZeRO-3
        cfg.optim,
        cfg.distributed,
        cfg.train.steps,
        plan.micro_batch_size,
    )
    reduction = get_reduction("token_mean")
    sampler = EpochSampler(len(train_rows), seed=cfg.seed)
    accuracy_fn = resolve_reward(cfg.accuracy_reward, REWARD_FUNCTIONS) if cfg.accuracy_reward else None
    check_rows = train_rows.select(
        random.Random(cfg.seed).sample(range(len(train_rows)), min(cfg.train.check_size, len(train_rows)))
    )
    start_step = 0
    if checkpoint:
        state = load_checkpoint(checkpoint, engine)
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
    loggers = build_loggers(
        cfg.logger if env.is_main else None,
        run_dir,
        "sft",
        dataclasses.asdict(cfg),
        cfg.train.steps,
        start_step,
    )
    d = cfg.data

    def accuracy_on(rows) -> float:
        return heldout_accuracy(engine, tokenizer, rows, accuracy_fn, d, cfg.eval)

    def save(step: int) -> str:
        return save_checkpoint(
            run_dir, step, engine, tokenizer, {"sampler": sampler.state_dict()}, cfg.checkpoint.keep_last
        )

    last_checkpoint, step, metrics = checkpoint or "", start_step, {}
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            started = time.perf_counter()
            # 1 batch: this rank's share of the next rows of the seeded, resumable sampler
            rows = train_rows.select(
                rank_slice(sampler.next_indices(cfg.train.batch_size), env.rank, env.world_size)
            )
            prompts, targets = list(rows[d.prompt_column]), [str(t) for t in rows[d.completion_column]]
            # 2 tokenize: [left-padded prompt; right-padded target + EOS]
            prompt_ids, prompt_mask, target_ids, target_mask = collate_sft(
                tokenizer, prompts, targets, engine.device, d.apply_chat_template
            )
            normalizer = engine.all_reduce_sum(reduction.count(target_mask).float())
            # 3 forward/backward per micro-batch, one optimizer step
            accumulator = MetricAccumulator()
            step_loss = torch.zeros((), device=engine.device)
            for micro in torch.arange(len(prompts)).split(plan.micro_batch_size):
                logprobs, _ = response_logprobs(
                    engine.model, prompt_ids[micro], prompt_mask[micro], target_ids[micro], target_mask[micro]
                )
                out = nll_loss(logprobs, target_mask[micro], reduction=reduction, normalizer=normalizer)
                engine.backward(out.loss)
                step_loss += out.loss.detach() * engine.world_size
                accumulator.add(out.metrics, weight=float(target_mask[micro].sum()))
            metrics = {"loss": float(step_loss), **accumulator.compute(), **engine.step()}
            metrics["time/step"] = time.perf_counter() - started
            metrics["tokens_per_s"] = (
                float((prompt_mask.sum() + target_mask.sum()).item()) / metrics["time/step"]
            )
            metrics = mean_over_ranks(metrics, engine)
            # 4 check accuracy, log, checkpoint
            stop = False
            if accuracy_fn is not None and cfg.train.check_every and step % cfg.train.check_every == 0:
                metrics["check/accuracy"] = accuracy_on(check_rows)
                stop = (
                    cfg.train.stop_at_accuracy is not None
                    and metrics["check/accuracy"] >= cfg.train.stop_at_accuracy
                )
            loggers.log(metrics, step)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                last_checkpoint = save(step)
            if stop:
                loggers.message(
                    f"check accuracy {metrics['check/accuracy']:.3f} reached {cfg.train.stop_at_accuracy} at step {step}"
                )
                break
        if cfg.checkpoint.save_final and not last_checkpoint.endswith(f"step-{step:06d}"):
            last_checkpoint = save(step)
        if accuracy_fn is not None and eval_rows is not None:
            metrics["eval/accuracy"] = accuracy_on(
                eval_rows.select(range(min(cfg.eval.num_samples, len(eval_rows))))
            )
            loggers.log({"eval/accuracy": metrics["eval/accuracy"]}, step)
    finally:
        loggers.close()
    if env.is_main:
        plot_metrics(run_dir, ["loss", "check/accuracy"], "sft_curves.png", "SFT")
    return {**metrics, "step": step, "checkpoint": last_checkpoint, "run_dir": run_dir}


@hydra.main(config_path="../configs", config_name="sft", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: SFTConfig = OmegaConf.to_object(dict_cfg)
    result = train(cfg)
    if launcher_env().is_main:
        print(f"SFT finished at step {result['step']}; checkpoint: {result['checkpoint']}")
        if "eval/accuracy" in result:
            print(f"held-out accuracy: {result['eval/accuracy']:.3f}")


register_configs()

if __name__ == "__main__":
    sys.argv = drop_launcher_arguments(sys.argv)
    main()
