"""Held-out evaluation over ranks: each rank scores its shard, padded to equal length by repeating
rows that no sum counts; every reward's mean and the weighted total are reduced as sums and counts."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from rlhf.config import ModelConfig, TinyModelConfig
from rlhf.eval.accuracy import greedy_evaluation
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.rollout.engine import FrozenPolicy
from rlhf.rollout.hf import TransformersEngine

ROWS = Dataset.from_dict(
    {"prompt": ["1+1=", "2+2=", "3+3=", "4+4=", "5+5="], "answer": ["0", "1", "2", "3", "4"]}
)


class RankPolicy(FrozenPolicy):
    """Rank `rank` of `world_size` (the sum over ranks is left to the caller: here identity)."""

    def __init__(self, model, rank: int, world_size: int):
        super().__init__(model)
        self.rank, self.world_size = rank, world_size


@pytest.fixture(scope="module")
def model_and_tokenizer():
    cfg = ModelConfig(tiny=TinyModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32))
    tokenizer = load_tokenizer(cfg)
    return load_causal_lm(cfg, tokenizer, seed=0), tokenizer


def _score_by_prompt(seen: list[str]):
    """1.0 for rows 0 and 3, else 0.0 (`good`); `half` scores only rows 1-4 (row 0 unscored)."""

    def score(batch):
        seen.extend(batch.prompts)
        good = torch.tensor([float(p in ("1+1=", "4+4=")) for p in batch.prompts])
        half = torch.tensor([math.nan if p == "1+1=" else 0.5 for p in batch.prompts])
        total = good + torch.nan_to_num(half)
        return total, torch.ones(len(good), dtype=torch.bool), {"good": good, "half": half}

    return score


@pytest.mark.parametrize(
    "rank, expected_prompts", [(0, ["1+1=", "2+2=", "3+3="]), (1, ["4+4=", "5+5=", "1+1="])]
)
def test_each_rank_scores_its_padded_shard_and_counts_only_its_rows(
    model_and_tokenizer, rank, expected_prompts
):
    model, tokenizer = model_and_tokenizer
    engine = TransformersEngine(RankPolicy(model, rank, 2), tokenizer)
    seen: list[str] = []
    results = greedy_evaluation(
        engine, ROWS, _score_by_prompt(seen), accuracy_reward="good", batch_size=2, max_new_tokens=2
    )
    assert seen == expected_prompts  # rank 1 repeats row 0 so both ranks run two batches
    if rank == 0:  # rows 0-2: good 1, 0, 0; half unscored on row 0
        assert results["eval/accuracy"] == pytest.approx(1 / 3)
        assert results["eval/reward/half"] == pytest.approx(0.5)
        assert results["eval/reward"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    else:  # rows 3-4 only: the repeated row 0 (good 1.0) is in no sum
        assert results["eval/accuracy"] == pytest.approx(1 / 2)
        assert results["eval/reward/good"] == pytest.approx(1 / 2)
        assert results["eval/reward"] == pytest.approx((1.5 + 0.5) / 2)
