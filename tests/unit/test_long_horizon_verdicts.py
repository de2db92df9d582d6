"""The long-horizon study's comparisons (benchmarks/studies/long_horizon.py) on made-up curves: the
paired intervals decide the words, and a gain over PPO that the KL-matched PPO shares is not
credited to macro actions."""

from __future__ import annotations

from benchmarks.studies.long_horizon import arm_figures, comparison_table, verdict_lines

SEEDS = [1, 2, 3, 4, 5]
STEPS = [0, 20, 40, 60]


def run(method: str, seed: int, lift: float) -> dict:
    """A run whose held-out curve climbs from 0.25 by `lift` per evaluation (plus a seed wobble)."""
    accuracy = [0.25 + i * lift + 0.003 * seed for i in range(len(STEPS))]
    return {
        "method": method,
        "seed": seed,
        "train_steps": list(range(1, 61)),
        "train_reward": [0.1 + 0.01 * lift * i for i in range(60)],
        "train_kl": [0.02] * 60,
        "eval_steps": STEPS,
        "eval_accuracy": accuracy,
        "eval_seconds": [0.0, 60.0, 120.0, 180.0],
    }


def study(lifts: dict[str, float]) -> tuple[str, dict]:
    results = {(m, s): run(m, s, lift + 0.002 * s) for m, lift in lifts.items() for s in SEEDS}
    figures = {key: arm_figures(result, 0.35) for key, result in results.items()}
    return comparison_table("macro", results, figures, list(lifts), SEEDS, 0.35)


def test_a_gain_the_kl_matched_ppo_shares_is_not_reproduced():
    table, verdicts = study({"ppo": 0.02, "ppo_kl_n5": 0.05, "ma_fixed5": 0.05})
    assert verdicts[("ma_fixed5", "ppo")]["auc"] == "better"
    assert verdicts[("ma_fixed5", "ppo_kl_n5")]["auc"] == "no difference shown"
    assert "no faster than PPO at the same effective KL" in verdict_lines("macro", verdicts)
    assert "| ma_fixed5 - ppo_kl_n5 |" in table and "ma_fixed10" not in table  # arms not run are left out


def test_a_gain_over_every_baseline_is_reproduced():
    _, verdicts = study({"ppo": 0.02, "ppo_kl_n5": 0.03, "ppo_tuned": 0.03, "ma_fixed5": 0.05})
    assert "MA-RLHF's claim, ma_fixed5: reproduced\n" in verdict_lines("macro", verdicts) + "\n"


def test_a_control_that_did_not_run_is_named_beside_the_word():
    _, verdicts = study({"ppo": 0.02, "ppo_kl_n5": 0.03, "ma_fixed5": 0.05})
    assert "ma_fixed5: reproduced (no tuned PPO run)" in verdict_lines("macro", verdicts)
    _, verdicts = study({"ppo": 0.02, "ma_fixed5": 0.05})
    assert "ma_fixed5: reproduced (no KL-matched control run; no tuned PPO run)" in verdict_lines(
        "macro", verdicts
    )


def test_every_fixed_n_is_judged_against_the_tuned_ppo():
    lifts = {"ppo": 0.02, "ppo_kl_n3": 0.03, "ppo_kl_n10": 0.03, "ppo_tuned": 0.05}
    _, verdicts = study(lifts | {"ma_fixed3": 0.05, "ma_fixed10": 0.05})
    lines = verdict_lines("macro", verdicts)
    for arm in ("ma_fixed3", "ma_fixed10"):
        assert (arm, "ppo_tuned") in verdicts
        assert f"{arm}: not reproduced: faster than PPO, but no faster than the tuned PPO" in lines


def test_a_slower_arm_is_worse_and_not_reproduced():
    _, verdicts = study({"ppo": 0.05, "ma_fixed5": 0.02})
    assert verdicts[("ma_fixed5", "ppo")] | {"what": None, "steps": None} == {
        "what": None,
        "final": "worse",
        "auc": "worse",
        "steps": None,
    }
    assert "ma_fixed5: not reproduced" in verdict_lines("macro", verdicts)
