"""The curiosity study's paired comparison (benchmarks/studies/curiosity_ppo.py) on made-up
trajectories: each seed's own line read at a matched reward, and the words the intervals allow."""

from __future__ import annotations

from benchmarks.studies.curiosity_ppo import matched, outside_range, overlap_reward, paired_table


def trajectory(diversity_at: float, slope: float, wobble: float, self_bleu: float = 0.5) -> list[dict]:
    """SFT start, then checkpoints whose diversity is linear in reward."""
    rewards = [0.2, 0.4, 0.5, 0.6, 0.7]
    return [
        {"reward": r, "diversity": diversity_at + slope * (r - 0.5) + wobble, "self_bleu": self_bleu - wobble}
        for r in rewards
    ]


def test_matched_reads_each_seeds_line():
    runs = {(1, "ppo"): trajectory(0.30, 0.1, 0.0), (2, "ppo"): trajectory(0.40, 0.1, 0.0)}
    assert matched(runs, "ppo", "diversity", 0.5, seed=1) == 0.30
    assert abs(matched(runs, "ppo", "diversity", 0.6, seed=2) - 0.41) < 1e-12
    assert abs(matched(runs, "ppo", "diversity", 0.5) - 0.35) < 1e-12  # pooled


def test_paired_words_follow_the_intervals():
    seeds = [1, 2, 3, 4, 5]
    runs = {}
    for seed in seeds:
        runs[(seed, "ppo")] = trajectory(0.30, 0.1, 0.01 * seed)
        runs[(seed, "cd")] = trajectory(0.35, 0.1, 0.01 * seed, self_bleu=0.45)  # more diverse on every seed
        runs[(seed, "cd_same")] = trajectory(0.30 + (0.01 if seed % 2 else -0.01), 0.1, 0.01 * seed)
    table = paired_table(runs, ["ppo", "cd", "cd_same"], ("reward", "diversity", "self_bleu"), seeds, 0.5)
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines()[2:]}
    assert "| more diverse |" in rows[("cd - ppo", "diversity")]
    assert rows[("cd - ppo", "diversity")].count("0.0500 [0.0500, 0.0500]") == 3
    assert "0.0500 [0.0500, 0.0500] (5) | more diverse |" in rows[("cd - ppo", "diversity")]
    assert "| more diverse |" in rows[("cd - ppo", "self_bleu")]  # lower Self-BLEU is more diverse
    assert "more diverse" not in rows[("cd_same - ppo", "diversity")]
    assert "no difference shown" in rows[("cd_same - ppo", "diversity")]
    assert rows[("cd - ppo", "reward")].endswith("| - | - |")  # no matched reading of the reward itself


def shifted(run: list[dict], by: float) -> list[dict]:
    return [{**point, "reward": point["reward"] + by} for point in run]


def test_inside_the_ranges_both_lines_are_read_where_both_runs_went():
    ppo = trajectory(0.30, 0.1, 0.0)  # checkpoints at rewards 0.4 .. 0.7
    runs = {(1, "ppo"): ppo, (1, "cd"): shifted(trajectory(0.30, 0.1, 0.0), 0.2)}  # 0.6 .. 0.9
    runs[(2, "ppo")], runs[(2, "cd")] = ppo, shifted(ppo, 0.5)  # 0.9 .. 1.2: never meets PPO's
    assert abs(overlap_reward(runs, "cd", 1) - 0.65) < 1e-12
    assert overlap_reward(runs, "cd", 2) is None
    assert outside_range(runs, ["ppo", "cd"], [1, 2], 0.65) == [2]
    assert outside_range(runs, ["ppo", "cd"], [1, 2], 0.95) == [1, 2]
    table = paired_table(runs, ["ppo", "cd"], ("reward", "diversity"), [1, 2], 0.65)
    row = next(line for line in table.splitlines() if line.startswith("| cd - ppo | diversity"))
    # seed 1 only: cd's line (0.30 at its reward 0.7) read at 0.65 is 0.295, PPO's is 0.315
    assert "-0.0200 [-0.0200, -0.0200] (1) | less diverse |" in row
    table = paired_table(
        {k: v for k, v in runs.items() if k[0] == 2}, ["ppo", "cd"], ("diversity",), [2], 0.9
    )
    assert "no seed's ranges overlap" in table
