"""Recipe tests that fail when a chosen method is ignored.

Every registered policy objective must change GRPO's update against the clipped objective run with
the same seed, clip band and aggregation (two minibatches, so the second step is off-policy and
sequence-level objectives part from token-level ones); PPO's objective likewise. Every outcome
estimator's advantages are recomputed here, from the scores of every row in rollouts.jsonl, with
the paper's formula written out (the RLOO case is in test_grpo_smoke.py).
"""

from __future__ import annotations

import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipes import grpo, ppo
from rlhf.checkpoint import export_dir
from rlhf.loggers import read_rollouts
from rlhf.losses.policy import POLICY_LOSSES
from tests.recipes.test_grpo_smoke import FAST, VARIED_REWARD

PRESET_OPTIONS = {"gtpo": ["loss.args.gtpo.entropy_threshold=1e9"]}  # the tiny model's entropy is ~3
OFF_POLICY = ["train.steps=1", "train.num_minibatches=2", "optim.lr=3e-2"]


def _weights(result) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(export_dir(result["checkpoint"])).state_dict()


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("objective", sorted(set(POLICY_LOSSES) - {"clipped"}))
def test_each_objective_changes_the_grpo_update(make_config, tmp_path, objective):
    common = [*FAST, *VARIED_REWARD, *OFF_POLICY, f"loss={objective}", *PRESET_OPTIONS.get(objective, [])]
    chosen = grpo.train(make_config("grpo", *common, run_dir=str(tmp_path / objective)))
    # the same preset (band, aggregation, KL) with the default objective in its place
    baseline_cfg = make_config("grpo", *common, "loss.policy_loss=clipped", run_dir=str(tmp_path / "clipped"))
    baseline = grpo.train(baseline_cfg)
    assert chosen["update/skipped_steps"] == 0 and baseline["update/skipped_steps"] == 0
    assert _differs(_weights(chosen), _weights(baseline)), f"{objective} trained exactly as clipped"


def test_gspo_by_objective_name_takes_the_papers_band(make_config):
    """loss.policy_loss=gspo alone (on GRPO's default loss group) clips at GSPO's 3e-4 / 4e-4, as
    loss=gspo does, not at the token objective's 0.2."""
    cfg = make_config("grpo", "loss.policy_loss=gspo")
    assert cfg.loss.clip_low is None and cfg.loss.clip_high is None  # the objective's own band
    preset = make_config("grpo", "loss=gspo")
    assert (preset.loss.clip_low, preset.loss.clip_high) == (3e-4, 4e-4)


def test_ppo_objective_changes_the_update(make_config, tmp_path):
    common = [
        "+experiment=ppo_arithmetic_rewards",
        "train.steps=1",
        "train.prompts_per_step=4",
        "train.micro_batch_size=4",
        "train.num_minibatches=2",
        "rollout.max_new_tokens=4",
        "optim.lr=3e-2",
        "eval.num_samples=8",
    ]
    cispo = ppo.train(
        make_config(
            "ppo",
            *common,
            "loss.policy_loss=cispo",
            "loss.args.cispo.max_weight=2.0",
            run_dir=str(tmp_path / "c"),
        )
    )
    clipped = ppo.train(make_config("ppo", *common, run_dir=str(tmp_path / "p")))
    # CISPO's loss is -w * A * log pi, the clipped one -A * ratio: their values differ from the first step
    assert cispo["loss"] != pytest.approx(clipped["loss"], rel=1e-3)
    assert _differs(_weights(cispo), _weights(clipped))


def _groups(run_dir: str) -> list[list[dict]]:
    by_prompt: dict[str, list[dict]] = {}
    for record in read_rollouts(run_dir):
        by_prompt.setdefault(record["prompt"], []).append(record)
    groups = list(by_prompt.values())
    assert len(groups) == 2 and all(len(g) == 4 for g in groups)
    return groups


def _rollout(make_config, tmp_path, name: str, *overrides: str) -> list[list[dict]]:
    cfg = make_config(
        "grpo",
        *FAST,
        *VARIED_REWARD,
        *overrides,
        "train.steps=1",
        "logger.rollout_samples=8",
        run_dir=str(tmp_path / name),
    )
    grpo.train(cfg)
    groups = _groups(cfg.run_dir)
    scores = [r["score"] for g in groups for r in g]
    assert len(set(scores)) > 1, "the tiny model's rollout gave one score: no advantage to check"
    return groups


def _centred(group: list[dict]) -> list[float]:
    mean = sum(r["score"] for r in group) / len(group)
    return [r["score"] - mean for r in group]


def test_grpo_divides_by_each_groups_std(make_config, tmp_path):
    for group in _rollout(make_config, tmp_path, "grpo", "advantage=grpo"):
        std = statistics.stdev(r["score"] for r in group)  # unbiased, as TRL
        for record, centred in zip(group, _centred(group)):
            assert record["advantage"] == pytest.approx(centred / (std + 1e-4), abs=1e-4)


def test_dr_grpo_does_not_scale_by_std(make_config, tmp_path):
    """Dr.GRPO (advantage.scale_by_std=false): the score minus its group's mean, nothing more."""
    for group in _rollout(make_config, tmp_path, "dr_grpo", "advantage=dr_grpo"):
        for record, centred in zip(group, _centred(group)):
            assert record["advantage"] == pytest.approx(centred, abs=1e-5)


def test_batch_std_scope_divides_by_the_batchs_std(make_config, tmp_path):
    groups = _rollout(make_config, tmp_path, "batch", "advantage=grpo", "advantage.std_scope=batch")
    std = statistics.stdev(r["score"] for g in groups for r in g)
    for group in groups:
        for record, centred in zip(group, _centred(group)):
            assert record["advantage"] == pytest.approx(centred / (std + 1e-4), abs=1e-4)


def _whitened(values: list[float], counts: list[int]) -> list[float]:
    """Each value whitened over all tokens (value repeated over its row's tokens), population var."""
    tokens = [v for v, n in zip(values, counts) for _ in range(n)]
    mean = sum(tokens) / len(tokens)
    var = sum((t - mean) ** 2 for t in tokens) / len(tokens)
    return [(v - mean) / (var + 1e-8) ** 0.5 for v in values]


def test_reinforce_pp_baseline_whitens_group_centred_scores_over_tokens(make_config, tmp_path):
    groups = _rollout(make_config, tmp_path, "rpp_baseline", "advantage=reinforce_pp_baseline")
    records = [r for g in groups for r in g]
    centred = [c for g in groups for c in _centred(g)]
    expected = _whitened(centred, [r["length"] for r in records])
    for record, value in zip(records, expected):
        assert record["advantages"] == pytest.approx([value] * record["length"], abs=1e-4)


def test_reinforce_pp_whitens_returns_over_tokens(make_config, tmp_path):
    """No KL: every token's return-to-go is the sequence score; whitened over the batch's tokens."""
    groups = _rollout(make_config, tmp_path, "rpp", "advantage=reinforce_pp", "loss.kl_coef=0")
    records = [r for g in groups for r in g]
    expected = _whitened([r["score"] for r in records], [r["length"] for r in records])
    for record, value in zip(records, expected):
        assert record["advantages"] == pytest.approx([value] * record["length"], abs=1e-4)


def test_gdpo_normalises_per_group_then_over_the_batch(make_config, tmp_path):
    """One reward of weight 1: (r - group mean) / (group std + eps), then over the batch's rows."""
    groups = _rollout(make_config, tmp_path, "gdpo", "advantage.estimator=gdpo")
    per_group = []
    for group in groups:
        std = statistics.stdev(r["score"] for r in group)
        per_group += [c / (std + 1e-4) for c in _centred(group)]
    mean, std = statistics.fmean(per_group), statistics.stdev(per_group)
    records = [r for g in groups for r in g]
    for record, value in zip(records, per_group):
        assert record["advantage"] == pytest.approx((value - mean) / (std + 1e-4), abs=1e-4)
