"""reference.sync (TR-DPO, TRL's sync_ref_model) through the GRPO and DPO recipes: a reference
replaced by the policy after every step measures no KL and no DPO log-ratio; the moved reference
survives a resume exactly; combinations without a separate reference are refused."""

from __future__ import annotations

import math

import pytest

from recipes import dpo, grpo
from rlhf.config import ConfigError
from rlhf.loggers import read_metrics
from tests.recipes.test_dpo import FAST as DPO_FAST
from tests.recipes.test_dpo import losses
from tests.recipes.test_grpo_smoke import FAST as GRPO_FAST
from tests.recipes.test_grpo_smoke import VARIED_REWARD
from tests.resume_checks import assert_resume_matches

HARD_SYNC = ["reference.sync=true", "reference.sync_steps=1", "reference.mixup_alpha=1.0"]
GRPO_KL = [*GRPO_FAST, "loss.kl_coef=0.1", "optim.lr=1e-2", "eval.every=0"]


def _trained(result) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(result["run_dir"]) if "loss" in r}


def test_grpo_hard_sync_leaves_no_kl_to_the_reference(make_config, tmp_path):
    """alpha=1 every step: each rollout's policy is the reference, so the KL is 0 at every step;
    without the sync it grows once the policy has moved."""
    common = [*GRPO_KL, "train.steps=3", *VARIED_REWARD]
    synced = _trained(grpo.train(make_config("grpo", *common, *HARD_SYNC, run_dir=str(tmp_path / "a"))))
    fixed = _trained(grpo.train(make_config("grpo", *common, run_dir=str(tmp_path / "b"))))
    assert all(synced[s]["kl/mean"] == 0.0 for s in (1, 2, 3)), synced
    assert all("time/reference_sync" in synced[s] for s in (1, 2, 3))
    assert fixed[3]["kl/mean"] > 1e-4


def test_grpo_resume_restores_the_moved_reference(make_config, tmp_path):
    """Sync every 2 steps with alpha 0.5, stopped after step 2 (just after a sync) and resumed: steps
    3-4 equal the uninterrupted run's, which they would not with the initial reference."""
    common = [*GRPO_KL, "reference.sync=true", "reference.sync_steps=2", "reference.mixup_alpha=0.5"]
    common += ["checkpoint.every=2"]
    straight = grpo.train(make_config("grpo", *common, "train.steps=4", run_dir=str(tmp_path / "straight")))
    grpo.train(make_config("grpo", *common, "train.steps=2", run_dir=str(tmp_path / "split")))
    resumed = grpo.train(make_config("grpo", "train.steps=4", f"resume={tmp_path / 'split'}"))
    first, second = _trained(straight), _trained(resumed)
    for step in (3, 4):
        for key in ("loss", "kl/mean", "reward/mean"):
            assert first[step][key] == second[step][key], (step, key)
    assert_resume_matches(straight, resumed, 2, 4)  # the moved reference is in the state compared


def test_dpo_hard_sync_keeps_every_log_ratio_at_zero(make_config, tmp_path):
    """alpha=1 every step: at each step the policy equals the reference, so the sigmoid loss is log 2
    throughout; with a fixed reference it leaves log 2 after the first update."""
    common = [*DPO_FAST, "optim.lr=1e-2"]
    synced = losses(dpo.train(make_config("dpo", *common, *HARD_SYNC, run_dir=str(tmp_path / "a"))))
    fixed = losses(dpo.train(make_config("dpo", *common, run_dir=str(tmp_path / "b"))))
    # measured: float32 log 2 at every step (the two forwards are identical); the fixed run's step 4 is
    # 0.6923 (step 1 has lr 0 in warmup, so its step 2 is still log 2)
    assert all(synced[s] == pytest.approx(math.log(2), rel=1e-6) for s in (1, 2, 3, 4)), synced
    assert fixed[4] != pytest.approx(math.log(2), rel=1e-3)


def test_dpo_resume_restores_the_moved_reference(make_config, tmp_path):
    common = [*DPO_FAST, "reference.sync=true", "reference.sync_steps=2", "checkpoint.every=2"]
    full = dpo.train(make_config("dpo", *common, run_dir=str(tmp_path / "a")))
    dpo.train(make_config("dpo", *common, "train.steps=2", run_dir=str(tmp_path / "b")))
    resumed = dpo.train(make_config("dpo", *common, f"resume={tmp_path / 'b'}"))
    assert losses(resumed)[3] == losses(full)[3] and losses(resumed)[4] == losses(full)[4]
    assert_resume_matches(full, resumed, 2, 4)


@pytest.mark.parametrize(
    ("recipe", "overrides", "named"),
    [
        ("grpo", [*GRPO_FAST, "reference.sync=true"], "loss.kl_coef"),
        ("grpo", [*GRPO_FAST, "reference.sync=true", "loss.kl_coef=0.1", "model.lora.enabled=true"], "lora"),
        ("dpo", [*DPO_FAST, "reference.sync=true", "loss.type=simpo"], "loss.type=simpo"),
        ("dpo", [*DPO_FAST, "reference.sync=true", "reference.precompute=true"], "reference.precompute"),
        ("dpo", [*DPO_FAST, "reference.sync=true", "reference.mixup_alpha=0"], "reference.mixup_alpha"),
    ],
)
def test_sync_without_a_reference_of_its_own_is_refused(make_config, recipe, overrides, named):
    train = {"grpo": grpo.train, "dpo": dpo.train}[recipe]
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        train(make_config(recipe, *overrides))
