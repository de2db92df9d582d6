"""Held-out accuracy: greedy completions scored by a 0/1 reward function."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.rollout.hf import SamplingParams, generate_rollouts
from rlhf.types import RewardFn


@torch.no_grad()
def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    reward_fn: RewardFn,
    *,
    prompt_column: str = "prompt",
    batch_size: int = 250,
    max_new_tokens: int = 8,
    apply_chat_template: bool = False,
) -> float:
    """Fraction of rows whose greedy completion gets reward 1.0."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    correct = 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        prompts = rows[prompt_column]
        columns = {k: v for k, v in rows.items() if k != prompt_column}
        batch = generate_rollouts(
            model,
            tokenizer,
            prompts,
            columns,
            group_size=1,
            sampling=sampling,
            apply_chat_template=apply_chat_template,
            do_sample=False,
        )
        scores = reward_fn(batch.prompts, batch.completions, **batch.columns)
        correct += sum(1 for s in scores if s is not None and s >= 1.0)
    return correct / max(len(dataset), 1)
