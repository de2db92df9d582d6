"""Reproduction studies on a long-response task: each seed method against its baseline, 5 seeds.

Task: `data.source=sort` (sort 16 digits: 31-token answers, one exact-match reward at the end, 1000
held-out lists). Every run starts from one SFT warm start (`+experiment=sft_sort`, about 23% held-out
exact match), trained here once and reused; the seed changes the RL run only. Every method samples
64 responses per step (PPO: 64 prompts; GRPO: 8 prompts x 8) for the same number of steps, and the
held-out exact match (greedy, all 1000 lists) is measured every `--eval-every` steps.

Studies (--study):
  grpo_vs_ppo  PPO (critic from the policy, exact-match reward) against GRPO (the demo's settings).
  macro        MA-PPO against PPO: fixed n-grams (n = 3, 5, 10), perplexity and parse segmenters,
               the authors' settings otherwise (configs/experiment/ppo_macro.yaml). The paper's claim:
               1.7-2x fewer steps to PPO's final reward.
Reported per method: the final held-out exact match and the final training reward (mean and standard
deviation over seeds), and for each seed the first step whose 10-step moving-average training reward
reaches that seed's PPO run's final value. A difference "exceeds the spread" when the gap between
the means is larger than the larger of the two standard deviations. One figure per study: every
seed's curves, coloured by method.

Finished runs are reused (a run directory whose `study_result.json` has the same steps and
evaluation interval), so a study can be stopped and rerun, or widened with more seeds. The same runs from the command line, as a Hydra multirun:
  python -m recipes.ppo -m +experiment=ppo_long_sort model.name_or_path=<sft export> seed=1,2,3,4,5
  python -m recipes.ppo -m +experiment=[ppo_long_sort,ppo_macro] model.name_or_path=<sft export> \\
      seed=1,2,3,4,5 advantage.macro.n=3,5,10
  python -m recipes.grpo -m +experiment=grpo_long_sort model.name_or_path=<sft export> seed=1,2,3,4,5

`--cost` reports what the finished runs of every long-task study took (this script's, and those of
token_rewards.py and curiosity_ppo.py --task group): training wall time per seed, from the first and
last timestamps of each run's metrics.

Usage: python benchmarks/studies/long_horizon.py --study macro [--methods ppo ma_fixed5] [--seeds 1 2 3 4 5]
       [--steps 120] [--eval-every 20] [--jobs 2] [--no-record]
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

RUNS = os.path.join(ROOT, "runs", "long_horizon", "sort")
WINDOW = 10
PPO = ("ppo", ["+experiment=ppo_long_sort"])
MACRO = ["+experiment=[ppo_long_sort,ppo_macro]"]
STUDIES: dict[str, dict[str, tuple[str, list[str]]]] = {
    "grpo_vs_ppo": {"ppo": PPO, "grpo": ("grpo", ["+experiment=grpo_long_sort"])},
    "macro": {
        "ppo": PPO,
        "ma_fixed3": ("ppo", [*MACRO, "advantage.macro.n=3"]),
        "ma_fixed5": ("ppo", [*MACRO, "advantage.macro.n=5"]),
        "ma_fixed10": ("ppo", [*MACRO, "advantage.macro.n=10"]),
        "ma_perplexity": ("ppo", [*MACRO, "advantage.macro.segmenter=perplexity"]),
        "ma_parse": ("ppo", [*MACRO, "advantage.macro.segmenter=parse"]),
    },
}
PAPER_SPEEDUP = 1.7  # MA-RLHF: PPO's final reward in 1.7-2x fewer steps


def sft_start(threads: int) -> str:
    """The shared SFT warm start's export directory, trained once (about 5 minutes) and reused."""
    import torch

    from rlhf.checkpoint import export_dir, list_checkpoints

    run_dir = os.path.join(RUNS, "sft")
    if not list_checkpoints(run_dir):
        torch.set_num_threads(threads)
        from recipes import sft

        print("training the SFT warm start (+experiment=sft_sort)", flush=True)
        sft.train(compose_config("sft", ["+experiment=sft_sort", f"run_dir={run_dir}", "logger=quiet"]))
    return export_dir(list_checkpoints(run_dir)[-1])


def run_method(job: tuple[str, str, int, int, int, str, list[str] | None], threads: int) -> str:
    """One seed of one method (its overrides: the study's, unless the job brings its own); writes
    its curves to study_result.json in the run directory."""
    method, recipe, seed, steps, eval_every, start, own_overrides = job
    run_dir = os.path.join(RUNS, method, f"seed{seed}")
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
    rows = read_metrics(run_dir)
    result = {
        "method": method,
        "seed": seed,
        "steps": steps,
        "eval_every": eval_every,
        "train_steps": [r["step"] for r in rows if "reward/mean" in r],
        "train_reward": [r["reward/mean"] for r in rows if "reward/mean" in r],
        "eval_steps": [r["step"] for r in rows if "eval/accuracy" in r],
        "eval_accuracy": [r["eval/accuracy"] for r in rows if "eval/accuracy" in r],
    }
    with open(done, "w") as handle:
        json.dump(result, handle)
    return run_dir


STUDIES_BY_METHOD = {method: spec for study in STUDIES.values() for method, spec in study.items()}


def first_step_reaching(result: dict, target: float) -> int | None:
    """First step (full windows only) whose moving-average training reward reaches `target`."""
    smooth = moving_average(result["train_reward"], WINDOW)
    for i in range(WINDOW - 1, len(smooth)):
        if smooth[i] >= target:
            return result["train_steps"][i]
    return None


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: dict[tuple[str, int], dict], methods: list[str], seeds: list[int]) -> tuple[str, dict]:
    """The study's table and, per method, the figures its verdict rests on."""
    final = {m: [results[(m, s)]["eval_accuracy"][-1] for s in seeds] for m in methods}
    reward = {
        m: [moving_average(results[(m, s)]["train_reward"], WINDOW)[-1] for s in seeds] for m in methods
    }
    lines = [
        "| method | held-out exact match, final: mean (sd) | per seed | training reward, final 10-step mean: mean (sd) | steps to PPO's final reward, per seed | PPO steps / method steps (median) |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = {}
    for method in methods:
        mean, sd = _mean_sd(final[method])
        reward_mean, reward_sd = _mean_sd(reward[method])
        reached, ratios = [], []
        if "ppo" in methods:
            for seed in seeds:
                ppo_result = results[("ppo", seed)]
                target = moving_average(ppo_result["train_reward"], WINDOW)[-1]
                steps = first_step_reaching(results[(method, seed)], target)
                reached.append(str(steps) if steps is not None else "never")
                ppo_steps = first_step_reaching(ppo_result, target)
                if steps and ppo_steps:
                    ratios.append(ppo_steps / steps)
        ratio = statistics.median(ratios) if ratios else None
        lines.append(
            f"| {method} | {100 * mean:.1f}% ({100 * sd:.1f}) | "
            + " / ".join(f"{100 * v:.1f}" for v in final[method])
            + f" | {reward_mean:.3f} ({reward_sd:.3f}) | {', '.join(reached) or '-'} | "
            + (f"{ratio:.2f}x ({len(ratios)}/{len(seeds)} seeds reach it)" if ratio else "-")
            + " |"
        )
        if method != "ppo" and "ppo" in methods:
            ppo_mean, ppo_sd = _mean_sd(final["ppo"])
            verdicts[method] = {
                "accuracy_gap": mean - ppo_mean,
                "exceeds_spread": abs(mean - ppo_mean) > max(sd, ppo_sd),
                "speedup": ratio,
                "reached": len(ratios),
            }
    return "\n".join(lines), verdicts


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
    """Each method against PPO; for MA-PPO the verdict on the paper's claim, by a rule fixed before
    the runs: reproduced = PPO's final reward in at least 1.7x fewer steps (median, 3+ seeds reach
    it) at no held-out loss; in part = at least 1.2x fewer steps, or a held-out gain beyond the seed
    spread; otherwise not reproduced."""
    lines = []
    for method, v in verdicts.items():
        speed = f"{v['speedup']:.2f}x" if v["speedup"] else "never"
        spread = "exceeds" if v["exceeds_spread"] else "within"
        facts = (
            f"PPO steps / {method} steps to PPO's final reward: median {speed}, {v['reached']} seeds reach it; "
            f"held-out gap to PPO {100 * v['accuracy_gap']:+.1f} points, {spread} the seed spread"
        )
        if study != "macro":
            lines.append(f"- {method}: {facts}")
            continue
        speedup = v["speedup"] if v["reached"] >= 3 else None
        if speedup and speedup >= PAPER_SPEEDUP and v["accuracy_gap"] >= 0:
            word = "reproduced"
        elif (speedup and speedup >= 1.2) or (v["accuracy_gap"] > 0 and v["exceeds_spread"]):
            word = "reproduced in part"
        else:
            word = "not reproduced"
        lines.append(f"- {method}: {word} ({facts})")
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
    parser.add_argument("--study", choices=sorted(STUDIES), required=True)
    parser.add_argument("--methods", nargs="+", help="a subset of the study's methods (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    methods = args.methods or list(STUDIES[args.study])
    unknown = sorted(set(methods) - set(STUDIES[args.study]))
    if unknown:
        parser.error(f"--methods {unknown} are not in study {args.study}: {sorted(STUDIES[args.study])}")
    os.environ.setdefault("WANDB_MODE", "disabled")
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    start = sft_start(os.cpu_count() or 2)
    jobs = [
        (m, STUDIES[args.study][m][0], s, args.steps, args.eval_every, start, None)
        for s in args.seeds
        for m in methods
    ]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        for job, run_dir in zip(jobs, pool.map(run_method, jobs, [threads] * len(jobs)), strict=True):
            print(f"{job[0]} seed {job[2]} done: {run_dir}", flush=True)
    results = {}
    for method, _recipe, seed, *_ in jobs:
        with open(os.path.join(RUNS, method, f"seed{seed}", "study_result.json")) as handle:
            results[(method, seed)] = json.load(handle)
    table, verdicts = summarise(results, methods, args.seeds)
    figure = f"long_horizon_{args.study}.png"
    plot(results, methods, os.path.join(ROOT, "benchmarks", "plots", figure), f"{args.study} on sort-16")
    body = f"{table}\n\n{verdict_lines(args.study, verdicts)}\n\nFigure: benchmarks/plots/{figure}"
    report(f"Long-horizon study '{args.study}' on sort-16, {len(args.seeds)} seeds", body, not args.no_record)


if __name__ == "__main__":
    main()
