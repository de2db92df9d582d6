"""Reward model: Bradley-Terry training on preference pairs (prompt, chosen, rejected).

Loss -log sigmoid(r_chosen - r_rejected [- margin]) (Ouyang et al., arXiv 2203.02155), optional
per-pair margin (Llama 2) and score centring; chosen and rejected go through one forward. Reports
pair accuracy on the held-out split. The result is a standard sequence-classification model
(one label) that `AutoModelForSequenceClassification.from_pretrained` loads, and a PPO critic can
start from it.

Launch:  python -m recipes.reward_model [overrides...]
         torchrun --nproc_per_node 2 -m recipes.reward_model distributed=zero2
"""

from __future__ import annotations

from rlhf.overrides import check_recipe_command_line

if __name__ == "__main__":  # a wrong key is refused in seconds, before the heavy imports below
    check_recipe_command_line("reward_model", __file__)


import time

import hydra
import torch
from omegaconf import DictConfig

from rlhf.config import RewardModelConfig, plan_sft_batches, register_configs
from rlhf.data.chat import PROMPT_TEXT, prepare_splits
from rlhf.data.collate import collate_pairs, pair_tokens
from rlhf.data.load import load_task_data, warn_unknown_tokens
from rlhf.data.sampler import EpochSampler, rank_slice
from rlhf.distributed import build_engine, launcher_env, run_entry_point
from rlhf.distributed.collectives import mean_over_ranks
from rlhf.losses.preference import bradley_terry_loss
from rlhf.metrics import MetricAccumulator
from rlhf.models.forward import sequence_scores
from rlhf.models.load import load_scorer, load_tokenizer, model_context
from rlhf.models.options import ForwardOptions
from rlhf.plots import plot_metrics
from rlhf.run import Run, recipe_config
from rlhf.update import micro_batches


def train(cfg: RewardModelConfig) -> dict[str, float | str]:
    """Train the reward model; returns the final metrics, the last checkpoint and the run directory."""
    # Setup: validate before loading anything heavy.
    env = launcher_env()
    plan = plan_sft_batches(cfg, env.world_size)
    train_rows, eval_rows = load_task_data(cfg.data, needs_pairs=True)
    total_steps = cfg.train.total_steps(len(train_rows))
    run = Run.open("reward_model", cfg, env, total_steps)
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows = prepare_splits(
        "pairs", train_rows, eval_rows, tokenizer, cfg.data, context=model_context(cfg.model)
    )
    warn_unknown_tokens(
        tokenizer, train_rows, [PROMPT_TEXT, cfg.data.chosen_column, cfg.data.rejected_column]
    )
    engine = build_engine(
        lambda: load_scorer(cfg.model, tokenizer, seed=cfg.seed),
        cfg.optim,
        cfg.distributed,
        total_steps,
        plan.micro_batch_size,
        cfg.train.precision,
    )
    sampler = EpochSampler(len(train_rows), seed=cfg.seed)
    run.attach(engine, tokenizer, {"sampler": sampler})
    d = cfg.data

    def pair_scores(rows) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = collate_pairs(rows, tokenizer.pad_token_id, engine.device)
        scores = sequence_scores(engine.model, *tensors, ForwardOptions.from_config(cfg.model))
        return scores[: len(rows)], scores[len(rows) :]

    @torch.no_grad()
    def pair_accuracy(rows) -> float:
        shard = rows.shard(num_shards=engine.world_size, index=engine.rank, contiguous=True)
        correct = torch.zeros((), device=engine.device)
        for start in range(0, len(shard), cfg.eval.batch_size):
            chosen, rejected = pair_scores(
                shard.select(range(start, min(start + cfg.eval.batch_size, len(shard))))
            )
            correct += (chosen > rejected).sum()
        return float(engine.all_reduce_sum(correct)) / len(rows)

    metrics: dict[str, float] = {}
    if eval_rows is not None:
        evaluation = eval_rows.select(range(min(cfg.eval.num_samples, len(eval_rows))))
        run.evaluate_with(lambda step: {"eval/pair_accuracy": pair_accuracy(evaluation)}, cfg.eval.every)
    with run:
        for step in run.steps():
            started = time.perf_counter()
            # 1 batch: this rank's share of the step's pairs
            rows = train_rows.select(
                rank_slice(sampler.next_indices(cfg.train.batch_size), env.rank, env.world_size)
            )
            normalizer = engine.all_reduce_sum(torch.tensor(float(len(rows)), device=engine.device))
            # 2 score chosen and rejected in one forward per micro-batch, Bradley-Terry loss
            accumulator = MetricAccumulator()
            step_loss = torch.zeros((), device=engine.device)
            budget = cfg.train.max_tokens_per_micro_batch
            tokens = pair_tokens(rows) if budget else None
            for micro in micro_batches(
                engine, torch.arange(len(rows)), plan.micro_batch_size, budget, tokens
            ):
                micro_rows = rows.select(micro.tolist())
                chosen, rejected = pair_scores(micro_rows)
                margin = (
                    torch.tensor(micro_rows[d.margin_column], device=engine.device)
                    if cfg.train.use_margin and d.margin_column
                    else None
                )
                out = bradley_terry_loss(
                    chosen, rejected, normalizer=normalizer, margin=margin, center_coef=cfg.train.center_coef
                )
                engine.backward(out.loss)
                step_loss += out.loss.detach() * engine.world_size
                accumulator.add(out.metrics, weight=len(micro))
            # 3 optimizer step, log, evaluate (checkpoints and stops: in run.steps)
            metrics = {"loss": float(step_loss), **accumulator.compute(), **engine.step()}
            metrics["time/step"] = time.perf_counter() - started
            metrics = mean_over_ranks(metrics, engine)
            run.end_step(step, metrics)  # evaluated every eval.every steps, logged by logger.log_every
        run.finish()
        metrics.update(run.evaluate_after(metrics))
    if env.is_main:
        plot_metrics(
            run.dir, ["loss", "rm/accuracy", "eval/pair_accuracy"], "reward_model_curves.png", "Reward model"
        )
    return run.result(metrics)


@hydra.main(config_path="../configs", config_name="reward_model", version_base=None)
def main(dict_cfg: DictConfig) -> None:
    cfg: RewardModelConfig = recipe_config(RewardModelConfig, dict_cfg)
    result = train(cfg)
    if launcher_env().is_main:
        print(f"reward model finished at step {result['step']}; checkpoint: {result['checkpoint']}")
        if "eval/pair_accuracy" in result:
            print(f"held-out pair accuracy: {result['eval/pair_accuracy']:.3f}")


register_configs()

if __name__ == "__main__":
    run_entry_point(main)
