"""Reward model recipe: learns synthetic pairs, exports a sequence classifier, seeds a critic."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from recipes import reward_model
from rlhf.checkpoint import export_dir
from rlhf.data.load import DataError
from rlhf.loggers import read_metrics


def test_reward_model_learns_exports_and_seeds_a_critic(make_config):
    result = reward_model.train(
        make_config(
            "reward_model",
            "train.steps=60",
            "train.batch_size=32",
            "train.micro_batch_size=16",
            "eval.num_samples=200",
            "eval.every=30",
            "optim.lr=3e-3",
        )
    )
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert sum(r["loss"] for r in rows[-10:]) / 10 < sum(r["loss"] for r in rows[:10]) / 10
    assert result["eval/pair_accuracy"] > 0.5
    path = export_dir(result["checkpoint"])
    rm = AutoModelForSequenceClassification.from_pretrained(path)
    critic = AutoModelForTokenClassification.from_pretrained(path)
    torch.testing.assert_close(critic.score.weight, rm.score.weight)  # the critic starts from the RM head
    assert rm.config.num_labels == 1


def test_pairs_need_their_columns(make_config, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "chosen": "2"}) + "\n")
    with pytest.raises(DataError, match="rejected"):
        reward_model.train(make_config("reward_model", f"data.source={data}", "data.eval_split=null"))
