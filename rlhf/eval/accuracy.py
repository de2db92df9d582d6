"""Held-out accuracy: greedy completions scored by a 0/1 reward function, sharded over ranks."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from rlhf.rollout.hf import SamplingParams, generate_rollouts, prompt_inputs
from rlhf.types import RewardFn


@torch.no_grad()
def greedy_accuracy(
    engine: Any,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    reward_fn: RewardFn,
    *,
    prompt_column: str = "prompt",
    batch_size: int = 250,
    max_new_tokens: int = 8,
    vllm: Any = None,
    weights_version: int = 0,
) -> float:
    """Fraction of rows whose greedy completion gets reward 1.0, over the whole dataset.

    Each rank scores a contiguous shard; every rank runs the same number of batches, so sharded
    (ZeRO-3) parameters are gathered in step on all ranks. With `vllm` the engine generates, its
    weights synced to `weights_version` first.
    """
    shard_size = math.ceil(len(dataset) / engine.world_size)
    start, stop = engine.rank * shard_size, min((engine.rank + 1) * shard_size, len(dataset))
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    correct = 0
    if vllm is not None:
        vllm.sync_weights(engine, weights_version)
    with contextlib.nullcontext() if vllm is not None else engine.gathered_parameters():
        for offset in range(0, shard_size, batch_size):
            rows = (
                dataset[start + offset : min(start + offset + batch_size, stop)]
                if start + offset < stop
                else None
            )
            if not rows or not rows[prompt_column]:
                continue
            batch = generate_rollouts(
                engine.module,
                tokenizer,
                **prompt_inputs(rows, prompt_column),
                group_size=1,
                sampling=sampling,
                do_sample=False,
                vllm=vllm,
            )
            scores = reward_fn(batch.prompts, batch.reward_completions(), **batch.columns)
            correct += sum(1 for s in scores if s is not None and s >= 1.0)
    if vllm is not None:
        vllm.sleep()
    total = engine.all_reduce_sum(torch.tensor(float(correct), device=engine.device))
    return float(total) / max(len(dataset), 1)


def heldout_accuracy(
    engine: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: Dataset,
    reward_fn: RewardFn,
    data_cfg: Any,
    eval_cfg: Any,
    limit: int | None = None,
    vllm: Any = None,
    weights_version: int = 0,
) -> float:
    """`greedy_accuracy` with the recipe's data and eval settings, on the first `limit` rows."""
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return greedy_accuracy(
        engine,
        tokenizer,
        rows,
        reward_fn,
        prompt_column=data_cfg.prompt_column,
        batch_size=eval_cfg.batch_size,
        max_new_tokens=eval_cfg.max_new_tokens,
        vllm=vllm,
        weights_version=weights_version,
    )
