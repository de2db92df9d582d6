"""Held-out accuracy of GRPO in each training precision, from one SFT checkpoint of the demo task.

One SFT warm start (the demo's: 35% check accuracy), then for each seed and each precision a GRPO
run with the demo's settings for a fixed number of steps (no time limit), loaded the way a user
loads their own model (`model=pretrained`, the default precision unless the variant changes it):
  fp32       the default pretrained config: float32 weights, optimizer and compute
  bf16       train.precision=bf16: bf16 compute, float32 master weights and optimizer state
  pure_bf16  model.dtype=bfloat16: bf16 weights and Adam state, no float32 master copy (the old
             pretrained default)
Accuracy is greedy exact match on the 1000 fixed held-out problems.

Usage: python benchmarks/precision.py [--seeds 1 2 3] [--steps 200] [--variants fp32 bf16 pure_bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import append_results  # noqa: E402

VARIANTS = {"fp32": [], "bf16": ["train.precision=bf16"], "pure_bf16": ["model.dtype=bfloat16"]}


def sft_checkpoint(root: str, seed: int) -> tuple[str, float]:
    """The demo's SFT warm start; its Hugging Face export and held-out accuracy."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recipes import sft
    from recipes.demo import CONFIG_DIR
    from rlhf.checkpoint import export_dir
    from rlhf.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(
            compose(
                "sft",
                ["+experiment=sft_arithmetic_demo", f"seed={seed}", "logger=quiet", f"run_dir={root}/sft"],
            )
        )
    result = sft.train(cfg)
    return export_dir(result["checkpoint"]), result["eval/accuracy"]


def grpo_accuracy(start: str, root: str, seed: int, steps: int, variant: str) -> tuple[float, float]:
    """(held-out accuracy after `steps` GRPO steps, seconds) from the SFT export."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recipes import grpo
    from recipes.demo import CONFIG_DIR

    overrides = [
        "+experiment=grpo_arithmetic_demo",
        "model=pretrained",
        f"model.name_or_path={start}",
        f"seed={seed}",
        f"train.steps={steps}",
        "train.time_limit_s=null",
        "eval.every=0",
        "checkpoint.every=0",
        "logger=quiet",
        f"run_dir={root}/{variant}_seed{seed}",
        *VARIANTS[variant],
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("grpo", overrides))
    started = time.perf_counter()
    result = grpo.train(cfg)
    return result["eval/accuracy"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sft-seed", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    root = tempfile.mkdtemp(prefix="precision_")
    start, sft_accuracy = sft_checkpoint(root, args.sft_seed)
    print(f"[precision] SFT held-out accuracy {100 * sft_accuracy:.1f}% ({start})", flush=True)
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in args.variants}
    for seed in args.seeds:
        for variant in args.variants:
            accuracy, seconds = grpo_accuracy(start, root, seed, args.steps, variant)
            results[variant].append((accuracy, seconds))
            print(f"[precision] seed {seed} {variant}: {100 * accuracy:.1f}% in {seconds:.0f} s", flush=True)
    seeds = " / ".join(str(s) for s in args.seeds)
    lines = [
        f"| precision | held-out accuracy after {args.steps} steps (seeds {seeds}) | mean | sd | s per run |",
        "|---|---|---|---|---|",
    ]
    for variant, rows in results.items():
        accuracies = [100 * a for a, _ in rows]
        sd = statistics.stdev(accuracies) if len(accuracies) > 1 else float("nan")
        lines.append(
            f"| {variant} | {' / '.join(f'{a:.1f}%' for a in accuracies)} | {statistics.mean(accuracies):.1f}% "
            f"| {sd:.1f} | {statistics.mean(s for _, s in rows):.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        append_results(
            "GRPO held-out accuracy by training precision",
            f"python benchmarks/precision.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps}",
            f"One SFT warm start (demo preset, seed {args.sft_seed}, held-out {100 * sft_accuracy:.1f}%), then GRPO "
            f"with the demo's settings for {args.steps} steps from its export with `model=pretrained`, tiny "
            "Llama, greedy exact match on 1000 held-out problems.\n\n" + table,
        )


if __name__ == "__main__":
    main()
