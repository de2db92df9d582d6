"""The synthetic RLHF pipeline over seeds: does PPO against a learned reward model raise the gold
score, where does over-optimisation start, and how do RTO, DPO and TGDPO compare from the same start?

Each seed runs `recipes.rlhf_pipeline` end to end (SFT, pairs labelled by the hidden gold rule,
reward model, then PPO, RTO, DPO and TGDPO from the SFT policy). PPO curves: gold = fraction of
correct answer digits on the rollouts; proxy = the reward model's score; both are moving averages
over 20 steps. Held-out: every final model answers the task's 1000 held-out problems greedily.

Usage: python benchmarks/learning/rlhf_pipeline.py [--seeds 1 2 3] [--jobs 3] [--no-record] [overrides...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.common import append_results  # noqa: E402


def plot_comparison(results: list[tuple[int, dict]], directory: str) -> str:
    """PPO vs RTO gold on the rollouts, DPO vs TGDPO held-out accuracy during training, and every
    method's final held-out exact match, all seeds in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf.loggers import read_metrics

    fig, (gold_axis, dpo_axis, bar_axis) = plt.subplots(1, 3, figsize=(16, 4.2))
    colors = {"ppo": "tab:blue", "rto": "tab:orange", "dpo": "tab:green", "tgdpo": "tab:red"}
    for seed, s in results:
        run_dir = s["run_dir"]
        for method in ("ppo", "rto"):
            rows = [r for r in read_metrics(os.path.join(run_dir, method)) if "reward/digit_match/mean" in r]
            if rows:
                values = [r["reward/digit_match/mean"] for r in rows]
                smoothed = [
                    sum(values[max(0, i - 19) : i + 1]) / len(values[max(0, i - 19) : i + 1])
                    for i in range(len(values))
                ]
                gold_axis.plot(
                    [r["step"] for r in rows],
                    smoothed,
                    color=colors[method],
                    alpha=0.8,
                    label=method.upper() if seed == results[0][0] else None,
                )
        for method in ("dpo", "tgdpo"):
            rows = [r for r in read_metrics(os.path.join(run_dir, method)) if "eval/accuracy" in r]
            if rows:
                dpo_axis.plot(
                    [r["step"] for r in rows],
                    [r["eval/accuracy"] for r in rows],
                    marker="o",
                    color=colors[method],
                    alpha=0.8,
                    label=method.upper() if seed == results[0][0] else None,
                )
    gold_axis.set(
        title="PPO vs RTO: gold on rollouts (20-step mean)",
        xlabel="PPO step",
        ylabel="fraction of correct digits",
    )
    dpo_axis.set(
        title="DPO vs TGDPO: exact match on held-out pair prompts", xlabel="step", ylabel="exact match"
    )
    methods = [m for m in ("sft", "ppo", "rto", "dpo", "tgdpo") if f"heldout/{m}" in results[0][1]]
    width = 0.8 / len(results)
    for index, (seed, s) in enumerate(results):
        bar_axis.bar(
            [i + index * width for i in range(len(methods))],
            [100 * s[f"heldout/{m}"]["exact_match"] for m in methods],
            width,
            label=f"seed {seed}",
        )
    bar_axis.set_xticks(
        [i + width * (len(results) - 1) / 2 for i in range(len(methods))], [m.upper() for m in methods]
    )
    bar_axis.set(title="Held-out exact match (1000 problems, greedy)", ylabel="%")
    for axis in (gold_axis, dpo_axis, bar_axis):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "rlhf_pipeline.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _run_seed(job: tuple[list[str], str], threads: int) -> dict:
    torch.set_num_threads(threads)
    from recipes.rlhf_pipeline import run_pipeline

    overrides, run_dir = job
    return run_pipeline(overrides, run_dir=run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds run side by side, the CPU threads split between them"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    root = os.path.join("runs", "benchmarks", "rlhf_pipeline", time.strftime("%Y-%m-%d_%H-%M-%S"))
    jobs = [
        ([f"seed={seed}", "logger=quiet", *args.overrides], os.path.join(root, f"seed{seed}"))
        for seed in args.seeds
    ]
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    if args.jobs > 1:
        # the tiny models gain little from a second thread, so whole seeds in parallel finish sooner
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            summaries = list(pool.map(_run_seed, jobs, [threads] * len(jobs)))
    else:
        summaries = [_run_seed(job, threads) for job in jobs]
    results = list(zip(args.seeds, summaries))
    lines = [
        "| seed | SFT exact match | pairs | RM pair accuracy | PPO rollout gold start → end (best @ step) | RM reward start → end | KL end | over-optimisation after step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, s in results:
        lines.append(
            f"| {seed} | {100 * s['sft_accuracy']:.1f}% | {s['pairs']} | {100 * s['rm_pair_accuracy']:.1f}% "
            f"| {s['gold_start']:.3f} → {s['gold_end']:.3f} ({s['gold_best']:.3f} @ {s['gold_best_step']}) "
            f"| {s['rm_start']:.2f} → {s['rm_end']:.2f} | {s['kl_end']:.2f} "
            f"| {s['overoptimisation_after_step'] or 'not seen'} |"
        )
    methods = [m for m in ("sft", "ppo", "rto", "dpo", "tgdpo") if f"heldout/{m}" in results[0][1]]
    lines += [
        "",
        "Held-out (1000 problems, greedy): exact match % / gold (mean fraction of correct digits)",
        "",
        "| seed | " + " | ".join(m.upper() for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for seed, s in results:
        cells = [
            f"{100 * s[f'heldout/{m}']['exact_match']:.1f}% / {s[f'heldout/{m}']['digit_match']:.3f}"
            for m in methods
        ]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = []
    for m in methods[1:]:
        gains = [
            100 * (s[f"heldout/{m}"]["exact_match"] - s["heldout/sft"]["exact_match"]) for _, s in results
        ]
        spread = f", sd {statistics.stdev(gains):.1f}" if len(gains) > 1 else ""
        means.append(f"{m.upper()} {statistics.mean(gains):+.1f}{spread}")
    lines.append("\nHeld-out exact match change from SFT, points (mean over seeds): " + "; ".join(means))
    figure = plot_comparison(
        results, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plots")
    )
    lines.append(f"\nPlot: benchmarks/plots/{os.path.basename(figure)}; runs under {root}")
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        append_results(
            "Synthetic RLHF pipeline: PPO, RTO, DPO and TGDPO against a learned reward model",
            f"python benchmarks/learning/rlhf_pipeline.py --seeds {' '.join(map(str, args.seeds))}",
            "SFT (tiny Llama, 2-digit addition, stop at 35%) → 4 samples per prompt on 9000 prompts, every two with "
            "different gold scores (fraction of correct digits) make a pair → Bradley-Terry RM (2000 steps x 64 pairs, "
            "lr 1e-3, cosine) from the SFT model trained on to 90% → from the SFT policy: PPO (32 prompts/step, 300 steps, KL "
            "0.05, critic from the RM); RTO (the same PPO plus clip(0.05 log pi_dpo/pi_sft, +-0.05) per token); DPO "
            "(300 steps x 32 pairs, beta 0.5, lr 1e-4); TGDPO (same, alpha 0.5, guided by the DPO model). PPO gold and "
            "RM reward are 20-step moving averages over the rollouts.\n\n" + table,
        )


if __name__ == "__main__":
    main()
