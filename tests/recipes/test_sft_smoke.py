"""SFT: loss falls on the arithmetic task, the export loads, and resume continues."""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from recipes import sft
from rlhf.checkpoint import export_dir
from rlhf.loggers import read_metrics


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
        )
    )
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "check/accuracy" in rows[-1] and "eval/accuracy" in result
    AutoModelForCausalLM.from_pretrained(export_dir(result["checkpoint"]))


def test_sft_stops_at_accuracy_threshold(make_config):
    result = sft.train(
        make_config(
            "sft", "train.steps=50", "train.check_every=2", "train.stop_at_accuracy=0.0", "eval.num_samples=4"
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
