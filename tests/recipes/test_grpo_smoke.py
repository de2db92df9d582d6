"""A few GRPO steps on a tiny model: finite loss, parameters move, checkpoints load and resume."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import grpo
from rlhf.checkpoint import export_dir, list_checkpoints
from rlhf.loggers import read_metrics
from rlhf.models.load import load_causal_lm, load_tokenizer

FAST = [
    "train.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=4",
    "eval.num_samples=16",
    "train.micro_batch_size=4",
]


def test_grpo_runs_changes_parameters_and_exports(make_config):
    cfg = make_config(
        "grpo",
        *FAST,
        "train.steps=3",
        "checkpoint.every=2",
        "optim.lr=1e-2",
        "loss.kl_coef=0.05",
        "train.num_minibatches=2",
    )
    initial = load_causal_lm(cfg.model, load_tokenizer(cfg.model), seed=cfg.seed)
    result = grpo.train(cfg)
    rows = read_metrics(result["run_dir"])
    trained = [r for r in rows if "loss" in r]
    assert len(trained) == 3
    for key in [
        "loss",
        "reward/mean",
        "reward/exact_match/mean",
        "reward/answer_format/mean",
        "accuracy",
        "kl/mean",
        "clip/fraction",
        "entropy",
        "response/length_mean",
        "time/step",
        "tokens_per_s",
    ]:
        assert key in trained[-1], key
        assert trained[-1][key] is not None and torch.isfinite(torch.tensor(trained[-1][key])), key
    exported = AutoModelForCausalLM.from_pretrained(export_dir(result["checkpoint"]))
    changed = [
        name for name, p in exported.named_parameters() if not torch.equal(p, initial.state_dict()[name])
    ]
    assert len(changed) == len(list(exported.named_parameters())), "every parameter should move"
    assert [os.path.basename(c) for c in list_checkpoints(result["run_dir"])] == [
        "step-000002",
        "step-000003",
    ]
    assert os.path.exists(os.path.join(result["run_dir"], "grpo_curves.png"))
    assert os.path.exists(os.path.join(result["run_dir"], "config.yaml"))


def test_resume_continues_exactly(make_config, tmp_path):
    """Stopping after step 2 and resuming gives the same step-3 and step-4 metrics as one run."""
    common = [*FAST, "checkpoint.every=2", "eval.every=0", "train.num_minibatches=2", "train.epochs=2"]
    straight = grpo.train(make_config("grpo", *common, "train.steps=4", run_dir=str(tmp_path / "straight")))
    grpo.train(make_config("grpo", *common, "train.steps=2", run_dir=str(tmp_path / "split")))
    resumed = grpo.train(
        make_config(
            "grpo",
            *common,
            "train.steps=4",
            f"resume={tmp_path / 'split'}",
            run_dir=str(tmp_path / "ignored"),
        )
    )
    assert resumed["run_dir"] == str(tmp_path / "split")
    first = {r["step"]: r for r in read_metrics(straight["run_dir"]) if "loss" in r}
    second = {r["step"]: r for r in read_metrics(resumed["run_dir"]) if "loss" in r}
    for step in (3, 4):
        for key in ("loss", "reward/mean", "ratio/mean", "optim/grad_norm"):
            assert first[step][key] == pytest.approx(second[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_failing_reward_keeps_the_last_checkpoint(make_config, tmp_path):
    calls = {"n": 0}

    def flaky(prompts, completions, **_):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("scorer went away")
        return [0.0] * len(completions)

    import rewards

    rewards.REWARD_FUNCTIONS["flaky_for_test"] = flaky
    try:
        cfg = make_config(
            "grpo",
            *FAST,
            "train.steps=5",
            "checkpoint.every=2",
            "reward.functions=[{name: flaky_for_test, weight: 1.0}]",
            "reward.accuracy_reward=null",
        )
        with pytest.raises(Exception, match="flaky_for_test"):
            grpo.train(cfg)
    finally:
        del rewards.REWARD_FUNCTIONS["flaky_for_test"]
    checkpoints = list_checkpoints(cfg.run_dir)
    assert [os.path.basename(c) for c in checkpoints] == ["step-000002"]
    AutoModelForCausalLM.from_pretrained(export_dir(checkpoints[-1]))
    assert not [n for n in os.listdir(os.path.dirname(checkpoints[-1])) if ".tmp-" in n]


def test_kl_in_reward_and_dr_grpo_presets_run(make_config):
    for preset in ("grpo_kl_reward", "grpo_dr_grpo"):
        result = grpo.train(
            make_config(
                "grpo",
                f"+experiment={preset}",
                *FAST,
                "train.steps=1",
                "checkpoint.save_final=false",
                "eval.num_samples=4",
            )
        )
        assert torch.isfinite(torch.tensor(result["loss"]))
        with open(os.path.join(result["run_dir"], "metrics.jsonl")) as handle:
            assert any("loss" in json.loads(line) for line in handle)
