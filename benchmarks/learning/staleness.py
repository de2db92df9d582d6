"""Does generating ahead of the trainer cost learning? The demo's GRPO from its SFT start, on a vLLM
server, with rollout.max_staleness=0 (generate, then train) against 1 (the next step's rollout
generated during this step's update), same steps, over seeds.

Each seed: the demo's SFT warm start (2-digit addition, SFT until 35% check accuracy; the tiny
model with head_dim 32, which vLLM's CPU kernel takes), then both arms from that start for
`--steps` GRPO steps with the demo's settings. Held-out accuracy is greedy exact match on the demo's
1000 fixed held-out problems. The verdict: the mean difference against the spread over seeds.

Usage: python benchmarks/learning/staleness.py [--seeds 1 2 3] [--steps 150] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.common import append_results, compose_config  # noqa: E402

SHAPE = "model.tiny.num_heads=2"


def sft_start(seed: int, directory: str) -> str:
    from recipes import sft
    from rlhf.checkpoint import export_dir

    cfg = compose_config(
        "sft",
        ["+experiment=sft_arithmetic_demo", SHAPE, f"seed={seed}", f"run_dir={directory}", "logger=quiet"],
    )
    return export_dir(sft.train(cfg)["checkpoint"])


def grpo_arm(start: str, seed: int, staleness: int, steps: int, directory: str) -> dict[str, float]:
    from recipes import grpo
    from rlhf.loggers import read_metrics

    cfg = compose_config(
        "grpo",
        [
            "+experiment=grpo_arithmetic_demo",
            "model=pretrained",
            f"model.name_or_path={start}",
            "rollout.engine=vllm_server",
            "rollout.vllm.max_model_len=64",
            "rollout.vllm.enforce_eager=true",  # no compiled graph: starts about 30 s sooner
            f"rollout.max_staleness={staleness}",
            f"train.steps={steps}",
            "train.time_limit_s=null",
            f"eval.every={steps}",
            "checkpoint.every=0",
            f"seed={seed}",
            f"run_dir={directory}",
            "logger=quiet",
        ],
    )
    result = grpo.train(cfg)
    rows = [r for r in read_metrics(directory) if "time/step" in r]
    return {
        "before": result["eval/accuracy_before"],
        "after": result["eval/accuracy"],
        "step_s": statistics.median(r["time/step"] for r in rows),
        "staleness": statistics.mean(r.get("async/staleness_mean", 0.0) for r in rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = tempfile.mkdtemp(prefix="staleness_")
    rows = []
    for seed in args.seeds:
        start = sft_start(seed, os.path.join(root, f"seed{seed}", "sft"))
        arms = {
            k: grpo_arm(start, seed, k, args.steps, os.path.join(root, f"seed{seed}", f"k{k}"))
            for k in (0, 1)
        }
        rows.append((seed, arms))
        print(f"[staleness] seed {seed}: {arms}", flush=True)
    lines = [
        "| seed | after SFT | staleness 0 | staleness 1 | difference (points) | mean staleness (k=1) | step s, k=0 / k=1 |",
        "|---|---|---|---|---|---|---|",
    ]
    differences = []
    for seed, arms in rows:
        difference = 100 * (arms[1]["after"] - arms[0]["after"])
        differences.append(difference)
        lines.append(
            f"| {seed} | {100 * arms[0]['before']:.1f}% | {100 * arms[0]['after']:.1f}% | {100 * arms[1]['after']:.1f}% "
            f"| {difference:+.1f} | {arms[1]['staleness']:.2f} | {arms[0]['step_s']:.2f} / {arms[1]['step_s']:.2f} |"
        )
    gains = {k: [100 * (a[k]["after"] - a[k]["before"]) for _, a in rows] for k in (0, 1)}
    spread = max(statistics.stdev(g) for g in gains.values()) if len(rows) > 1 else float("nan")
    lines.append(
        f"\nMean difference (staleness 1 - 0) {statistics.mean(differences):+.1f} points; gains over SFT: "
        f"k=0 {statistics.mean(gains[0]):+.1f}, k=1 {statistics.mean(gains[1]):+.1f}; largest sd of an arm's gain "
        f"over seeds {spread:.1f}."
    )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        append_results(
            "vLLM server: learning with generation one step ahead",
            " ".join(["python benchmarks/learning/staleness.py", *sys.argv[1:]]),
            f"The demo's SFT start per seed (2-digit addition, tiny Llama with head_dim 32), then {args.steps} GRPO "
            "steps with the demo's settings on one launched vLLM server, rollout.max_staleness 0 and 1; greedy exact "
            "match on 1000 held-out problems.\n\n" + table,
        )


if __name__ == "__main__":
    main()
