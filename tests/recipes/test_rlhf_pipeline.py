"""The synthetic RLHF pipeline end to end at toy sizes: every stage hands over to the next."""

from __future__ import annotations

import json
import os

from recipes.rlhf_pipeline import run_pipeline, split_overrides

SMALL = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
]


def test_overrides_go_to_their_stage():
    assert split_overrides(["seed=3", "ppo.train.steps=5", "rm.optim.lr=1"]) == {
        "sft": ["seed=3"],
        "rm": ["seed=3", "optim.lr=1"],
        "ppo": ["seed=3", "train.steps=5"],
    }


def test_pipeline_runs_every_stage(tmp_path):
    summary = run_pipeline(
        [
            "logger=quiet",
            *[f"sft.{o}" for o in SMALL],
            "sft.train.steps=20",
            "sft.train.check_every=0",
            "sft.eval.num_samples=20",
            "rm.train.steps=4",
            "rm.train.batch_size=8",
            "rm.train.micro_batch_size=8",
            "rm.eval.num_samples=20",
            "ppo.train.steps=3",
            "ppo.train.prompts_per_step=4",
            "ppo.train.micro_batch_size=4",
            "ppo.eval.every=0",
            "ppo.eval.num_samples=20",
        ],
        run_dir=str(tmp_path),
        num_pair_prompts=200,
    )
    assert summary["pairs"] > 0
    with open(tmp_path / "pairs" / "train.jsonl") as handle:
        row = json.loads(handle.readline())
    assert {"prompt", "chosen", "rejected", "answer"} <= set(row)
    assert os.path.exists(tmp_path / "ppo" / "pipeline.png")
    for key in ("gold_start", "gold_end", "rm_start", "rm_end", "kl_end", "accuracy_start", "accuracy_end"):
        assert summary[key] == summary[key], key  # not NaN
