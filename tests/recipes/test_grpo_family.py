"""Each registered policy objective and outcome estimator through the GRPO recipe (and PPO with a
non-default objective); DAPO's dynamic sampling, overlong penalty and truncation mask; combinations
with the shared prefix and LoRA. The 2-rank ZeRO-3 run is in tests/distributed/test_launchers.py."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import grpo, ppo
from rlhf.checkpoint import export_dir
from rlhf.loggers import read_metrics, read_rollouts
from rlhf.models.load import load_causal_lm, load_tokenizer
from tests.recipes.test_grpo_smoke import FAST, VARIED_REWARD

METHODS = {
    # preset overrides -> a metric the method logs
    "gspo": (["loss=gspo"], "clip/fraction"),
    "gspo_token": (["loss=gspo_token"], "clip/fraction"),
    "luspo": (["loss=luspo"], "clip/fraction"),
    "cispo": (["+experiment=grpo_cispo"], "clip/high_fraction"),
    "sapo": (["+experiment=grpo_sapo"], "sapo/gate_slope_mean"),
    "vespo": (["loss=vespo"], "vespo/phi_mean"),
    # the random tiny model's entropy (~3 nats) is above the authors' 0.7 filter: the paper's branch
    # for such a model (initial entropy above ln 2: no filter) is a threshold above any entropy
    "gtpo": (["+experiment=grpo_gtpo", "loss.args.gtpo.entropy_threshold=1e9"], "gtpo/amplified_fraction"),
    "reinforce_pp": (["+experiment=grpo_reinforce_pp"], "reward_kl/mean"),
    "reinforce_pp_baseline": (["advantage=reinforce_pp_baseline"], "loss"),
    "nthr": (["advantage.nthr=true"], "nthr/damped_token_fraction"),
}


def _moved(cfg, result) -> bool:
    initial = load_causal_lm(cfg.model, load_tokenizer(cfg.model), seed=cfg.seed).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(export_dir(result["checkpoint"])).state_dict()
    return all(not torch.equal(exported[name], initial[name]) for name in exported)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_trains_through_the_recipe(make_config, method):
    overrides, metric = METHODS[method]
    cfg = make_config(
        "grpo", *FAST, *VARIED_REWARD, *overrides, "train.steps=2", "train.num_minibatches=2", "optim.lr=1e-2"
    )
    result = grpo.train(cfg)
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row[metric]), (method, row)
    assert _moved(cfg, result)


def test_gtpo_entropy_filter_removes_high_entropy_completions(make_config):
    """With the authors' threshold (0.7) every completion of the near-uniform tiny model is filtered:
    no advantage is left and the weights do not move."""
    cfg = make_config(
        "grpo", *FAST, *VARIED_REWARD, "+experiment=grpo_gtpo", "train.steps=1", "optim.lr=1e-2"
    )
    result = grpo.train(cfg)
    assert result["gtpo/entropy_filtered_fraction"] == 1.0 and result["entropy"] > 0.7
    assert not any(_moved_any(cfg, result))


def test_gtpo_paper_entropy_rule_turns_the_filter_off_for_a_high_entropy_start(make_config, tmp_path):
    """advantage.gtpo.entropy_filter=initial: the starting policy's entropy (about 3 nats, above 0.7)
    switches the filter off, so the run trains; the measured value survives a resume."""
    common = [
        *FAST,
        *VARIED_REWARD,
        "+experiment=grpo_gtpo",
        "advantage.gtpo.entropy_filter=initial",
        "optim.lr=1e-2",
    ]
    cfg = make_config("grpo", *common, "train.steps=2", "checkpoint.every=1", run_dir=str(tmp_path / "run"))
    result = grpo.train(cfg)
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    initial = rows[0]["gtpo/initial_entropy"]
    assert initial > 0.7 and all(r["gtpo/initial_entropy"] == initial for r in rows)
    assert all(r["gtpo/entropy_filtered_fraction"] == 0.0 for r in rows)
    assert any(_moved_any(cfg, result))
    resumed = grpo.train(make_config("grpo", f"resume={tmp_path / 'run'}", "train.steps=3"))
    assert resumed["gtpo/initial_entropy"] == initial  # remembered, not re-measured on the new policy


def _moved_any(cfg, result):
    initial = load_causal_lm(cfg.model, load_tokenizer(cfg.model), seed=cfg.seed).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(export_dir(result["checkpoint"])).state_dict()
    return [not torch.equal(exported[name], initial[name]) for name in exported]


def test_ppo_takes_a_registered_objective(make_config):
    cfg = make_config(
        "ppo",
        "+experiment=ppo_arithmetic_rewards",
        "loss.policy_loss=cispo",
        "loss.args.cispo.max_weight=2.0",
        "train.steps=2",
        "train.prompts_per_step=4",
        "train.micro_batch_size=4",
        "rollout.max_new_tokens=4",
        "eval.num_samples=8",
    )
    result = ppo.train(cfg)
    assert math.isfinite(result["loss"]) and "clip/high_fraction" in result


def prompt_dependent_reward(prompts, completions, **_):
    """Varied scores for prompts of odd length, a constant for the rest: only some groups carry signal."""
    return [float(len(c) % 3) if len(p) % 2 else 1.0 for p, c in zip(prompts, completions)]


def constant_reward(prompts, completions, **_):
    return [1.0] * len(completions)


def test_dynamic_sampling_trains_only_groups_with_signal(make_config):
    cfg = make_config(
        "grpo",
        *FAST,
        "reward.functions=[{name: 'tests.recipes.test_grpo_family:prompt_dependent_reward', weight: 1.0}]",
        "reward.accuracy_reward=null",
        "advantage.dynamic_sampling=true",
        "advantage.max_sampling_rounds=6",
        "train.steps=3",
        "logger.rollout_samples=8",
    )
    result = grpo.train(cfg)
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert all(r["dynamic_sampling/rounds"] >= 1 for r in rows)
    assert any(r["dynamic_sampling/signal_fraction"] < 1 for r in rows)  # something was replaced
    for step in {r["step"] for r in rows if r["dynamic_sampling/filled_fraction"] == 0}:
        groups: dict[str, list[float]] = {}
        for record in read_rollouts(cfg.run_dir):
            if record["step"] == step:
                groups.setdefault(record["prompt"], []).append(record["score"])
        assert len(groups) == 2 and all(len(set(scores)) > 1 for scores in groups.values()), groups


def test_dynamic_sampling_cap_leaves_flat_groups_out_of_the_loss(make_config):
    """A constant reward never gives signal: after max_sampling_rounds the batch is filled with flat
    groups marked invalid, so the update is skipped and the policy does not move."""
    cfg = make_config(
        "grpo",
        *FAST,
        "reward.functions=[{name: 'tests.recipes.test_grpo_family:constant_reward', weight: 1.0}]",
        "reward.accuracy_reward=null",
        "advantage.dynamic_sampling=true",
        "advantage.max_sampling_rounds=2",
        "train.steps=1",
        "optim.lr=0.1",
    )
    result = grpo.train(cfg)
    assert result["dynamic_sampling/rounds"] == 2 and result["dynamic_sampling/filled_fraction"] == 1.0
    assert result["update/skipped_steps"] == 1.0
    initial = load_causal_lm(cfg.model, load_tokenizer(cfg.model), seed=cfg.seed).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(export_dir(result["checkpoint"])).state_dict()
    assert all(torch.equal(exported[name], initial[name]) for name in exported)


def test_overlong_penalty_and_truncation_mask(make_config, tmp_path):
    """A 2-token budget truncates nearly every response: the overlong penalty reaches the scores,
    and with loss.mask_truncated those rows leave the loss."""
    common = [*FAST, *VARIED_REWARD, "rollout.max_new_tokens=2", "train.steps=1"]
    shaped = grpo.train(
        make_config("grpo", *common, "reward.overlong_buffer=1", "reward.overlong_penalty=0.5")
    )
    assert -0.5 <= shaped["reward/overlong_penalty_mean"] < 0
    masked = grpo.train(make_config("grpo", *common, "loss.mask_truncated=true", run_dir=str(tmp_path / "b")))
    assert masked["loss/masked_truncated_fraction"] > 0.5


def test_methods_compose_with_shared_prefix_and_lora(make_config, tmp_path):
    """GTPO and GSPO with the shared-prefix forward give the same run as without it; CISPO trains
    LoRA adapters."""
    for preset in ("+experiment=grpo_gtpo", "loss=gspo"):
        common = [
            *FAST,
            *VARIED_REWARD,
            preset,
            "train.steps=2",
            "optim.lr=1e-2",
            "loss.args.gtpo.entropy_threshold=1e9",
        ]
        name = preset.split("=")[1]
        plain = grpo.train(make_config("grpo", *common, run_dir=str(tmp_path / f"{name}-plain")))
        shared = grpo.train(
            make_config("grpo", *common, "model.shared_prefix=true", run_dir=str(tmp_path / f"{name}-shared"))
        )
        # the shared-prefix forward changes summation order only (float32 rounding)
        assert shared["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-6)
    lora = grpo.train(
        make_config(
            "grpo",
            *FAST,
            *VARIED_REWARD,
            "+experiment=grpo_cispo",
            "model.lora.enabled=true",
            "train.steps=2",
            run_dir=str(tmp_path / "lora"),
        )
    )
    assert math.isfinite(lora["loss"])


def test_padding_free_gives_the_same_grpo_and_dpo_runs(make_config, tmp_path):
    """model.padding_free changes only how rows go through the model: GRPO (mixed-length responses)
    and DPO losses equal the padded runs."""
    from recipes import dpo

    common = [*FAST, *VARIED_REWARD, "train.steps=2", "optim.lr=1e-2", "rollout.max_new_tokens=6"]
    plain = grpo.train(make_config("grpo", *common, run_dir=str(tmp_path / "plain")))
    packed = grpo.train(
        make_config("grpo", *common, "model.padding_free=true", run_dir=str(tmp_path / "packed"))
    )
    # fp32: the same terms, summed over other widths
    assert packed["loss"] == pytest.approx(plain["loss"], rel=1e-4, abs=1e-6)
    dpo_common = [
        "train.steps=2",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "eval.every=0",
        "eval.num_samples=8",
    ]
    a = dpo.train(make_config("dpo", *dpo_common, run_dir=str(tmp_path / "dpo_plain")))
    b = dpo.train(
        make_config("dpo", *dpo_common, "model.padding_free=true", run_dir=str(tmp_path / "dpo_packed"))
    )
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_trl_grpo_options_through_the_recipe(make_config, tmp_path):
    """Two-sided clipping, the entropy-quantile token mask, the off-policy sequence mask, the entropy
    bonus and batch-std advantages in one run (two updates per rollout, so ratios move)."""
    cfg = make_config(
        "grpo",
        *FAST,
        *VARIED_REWARD,
        "train.steps=2",
        "train.num_minibatches=2",
        "optim.lr=1e-2",
        "loss.delta=1.5",
        "loss.top_entropy_quantile=0.5",
        "loss.off_policy_mask_threshold=0.0",
        "loss.entropy_coef=0.01",
        "advantage.std_scope=batch",
    )
    result = grpo.train(cfg)
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert all(0.3 < r["loss/entropy_kept_fraction"] < 0.8 for r in rows)
    assert all("loss/off_policy_masked_fraction" in r for r in rows)  # the mask ran


def test_token_budget_micro_batches_give_the_same_update(make_config, tmp_path):
    """train.max_tokens_per_micro_batch splits by tokens: more micro-batches, the same losses."""
    common = [
        *FAST,
        *VARIED_REWARD,
        "train.steps=2",
        "optim.lr=1e-2",
        "loss.kl_coef=0.05",
        "train.num_minibatches=2",
    ]
    rows_split = grpo.train(make_config("grpo", *common, run_dir=str(tmp_path / "rows")))
    budget = grpo.train(
        make_config("grpo", *common, "train.max_tokens_per_micro_batch=12", run_dir=str(tmp_path / "tokens"))
    )
    assert budget["update/micro_batches"] > rows_split["update/micro_batches"]
    # fp32: the same per-row terms accumulated in other groupings
    assert budget["loss"] == pytest.approx(rows_split["loss"], rel=1e-4, abs=1e-6)


def test_gdpo_and_adaptive_entropy_through_the_recipe(make_config, tmp_path):
    """GDPO with two reward functions; the adaptive entropy coefficient moves each step and is
    restored on resume."""
    cfg = make_config(
        "grpo",
        *FAST,
        "reward.functions=[{name: 'tests.recipes.test_grpo_smoke:digit_sum', weight: 1.0}, {name: answer_format, weight: 0.5}]",
        "reward.accuracy_reward=null",
        "advantage.estimator=gdpo",
        "loss.entropy_coef=0.01",
        "loss.entropy_target=100.0",  # above any entropy here: the coefficient rises every step
        "loss.entropy_coef_delta=0.005",
        "train.steps=2",
        "checkpoint.every=1",
        "optim.lr=1e-2",
        run_dir=str(tmp_path / "run"),
    )
    result = grpo.train(cfg)
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    # step 1: no entropy measured yet, no bonus; step 2: 0.01 + 0.005
    assert [r["loss/entropy_coef"] for r in rows] == pytest.approx([0.0, 0.015])
    resumed = grpo.train(make_config("grpo", f"resume={tmp_path / 'run'}", "train.steps=3"))
    assert resumed["loss/entropy_coef"] == pytest.approx(0.02)
