"""train.max_tokens_per_micro_batch in every recipe besides GRPO (tests/recipes/test_grpo_family.py):
SFT, reward model, DPO, AlignDistil and PPO split their rows by tokens into more micro-batches and
make the same update as row micro-batches (one normaliser per optimizer step either way)."""

from __future__ import annotations

import importlib

import pytest

import rlhf.update
from recipes import aligndistil, dpo, ppo, reward_model, sft

ROWS = [
    "train.steps=2",
    "train.batch_size=8",
    "train.micro_batch_size=8",
    "eval.every=0",
    "eval.num_samples=8",
]
CASES = {
    # recipe: (train, overrides, a token budget that splits its batches, the loss metrics compared)
    "sft": (sft.train, [*ROWS, "train.check_every=0", "optim.lr=1e-2"], 24, ["loss"]),
    "reward_model": (reward_model.train, [*ROWS, "optim.lr=1e-2"], 40, ["loss"]),
    "dpo": (dpo.train, [*ROWS, "optim.lr=1e-2"], 40, ["loss"]),
    "aligndistil": (aligndistil.train, [*ROWS, "optim.lr=1e-2"], 24, ["loss"]),
    "ppo": (
        ppo.train,
        [
            "+experiment=ppo_arithmetic_rewards",
            "train.steps=2",
            "train.prompts_per_step=4",
            "train.micro_batch_size=4",
            "rollout.max_new_tokens=4",
        ]
        + ["eval.num_samples=8", "optim.lr=1e-2", "critic.optim.lr=1e-2"],
        12,
        ["loss", "loss/value", "value/mean"],
    ),
}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_token_budget_gives_more_micro_batches_and_the_same_update(
    recipe, make_config, monkeypatch, tmp_path
):
    train, overrides, budget, keys = CASES[recipe]
    if recipe == "aligndistil":
        from tests.unit.test_distill import save_teachers

        save_teachers(tmp_path)
        overrides = [
            *overrides,
            f"teacher.dpo_model={tmp_path / 'dpo'}",
            f"teacher.reverse_dpo_model={tmp_path / 'reverse'}",
        ]
    module = importlib.import_module(f"recipes.{recipe}")
    splits: list[int] = []

    split = rlhf.update.micro_batches

    def counted(*args, **kwargs):
        parts = split(*args, **kwargs)
        splits.append(len(parts))
        return parts

    # the recipes' own splits and the shared update loop's
    monkeypatch.setattr(module, "micro_batches", counted)
    monkeypatch.setattr(rlhf.update, "micro_batches", counted)
    rows = train(make_config(recipe, *overrides, run_dir=str(tmp_path / "rows")))
    by_rows, splits[:] = list(splits), []
    tokens = train(
        make_config(
            recipe, *overrides, f"train.max_tokens_per_micro_batch={budget}", run_dir=str(tmp_path / "tokens")
        )
    )
    assert sum(splits) > sum(by_rows), (splits, by_rows)
    for key in keys:
        # fp32: the same per-row terms accumulated in other groupings
        assert tokens[key] == pytest.approx(rows[key], rel=1e-4, abs=1e-6), key
