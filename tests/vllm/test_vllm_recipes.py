"""GRPO and PPO with rollout.engine=vllm: runs that train, the engine/trainer mismatch logged and
tiny, exact resume (vLLM sampling is seeded per step and rank), LoRA, and two ranks under ZeRO-3."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from recipes import grpo, ppo  # noqa: E402
from rlhf.config import ConfigError  # noqa: E402
from rlhf.loggers import read_metrics  # noqa: E402
from tests.distributed.test_zero_invariance import torchrun  # noqa: E402
from tests.recipes.conftest import compose_recipe_config  # noqa: E402
from tests.resume_checks import assert_resume_matches

# head_dim 32: the smallest vLLM's CPU attention takes
SHAPE = [
    "model.tiny.hidden_size=64",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=128",
    "logger=quiet",
]
VLLM = [
    "rollout.engine=vllm",
    "rollout.vllm.max_model_len=64",
    "rollout.vllm.enforce_eager=true",
]  # quick start
GRPO_FAST = [
    "train.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=6",
    "train.micro_batch_size=8",
    "eval.num_samples=8",
    "optim.lr=3e-3",
    # partial credit, so groups differ and every step updates the weights
    "reward.functions=[{name: digit_match, weight: 1.0}]",
    "reward.accuracy_reward=null",
]


def _config(recipe: str, tmp_path, *overrides: str, run_dir: str | None = None):
    where = (
        [] if any(o.startswith("resume=") for o in overrides) else [f"run_dir={run_dir or tmp_path / recipe}"]
    )
    return compose_recipe_config(recipe, [*SHAPE, *where, *overrides])


def _trained(run_dir: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r]


def test_grpo_with_vllm_trains_and_the_engine_matches_the_trainer(tmp_path):
    result = grpo.train(_config("grpo", tmp_path, *VLLM, *GRPO_FAST, "train.steps=4"))
    rows = _trained(result["run_dir"])
    assert len(rows) == 4 and all(r["optim/grad_norm"] > 0 for r in rows)
    # weights synced once per update: before every rollout but the first, whose weights (version 0)
    # the held-out evaluation before training synced already
    assert rows[0]["time/weight_sync"] == 0.0 and all(r["time/weight_sync"] > 0 for r in rows[1:])
    for row in rows:  # the engine samples the trainer's policy
        # kernel differences only (measured: logprob diffs below 5e-7), so ratios exp(diff) are 1 to 1e-4
        assert row["rollout/logprob_diff_max"] < 1e-4 and row["rollout/kl"] < 1e-6
        assert row["rollout_correction/ratio_mean"] == pytest.approx(1.0, abs=1e-4)


def test_grpo_with_vllm_and_two_updates_per_rollout(tmp_path):
    """With old logprobs from a separate pass (two passes over the rollout), the correction is
    computed there; with one update it comes from the update's own forward (test above). A
    repetition penalty reaches the engine and every logprob pass alike."""
    result = grpo.train(
        _config(
            "grpo",
            tmp_path,
            *VLLM,
            *GRPO_FAST,
            "train.steps=2",
            "train.updates_per_rollout=2",
            "rollout.repetition_penalty=1.3",
        )
    )
    for row in _trained(result["run_dir"]):
        assert row["rollout/logprob_diff_max"] < 1e-4 and "rollout_correction/clipped_fraction" in row


def test_grpo_with_vllm_resumes_exactly(tmp_path):
    common = [*VLLM, *GRPO_FAST, "checkpoint.every=2"]
    straight = grpo.train(_config("grpo", tmp_path, *common, "train.steps=4", run_dir=str(tmp_path / "a")))
    grpo.train(_config("grpo", tmp_path, *common, "train.steps=2", run_dir=str(tmp_path / "b")))
    resumed = grpo.train(_config("grpo", tmp_path, *common, "train.steps=4", f"resume={tmp_path / 'b'}"))
    first = {r["step"]: r for r in _trained(straight["run_dir"])}
    second = {r["step"]: r for r in _trained(resumed["run_dir"])}
    for step in (3, 4):
        # the same samples (seeded per step and rank): identical rewards and lengths
        for key in ("reward/mean", "reward/std", "response/length_mean"):
            assert first[step][key] == second[step][key]
        # a restarted engine's logprobs can differ in the last float bits, and with them the
        # importance weights: the update agrees to float precision, not bit for bit
        assert first[step]["loss"] == pytest.approx(second[step]["loss"], abs=1e-6)
        assert first[step]["optim/grad_norm"] == pytest.approx(second[step]["optim/grad_norm"], rel=1e-4)
    assert_resume_matches(straight, resumed, 2, 4, rel=1e-4)


def test_grpo_with_vllm_dynamic_sampling_and_vespo(tmp_path):
    """Dynamic sampling rounds reuse the synced engine; VESPO folds the token-level correction into
    its sequence weight (a sequence-level mode is a config error)."""
    common = [*VLLM, *GRPO_FAST, "loss=vespo", "advantage.dynamic_sampling=true", "train.steps=2"]
    with pytest.raises(ConfigError, match="vespo takes token-level rollout corrections"):
        grpo.train(_config("grpo", tmp_path, *common, "rollout.vllm.correction=sequence_mask"))
    result = grpo.train(_config("grpo", tmp_path, *common, "rollout.vllm.correction=token_truncate"))
    rows = _trained(result["run_dir"])
    assert len(rows) == 2 and all(r["vespo/phi_mean"] > 0 and r["dynamic_sampling/rounds"] >= 1 for r in rows)


def test_grpo_with_vllm_and_lora(tmp_path):
    result = grpo.train(
        _config(
            "grpo", tmp_path, *VLLM, *GRPO_FAST, "train.steps=2", "model.lora.enabled=true", "model.lora.r=4"
        )
    )
    for row in _trained(result["run_dir"]):
        assert row["rollout/logprob_diff_max"] < 1e-4


def test_ppo_with_vllm(tmp_path):
    result = ppo.train(
        _config(
            "ppo",
            tmp_path,
            *VLLM,
            "+experiment=ppo_arithmetic_rewards",
            "rollout.repetition_penalty=1.3",
            "train.steps=2",
            "train.prompts_per_step=8",
            "train.micro_batch_size=8",
            "eval.num_samples=8",
        )
    )
    rows = _trained(result["run_dir"])
    assert len(rows) == 2 and all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows)
    assert "eval/accuracy" in result  # held-out greedy accuracy, generated by the engine


def test_grpo_with_vllm_two_ranks_zero3(tmp_path):
    torchrun(
        [
            "-m",
            "recipes.grpo",
            *SHAPE,
            *VLLM,
            *GRPO_FAST,
            "train.steps=2",
            "distributed=zero3",
            f"run_dir={tmp_path}",
        ]
    )
    rows = _trained(str(tmp_path))
    assert len(rows) == 2
    # each rank synced the gathered (one module at a time) weights into its own engine: after the first
    # update (the held-out evaluation before training synced the initial weights)
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows) and rows[1]["time/weight_sync"] > 0


def test_aligndistil_on_policy_with_vllm(tmp_path):
    """On-policy AlignDistil samples with the colocated engine (synced before every rollout after an
    update) and evaluates with it."""
    from recipes import aligndistil
    from tests.unit.test_distill import save_teachers

    save_teachers(tmp_path, hidden_size=64, intermediate_size=128)  # head_dim 32 for vLLM's CPU kernel
    result = aligndistil.train(
        _config(
            "aligndistil",
            tmp_path,
            *VLLM,
            "train.mode=on_policy",
            f"teacher.dpo_model={tmp_path / 'dpo'}",
            f"teacher.reverse_dpo_model={tmp_path / 'reverse'}",
            "train.steps=2",
            "train.batch_size=8",
            "train.micro_batch_size=8",
            "rollout.max_new_tokens=6",
            "eval.num_samples=8",
            "eval.accuracy_reward=exact_match",
        )
    )
    rows = _trained(result["run_dir"])
    assert len(rows) == 2 and all(r["loss"] > 0 for r in rows)
    # the held-out evaluation before training synced the start weights; step 2 follows an update
    assert rows[1]["time/weight_sync"] > 0
    assert "eval/accuracy" in result
