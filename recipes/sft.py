"""Supervised fine-tuning (SFT): the warm start before RL.

Maximises the likelihood of the completion given the prompt: prompt/completion rows (strings or
message lists) or `messages` conversations (learned from the last assistant turn), as TRL's
SFTTrainer takes them. The loss covers completion tokens only unless `train.completion_only_loss`
is false. `eval/loss` is measured on the eval split. With `accuracy_reward` set (and the columns it
needs), greedy accuracy is checked on training rows, and training can stop as soon as it reaches
`train.stop_at_accuracy` (a tiny model learns arithmetic in a sharp phase transition, so a fixed
step count would give an unpredictable starting accuracy for RL).

Launch:  python -m recipes.sft [overrides...]
         torchrun --nproc_per_node 2 -m recipes.sft distributed=zero2
         deepspeed --num_gpus 2 --module recipes.sft distributed=zero3
"""

from __future__ import annotations

from rlhf.overrides import check_recipe_command_line

if __name__ == "__main__":  # a wrong key is refused in seconds, before the heavy imports below
    check_recipe_command_line("sft", __file__)


import random
import time

import hydra
import torch
from omegaconf import DictConfig

from rewards import REWARD_FUNCTIONS
from rlhf.config import ConfigError, SFTConfig, plan_sft_batches, register_configs
from rlhf.data.chat import PROMPT_TEXT, prepare_splits
from rlhf.data.collate import collate_sft, sft_loss_mask
from rlhf.data.load import load_task_data, warn_unknown_tokens
from rlhf.data.sampler import EpochSampler, rank_slice
from rlhf.distributed import build_engine, launcher_env, run_entry_point
from rlhf.distributed.collectives import mean_over_ranks
from rlhf.eval.accuracy import heldout_accuracy
from rlhf.losses.reduce import get_reduction
from rlhf.losses.sft import nll_loss
from rlhf.metrics import MetricAccumulator
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_policy, load_tokenizer, model_context
from rlhf.models.options import ForwardOptions
from rlhf.plots import plot_metrics
from rlhf.rollout.hf import TransformersEngine
from rlhf.run import Run, recipe_config
from rlhf.scoring import check_reward_columns, resolve_reward
from rlhf.update import micro_batches


def train(cfg: SFTConfig) -> dict[str, float | str]:
    """Run SFT; returns the final metrics and the path of the last checkpoint."""
    # Setup: validate before loading anything heavy.
    env = launcher_env()
    plan = plan_sft_batches(cfg, env.world_size)
    train_rows, eval_rows = load_task_data(cfg.data, needs_completion=True)
    accuracy_fn = _accuracy_reward(cfg, train_rows)
    total_steps = cfg.train.total_steps(len(train_rows))
    run = Run.open("sft", cfg, env, total_steps)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows = prepare_splits(
        "sft",
        train_rows,
        eval_rows,
        tokenizer,
        cfg.data,
        context=model_context(cfg.model),
        assistant_only=cfg.train.assistant_only_loss,
    )
    warn_unknown_tokens(tokenizer, train_rows, [PROMPT_TEXT, cfg.data.completion_column])
    engine = build_engine(
        lambda: load_policy(cfg.model, tokenizer, seed=cfg.seed),  # built partitioned under ZeRO-3
        cfg.optim,
        cfg.distributed,
        total_steps,
        plan.micro_batch_size,
        cfg.train.precision,
    )
    reduction = get_reduction("token_mean")
    options = ForwardOptions.from_config(cfg.model)
    sampler = EpochSampler(len(train_rows), seed=cfg.seed)
    check_rows = train_rows.select(
        random.Random(cfg.seed).sample(range(len(train_rows)), min(cfg.train.check_size, len(train_rows)))
    )
    run.attach(engine, tokenizer, {"sampler": sampler})
    d = cfg.data

    def accuracy_on(rows) -> float:
        return heldout_accuracy(TransformersEngine(engine, tokenizer), rows, accuracy_fn, d, cfg.eval)

    def collate(rows):
        """[left-padded prompt; right-padded target] of prepared rows."""
        return collate_sft(rows, tokenizer.pad_token_id, engine.device, cfg.train.completion_only_loss)

    if eval_rows is not None:
        run.evaluate_with(
            lambda step: {"eval/loss": _eval_loss(engine, eval_rows, collate, options, cfg)}, cfg.eval.every
        )
    metrics: dict[str, float] = {}
    with run:
        for step in run.steps():
            started = time.perf_counter()
            # 1 batch: this rank's share of the next rows of the seeded, resumable sampler
            rows = train_rows.select(
                rank_slice(sampler.next_indices(cfg.train.batch_size), env.rank, env.world_size)
            )
            # 2 collate the prepared token ids: [left-padded prompt; right-padded target]
            prompt_ids, prompt_mask, target_ids, target_mask = collate(rows)
            loss_mask = sft_loss_mask(rows, target_mask)  # assistant turns only with assistant_only_loss
            normalizer = engine.all_reduce_sum(reduction.count(loss_mask).float())
            # 3 forward/backward per micro-batch, one optimizer step
            accumulator = MetricAccumulator()
            step_loss = torch.zeros((), device=engine.device)
            tokens = (prompt_mask.sum(-1) + target_mask.sum(-1)).cpu()
            budget = cfg.train.max_tokens_per_micro_batch
            for micro in micro_batches(
                engine, torch.arange(len(rows)), plan.micro_batch_size, budget, tokens
            ):
                logprobs, _ = response_logprobs(
                    engine.model,
                    prompt_ids[micro],
                    prompt_mask[micro],
                    target_ids[micro],
                    target_mask[micro],
                    options,
                )
                out = nll_loss(logprobs, loss_mask[micro], reduction=reduction, normalizer=normalizer)
                engine.backward(out.loss)
                step_loss += out.loss.detach() * engine.world_size
                accumulator.add(out.metrics, weight=float(loss_mask[micro].sum()))
            metrics = {"loss": float(step_loss), **accumulator.compute(), **engine.step()}
            metrics["time/step"] = time.perf_counter() - started
            metrics["tokens_per_s"] = (
                float((prompt_mask.sum() + target_mask.sum()).item()) / metrics["time/step"]
            )
            metrics = mean_over_ranks(metrics, engine)
            # 4 check accuracy on training rows; evaluate and log (checkpoints and stops: in run.steps)
            checked = accuracy_fn is not None and cfg.train.check_every and step % cfg.train.check_every == 0
            if checked:
                with run.untimed():
                    metrics["check/accuracy"] = accuracy_on(check_rows)
            if not run.end_step(step, metrics) and checked:
                run.log(metrics, step)
            if checked and cfg.train.stop_at_accuracy is not None:
                if metrics["check/accuracy"] >= cfg.train.stop_at_accuracy:
                    run.message(
                        f"check accuracy {metrics['check/accuracy']:.3f} reached "
                        f"{cfg.train.stop_at_accuracy} at step {step}"
                    )
                    break
        run.finish()
        metrics.update(run.evaluate_after(metrics))
        if eval_rows is not None and accuracy_fn is not None:  # greedy accuracy: once, at the end
            with run.untimed():
                final = {
                    "eval/accuracy": accuracy_on(
                        eval_rows.select(range(min(cfg.eval.num_samples, len(eval_rows))))
                    )
                }
            metrics.update(final)
            run.log(final, run.step)
    if env.is_main:
        plot_metrics(run.dir, ["loss", "eval/loss", "check/accuracy"], "sft_curves.png", "SFT")
    return run.result(metrics)


def _accuracy_reward(cfg: SFTConfig, rows):
    """The accuracy check's reward, checked against the data's columns before anything loads."""
    if cfg.accuracy_reward is None:
        if cfg.train.stop_at_accuracy is not None:
            raise ConfigError(
                "train.stop_at_accuracy needs accuracy_reward (a 0/1 reward function, e.g. exact_match)"
            )
        return None
    fn = resolve_reward(cfg.accuracy_reward, REWARD_FUNCTIONS)
    check_reward_columns(
        cfg.accuracy_reward, fn, rows.column_names, f"data.source={cfg.data.source!r} (accuracy_reward)"
    )
    return fn


@torch.no_grad()
def _eval_loss(engine, rows, collate, options: ForwardOptions, cfg: SFTConfig) -> float:
    """Token-mean NLL over the first eval.num_samples eval rows, sharded over ranks (every rank the
    same number of forwards, so ZeRO-3 gathers stay in step)."""
    rows = rows.select(range(min(cfg.eval.num_samples, len(rows))))
    shard = -(-len(rows) // engine.world_size)
    total = torch.zeros(2, device=engine.device)
    for offset in range(0, shard, cfg.eval.batch_size):
        start = engine.rank * shard + offset
        ids = list(range(start, min(start + cfg.eval.batch_size, (engine.rank + 1) * shard, len(rows))))
        batch = rows.select(ids or [0])
        prompt_ids, prompt_mask, target_ids, target_mask = collate(batch)
        loss_mask = sft_loss_mask(batch, target_mask)
        logprobs, _ = response_logprobs(
            engine.model, prompt_ids, prompt_mask, target_ids, target_mask, options
        )
        if ids:
            total += torch.stack([-(logprobs * loss_mask).sum(), loss_mask.sum().float()])
    total = engine.all_reduce_sum(total)
    return float(total[0] / total[1].clamp(min=1))


@hydra.main(config_path="../configs", config_name="sft", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: SFTConfig = recipe_config(SFTConfig, dict_cfg)
    result = train(cfg)
    if launcher_env().is_main:
        print(f"SFT finished at step {result['step']}; checkpoint: {result['checkpoint']}")
        if "eval/accuracy" in result:
            print(f"held-out accuracy: {result['eval/accuracy']:.3f}")


register_configs()

if __name__ == "__main__":
    run_entry_point(main)
