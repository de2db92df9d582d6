"""Pieces of benchmarks/studies/token_rewards.py: the TGDPO anatomy's split of each pair (shared
prefix, first differing token, the rest), the placebo pairs, the verdict rule against controls, and
the KL every arm reports, and the DPO family's tuning (the chosen grid point, the tuned control)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks.studies.token_rewards import (
    DPO_GRID,
    Layout,
    best_point,
    claim_verdicts,
    dpo_overrides,
    pair_regions,
    policy_kl,
    train_dpo,
    tuned_arm,
    validation_scores,
    write_placebo_pairs,
)


def test_pair_regions_split_at_the_first_differing_token():
    chosen = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 0, 0]])
    rejected = torch.tensor([[1, 2, 9, 4, 8], [9, 6, 7, 0, 0]])
    chosen_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    rejected_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    regions = pair_regions(chosen, rejected, chosen_mask, rejected_mask)
    as_lists = {name: [side.int().tolist() for side in sides] for name, sides in regions.items()}
    # pair 1 shares "1 2" and differs at position 2; the later equal 4 is not shared (its context
    # differs); pair 2 differs at its first token, and padding belongs to no region
    assert as_lists["shared"] == [[[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]] * 2
    assert as_lists["first"] == [[[0, 0, 1, 0, 0], [1, 0, 0, 0, 0]]] * 2
    assert as_lists["rest"] == [
        [[0, 0, 0, 1, 0], [0, 1, 1, 0, 0]],
        [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]],
    ]


def test_placebo_pairs_swap_sides_by_a_fair_coin(tmp_path):
    rows = [{"prompt": f"{n}=", "chosen": f"c{n}", "rejected": f"r{n}"} for n in range(400)]
    for split in ("train", "eval"):
        (tmp_path / "pairs").mkdir(exist_ok=True)
        (tmp_path / "pairs" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = write_placebo_pairs(str(tmp_path / "pairs"), str(tmp_path / "placebo"), seed=1)
    placebo = [json.loads(line) for line in open(os.path.join(out, "train.jsonl"))]
    swapped = sum(p["chosen"].startswith("r") for p in placebo)
    assert 150 < swapped < 250  # about half (binomial sd 10)
    assert all({p["chosen"], p["rejected"]} == {r["chosen"], r["rejected"]} for p, r in zip(placebo, rows))


def test_a_gain_the_control_shares_is_not_reproduced():
    paired = {
        ("rto", "ppo"): "better",
        ("rto", "rto_placebo"): "no difference shown",
        ("cdpo_b0.1", "dpo_b0.1"): "better",
        ("cdpo_b0.1", "uniform_b0.1"): "better",
        ("tgdpo_b0.1", "dpo_b0.1"): "worse",
    }
    lines = claim_verdicts(paired)
    assert lines == [
        "- rto: not reproduced: better than ppo, but no difference shown against the control rto_placebo",
        "- cdpo_b0.1: reproduced (better than dpo_b0.1 and than uniform_b0.1)",
        "- tgdpo_b0.1: not reproduced (worse against dpo_b0.1)",
    ]


def test_rto_is_reproduced_only_past_every_control_it_ran():
    past_placebo = {("rto", "ppo"): "better", ("rto", "rto_placebo"): "better"}
    assert claim_verdicts(past_placebo) == ["- rto: reproduced (better than ppo and than rto_placebo)"]
    at_matched_kl = {**past_placebo, ("rto", "ppo_kl_n5"): "worse"}
    assert claim_verdicts(at_matched_kl) == [
        "- rto: not reproduced: better than ppo, but worse against the control ppo_kl_n5"
    ]
    past_both = {**past_placebo, ("rto", "ppo_kl_n5"): "better", ("rto", "ppo_tuned"): "worse"}
    # the tuned PPO is shown beside RTO (RTO itself untuned), not part of the rule
    assert claim_verdicts(past_both) == [
        "- rto: reproduced (better than ppo and than rto_placebo and than ppo_kl_n5)"
    ]


def test_policy_kl_is_zero_against_itself_and_positive_against_another_model(tmp_path, monkeypatch):
    from benchmarks.studies import token_rewards
    from rlhf.config import ModelConfig
    from rlhf.models.load import load_causal_lm, load_tokenizer

    directories = []
    for seed in (0, 1):
        cfg = ModelConfig(source="tiny")
        tokenizer = load_tokenizer(cfg)
        model = load_causal_lm(cfg, tokenizer, seed=seed)
        directory = str(tmp_path / f"model{seed}")
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        directories.append(directory)
    monkeypatch.setattr(token_rewards, "kl_prompts", lambda: ["7,3,9,1=", "5,5,0,2,8=", "1,2="] * 10)
    assert policy_kl(directories[0], directories[0]) == pytest.approx(0.0, abs=1e-6)
    assert policy_kl(directories[0], directories[1]) > 0.01


def test_the_chosen_grid_point_has_the_best_mean_and_a_tie_goes_to_the_earlier_point():
    first, second, third = list(DPO_GRID)[:3]
    assert best_point({first: [0.2, 0.4], second: [0.1, 0.9], third: [0.5, 0.4]}) == second
    # equal means: the earlier point of the grid (smaller lr, fewer steps), whatever the dict order
    assert best_point({third: [0.25, 0.25], first: [0.5, 0.0]}) == first


def _write_result(layout: Layout, arm: str, seed: int, **fields) -> None:
    run_dir = layout.run_dir(arm, seed)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "study_result.json"), "w") as handle:
        json.dump(fields, handle)


def test_validation_scores_read_every_grid_point_and_name_a_missing_one(tmp_path, monkeypatch):
    monkeypatch.setattr(Layout, "root", property(lambda self: str(tmp_path)))
    layout = Layout(True, {1: "start1", 2: "start2"})
    points = list(DPO_GRID)
    for n, point in enumerate(points):
        for seed in (1, 2):
            _write_result(layout, f"tune_dpo_b0.1_{point}", seed, validation=n / 10 + seed / 100)
    scores = validation_scores("dpo_b0.1", layout)
    assert scores[points[2]] == pytest.approx([0.21, 0.22])
    assert best_point(scores) == points[-1]
    os.remove(os.path.join(layout.run_dir(f"tune_dpo_b0.1_{points[1]}", 2), "study_result.json"))
    with pytest.raises(SystemExit, match=f"dpo_b0.1 has no tuning run at {points[1]}"):
        validation_scores("dpo_b0.1", layout)


def test_the_tuned_uniform_control_takes_the_tuned_cdpo_runs_mean_weight(tmp_path, monkeypatch):
    monkeypatch.setattr(Layout, "root", property(lambda self: str(tmp_path)))
    layout = Layout(True, {1: "start1"})
    for arm, weights in (("cdpo_b0.1", [0.1, 0.3]), (tuned_arm("cdpo_b0.1"), [0.5, 0.7])):
        os.makedirs(layout.run_dir(arm, 1))
        with open(os.path.join(layout.run_dir(arm, 1), "metrics.jsonl"), "w") as handle:
            for step, weight in enumerate(weights):
                handle.write(json.dumps({"step": step, "cdpo/rejected_weight_mean": weight}) + "\n")
    built = {"pairs": "pairs_dir", "placebo_pairs": "placebo_dir"}
    preset = dpo_overrides("uniform_b0.1", 1, layout, built)
    tuned = dpo_overrides("uniform_b0.1", 1, layout, built, tuned=True)
    assert "token_weights.uniform_rejected_weight=0.200000" in preset
    assert "token_weights.uniform_rejected_weight=0.600000" in tuned


def test_a_tuned_arm_is_reused_only_at_the_point_it_ran_at(tmp_path, monkeypatch):
    """A finished tuned run is kept while its method's chosen point stands; once a wider grid
    chooses another point, the run is trained again instead of being read as the new point's."""
    from recipes import dpo

    monkeypatch.setattr(Layout, "root", property(lambda self: str(tmp_path)))
    layout = Layout(True, {1: "start1"})
    first, second = list(DPO_GRID)[:2]
    _write_result(layout, tuned_arm("dpo_b0.1"), 1, method="dpo_b0.1", point=first, heldout=0.5)
    trained = []
    monkeypatch.setattr(dpo, "train", lambda cfg: trained.append(cfg) or pytest.fail("retrained"))
    built = {"pairs": "pairs_dir", "placebo_pairs": "placebo_dir"}
    assert train_dpo(("dpo_b0.1", 1, layout, built, first, True), 1) == layout.run_dir(
        tuned_arm("dpo_b0.1"), 1
    )
    assert not trained

    class Retrained(Exception):
        pass

    def train(cfg):
        raise Retrained(cfg)

    monkeypatch.setattr(dpo, "train", train)
    with pytest.raises(Retrained) as retrained:
        train_dpo(("dpo_b0.1", 1, layout, built, second, True), 1)
    cfg = retrained.value.args[0]
    wanted = dict(override.split("=") for override in DPO_GRID[second])
    assert (cfg.optim.lr, cfg.train.steps) == (float(wanted["optim.lr"]), int(wanted["train.steps"]))
