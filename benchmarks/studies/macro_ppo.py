"""MA-PPO (macro actions, fixed 5-grams) against token-level PPO on the synthetic RLHF pipeline, with
the ablation of the authors' mean aggregation against the paper's sum.

For each seed the SFT policy and the reward model of a synthetic-pipeline run are reused (run them
with `python benchmarks/learning/rlhf_pipeline.py`, or this script runs the pipeline's first stages itself),
and three PPO runs start from the same policy with the same budget (300 steps x 32 prompts):
  ppo       token-level GAE (the pipeline's PPO preset)
  ma_mean   GAE over fixed 5-grams, token rewards and values averaged per segment (authors' code)
  ma_sum    the same, rewards summed per segment (the paper; the KL penalty keeps its full weight)
Reported: the RM reward and the gold score on the rollouts (20-step moving averages), the first step at
which each run reaches vanilla PPO's final RM reward, held-out exact match of each final policy.

Usage: python benchmarks/studies/macro_ppo.py [--seeds 1 2 3] [--jobs 3] [--pipeline-runs DIR] [--no-record]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import multiprocessing
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.common import append_results, moving_average, save_figure  # noqa: E402

VARIANTS = {
    "ppo": [],
    "ma_mean": ["advantage.macro.segmenter=fixed", "advantage.macro.n=5", "advantage.macro.aggregation=mean"],
    "ma_sum": [
        "advantage.macro.segmenter=fixed",
        "advantage.macro.n=5",
        "advantage.macro.aggregation=mean",
        "advantage.macro.reward_aggregation=sum",
    ],
}
WINDOW = 20


def _models(seed_dir: str) -> tuple[str, str]:
    from rlhf.checkpoint import export_dir, list_checkpoints

    return tuple(export_dir(list_checkpoints(os.path.join(seed_dir, stage))[-1]) for stage in ("sft", "rm"))


def _prepare_seed(seed: int, seed_dir: str, threads: int) -> None:
    """SFT, pairs and reward model of the pipeline for this seed (its PPO is run here instead)."""
    torch.set_num_threads(threads)
    from recipes.rlhf_pipeline import run_pipeline

    run_pipeline([f"seed={seed}", "logger=quiet", "ppo.train.steps=1"], run_dir=seed_dir, methods=("ppo",))


def _run_variant(job: tuple[int, str, str, str], threads: int) -> tuple[int, str, str]:
    seed, variant, seed_dir, out_dir = job
    torch.set_num_threads(threads)
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recipes import ppo
    from rlhf.config import register_configs

    sft_model, rm_model = _models(seed_dir)
    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
        cfg = OmegaConf.to_object(
            compose(
                "ppo",
                overrides=[
                    "+experiment=ppo_pipeline",
                    "model=pretrained",
                    f"model.name_or_path={sft_model}",
                    f"reward_model.name_or_path={rm_model}",
                    f"seed={seed}",
                    "logger=quiet",
                    f"run_dir={out_dir}",
                    *VARIANTS[variant],
                ],
            )
        )
    result = ppo.train(cfg)
    return seed, variant, result["checkpoint"]


def smoothed(values: list[float], window: int = WINDOW) -> list[float]:
    return moving_average(values, window)


def curves(run_dir: str) -> dict[str, list[float]]:
    from rlhf.loggers import read_metrics

    rows = [r for r in read_metrics(run_dir) if "reward/model_mean" in r]
    return {
        "step": [r["step"] for r in rows],
        "rm": smoothed([r["reward/model_mean"] for r in rows]),
        "gold": smoothed([r["reward/digit_match/mean"] for r in rows]),
        "kl": smoothed([r["kl/sequence_mean"] for r in rows]),
    }


def first_step_reaching(curve: dict[str, list[float]], target: float) -> int | None:
    """First step (full windows only) whose moving-average RM reward reaches `target`."""
    for i in range(WINDOW - 1, len(curve["rm"])):
        if curve["rm"][i] >= target:
            return curve["step"][i]
    return None


def plot(all_curves: dict[tuple[int, str], dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ppo": "tab:blue", "ma_mean": "tab:orange", "ma_sum": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    seen = set()
    for (_seed, variant), curve in sorted(all_curves.items()):
        label = variant if variant not in seen else None
        seen.add(variant)
        for axis, key in zip(axes, ("rm", "gold", "kl"), strict=True):
            axis.plot(curve["step"], curve[key], color=colors[variant], alpha=0.75, label=label)
    titles = ("RM reward on rollouts", "gold (fraction of correct digits) on rollouts", "KL per sequence")
    for axis, title in zip(axes, titles, strict=True):
        axis.set(title=f"{title} ({WINDOW}-step mean)", xlabel="PPO step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument(
        "--pipeline-runs", help="a benchmarks/learning/rlhf_pipeline.py run directory (seed<N>/ inside)"
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    root = os.path.join("runs", "benchmarks", "macro_ppo", time.strftime("%Y-%m-%d_%H-%M-%S"))
    pipeline_runs = args.pipeline_runs or next(
        iter(sorted(glob.glob(os.path.join("runs", "benchmarks", "rlhf_pipeline", "*")), reverse=True)), None
    )
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        seed_dirs = {}
        missing = []
        for seed in args.seeds:
            candidate = os.path.join(pipeline_runs, f"seed{seed}") if pipeline_runs else None
            if candidate and os.path.isdir(os.path.join(candidate, "rm")):
                seed_dirs[seed] = candidate
            else:
                seed_dirs[seed] = os.path.join(root, f"pipeline_seed{seed}")
                missing.append(pool.submit(_prepare_seed, seed, seed_dirs[seed], threads))
        for future in missing:
            future.result()
        jobs = [
            (seed, variant, seed_dirs[seed], os.path.join(root, f"seed{seed}", variant))
            for seed in args.seeds
            for variant in VARIANTS
        ]
        checkpoints = {}
        for seed, variant, checkpoint in pool.map(_run_variant, jobs, [threads] * len(jobs)):
            checkpoints[(seed, variant)] = checkpoint
            print(f"seed {seed} {variant} done", flush=True)

    from rlhf.checkpoint import export_dir

    all_curves = {(s, v): curves(os.path.join(root, f"seed{s}", v)) for s in args.seeds for v in VARIANTS}
    heldout = _heldout(checkpoints, export_dir)
    lines = [
        "| seed | variant | RM reward end | steps to reach PPO's final RM reward | gold end (best) | KL end | held-out exact match |",
        "|---|---|---|---|---|---|---|",
    ]
    speedups: dict[str, list[float]] = {v: [] for v in VARIANTS if v != "ppo"}
    for seed in args.seeds:
        target = all_curves[(seed, "ppo")]["rm"][-1]
        ppo_steps = first_step_reaching(all_curves[(seed, "ppo")], target)
        for variant in VARIANTS:
            curve = all_curves[(seed, variant)]
            steps = first_step_reaching(curve, target)
            if variant != "ppo" and steps:
                speedups[variant].append(ppo_steps / steps)
            lines.append(
                f"| {seed} | {variant} | {curve['rm'][-1]:.2f} | {steps if steps else 'not reached'} "
                f"| {curve['gold'][-1]:.3f} ({max(curve['gold'][WINDOW - 1 :]):.3f}) | {curve['kl'][-1]:.2f} "
                f"| {100 * heldout[(seed, variant)]:.1f}% |"
            )
    summary = []
    for variant, values in speedups.items():
        reached = f"{len(values)}/{len(args.seeds)} seeds reach it"
        ratio = f", PPO steps / {variant} steps: median {statistics.median(values):.2f}x" if values else ""
        summary.append(f"{variant}: {reached}{ratio}")
    figure = os.path.join(ROOT, "benchmarks", "plots", "macro_ppo.png")
    plot(all_curves, figure)
    table = (
        "\n".join(lines)
        + "\n\n"
        + "; ".join(summary)
        + f"\n\nPlot: benchmarks/plots/macro_ppo.png; runs under {root}"
    )
    print(table)
    if not args.no_record:
        append_results(
            "MA-PPO (fixed 5-gram macro actions) against PPO on the synthetic RLHF pipeline",
            "python benchmarks/studies/macro_ppo.py --seeds " + " ".join(map(str, args.seeds)),
            "Each seed: the SFT policy and reward model of a synthetic-pipeline run; three PPO runs from the same "
            "start, 300 steps x 32 prompts, KL 0.05, critic from the RM: token-level PPO, MA-PPO with the authors' "
            "mean aggregation, MA-PPO with rewards summed per segment (the paper). 'Steps to reach' counts the "
            f"first step whose {WINDOW}-step mean RM reward reaches PPO's final one.\n\n" + table,
        )


def _heldout(checkpoints: dict, export_dir) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf.config import register_configs
    from rlhf.eval.accuracy import heldout_gold

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "configs"), version_base=None):
        data = OmegaConf.to_object(compose("sft", overrides=["+experiment=sft_arithmetic_demo"])).data
    return {key: heldout_gold(export_dir(path), data)["exact_match"] for key, path in checkpoints.items()}


if __name__ == "__main__":
    main()
