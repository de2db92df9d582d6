"""Token-level reward methods on the long-response sort task, 5 seeds: RTO against PPO, and DPO,
TGDPO and cDPO against each other, each DPO-family method at the paper's beta (0.1) and at 0.5.

Everything starts from the SFT warm start of benchmarks/long_horizon.py (`+experiment=sft_sort`,
about 23% held-out exact match). Pairs: 8 samples (T = 1) for each of 3000 training lists from that
policy, verified by exact match; one exact (chosen) and one wrong (rejected) sample per list that
has both (recipes/cdpo_models.py, which also trains cDPO's positive and negative LoRA models on the
exact and the wrong samples). Per seed:
  dpo_b<beta>    DPO on the pairs (+experiment=dpo_long_sort, 200 steps x 32 pairs)
  tgdpo_b<beta>  TGDPO on the pairs, guided by the same seed's DPO model of that beta
  cdpo_b<beta>   cDPO on the pairs (rejected-token weights from the positive and negative models)
  rto            PPO (+experiment=ppo_long_sort) plus RTO's DPO token reward from dpo_b0.1, the
                 baseline being long_horizon.py's PPO runs (same start, steps and evaluation)
Every final model answers the 1000 held-out lists greedily (exact match). Verdicts, by a rule fixed
before the runs: a method is better than its baseline when its mean exceeds the baseline's by more
than the larger of the two seed standard deviations ("reproduced"), better within that spread
("reproduced in part"), else "not reproduced". Finished runs are reused (`study_result.json`).

Usage: python benchmarks/token_rewards.py [--seeds 1 2 3 4 5] [--jobs 2] [--no-record]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import append_results, compose_config, save_figure  # noqa: E402
from benchmarks.long_horizon import RUNS, run_method, sft_start  # noqa: E402

BETAS = (0.1, 0.5)
PAIRS = os.path.join(RUNS, "pairs")
PPO_STEPS, PPO_EVAL_EVERY = 120, 20  # long_horizon.py's defaults: its PPO runs are the baseline


def build_pairs(start: str) -> dict:
    """The pairs and cDPO's positive and negative models, built once and reused."""
    done = os.path.join(PAIRS, "built.json")
    if os.path.exists(done):
        with open(done) as handle:
            return json.load(handle)
    from recipes.cdpo_models import build_cdpo_models

    shutil.rmtree(PAIRS, ignore_errors=True)
    built = build_cdpo_models(
        start,
        PAIRS,
        samples=8,
        temperature=1.0,
        num_prompts=3000,
        max_new_tokens=34,
        task_overrides=("data=sort",),
        sft_overrides=("logger=quiet",),
    )
    with open(done, "w") as handle:
        json.dump(built, handle)
    return built


def dpo_overrides(method: str, seed: int, start: str, built: dict) -> list[str]:
    name, beta = method.rsplit("_b", 1)
    common = [
        "+experiment=dpo_long_sort",
        f"model.name_or_path={start}",
        f"data.source={built['pairs']}",
        f"loss.beta={beta}",
        f"seed={seed}",
    ]
    if name == "tgdpo":
        guide = _export(os.path.join(RUNS, f"dpo_b{beta}", f"seed{seed}"))
        return [
            *common,
            "token_weights.method=tgdpo",
            "token_weights.alpha=0.5",
            f"token_weights.guide_model={guide}",
        ]
    if name == "cdpo":
        return [
            *common,
            "token_weights.method=cdpo",
            f"token_weights.positive_model={built['positive_model']}",
            f"token_weights.negative_model={built['negative_model']}",
            "token_weights.contrast_beta=1.0",
        ]
    return common


def _sort_data():
    """The sort task's data config: its held-out lists are every model's evaluation."""
    return compose_config("sft", ["data=sort"]).data


def _export(run_dir: str) -> str:
    from rlhf.checkpoint import export_dir, list_checkpoints

    return export_dir(list_checkpoints(run_dir)[-1])


def train_dpo(job: tuple[str, int, str, dict], threads: int) -> str:
    """One seed of one DPO-family method, then its held-out exact match on the sort task."""
    method, seed, start, built = job
    run_dir = os.path.join(RUNS, method, f"seed{seed}")
    done = os.path.join(run_dir, "study_result.json")
    if os.path.exists(done):
        return run_dir
    import torch

    torch.set_num_threads(threads)
    from recipes import dpo
    from recipes.rlhf_pipeline import heldout_gold
    from rlhf.loggers import read_metrics

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = compose_config(
        "dpo", [*dpo_overrides(method, seed, start, built), f"run_dir={run_dir}", "logger=quiet"]
    )
    dpo.train(cfg)
    rows = read_metrics(run_dir)
    data = _sort_data()
    result = {
        "method": method,
        "seed": seed,
        "heldout": heldout_gold(_export(run_dir), data, max_new_tokens=34)["exact_match"],
        "loss_steps": [r["step"] for r in rows if "loss" in r],
        "loss": [r["loss"] for r in rows if "loss" in r],
    }
    with open(done, "w") as handle:
        json.dump(result, handle)
    return run_dir


def heldout_of_ppo_run(job: tuple[str, int], threads: int) -> float:
    """The held-out exact match of a long_horizon.py PPO-style run's final export, by the same
    evaluation as the DPO-family models (cached in its study_result.json)."""
    method, seed = job
    path = os.path.join(RUNS, method, f"seed{seed}", "study_result.json")
    with open(path) as handle:
        result = json.load(handle)
    if "heldout" not in result:
        import torch

        torch.set_num_threads(threads)
        from recipes.rlhf_pipeline import heldout_gold

        data = _sort_data()
        run_dir = os.path.dirname(path)
        result["heldout"] = heldout_gold(_export(run_dir), data, max_new_tokens=34)["exact_match"]
        with open(path, "w") as handle:
            json.dump(result, handle)
    return result["heldout"]


def compare(name: str, values: list[float], baseline_name: str, baseline: list[float]) -> str:
    mean, sd = statistics.mean(values), statistics.stdev(values)
    base_mean, base_sd = statistics.mean(baseline), statistics.stdev(baseline)
    gap = mean - base_mean
    if gap > max(sd, base_sd):
        word = "reproduced"
    elif gap > 0:
        word = "reproduced in part (within the seed spread)"
    else:
        word = "not reproduced"
    return f"- {name} against {baseline_name}: {word}, {100 * gap:+.1f} points (sd {100 * sd:.1f} and {100 * base_sd:.1f})"


def plot(heldout: dict[str, list[float]], seeds: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(10, 4.2))
    names = list(heldout)
    for i, name in enumerate(names):
        values = [100 * v for v in heldout[name]]
        axis.scatter([i] * len(values), values, s=18, alpha=0.8)
        axis.hlines(statistics.mean(values), i - 0.3, i + 0.3, color="black")
    axis.set_xticks(range(len(names)), names, rotation=30)
    axis.set(ylabel="held-out exact match (%)", title=f"sort-16, one dot per seed ({len(seeds)}), bar = mean")
    axis.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    start = sft_start(os.cpu_count() or 2)
    built = build_pairs(start)
    print(
        f"pairs: {built['num_pairs']} ({built['num_correct']} exact, {built['num_incorrect']} wrong samples)"
    )
    context = multiprocessing.get_context("spawn")
    first = [f"dpo_b{b}" for b in BETAS]
    second = [f"{m}_b{b}" for m in ("tgdpo", "cdpo") for b in BETAS]
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        for methods in (first, second):  # TGDPO's guide is the same seed's DPO model
            jobs = [(m, s, start, built) for s in args.seeds for m in methods]
            for job, run_dir in zip(jobs, pool.map(train_dpo, jobs, [threads] * len(jobs)), strict=True):
                print(f"{job[0]} seed {job[1]} done: {run_dir}", flush=True)
        rto = [("rto", "ppo", s, PPO_STEPS, PPO_EVAL_EVERY, start, _rto_overrides(s)) for s in args.seeds]
        ppo = [("ppo", "ppo", s, PPO_STEPS, PPO_EVAL_EVERY, start, None) for s in args.seeds]
        list(pool.map(run_method, rto + ppo, [threads] * (len(rto) + len(ppo))))
        evaluated = [(m, s) for m in ("ppo", "rto") for s in args.seeds]
        ppo_heldout = dict(
            zip(evaluated, pool.map(heldout_of_ppo_run, evaluated, [threads] * len(evaluated)), strict=True)
        )
    heldout = {
        "ppo": [ppo_heldout[("ppo", s)] for s in args.seeds],
        "rto": [ppo_heldout[("rto", s)] for s in args.seeds],
    }
    for method in first + second:
        heldout[method] = []
        for seed in args.seeds:
            with open(os.path.join(RUNS, method, f"seed{seed}", "study_result.json")) as handle:
                heldout[method].append(json.load(handle)["heldout"])
    sft_heldout = heldout_of_start(start)
    lines = [
        f"SFT start: {100 * sft_heldout:.1f}% held-out exact match; {built['num_pairs']} pairs.",
        "",
        "| method | held-out exact match: mean (sd) | per seed |",
        "|---|---|---|",
    ]
    for name, values in heldout.items():
        per_seed = " / ".join(f"{100 * v:.1f}" for v in values)
        lines.append(
            f"| {name} | {100 * statistics.mean(values):.1f}% ({100 * statistics.stdev(values):.1f}) | {per_seed} |"
        )
    lines += ["", compare("rto", heldout["rto"], "ppo", heldout["ppo"])]
    for beta in BETAS:
        for name in ("tgdpo", "cdpo"):
            lines.append(
                compare(
                    f"{name}_b{beta}", heldout[f"{name}_b{beta}"], f"dpo_b{beta}", heldout[f"dpo_b{beta}"]
                )
            )
    plot(heldout, args.seeds, os.path.join(ROOT, "benchmarks", "plots", "token_rewards_sort.png"))
    lines += ["", "Figure: benchmarks/plots/token_rewards_sort.png"]
    body = "\n".join(lines)
    print(body)
    if not args.no_record:
        command = "python benchmarks/token_rewards.py " + " ".join(sys.argv[1:])
        append_results(
            f"Token-level rewards on sort-16: RTO, DPO, TGDPO, cDPO, {len(args.seeds)} seeds", command, body
        )


def heldout_of_start(start: str) -> float:
    from recipes.rlhf_pipeline import heldout_gold

    return heldout_gold(start, _sort_data(), max_new_tokens=34)["exact_match"]


def _rto_overrides(seed: int) -> list[str]:
    dpo_model = _export(os.path.join(RUNS, "dpo_b0.1", f"seed{seed}"))
    return ["+experiment=[ppo_long_sort,ppo_rto]", f"rto.dpo_model={dpo_model}"]


if __name__ == "__main__":
    main()
