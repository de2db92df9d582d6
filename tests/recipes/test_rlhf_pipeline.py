"""The synthetic RLHF pipeline end to end at toy sizes: every stage hands over to the next."""

from __future__ import annotations

import json
import math
import os

import torch
from transformers import AutoModelForCausalLM

from recipes.rlhf_pipeline import METHODS, parse_methods, run_pipeline, split_overrides
from rlhf.checkpoint import export_dir, list_checkpoints

SMALL = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
]


def test_overrides_go_to_their_stage():
    assert split_overrides(["seed=3", "ppo.train.steps=5", "rm.optim.lr=1", "dpo.loss.beta=0.2"]) == {
        "sft": ["seed=3"],
        "rm_backbone": ["seed=3"],
        "rm": ["seed=3", "optim.lr=1"],
        "ppo": ["seed=3", "train.steps=5"],
        "dpo": ["seed=3", "loss.beta=0.2"],
    }
    assert parse_methods(["seed=1", "methods=ppo,dpo"]) == (["seed=1"], ("ppo", "dpo"))
    assert parse_methods(["seed=1"]) == (["seed=1"], METHODS)


def test_pipeline_runs_every_stage(tmp_path):
    summary = run_pipeline(
        [
            "logger=quiet",
            *[f"sft.{o}" for o in SMALL],
            "sft.train.steps=20",
            "sft.train.check_every=0",
            "rm_backbone.train.steps=5",
            "dpo.train.steps=3",
            "dpo.train.batch_size=8",
            "dpo.train.micro_batch_size=8",
            "dpo.eval.every=0",
            "dpo.eval.num_samples=16",
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
        assert math.isfinite(summary[key]), key
    assert os.path.exists(tmp_path / "rto" / "pipeline.png")

    def weights(stage: str) -> dict:
        export = export_dir(list_checkpoints(str(tmp_path / stage))[-1])
        return AutoModelForCausalLM.from_pretrained(export).state_dict()

    sft_weights = weights("sft")
    for name in ("sft", *METHODS):  # every model answered the held-out problems
        heldout = summary[f"heldout/{name}"]
        assert heldout["exact_match"] <= heldout["digit_match"], name  # an exact answer has every digit
        if name != "sft":  # and every method trained its own model from the SFT start
            trained = weights(name)
            assert any(not torch.equal(trained[k], sft_weights[k]) for k in sft_weights), name
