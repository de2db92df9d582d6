"""Reproduction studies on a long-response task: each seed method against its baseline and against
controls for its confounds, 5 seeds, verdicts from paired bootstrap intervals.

Task: `data.source=sort` (sort 16 digits: 31-token answers, one exact-match reward at the end, 1000
held-out lists). By default each seed trains its own SFT warm start (`+experiment=sft_sort seed=<s>`,
its initialisation and data order), so the seed spread includes the warm start's; 500 training lists
are carved out as a validation split in every run (`data.validation_size=500`) for tuning.
`--starts shared` is the earlier protocol (one start for every seed). Every method samples 64
responses per step (PPO: 64 prompts; GRPO: 8 prompts x 8) for the same number of steps, and the
held-out exact match (greedy, all 1000 lists) is measured every `--eval-every` steps.

Studies (--study), each with its controls:
  grpo_vs_ppo  GRPO (the demo's settings, no KL) against PPO (KL 0.05 in the reward), and at matched
               KL: both without (ppo_kl0), both with 0.05 in the reward (grpo_kl0.05).
  macro        MA-PPO (fixed n = 3, 5, 10; perplexity and parse segmenters; the authors' settings,
               configs/experiment/ppo_macro.yaml) against PPO. Averaging token rewards over an
               n-token segment leaves 1/n of the per-token KL penalty, so the controls are PPO at
               kl_coef / n (ppo_kl_n3/5/10) and MA-PPO with summed rewards (ma_fixed5_sum). The
               paper's claim: PPO's final reward in 1.7-2x fewer steps.
Reported per arm: the final held-out exact match and the area under the held-out curve (its mean
height over training: higher when the same accuracy comes sooner), each with a 95% percentile
bootstrap interval over seeds, the per-token KL to the reference over the last 10 steps, and the
training minutes. Per comparison (arm - baseline at the same seed): paired differences with intervals
and the word they allow ("better"/"worse" only where the interval excludes zero), the wall clock to
a fixed held-out accuracy (--target), and, secondary, the steps to the baseline's final 10-step
training reward. One figure per study: every seed's curves, coloured by method.

`--tune <method>` runs a small grid (TUNING_GRID: lr, KL, epochs x minibatches, GAE lambda, one
factor at a time) at the warm starts of seeds 1 and 2, scored on the validation lists; the same grid
for every method, so the same tuning budget.

Finished runs are reused (a run directory whose `study_result.json` has the same steps and
evaluation interval), so a study can be stopped and rerun, or widened with more seeds. The same runs
from the command line, as a Hydra multirun (per-seed starts: one model.name_or_path per seed):
  python -m recipes.ppo -m +experiment=ppo_long_sort model.name_or_path=<sft export> seed=1,2,3,4,5
  python -m recipes.ppo -m +experiment=[ppo_long_sort,ppo_macro] model.name_or_path=<sft export> \\
      seed=1,2,3,4,5 advantage.macro.n=3,5,10
  python -m recipes.grpo -m +experiment=grpo_long_sort model.name_or_path=<sft export> seed=1,2,3,4,5

`--cost` reports what the finished runs of every long-task study took (this script's, and those of
token_rewards.py and curiosity_ppo.py --task group): training wall time per seed, from the first and
last timestamps of each run's metrics.

Usage: python benchmarks/studies/long_horizon.py --study macro [--methods ppo ppo_kl_n5 ma_fixed5]
       [--seeds 1 2 3 4 5] [--starts per-seed|shared] [--target 0.35] [--steps 120] [--eval-every 20]
       [--jobs 2] [--no-record]
       python benchmarks/studies/long_horizon.py --tune ppo [--no-record]
       python benchmarks/studies/long_horizon.py --cost [--no-record]
       python benchmarks/studies/long_horizon.py --warm-starts [--no-record]

`--warm-starts` measures the shared warm start on each long task's held-out lists with that task's
verifier (sort: exact match; group: any correct grouping), greedy and at T = 1.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.common import compose_config, moving_average, report, save_figure  # noqa: E402
from benchmarks.studies.intervals import (  # noqa: E402
    area_under_curve,
    bootstrap_interval,
    first_reaching,
    format_interval,
    mean_text,
    per_seed,
    verdict,
)

RUNS = os.path.join(ROOT, "runs", "long_horizon", "sort")
# Runs from one warm start per seed (--starts per-seed): the SFT start, the pairs and every RL run of
# seed s under .../sort_seeds/<method>/seed<s>. 500 training lists carved out as a validation split
# (data.validation_size) in every run, so tuning never sees the held-out lists.
SEEDED_RUNS = os.path.join(ROOT, "runs", "long_horizon", "sort_seeds")
SEEDED_DATA = ["data.validation_size=500"]
WINDOW = 10
PPO_KL = 0.05  # ppo_long_sort's loss.kl_coef
PPO = ("ppo", ["+experiment=ppo_long_sort"])
MACRO = ["+experiment=[ppo_long_sort,ppo_macro]"]
TWO_EPOCHS = ["train.updates_per_rollout=2", "train.num_minibatches=4", "train.micro_batch_size=16"]
GRPO = ["+experiment=grpo_long_sort"]
STUDIES: dict[str, dict[str, tuple[str, list[str]]]] = {
    "grpo_vs_ppo": {
        "ppo": PPO,
        "grpo": ("grpo", [*GRPO, "loss.log_kl=true"]),  # the KL measured, not penalised
        # controls: both without KL, and GRPO with PPO's per-token k1 KL in its reward
        "ppo_kl0": ("ppo", [*PPO[1], "loss.kl_coef=0"]),
        "grpo_kl0.05": (
            "grpo",
            [*GRPO, f"loss.kl_coef={PPO_KL}", "loss.kl_placement=reward", "loss.kl_estimator=k1"],
        ),
    },
    "macro": {
        "ppo": PPO,
        "ma_fixed3": ("ppo", [*MACRO, "advantage.macro.n=3"]),
        "ma_fixed5": ("ppo", [*MACRO, "advantage.macro.n=5"]),
        "ma_fixed10": ("ppo", [*MACRO, "advantage.macro.n=10"]),
        "ma_perplexity": ("ppo", [*MACRO, "advantage.macro.segmenter=perplexity"]),
        "ma_parse": ("ppo", [*MACRO, "advantage.macro.segmenter=parse"]),
        # controls: averaging token rewards over an n-token segment leaves 1/n of the per-token KL
        # penalty, so PPO at kl_coef/n, and MA-PPO with summed rewards (the KL unchanged)
        "ppo_kl_n3": ("ppo", [*PPO[1], f"loss.kl_coef={PPO_KL / 3:.5f}"]),
        "ppo_kl_n5": ("ppo", [*PPO[1], f"loss.kl_coef={PPO_KL / 5:.5f}"]),
        "ppo_kl_n10": ("ppo", [*PPO[1], f"loss.kl_coef={PPO_KL / 10:.5f}"]),
        "ma_fixed5_sum": ("ppo", [*MACRO, "advantage.macro.n=5", "advantage.macro.aggregation=sum"]),
        # the tuned baseline: --tune ppo's choice on the validation lists (RESULTS.md, 2026-12-06:
        # lam 1 and kl_coef 0.01 tied at 55.0% final validation accuracy; lam 1 has the larger area;
        # kl_coef 0.01 is ppo_kl_n5)
        "ppo_tuned": ("ppo", [*PPO[1], "advantage.lam=1.0"]),
        # MA-PPO tuned on the same grid (--tune ma_fixed5, RESULTS.md 2026-12-06): 2 epochs x 4 minibatches
        "ma_tuned": ("ppo", [*MACRO, "advantage.macro.n=5", *TWO_EPOCHS]),
    },
}
# (arm, baseline, what the pair separates), shown when both arms ran
COMPARISONS: dict[str, list[tuple[str, str, str]]] = {
    "grpo_vs_ppo": [
        ("grpo", "ppo", "as configured (GRPO without KL, PPO with 0.05)"),
        ("grpo", "ppo_kl0", "both without KL"),
        ("grpo_kl0.05", "ppo", "both with a 0.05 per-token KL in the reward"),
    ],
    "macro": [
        *[
            (m, "ppo", "as configured")
            for m in ("ma_fixed3", "ma_fixed5", "ma_fixed10", "ma_perplexity", "ma_parse")
        ],
        ("ma_fixed3", "ppo_kl_n3", "at the KL MA-PPO effectively gets"),
        ("ma_fixed5", "ppo_kl_n5", "at the KL MA-PPO effectively gets"),
        ("ma_fixed10", "ppo_kl_n10", "at the KL MA-PPO effectively gets"),
        ("ma_fixed5_sum", "ppo", "MA-PPO with summed rewards: PPO's KL"),
        *[
            (m, "ppo_tuned", "against PPO tuned on validation lists")
            for m in ("ma_fixed3", "ma_fixed5", "ma_fixed10", "ma_perplexity", "ma_parse")
        ],
        ("ppo_tuned", "ppo", "tuning alone"),
        ("ma_tuned", "ppo_tuned", "both tuned on validation lists, the same grid"),
        ("ma_tuned", "ppo", "MA-PPO tuned against the preset PPO"),
        ("ppo_kl_n5", "ppo", "PPO at a fifth of its KL (the confound alone)"),
    ],
}
# --tune <method>: one factor at a time around the preset, each at TUNE_SEEDS' warm starts, scored on
# the validation lists (never the held-out ones); the same grid, so the same budget, for every method
TUNING_GRID: dict[str, list[str]] = {
    "preset": [],
    "lr3e-5": ["optim.lr=3e-5"],
    "lr3e-4": ["optim.lr=3e-4"],
    "kl0.01": ["loss.kl_coef=0.01"],
    "kl0.2": ["loss.kl_coef=0.2"],
    "2epochs_4minibatches": TWO_EPOCHS,
    "lam1": ["advantage.lam=1.0"],
}
TUNE_SEEDS = (1, 2)
PAPER_SPEEDUP = 1.7  # MA-RLHF: PPO's final reward in 1.7-2x fewer steps


def sft_start(threads: int, seed: int | None = None) -> str:
    """The SFT warm start's export directory, trained once (about 5 minutes) and reused: the shared
    one (seed None), or seed `seed`'s own (its initialisation and data order, validation lists
    carved out)."""
    import torch

    from rlhf.checkpoint import export_dir, list_checkpoints

    if seed is None:
        run_dir, overrides = os.path.join(RUNS, "sft"), []
    else:
        run_dir, overrides = os.path.join(SEEDED_RUNS, "sft", f"seed{seed}"), [*SEEDED_DATA, f"seed={seed}"]
    if not list_checkpoints(run_dir):
        torch.set_num_threads(threads)
        from recipes import sft

        print(f"training the SFT warm start (+experiment=sft_sort {' '.join(overrides)})", flush=True)
        cfg = compose_config(
            "sft", ["+experiment=sft_sort", *overrides, f"run_dir={run_dir}", "logger=quiet"]
        )
        sft.train(cfg)
    return export_dir(list_checkpoints(run_dir)[-1])


def run_method(job: tuple, threads: int) -> str:
    """One seed of one method: job = (method, recipe, seed, steps, eval_every, start, overrides or
    None for the study's[, seeded]); `seeded` runs live under SEEDED_RUNS with validation lists
    carved out. Writes its curves (held-out accuracy with the wall clock, training reward and KL)
    to study_result.json in the run directory."""
    method, recipe, seed, steps, eval_every, start, own_overrides, *rest = job
    seeded = bool(rest and rest[0])
    run_dir = os.path.join(SEEDED_RUNS if seeded else RUNS, method, f"seed{seed}")
    done = os.path.join(run_dir, "study_result.json")
    if os.path.exists(done):
        with open(done) as handle:
            found = json.load(handle)
        if (found["steps"], found["eval_every"]) == (steps, eval_every):
            return run_dir
    import torch

    torch.set_num_threads(threads)
    from recipes import grpo, ppo
    from rlhf.loggers import read_metrics

    overrides = own_overrides if own_overrides is not None else STUDIES_BY_METHOD[method][1]
    cfg = compose_config(
        recipe,
        [
            *overrides,
            *(SEEDED_DATA if seeded else []),
            f"model.name_or_path={start}",
            f"seed={seed}",
            f"train.steps={steps}",
            f"eval.every={eval_every}",
            f"run_dir={run_dir}",
            "logger=quiet",
        ],
    )
    if os.path.isdir(run_dir):  # an unfinished attempt, or other settings: start again
        import shutil

        shutil.rmtree(run_dir)
    (grpo if recipe == "grpo" else ppo).train(cfg)
    with open(done, "w") as handle:
        json.dump(curves_of_run(read_metrics(run_dir), method, seed, steps, eval_every), handle)
    return run_dir


def curves_of_run(rows: list[dict], method: str, seed: int, steps: int, eval_every: int) -> dict:
    """What a study reads from a run's metrics: the training reward and per-token KL to the
    reference (PPO logs it as kl/mean; GRPO with the KL in its reward as reward_kl/mean; GRPO
    without a KL term has none), and the held-out accuracy with seconds since the run's first row."""
    start = min(r["time"] for r in rows if "time" in r)
    train = [r for r in rows if "reward/mean" in r]
    evals = [r for r in rows if "eval/accuracy" in r]
    kl_key = next((k for k in ("kl/mean", "reward_kl/mean") if any(k in r for r in train)), None)
    return {
        "method": method,
        "seed": seed,
        "steps": steps,
        "eval_every": eval_every,
        "train_steps": [r["step"] for r in train],
        "train_reward": [r["reward/mean"] for r in train],
        "train_kl": [r[kl_key] for r in train] if kl_key else None,
        "eval_steps": [r["step"] for r in evals],
        "eval_accuracy": [r["eval/accuracy"] for r in evals],
        "eval_seconds": [r["time"] - start for r in evals],
    }


STUDIES_BY_METHOD = {method: spec for study in STUDIES.values() for method, spec in study.items()}


def first_step_reaching(result: dict, target: float) -> int | None:
    """First step (full windows only) whose moving-average training reward reaches `target`."""
    smooth = moving_average(result["train_reward"], WINDOW)
    for i in range(WINDOW - 1, len(smooth)):
        if smooth[i] >= target:
            return result["train_steps"][i]
    return None


def final_kl(result: dict) -> float | None:
    """The per-token KL to the reference over the last WINDOW training steps (None: not logged)."""
    kl = result.get("train_kl")
    return statistics.fmean(kl[-WINDOW:]) if kl else None


def arm_figures(result: dict, target: float) -> dict[str, float | None]:
    """One run's figures: final held-out accuracy, its area under the held-out curve (mean height),
    final KL, training minutes, and the wall clock to the fixed held-out target (None: never)."""
    seconds = result.get("eval_seconds")
    return {
        "final": result["eval_accuracy"][-1],
        "auc": area_under_curve(result["eval_steps"], result["eval_accuracy"]),
        "kl": final_kl(result),
        "minutes": seconds[-1] / 60 if seconds else None,
        "to_target": first_reaching(seconds, result["eval_accuracy"], target) if seconds else None,
    }


def arm_table(figures: dict[tuple[str, int], dict], methods: list[str], seeds: list[int]) -> str:
    lines = [
        "| arm | held-out final, mean [95% CI] | per seed | held-out area under curve, mean [95% CI] | KL to reference per token, last 10 steps | training minutes |",
        "|---|---|---|---|---|---|",
    ]
    for method in methods:
        final = [figures[(method, s)]["final"] for s in seeds]
        auc = [figures[(method, s)]["auc"] for s in seeds]
        kl = [figures[(method, s)]["kl"] for s in seeds]
        minutes = [figures[(method, s)]["minutes"] for s in seeds]
        lines.append(
            f"| {method} | {format_interval(*bootstrap_interval(final))} | {per_seed(final)} | "
            f"{format_interval(*bootstrap_interval(auc))} | {mean_text(kl, 'not computed (no reference)')} | "
            f"{mean_text(minutes, digits=1)} |"
        )
    return "\n".join(lines)


def comparison_table(
    study: str, results: dict, figures: dict, methods: list[str], seeds: list[int], target: float
) -> tuple[str, dict]:
    """Each arm against its baseline at the same seeds: paired differences of the final held-out
    accuracy and of the area under the held-out curve with bootstrap intervals and the verdict word
    each interval allows; the wall clock to `target` (baseline / arm, seeds where both reach it);
    steps to the baseline's final training reward as a secondary figure."""
    lines = [
        f"| arm - baseline | what it separates | final held-out, paired difference [95% CI] | verdict | area under curve, paired difference [95% CI] | verdict | wall clock to {100 * target:.0f}% held-out, baseline / arm [95% CI] (seeds reaching: arm, baseline) | steps to the baseline's final training reward, baseline / arm (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = {}
    for arm, baseline, what in COMPARISONS[study]:
        if arm not in methods or baseline not in methods:
            continue
        pair = {}
        for figure in ("final", "auc"):
            differences = [figures[(arm, s)][figure] - figures[(baseline, s)][figure] for s in seeds]
            interval = bootstrap_interval(differences)
            pair[figure] = (interval, verdict(interval[1], interval[2]))
        times = [(figures[(baseline, s)]["to_target"], figures[(arm, s)]["to_target"]) for s in seeds]
        ratios = [b / a for b, a in times if a and b]
        speed = format_interval(*bootstrap_interval(ratios), scale=1, digits=2) if ratios else "-"
        reached = (sum(a is not None for _, a in times), sum(b is not None for b, _ in times))
        steps = steps_ratio(results, arm, baseline, seeds)
        verdicts[(arm, baseline)] = {"what": what, **{k: v[1] for k, v in pair.items()}, "steps": steps}
        lines.append(
            f"| {arm} - {baseline} | {what} | {format_interval(*pair['final'][0])} | {pair['final'][1]} | "
            f"{format_interval(*pair['auc'][0])} | {pair['auc'][1]} | {speed} ({reached[0]}, {reached[1]}) | "
            + (f"{steps[0]:.2f}x ({steps[1]}/{len(seeds)} seeds reach it)" if steps[0] else "-")
            + " |"
        )
    return "\n".join(lines), verdicts


def steps_ratio(results: dict, arm: str, baseline: str, seeds: list[int]) -> tuple[float | None, int]:
    """(median over seeds of baseline steps / arm steps to the baseline's final 10-step training
    reward, seeds where both reach it). Noisy (a moving average's first crossing), so secondary."""
    ratios = []
    for seed in seeds:
        target = moving_average(results[(baseline, seed)]["train_reward"], WINDOW)[-1]
        arm_steps = first_step_reaching(results[(arm, seed)], target)
        baseline_steps = first_step_reaching(results[(baseline, seed)], target)
        if arm_steps and baseline_steps:
            ratios.append(baseline_steps / arm_steps)
    return (statistics.median(ratios) if ratios else None), len(ratios)


def plot(results: dict[tuple[str, int], dict], methods: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for (method, _seed), result in sorted(results.items()):
        label = method if _seed == min(s for m, s in results if m == method) else None
        smooth = moving_average(result["train_reward"], WINDOW)
        left.plot(result["train_steps"], smooth, color=colors[method], alpha=0.7, lw=1, label=label)
        right.plot(
            result["eval_steps"],
            [100 * a for a in result["eval_accuracy"]],
            color=colors[method],
            alpha=0.7,
            lw=1,
            marker="o",
            ms=3,
            label=label,
        )
    left.set(title=f"training reward ({WINDOW}-step mean), one line per seed", xlabel="step")
    right.set(title="held-out exact match (%), greedy, 1000 lists", xlabel="step")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def verdict_lines(study: str, verdicts: dict) -> str:
    """A sentence per arm. For MA-PPO the paper's claim (PPO's final reward in 1.7-2x fewer steps),
    by a rule fixed before the runs: reproduced where the paired interval of the area under the
    held-out curve against PPO excludes zero in MA-PPO's favour, the final accuracy is not shown
    worse, and the same holds against PPO at MA-PPO's effective KL and against the tuned PPO; a
    control that did not run is named beside the word. Where it beats PPO but not the KL-matched
    PPO, the gain is the KL."""
    lines = []
    for (arm, baseline), v in verdicts.items():
        lines.append(
            f"- {arm} against {baseline} ({v['what']}): final held-out {v['final']}, area under the curve {v['auc']}"
        )
    if study != "macro":
        return "\n".join(lines)
    for arm in sorted({a for a, _ in verdicts if a.startswith("ma_")}):
        against_ppo = verdicts.get((arm, "ppo"))
        matched = next((v for (a, b), v in verdicts.items() if a == arm and b.startswith("ppo_kl")), None)
        tuned = verdicts.get((arm, "ppo_tuned"))
        if against_ppo is None:
            continue
        faster = against_ppo["auc"] == "better" and against_ppo["final"] != "worse"
        if faster and matched is not None and matched["auc"] != "better":
            word = "not reproduced: faster than PPO, but no faster than PPO at the same effective KL"
        elif faster and tuned is not None and tuned["auc"] != "better":
            word = "not reproduced: faster than PPO, but no faster than the tuned PPO"
        elif faster:
            missing = [
                what
                for what, control in (("no KL-matched control run", matched), ("no tuned PPO run", tuned))
                if control is None
            ]
            word = "reproduced" + (f" ({'; '.join(missing)})" if missing else "")
        else:
            word = "not reproduced"
        lines.append(f"- MA-RLHF's claim, {arm}: {word}")
    return "\n".join(lines)


def study_cost() -> str:
    """Training wall time of every finished long-task run, per method (its seeds)."""
    import glob

    from rlhf.loggers import read_metrics

    def minutes(run_dir: str) -> float:
        times = [row["time"] for row in read_metrics(run_dir) if "time" in row]
        return (max(times) - min(times)) / 60

    group = os.path.join(os.path.dirname(RUNS), "group", "cd")
    layouts = (  # (run directories, the method a directory belongs to)
        (os.path.join(RUNS, "*", "seed*"), lambda d: os.path.basename(os.path.dirname(d))),
        (os.path.join(group, "seed*", "*"), lambda d: f"group {os.path.basename(d)}"),
    )
    methods: dict[str, list[float]] = {}
    for pattern, method_of in layouts:
        for run_dir in sorted(glob.glob(pattern)):
            if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
                methods.setdefault(method_of(run_dir), []).append(minutes(run_dir))
    lines = ["| method | runs | training wall minutes per seed | total |", "|---|---|---|---|"]
    for name, runs in methods.items():
        per_seed = " / ".join(f"{m:.1f}" for m in runs)
        lines.append(f"| {name} | {len(runs)} | {per_seed} | {sum(runs):.1f} |")
    return "\n".join(lines)


WARM_START_TASKS = {"sort": "ppo_long_sort", "group": "ppo_group"}  # task -> the study's PPO preset


def warm_start_accuracy(start: str, threads: int, lists: int = 1000) -> str:
    """The warm start's held-out accuracy on each long task by its verifier, greedy and sampled."""
    import torch

    from rewards import REWARD_FUNCTIONS
    from rlhf.config import ModelConfig
    from rlhf.data.load import load_task_data
    from rlhf.models.load import load_causal_lm, load_tokenizer
    from rlhf.rollout.engine import generate_rollouts
    from rlhf.rollout.hf import TransformersEngine
    from rlhf.rollout.sampling import SamplingParams

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_cfg = ModelConfig(source="pretrained", name_or_path=start)
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, tokenizer).eval()
    lines = ["| task | verifier | held-out lists | greedy | T = 1 |", "|---|---|---|---|---|"]
    for task, preset in WARM_START_TASKS.items():
        cfg = compose_config("ppo", [f"+experiment={preset}"])
        _, rows = load_task_data(cfg.data)
        rows = rows.select(range(min(lists, len(rows))))
        verify = REWARD_FUNCTIONS[cfg.reward.accuracy_reward]
        columns = {c: list(rows[c]) for c in rows.column_names if c != cfg.data.prompt_column}
        sampling = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=1.0)
        accuracy = []
        for do_sample in (False, True):
            scores = []
            for first in range(0, len(rows), 500):
                part = {c: v[first : first + 500] for c, v in columns.items()}
                batch = generate_rollouts(
                    TransformersEngine.for_model(model, tokenizer),
                    list(rows[cfg.data.prompt_column][first : first + 500]),
                    part,
                    group_size=1,
                    sampling=sampling,
                    do_sample=do_sample,
                )
                scores += [s or 0.0 for s in verify(batch.prompts, batch.completions, **part)]
            accuracy.append(sum(scores) / len(scores))
        lines.append(
            f"| {task} | {cfg.reward.accuracy_reward} | {len(rows)} | {100 * accuracy[0]:.1f}% | {100 * accuracy[1]:.1f}% |"
        )
    return "\n".join(lines)


def tuning_jobs(method: str, steps: int, eval_every: int, starts: dict[int, str]) -> list[tuple]:
    """`method`'s tuning runs: each grid point at each tuning seed, evaluated on the validation lists."""
    recipe, base = STUDIES_BY_METHOD[method]
    return [
        (
            f"tune_{method}_{name}",
            recipe,
            seed,
            steps,
            eval_every,
            starts[seed],
            [*base, *extra, "data.eval_split=validation"],
            True,
        )
        for name, extra in TUNING_GRID.items()
        for seed in TUNE_SEEDS
    ]


def tuning_table(method: str, results: dict[tuple[str, int], dict]) -> str:
    """The grid's validation figures, best final validation accuracy (mean over tuning seeds) first."""
    rows = []
    for name, extra in TUNING_GRID.items():
        runs = [results[(f"tune_{method}_{name}", seed)] for seed in TUNE_SEEDS]
        final = [r["eval_accuracy"][-1] for r in runs]
        auc = [area_under_curve(r["eval_steps"], r["eval_accuracy"]) for r in runs]
        kl = [final_kl(r) for r in runs]
        rows.append((statistics.fmean(final), name, extra, final, statistics.fmean(auc), kl))
    rows.sort(key=lambda row: (-row[0], -row[4]))  # a tie on the final accuracy goes to the larger area
    lines = [
        "| grid point | overrides | validation final, per seed | mean | validation area under curve | KL per token, last 10 steps |",
        "|---|---|---|---|---|---|",
    ]
    for mean, name, extra, final, auc, kl in rows:
        lines.append(
            f"| {name}{' (chosen)' if name == rows[0][1] else ''} | {' '.join(extra) or '(the preset)'} | "
            f"{per_seed(final)} | {100 * mean:.1f}% | {100 * auc:.1f}% | {mean_text(kl)} |"
        )
    return "\n".join(lines)


def tune(method: str, steps: int, eval_every: int, jobs: int, record: bool) -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    threads = max(1, (os.cpu_count() or 2) // max(1, jobs))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        starts = dict(
            zip(TUNE_SEEDS, pool.map(sft_start, [threads] * len(TUNE_SEEDS), TUNE_SEEDS), strict=True)
        )
        runs = tuning_jobs(method, steps, eval_every, starts)
        for job, run_dir in zip(runs, pool.map(run_method, runs, [threads] * len(runs)), strict=True):
            print(f"{job[0]} seed {job[2]} done: {run_dir}", flush=True)
    results = {}
    for name, _recipe, seed, *_ in runs:
        with open(os.path.join(SEEDED_RUNS, name, f"seed{seed}", "study_result.json")) as handle:
            results[(name, seed)] = json.load(handle)
    body = (
        f"{len(TUNING_GRID)} grid points x seeds {list(TUNE_SEEDS)} (their own warm starts), {steps} steps, "
        f"scored on 500 validation lists carved from the training lists.\n\n{tuning_table(method, results)}"
    )
    report(f"Tuning {method} on sort-16, on validation lists", body, record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    record = "--no-record" not in sys.argv[1:]
    if "--warm-starts" in sys.argv[1:]:
        body = warm_start_accuracy(sft_start(os.cpu_count() or 2), os.cpu_count() or 2)
        report("The long tasks' warm start (sft_sort) on each task", body, record)
        return
    if "--cost" in sys.argv[1:]:
        report("What the long-task studies cost", study_cost(), record)
        return
    parser.add_argument("--study", choices=sorted(STUDIES))
    parser.add_argument(
        "--tune",
        choices=sorted(m for m, (recipe, _) in STUDIES_BY_METHOD.items() if recipe == "ppo"),
        help="tune this method instead: TUNING_GRID at the warm starts of seeds 1 and 2, on the validation lists",
    )
    parser.add_argument("--methods", nargs="+", help="a subset of the study's methods (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--starts",
        choices=("per-seed", "shared"),
        default="per-seed",
        help="per-seed: each seed trains its own SFT warm start (runs under runs/long_horizon/sort_seeds); "
        "shared: one start for every seed (the earlier protocol, runs under runs/long_horizon/sort)",
    )
    parser.add_argument(
        "--target", type=float, default=0.35, help="held-out accuracy the wall clock is measured to"
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.tune:
        tune(args.tune, args.steps, args.eval_every, args.jobs, not args.no_record)
        return
    if not args.study:
        parser.error("--study (or --tune, --cost, --warm-starts) is required")
    methods = args.methods or list(STUDIES[args.study])
    unknown = sorted(set(methods) - set(STUDIES[args.study]))
    if unknown:
        parser.error(f"--methods {unknown} are not in study {args.study}: {sorted(STUDIES[args.study])}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    seeded = args.starts == "per-seed"
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        if seeded:
            starts = dict(
                zip(args.seeds, pool.map(sft_start, [threads] * len(args.seeds), args.seeds), strict=True)
            )
        else:
            starts = dict.fromkeys(args.seeds, sft_start(os.cpu_count() or 2))
        jobs = [
            (m, STUDIES[args.study][m][0], s, args.steps, args.eval_every, starts[s], None, seeded)
            for s in args.seeds
            for m in methods
        ]
        for job, run_dir in zip(jobs, pool.map(run_method, jobs, [threads] * len(jobs)), strict=True):
            print(f"{job[0]} seed {job[2]} done: {run_dir}", flush=True)
    results = {}
    for method, _recipe, seed, *_ in jobs:
        with open(
            os.path.join(SEEDED_RUNS if seeded else RUNS, method, f"seed{seed}", "study_result.json")
        ) as handle:
            results[(method, seed)] = json.load(handle)
    figures = {key: arm_figures(result, args.target) for key, result in results.items()}
    comparisons, verdicts = comparison_table(args.study, results, figures, methods, args.seeds, args.target)
    figure = f"long_horizon_{args.study}{'' if seeded else '_shared_start'}.png"
    plot(results, methods, os.path.join(ROOT, "benchmarks", "plots", figure), f"{args.study} on sort-16")
    body = (
        f"{'One SFT warm start per seed' if seeded else 'One SFT warm start for every seed'}; "
        f"intervals: percentile bootstrap over seeds (10,000 resamples).\n\n{arm_table(figures, methods, args.seeds)}"
        f"\n\n{comparisons}\n\n{verdict_lines(args.study, verdicts)}\n\nFigure: benchmarks/plots/{figure}"
    )
    report(f"Long-horizon study '{args.study}' on sort-16, {len(args.seeds)} seeds", body, not args.no_record)


if __name__ == "__main__":
    main()
