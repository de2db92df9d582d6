"""The synthetic RLHF pipeline over seeds: does PPO against a learned reward model raise the gold
score, and where does over-optimisation start?

Each seed runs `recipes.rlhf_pipeline` end to end (SFT, pairs labelled by the hidden gold rule,
reward model, PPO with a critic). Gold = fraction of correct answer digits on the rollouts; proxy =
the reward model's score; both are moving averages over 20 steps.

Usage: python benchmarks/rlhf_pipeline.py [--seeds 1 2 3] [--no-record] [overrides...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import append_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from recipes.rlhf_pipeline import run_pipeline

    root = tempfile.mkdtemp(prefix="rlhf_pipeline_")
    results = [
        (
            seed,
            run_pipeline(
                [f"seed={seed}", "logger=quiet", *args.overrides], run_dir=os.path.join(root, f"seed{seed}")
            ),
        )
        for seed in args.seeds
    ]
    lines = [
        "| seed | SFT exact match | pairs | RM pair accuracy | gold start → end (best @ step) | RM reward start → end | KL end | held-out exact match start → end | over-optimisation after step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, s in results:
        lines.append(
            f"| {seed} | {100 * s['sft_accuracy']:.1f}% | {s['pairs']} | {100 * s['rm_pair_accuracy']:.1f}% "
            f"| {s['gold_start']:.3f} → {s['gold_end']:.3f} ({s['gold_best']:.3f} @ {s['gold_best_step']}) "
            f"| {s['rm_start']:.2f} → {s['rm_end']:.2f} | {s['kl_end']:.2f} "
            f"| {100 * s['accuracy_start']:.1f}% → {100 * s['accuracy_end']:.1f}% | {s['overoptimisation_after_step'] or 'not seen'} |"
        )
    gains = [s["gold_end"] - s["gold_start"] for _, s in results]
    lines.append(
        f"\nGold gain (end - start): mean {statistics.mean(gains):+.3f}"
        + (f", sd {statistics.stdev(gains):.3f}" if len(gains) > 1 else "")
    )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        append_results(
            "Synthetic RLHF pipeline: PPO against a learned reward model",
            f"python benchmarks/rlhf_pipeline.py --seeds {' '.join(map(str, args.seeds))}",
            "SFT (tiny Llama, 2-digit addition) → 2 samples per prompt on 6000 prompts, labelled by the gold rule "
            "(fraction of correct digits), ties dropped → Bradley-Terry RM from the SFT weights (300 steps) → PPO "
            "(32 prompts/step, 300 steps, KL 0.05, critic from the RM). Gold and RM reward are 20-step moving averages "
            "over the PPO rollouts; held-out exact match is greedy on 500 problems.\n\n" + table,
        )


if __name__ == "__main__":
    main()
