"""Run set-up shared by the recipes: seeding, the run directory, resume lookup, reward functions.

A run directory holds config.yaml (the resolved config), metrics.jsonl, rollouts.jsonl (a sample of
each logged step's rollout), checkpoints/, plots and the offline wandb run. `resume=<dir>` continues the run that owns that checkpoint, in its own directory.
"""

from __future__ import annotations

import dataclasses
import os
import random
from typing import Any

import numpy as np
import torch
import yaml

from rlhf.checkpoint import CHECKPOINT_DIR, export_dir, resolve_checkpoint
from rlhf.config import LoggerConfig, ModelConfig, RewardConfig
from rlhf.rollout.records import rollout_records, sample_rows
from rlhf.scoring import WeightedReward, resolve_reward


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def prepare_run_dir(run_dir: str, config: Any) -> str:
    """Create the run directory and write its resolved config.yaml."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as handle:
        yaml.safe_dump(dataclasses.asdict(config), handle, sort_keys=False)
    return run_dir


def resume_target(resume: str | None) -> tuple[str | None, str | None]:
    """(checkpoint directory, its run directory) for `resume`, or (None, None)."""
    if not resume:
        return None, None
    checkpoint = resolve_checkpoint(resume)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    if os.path.basename(os.path.dirname(os.path.abspath(checkpoint))) != CHECKPOINT_DIR:
        run_dir = os.path.dirname(os.path.abspath(checkpoint))
    return checkpoint, run_dir


def model_config_from_checkpoint(model_cfg: ModelConfig, checkpoint: str) -> ModelConfig:
    """The same model settings, loading weights and tokenizer from a checkpoint's HF export."""
    return dataclasses.replace(
        model_cfg, source="pretrained", name_or_path=export_dir(checkpoint), tokenizer_name_or_path=None
    )


def build_rewards(cfg: RewardConfig) -> list[WeightedReward]:
    from rewards import REWARD_FUNCTIONS

    return [
        WeightedReward(term.name, resolve_reward(term.name, REWARD_FUNCTIONS), term.weight)
        for term in cfg.functions
    ]


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch of row indices (groups stay whole)."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank : (rank + 1) * per_rank]


def mean_over_ranks(metrics: dict[str, float], engine: Any) -> dict[str, float]:
    """Average scalar metrics over ranks (every rank must log the same keys)."""
    if engine.world_size == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=engine.device)
    summed = engine.all_reduce_sum(values) / engine.world_size
    return dict(zip(keys, summed.tolist()))


def drop_launcher_arguments(argv: list[str]) -> list[str]:
    """argv without the `--local_rank=N` the deepspeed launcher appends (LOCAL_RANK is in the
    environment too); Hydra would reject it as an override."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        else:
            kept.append(arg)
    return kept


def open_run(cfg: Any, env: Any) -> tuple[str, str | None]:
    """(run directory, checkpoint to resume or None) for a recipe: finds the checkpoint `cfg.resume`
    names (its run continues in its own directory), writes config.yaml on rank 0, and seeds every
    rank differently so ranks sample different completions."""
    checkpoint, resumed_run_dir = resume_target(cfg.resume)
    run_dir = resumed_run_dir or cfg.run_dir
    if env.is_main:
        prepare_run_dir(run_dir, cfg)
    seed_everything(cfg.seed + env.rank)
    return run_dir, checkpoint


def log_rollout_sample(
    loggers: Any,
    cfg: LoggerConfig,
    batch: Any,
    tokenizer: Any,
    step: int,
    scores: torch.Tensor,
    per_token: dict[str, torch.Tensor | None],
) -> None:
    """Save `logger.rollout_samples` rows of this step's rollout (rank 0; other ranks have no sinks)
    with the distributions of the whole rollout's scores, advantages and response lengths."""
    if not loggers.sinks or cfg.rollout_samples <= 0:
        return
    rows = sample_rows(batch.batch_size, cfg.rollout_samples, step)
    mask = batch.response_mask.bool()
    advantages = batch.advantages
    if advantages is not None and advantages.dim() == 2:  # per token: one value per trained token
        advantages = advantages[mask]
    distributions = {
        "reward": scores.float().cpu().tolist(),
        "response_length": mask.sum(-1).float().cpu().tolist(),
    }
    if advantages is not None:
        distributions["advantage"] = advantages.float().cpu().tolist()
    records = rollout_records(batch, tokenizer, rows, step, scores, per_token)
    loggers.log_rollouts(records, step, distributions)
