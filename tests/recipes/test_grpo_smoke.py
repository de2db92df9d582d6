"""A few GRPO steps on a tiny model: finite loss, parameters move, checkpoints load and resume."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import grpo
from rlhf.checkpoint import CheckpointError, export_dir, list_checkpoints
from rlhf.loggers import read_metrics
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.scoring import RewardError
from tests.resume_checks import assert_resume_matches

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
        *ARITHMETIC_AND_VARIED,
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
    # held-out evaluation scores every configured reward, before training and at the end
    evaluations = [r for r in rows if "eval/reward" in r]
    assert [r["step"] for r in evaluations] == [0, 3]
    for row in evaluations:
        means = [row[f"eval/reward/{name}"] for name in ("exact_match", "answer_format", DIGIT_SUM)]
        assert row["eval/reward"] == pytest.approx(means[0] + 0.1 * means[1] + 0.1 * means[2], abs=1e-5)
        assert row["eval/accuracy"] == row["eval/reward/exact_match"]  # exact_match is 0/1
    assert result["eval/reward_before"] == evaluations[0]["eval/reward"]


def test_resume_continues_exactly(make_config, tmp_path):
    """Stopping after step 2 and resuming with only `resume=<dir> train.steps=4` (the run's saved
    config supplies the rest) gives exactly the step-3 and step-4 metrics of one run."""
    common = [*FAST, *VARIED_REWARD, "checkpoint.every=2", "eval.every=0", "train.num_minibatches=2"]
    common.append("train.updates_per_rollout=2")
    straight = grpo.train(make_config("grpo", *common, "train.steps=4", run_dir=str(tmp_path / "straight")))
    grpo.train(make_config("grpo", *common, "train.steps=2", run_dir=str(tmp_path / "split")))
    cfg = make_config("grpo", "train.steps=4", f"resume={tmp_path / 'split'}")
    assert cfg.train.num_minibatches == 2 and cfg.rollout.group_size == 4  # from the saved config
    resumed = grpo.train(cfg)
    assert resumed["run_dir"] == str(tmp_path / "split")
    first = {r["step"]: r for r in read_metrics(straight["run_dir"]) if "loss" in r}
    second = {r["step"]: r for r in read_metrics(resumed["run_dir"]) if "loss" in r}
    assert sorted(second) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "reward/mean", "ratio/mean", "optim/grad_norm"):
            assert first[step][key] == second[step][key], (step, key)
    assert_resume_matches(straight, resumed, 2, 4)


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
            "data.eval_split=null",  # the reward counts its calls: training's only
        )
        with pytest.raises(Exception, match="flaky_for_test"):
            grpo.train(cfg)
    finally:
        del rewards.REWARD_FUNCTIONS["flaky_for_test"]
    checkpoints = list_checkpoints(cfg.run_dir)
    assert [os.path.basename(c) for c in checkpoints] == ["step-000002"]
    AutoModelForCausalLM.from_pretrained(export_dir(checkpoints[-1]))
    assert not [n for n in os.listdir(os.path.dirname(checkpoints[-1])) if ".tmp" in n]


def digit_sum(prompts, completions, **_):
    """A reward with spread on a random policy's samples, so advantages are not all zero. With the
    arithmetic rewards alone a random model's groups often all score 0, and which do depends on the
    sampler's random stream: on a CUDA device such tests saw no update but numerical noise."""
    return [float(sum(int(c) for c in text if c.isdigit())) for text in completions]


DIGIT_SUM = "tests.recipes.test_grpo_smoke:digit_sum"
VARIED_REWARD = [
    "reward.functions=[{name: 'tests.recipes.test_grpo_smoke:digit_sum', weight: 1.0}]",
    "reward.accuracy_reward=null",
]
ARITHMETIC_AND_VARIED = [  # the arithmetic preset's rewards and metrics, plus digit_sum's spread
    "reward.functions=[{name: exact_match, weight: 1.0}, {name: answer_format, weight: 0.1},"
    " {name: 'tests.recipes.test_grpo_smoke:digit_sum', weight: 0.1}]"
]


def test_kl_in_reward_and_dr_grpo_presets_run(make_config, tmp_path):
    """The KL-in-reward preset puts the KL into the scores, not the loss; Dr.GRPO's preset trains
    with its aggregation and without std scaling (its loss differs from GRPO's on the same start)."""
    runs = {}
    for preset in ("grpo_kl_reward", "grpo_dr_grpo", None):
        cfg = make_config(
            "grpo",
            *([f"+experiment={preset}"] if preset else []),
            *FAST,
            *VARIED_REWARD,
            "train.steps=1",
            "checkpoint.save_final=false",
            run_dir=str(tmp_path / str(preset)),
        )
        runs[preset] = (cfg, grpo.train(cfg))
    kl_cfg, kl_run = runs["grpo_kl_reward"]
    assert kl_cfg.loss.kl_placement == "reward" and kl_run["reward_kl/sequence_mean"] >= 0
    assert "kl/mean" not in kl_run  # nothing of the KL in the loss
    # a custom reward without an accuracy reward is still evaluated on the held-out prompts
    assert f"eval/reward/{DIGIT_SUM}" in kl_run and "eval/accuracy" not in kl_run
    dr_cfg, dr_run = runs["grpo_dr_grpo"]
    assert dr_cfg.loss.aggregation == "sequence_mean_token_sum_norm" and not dr_cfg.advantage.scale_by_std
    assert torch.isfinite(torch.tensor(dr_run["loss"]))
    assert dr_run["optim/grad_norm"] != pytest.approx(runs[None][1]["optim/grad_norm"], rel=1e-3)


def test_wandb_offline_by_default(make_config, monkeypatch):
    """The default logger writes an offline wandb run (no network) plus metrics.jsonl."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = make_config(
        "grpo",
        *FAST,
        "logger=default",
        "logger.console=false",
        "train.steps=1",
        "checkpoint.save_final=false",
        "eval.num_samples=4",
    )
    assert cfg.logger.wandb and cfg.logger.wandb_mode == "offline"
    result = grpo.train(cfg)
    runs = os.listdir(os.path.join(result["run_dir"], "wandb"))
    assert any(name.startswith("offline-run-") for name in runs), runs


@pytest.mark.parametrize(
    "aggregation", ["token_mean", "sequence_mean_token_mean", "sequence_mean_token_sum_norm"]
)
def test_gradient_accumulation_split_gives_the_same_update(make_config, tmp_path, aggregation):
    """One optimizer step over 8 rollouts: 4 micro-batches of 2 equal 1 micro-batch of 8."""
    common = [
        *FAST,
        "train.steps=1",
        "eval.num_samples=4",
        f"loss.aggregation={aggregation}",
        "optim.lr=1e-2",
        "optim.max_grad_norm=null",
    ]
    whole = grpo.train(
        make_config("grpo", *common, "train.micro_batch_size=8", run_dir=str(tmp_path / "whole"))
    )
    split = grpo.train(
        make_config("grpo", *common, "train.micro_batch_size=2", run_dir=str(tmp_path / "split"))
    )
    a = AutoModelForCausalLM.from_pretrained(export_dir(whole["checkpoint"])).state_dict()
    b = AutoModelForCausalLM.from_pretrained(export_dir(split["checkpoint"])).state_dict()
    for name in a:
        # the same sums in a different order (per micro-batch, then added): float rounding only
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "failure,message",
    [
        (OSError("disk vanished mid-save"), "failed: OSError\\('disk vanished mid-save'\\)"),
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full: saving .*step-000004 failed"),
    ],
)
def test_a_failed_save_leaves_the_previous_checkpoint(make_config, monkeypatch, failure, message):
    """A write that fails mid-save (a full disk) is an error naming the checkpoint; the partial
    directory is removed and the run resumes from the previous checkpoint."""
    from rlhf.distributed.engine import SingleProcessEngine

    cfg = make_config("grpo", *FAST, "train.steps=4", "checkpoint.every=2", "eval.num_samples=4")
    original = SingleProcessEngine.save_state
    calls = {"n": 0}

    def crash_on_second_save(self, directory):
        calls["n"] += 1
        original(self, directory)
        if calls["n"] == 2:
            raise failure

    monkeypatch.setattr(SingleProcessEngine, "save_state", crash_on_second_save)
    with pytest.raises(CheckpointError, match=message):
        grpo.train(cfg)
    monkeypatch.setattr(SingleProcessEngine, "save_state", original)
    assert sorted(os.listdir(os.path.join(cfg.run_dir, "checkpoints"))) == ["step-000002"]
    resumed = grpo.train(make_config("grpo", f"resume={cfg.run_dir}"))
    assert resumed["step"] == 4 and resumed["checkpoint"].endswith("step-000004")


def test_shared_prefix_forward_gives_the_same_run(make_config, tmp_path):
    """Policy (with gradient), old and reference logprobs through the packed layout: same run."""
    common = [
        *FAST,
        "train.steps=2",
        "loss.kl_coef=0.05",
        "train.num_minibatches=2",
        "eval.every=0",
        *VARIED_REWARD,
    ]
    runs = [
        grpo.train(make_config("grpo", *common, f"model.shared_prefix={on}", run_dir=str(tmp_path / str(on))))
        for on in (False, True)
    ]
    plain, shared = ({r["step"]: r for r in read_metrics(run["run_dir"]) if "loss" in r} for run in runs)
    for step in plain:
        for key in ("loss", "kl/mean", "reward/mean", "entropy"):
            assert shared[step][key] == pytest.approx(plain[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_rloo_advantages_through_the_recipe(make_config, tmp_path):
    """Every row of the rollout is saved: each advantage is its score minus the mean of the other
    samples of its prompt (RLOO), so groups are the rollout's blocks of G rows."""
    from rlhf.loggers import read_rollouts

    cfg = make_config(
        "grpo", *FAST, *VARIED_REWARD, "advantage.estimator=rloo", "train.steps=1", "logger.rollout_samples=8"
    )
    grpo.train(cfg)
    records = read_rollouts(cfg.run_dir)
    assert len(records) == 8
    by_prompt: dict[str, list[dict]] = {}
    for record in records:
        by_prompt.setdefault(record["prompt"], []).append(record)
    for group in by_prompt.values():
        assert len(group) == 4
        for record in group:
            others = [r["score"] for r in group if r is not record]
            assert record["advantage"] == pytest.approx(record["score"] - sum(others) / 3, abs=1e-5)


def constant_reward(prompts, completions, **_):
    return [1.0] * len(completions)


def test_zero_variance_groups_are_dropped_through_the_recipe(make_config):
    """A constant reward: every group has zero variance, so every row leaves the loss mask and the
    update is skipped on all ranks (the policy is exactly the initial one)."""
    cfg = make_config(
        "grpo",
        *FAST,
        "reward.functions=[{name: 'tests.recipes.test_grpo_smoke:constant_reward', weight: 1.0}]",
        "reward.accuracy_reward=null",
        "advantage.drop_zero_variance_groups=true",
        "train.steps=2",
        "optim.lr=0.1",
    )
    initial = load_causal_lm(cfg.model, load_tokenizer(cfg.model), seed=cfg.seed).state_dict()
    result = grpo.train(cfg)
    assert result["groups/zero_variance_fraction"] == 1.0 and result["update/skipped_steps"] == 1.0
    exported = AutoModelForCausalLM.from_pretrained(export_dir(result["checkpoint"])).state_dict()
    assert all(torch.equal(exported[name], initial[name]) for name in exported)


def test_bf16_mixed_precision_trains_float32_weights(make_config, tmp_path):
    """train.precision=bf16: the same run in bf16 compute (its numbers differ from fp32 by bf16
    rounding, so autocast is on), with float32 weights that every update moved."""
    common = [*FAST, *VARIED_REWARD, "train.steps=2", "loss.kl_coef=0.05", "optim.lr=1e-3"]
    fp32 = grpo.train(make_config("grpo", *common, run_dir=str(tmp_path / "fp32")))
    cfg = make_config("grpo", *common, "train.precision=bf16", run_dir=str(tmp_path / "bf16"))
    initial = load_causal_lm(cfg.model, load_tokenizer(cfg.model), seed=cfg.seed).state_dict()
    bf16 = grpo.train(cfg)
    first = [next(r for r in read_metrics(run["run_dir"]) if r["step"] == 1) for run in (fp32, bf16)]
    assert first[1]["optim/grad_norm"] != first[0]["optim/grad_norm"]  # computed in bf16
    assert first[1]["optim/grad_norm"] > 0
    exported = AutoModelForCausalLM.from_pretrained(export_dir(bf16["checkpoint"])).state_dict()
    assert all(tensor.dtype == torch.float32 for tensor in exported.values())
    assert all(not torch.equal(exported[name], initial[name]) for name in exported)


def test_a_reward_needing_a_column_the_data_lacks_is_refused_before_loading(
    make_config, tmp_path, monkeypatch
):
    """The default rewards (exact_match, answer_format) on prompts without an `answer` column: the
    run stops before any model loads, naming the reward, the column and how to set one."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {n}"}) + "\n" for n in range(8)))
    cfg = make_config("grpo", *FAST, "data=jsonl", f"data.source={data}")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(grpo, "load_policy", no_model)
    with pytest.raises(RewardError, match=r"'exact_match' needs column\(s\) \['answer'\].*reward.functions="):
        grpo.train(cfg)


def test_epochs_set_the_number_of_rollout_steps(make_config, tmp_path):
    data = tmp_path / "six.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{n}+1=", "answer": str(n + 1)}) + "\n" for n in range(6)))
    cfg = make_config("grpo", *FAST, "data=jsonl", f"data.source={data}", "train.epochs=2", "eval.every=0")
    result = grpo.train(cfg)
    assert result["step"] == 6  # 2 passes over 6 prompts, 2 per step
    assert [r["step"] for r in read_metrics(result["run_dir"]) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_log_kl_measures_the_kl_without_changing_training(make_config, tmp_path):
    """loss.log_kl with kl_coef 0: kl/mean is logged (0 on the first step, where the policy is the
    reference; away from 0 once it moved: k1 on sampled tokens, as PPO logs it, can be negative) and
    the losses are those of the same run without it."""
    common = [*FAST, *VARIED_REWARD, "train.steps=3", "optim.lr=1e-2"]
    plain = grpo.train(make_config("grpo", *common, run_dir=str(tmp_path / "plain")))
    measured = grpo.train(
        make_config("grpo", *common, "loss.log_kl=true", run_dir=str(tmp_path / "measured"))
    )
    rows = {
        run: [r for r in read_metrics(result["run_dir"]) if "loss" in r]
        for run, result in [("plain", plain), ("measured", measured)]
    }
    assert all("kl/mean" not in r for r in rows["plain"])
    assert [r["loss"] for r in rows["measured"]] == [r["loss"] for r in rows["plain"]]
    kl = [r["kl/mean"] for r in rows["measured"]]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and abs(kl[-1]) > 1e-4
