"""Held-out accuracy: greedy completions scored by a 0/1 reward function, sharded over ranks."""

from __future__ import annotations

import math
from typing import Any

import torch
from datasets import Dataset

from rlhf.rollout.engine import RolloutEngine, generate_rollouts
from rlhf.rollout.sampling import SamplingParams, prompt_inputs
from rlhf.types import RewardFn


@torch.no_grad()
def greedy_accuracy(
    rollout: RolloutEngine,
    dataset: Dataset,
    reward_fn: RewardFn,
    *,
    prompt_column: str = "prompt",
    batch_size: int = 250,
    max_new_tokens: int = 8,
    weights_version: int = 0,
) -> float:
    """Fraction of rows whose greedy completion by `rollout` (an engine of rlhf/rollout/engine.py,
    holding the policy's weights after `weights_version` updates) gets reward 1.0, over the whole
    dataset.

    Each rank scores a contiguous shard inside one `ready` block of the engine, which every rank
    enters together (ZeRO-3 parameters are gathered there, in step on all ranks).
    """
    policy = rollout.policy
    shard_size = math.ceil(len(dataset) / policy.world_size)
    start, stop = policy.rank * shard_size, min((policy.rank + 1) * shard_size, len(dataset))
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    correct = 0
    with rollout.ready(weights_version):
        for offset in range(start, stop, batch_size):
            rows = dataset[offset : min(offset + batch_size, stop)]
            if not rows[prompt_column]:
                continue
            batch = generate_rollouts(
                rollout,
                **prompt_inputs(rows, prompt_column),
                group_size=1,
                sampling=sampling,
                do_sample=False,
            )
            scores = reward_fn(batch.prompts, batch.reward_completions(), **batch.columns)
            correct += sum(1 for s in scores if s is not None and s >= 1.0)
    total = policy.all_reduce_sum(torch.tensor(float(correct), device=policy.device))
    return float(total) / max(len(dataset), 1)


def heldout_accuracy(
    rollout: RolloutEngine,
    rows: Dataset,
    reward_fn: RewardFn,
    data_cfg: Any,
    eval_cfg: Any,
    limit: int | None = None,
    weights_version: int = 0,
) -> float:
    """`greedy_accuracy` with the recipe's data and eval settings, on the first `limit` rows."""
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return greedy_accuracy(
        rollout,
        rows,
        reward_fn,
        prompt_column=data_cfg.prompt_column,
        batch_size=eval_cfg.batch_size,
        max_new_tokens=eval_cfg.max_new_tokens,
        weights_version=weights_version,
    )
