"""Supervised fine-tuning (SFT): the warm start before RL.

Maximises the likelihood of the dataset's completion column given the prompt, with the loss on
completion tokens only (prompt tokens are context, never targets). Optionally stops as soon as
greedy accuracy on a check set drawn from the training rows reaches `train.stop_at_accuracy`,
because a tiny model learns arithmetic in a sharp phase transition and a fixed step count would
give an unpredictable starting accuracy for RL.

Launch:  python -m recipes.sft [overrides...]      e.g.  python -m recipes.sft train.steps=200
"""

from __future__ import annotations

import os
import random
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from rewards import REWARD_FUNCTIONS
from rlhf.checkpoint import load_training_state, save_checkpoint
from rlhf.config import SFTConfig, plan_sft_batches, register_configs
from rlhf.data.collate import collate_sft
from rlhf.data.load import load_task_data
from rlhf.data.sampler import EpochSampler
from rlhf.distributed import build_engine
from rlhf.eval.accuracy import greedy_accuracy
from rlhf.loggers import build_loggers
from rlhf.losses.reduce import get_reduction
from rlhf.losses.sft import nll_loss
from rlhf.metrics import MetricAccumulator
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.plots import plot_metrics
from rlhf.runtime import model_config_from_checkpoint, prepare_run_dir, resume_target, seed_everything
from rlhf.scoring import resolve_reward


def train(cfg: SFTConfig) -> dict[str, float | str]:
    """Run SFT; returns the final metrics and the path of the last checkpoint."""
    # Setup: validate before loading anything heavy.
    plan = plan_sft_batches(cfg)
    train_rows, eval_rows = load_task_data(cfg.data, needs_completion=True)
    checkpoint, resumed_run_dir = resume_target(cfg.resume)
    run_dir = prepare_run_dir(resumed_run_dir or cfg.run_dir, cfg)
    seed_everything(cfg.seed)
    model_cfg = model_config_from_checkpoint(cfg.model, checkpoint) if checkpoint else cfg.model
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, tokenizer, seed=cfg.seed)
    engine = build_engine(model, cfg.optim, cfg.distributed, cfg.train.steps)
    reduction = get_reduction("token_mean")
    sampler = EpochSampler(len(train_rows), seed=cfg.seed)
    accuracy_fn = resolve_reward(cfg.accuracy_reward, REWARD_FUNCTIONS) if cfg.accuracy_reward else None
    check_rows = train_rows.select(
        random.Random(cfg.seed).sample(range(len(train_rows)), min(cfg.train.check_size, len(train_rows)))
    )
    start_step = 0
    if checkpoint:
        state = load_training_state(checkpoint)
        engine.load_state_dict(state["engine"])
        sampler.load_state_dict(state["sampler"])
        start_step = state["step"]
    loggers = build_loggers(
        cfg.logger,
        run_dir,
        "sft",
        OmegaConf.to_container(OmegaConf.structured(cfg)),
        cfg.train.steps,
        start_step,
    )
    d = cfg.data

    def accuracy_on(rows) -> float:
        return greedy_accuracy(
            engine.model,
            tokenizer,
            rows,
            accuracy_fn,
            prompt_column=d.prompt_column,
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            apply_chat_template=d.apply_chat_template,
        )

    def save(step: int) -> str:
        state = {"engine": engine.state_dict(), "sampler": sampler.state_dict()}
        return save_checkpoint(run_dir, step, engine.model, tokenizer, state, cfg.checkpoint.keep_last)

    last_checkpoint, step, metrics = checkpoint or "", start_step, {}
    try:
        for step in range(start_step + 1, cfg.train.steps + 1):
            started = time.perf_counter()
            # 1 batch: the next rows of the seeded, resumable sampler
            rows = train_rows.select(sampler.next_indices(plan.rollouts_per_rank))
            prompts, targets = list(rows[d.prompt_column]), [str(t) for t in rows[d.completion_column]]
            # 2 tokenize: [left-padded prompt; right-padded target + EOS]
            prompt_ids, prompt_mask, target_ids, target_mask = collate_sft(
                tokenizer, prompts, targets, engine.device, d.apply_chat_template
            )
            normalizer = engine.all_reduce_sum(reduction.count(target_mask).float())
            # 3 forward/backward per micro-batch, one optimizer step
            accumulator = MetricAccumulator()
            for micro in torch.arange(len(prompts)).split(plan.micro_batch_size):
                logprobs, _ = response_logprobs(
                    engine.model, prompt_ids[micro], prompt_mask[micro], target_ids[micro], target_mask[micro]
                )
                out = nll_loss(logprobs, target_mask[micro], reduction=reduction, normalizer=normalizer)
                engine.backward(out.loss)
                accumulator.add({"loss": out.loss.detach(), **out.metrics})
            metrics = accumulator.compute()
            metrics.update(engine.step())
            metrics["time/step"] = time.perf_counter() - started
            metrics["tokens_per_s"] = (
                float((prompt_mask.sum() + target_mask.sum()).item()) / metrics["time/step"]
            )
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
        if cfg.checkpoint.save_final and (not last_checkpoint or not last_checkpoint.endswith(f"{step:06d}")):
            last_checkpoint = save(step)
        if accuracy_fn is not None and eval_rows is not None:
            sample = eval_rows.select(range(min(cfg.eval.num_samples, len(eval_rows))))
            metrics["eval/accuracy"] = accuracy_on(sample)
            loggers.log({"eval/accuracy": metrics["eval/accuracy"]}, step)
    finally:
        loggers.close()
    plot_metrics(run_dir, ["loss", "check/accuracy"], "sft_curves.png", "SFT")
    return {**metrics, "step": step, "checkpoint": last_checkpoint, "run_dir": run_dir}


@hydra.main(config_path="../configs", config_name="sft", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: SFTConfig = OmegaConf.to_object(dict_cfg)
    result = train(cfg)
    print(f"SFT finished at step {result['step']}; checkpoint: {result['checkpoint']}")
    if "eval/accuracy" in result:
        print(f"held-out accuracy: {result['eval/accuracy']:.3f}")


register_configs()

if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
