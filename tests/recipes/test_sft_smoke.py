"""SFT: loss falls on the arithmetic task, the export loads, resume continues; eval loss, the
all-token loss, epochs, and the accuracy check's requirements."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from recipes import sft
from rlhf.checkpoint import export_dir
from rlhf.config import ConfigError
from rlhf.loggers import read_metrics
from rlhf.scoring import RewardError
from tests.chat_model import save_chat_model
from tests.resume_checks import assert_resume_matches


def test_sft_loss_falls_and_exports(make_config):
    result = sft.train(
        make_config(
            "sft",
            "train.steps=30",
            "train.batch_size=32",
            "train.micro_batch_size=16",
            "train.check_every=15",
            "eval.num_samples=20",
            "optim.warmup_steps=5",
            "optim.lr=3e-3",
            "accuracy_reward=exact_match",
        )
    )
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "check/accuracy" in rows[-1] and "eval/accuracy" in result
    AutoModelForCausalLM.from_pretrained(export_dir(result["checkpoint"]))


def test_sft_stops_at_accuracy_threshold(make_config):
    result = sft.train(
        make_config(
            "sft",
            "train.steps=50",
            "train.check_every=2",
            "train.stop_at_accuracy=0.0",
            "accuracy_reward=exact_match",
            "eval.num_samples=4",
        )
    )
    assert result["step"] == 2


def test_sft_resume(make_config, tmp_path):
    args = ["train.batch_size=16", "train.check_every=0", "checkpoint.every=3", "eval.num_samples=4"]
    straight = sft.train(make_config("sft", *args, "train.steps=6", run_dir=str(tmp_path / "a")))
    sft.train(make_config("sft", *args, "train.steps=3", run_dir=str(tmp_path / "b")))
    resumed = sft.train(make_config("sft", *args, "train.steps=6", f"resume={tmp_path / 'b'}"))
    first = {r["step"]: r["loss"] for r in read_metrics(straight["run_dir"]) if "loss" in r}
    second = {r["step"]: r["loss"] for r in read_metrics(resumed["run_dir"]) if "loss" in r}
    assert [first[s] for s in (4, 5, 6)] == [second[s] for s in (4, 5, 6)]
    assert_resume_matches(straight, resumed, 3, 6)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_sft_eval_loss_epochs_and_the_all_token_loss(make_config, tmp_path):
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(10) for b in range(3)]
    _jsonl(tmp_path / "data" / "train.jsonl", rows)
    _jsonl(tmp_path / "data" / "eval.jsonl", rows[:8])
    common = ["data=jsonl", f"data.source={tmp_path / 'data'}", "train.epochs=2", "train.batch_size=10"]
    completion_only = sft.train(make_config("sft", *common, run_dir=str(tmp_path / "a")))
    assert completion_only["step"] == 6  # 2 epochs of 30 rows, 10 per step
    assert "eval/loss" in completion_only and "eval/accuracy" not in completion_only
    everything = sft.train(
        make_config("sft", *common, "train.completion_only_loss=false", run_dir=str(tmp_path / "b"))
    )
    # the prompt's tokens are targets too: a different (per-token mean) loss from the first step on
    first = [
        next(r["loss"] for r in read_metrics(run["run_dir"]) if "loss" in r)
        for run in (completion_only, everything)
    ]
    assert first[0] != pytest.approx(first[1], rel=1e-3)


def test_sft_accuracy_check_needs_a_reward_and_its_columns(make_config, tmp_path):
    with pytest.raises(ConfigError, match="train.stop_at_accuracy needs accuracy_reward"):
        sft.train(make_config("sft", "train.stop_at_accuracy=0.5"))
    _jsonl(tmp_path / "data" / "train.jsonl", [{"prompt": "1+2=", "completion": "3"}])
    with pytest.raises(RewardError, match=r"'exact_match' needs column\(s\) \['answer'\]"):
        sft.train(
            make_config(
                "sft", "data=jsonl", f"data.source={tmp_path / 'data'}", "accuracy_reward=exact_match"
            )
        )


def test_assistant_only_loss_reaches_the_recipes_loss(make_config, tmp_path):
    """Two-exchange conversations: with train.assistant_only_loss the first answer is learned and
    evaluated too, so the eval loss differs from the last-turn-only run's."""
    save_chat_model(str(tmp_path / "model"))
    turns = [("Hi", "Hello!"), ("What is 12 + 30?", "42.")]
    conversation = [
        m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})
    ]
    for split in ("train", "eval"):
        _jsonl(tmp_path / "data" / f"{split}.jsonl", [{"messages": conversation}] * 4)
    common = ["model=pretrained", f"model.name_or_path={tmp_path / 'model'}", "data=jsonl"]
    common += [
        f"data.source={tmp_path / 'data'}",
        "train.steps=1",
        "train.batch_size=4",
        "train.check_every=0",
    ]
    last_turn = sft.train(make_config("sft", *common, run_dir=str(tmp_path / "last")))
    every_turn = sft.train(
        make_config("sft", *common, "train.assistant_only_loss=true", run_dir=str(tmp_path / "every"))
    )
    assert every_turn["eval/loss"] != pytest.approx(last_turn["eval/loss"], rel=1e-3)
