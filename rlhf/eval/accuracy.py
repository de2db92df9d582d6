"""Greedy evaluation on held-out prompts: completions sampled by a rollout engine without sampling,
scored by reward functions (or a reward model), reduced over ranks. `greedy_accuracy` is the 0/1
case: the fraction of rows a reward scores 1.0."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset

from rlhf.rollout.engine import RolloutEngine, generate_rollouts
from rlhf.rollout.sampling import SamplingParams, prompt_inputs
from rlhf.types import RewardFn

# batch -> (weighted total [B], scored [B] bool, per-reward values [B] with NaN where unscored)
BatchScorer = Callable[[Any], tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]


@torch.no_grad()
def greedy_evaluation(
    rollout: RolloutEngine,
    dataset: Dataset,
    score: BatchScorer,
    *,
    accuracy_reward: str | None = None,
    prompt_column: str = "prompt",
    batch_size: int = 250,
    max_new_tokens: int = 8,
    weights_version: int = 0,
    agent: Any = None,
) -> dict[str, float]:
    """Greedy completions of every row of `dataset` by `rollout` (holding the policy's weights after
    `weights_version` updates), scored by `score`: `eval/reward` is the mean weighted total over the
    rows some reward scored, `eval/reward/<name>` each reward's mean over the rows it scored, and
    with `accuracy_reward`, `eval/accuracy` the fraction of all rows where that reward is 1.0. With
    an `agent` (rlhf/agents), each row is a greedy episode with its tools and environments.

    Each rank takes a contiguous shard, padded to the same length on every rank by repeating rows
    that are then left out of every sum: all ranks run the same batches inside one `ready` block
    (ZeRO-3 gathers parameters, and a partitioned reward model runs its forward, in step).
    """
    policy, total_rows = rollout.policy, len(dataset)
    shard = math.ceil(total_rows / policy.world_size)
    positions = range(policy.rank * shard, (policy.rank + 1) * shard)
    sums: dict[str, list[float]] = {}  # key -> [sum, count]

    def add(key: str, values: torch.Tensor, counted: torch.Tensor) -> None:
        entry = sums.setdefault(key, [0.0, 0.0])
        entry[0] += float(values[counted].sum())
        entry[1] += float(counted.sum())

    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    with rollout.ready(weights_version):
        for offset in range(0, shard, batch_size):
            chunk = positions[offset : offset + batch_size]
            real = torch.tensor([p < total_rows for p in chunk])
            indices = [p % total_rows for p in chunk]
            if agent is not None:
                batch, _ = agent.rollout(
                    rollout,
                    dataset.select(indices),
                    prompt_column=prompt_column,
                    group_size=1,
                    sampling=sampling,
                    do_sample=False,
                )
            else:
                batch = generate_rollouts(
                    rollout,
                    **prompt_inputs(dataset[indices], prompt_column),
                    group_size=1,
                    sampling=sampling,
                    do_sample=False,
                )
            total, scored, per_reward = score(batch)
            add("eval/reward", total.float().cpu(), scored.cpu() & real)
            for name, values in per_reward.items():
                values = values.float().cpu()
                add(f"eval/reward/{name}", values, ~torch.isnan(values) & real)
            if accuracy_reward in per_reward:
                add("eval/accuracy", (per_reward[accuracy_reward].cpu() >= 1.0).float(), real)
    keys = sorted(sums)  # the same on every rank: the scorer's names do not depend on the rows
    reduced = policy.all_reduce_sum(torch.tensor([sums[k] for k in keys], device=policy.device).view(-1, 2))
    return {key: float(s) / max(float(n), 1.0) for key, (s, n) in zip(keys, reduced.cpu().tolist())}


def reward_scorer(reward_fn: RewardFn, name: str = "accuracy") -> BatchScorer:
    """A BatchScorer of one reward function (None values are unscored)."""

    def score(batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        values = reward_fn(batch.prompts, batch.reward_completions(), **batch.columns)
        tensor = torch.tensor([math.nan if v is None else float(v) for v in values])
        scored = ~torch.isnan(tensor)
        return torch.nan_to_num(tensor), scored, {name: tensor}

    return score


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
    """Fraction of rows whose greedy completion gets reward 1.0 from `reward_fn`, over the whole
    dataset (rows the reward cannot score count as wrong)."""
    results = greedy_evaluation(
        rollout,
        dataset,
        reward_scorer(reward_fn),
        accuracy_reward="accuracy",
        prompt_column=prompt_column,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        weights_version=weights_version,
    )
    return results.get("eval/accuracy", 0.0)


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


def heldout_gold(
    model_dir: str, data_cfg: Any, batch_size: int = 500, max_new_tokens: int = 5
) -> dict[str, float]:
    """Greedy answers of the model exported at `model_dir` to every held-out problem of a task with
    an `answer` column: the mean exact match and the mean gold score (fraction of correct digits),
    as the synthetic pipeline and its benchmarks report them."""
    from rewards import digit_match, exact_match
    from rlhf.config import ModelConfig
    from rlhf.data.load import load_task_data
    from rlhf.models.load import load_causal_lm, load_tokenizer
    from rlhf.rollout.engine import engine_for_model
    from rlhf.scoring import WeightedReward, score_completions

    model_cfg = ModelConfig(source="pretrained", name_or_path=model_dir)
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, tokenizer).eval()
    _, eval_rows = load_task_data(data_cfg)
    rewards = [
        WeightedReward("exact_match", exact_match, 1.0),
        WeightedReward("digit_match", digit_match, 0.0),
    ]

    def score(batch: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return score_completions(rewards, batch.prompts, batch.completions, batch.columns)[:3]

    results = greedy_evaluation(
        engine_for_model("hf", model, tokenizer, max_new_tokens),
        eval_rows,
        score,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    return {name: results[f"eval/reward/{name}"] for name in ("exact_match", "digit_match")}
