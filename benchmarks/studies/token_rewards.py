"""Token-level reward methods on the long-response sort task, 5 seeds: RTO against PPO, and DPO,
TGDPO and cDPO against each other, each DPO-family method at the paper's beta (0.1) and at 0.5.

Everything starts from the SFT warm start of benchmarks/studies/long_horizon.py (`+experiment=sft_sort`,
about 23% held-out exact match). Pairs: 8 samples (T = 1) for each of 3000 training lists from that
policy, verified by exact match; one exact (chosen) and one wrong (rejected) sample per list that
has both (recipes/cdpo_models.py, which also trains cDPO's positive and negative LoRA models on the
exact and the wrong samples). Per seed:
  dpo_b<beta>    DPO on the pairs (+experiment=dpo_long_sort, 200 steps x 32 pairs)
  tgdpo_b<beta>  TGDPO on the pairs, guided by the same seed's DPO model of that beta
  tgdpo_cguide_b<beta>  (with --guide-control, a diagnostic outside the verdicts) TGDPO guided by
                 the same seed's cDPO model instead, a guide whose correct answers did not collapse
  cdpo_b<beta>   cDPO on the pairs (rejected-token weights from the positive and negative models)
  rto            PPO (+experiment=ppo_long_sort) plus RTO's DPO token reward from dpo_b0.1, the
                 baseline being long_horizon.py's PPO runs (same start, steps and evaluation)
Every final model answers the 1000 held-out lists greedily (exact match). Verdicts, by a rule fixed
before the runs: a method is better than its baseline when its mean exceeds the baseline's by more
than the larger of the two seed standard deviations ("reproduced"), better within that spread
("reproduced in part"), else "not reproduced". Finished runs are reused (`study_result.json`).

`--explain-tgdpo` takes TGDPO's finished runs apart on the training pairs (no training): where the
guide's token rewards and each model's log-ratio shift sit along a pair (the shared prefix, the first
diverging token, the rest), and how much of TGDPO's margin comes from the plain DPO sum and how much
from the guide's weights.

Usage: python benchmarks/studies/token_rewards.py [--seeds 1 2 3 4 5] [--jobs 2] [--no-record]
           [--guide-control] [--explain-tgdpo]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.common import compose_config, report, save_figure  # noqa: E402
from benchmarks.studies.long_horizon import RUNS, run_method, sft_start  # noqa: E402

BETAS = (0.1, 0.5)
PAIRS = os.path.join(RUNS, "pairs")
GUIDE_OF = {"tgdpo": "dpo", "tgdpo_cguide": "cdpo"}  # TGDPO variant -> the method of its guide
TGDPO_ALPHA = 0.5  # the paper's default
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
    if name in GUIDE_OF:
        guide = _export(os.path.join(RUNS, f"{GUIDE_OF[name]}_b{beta}", f"seed{seed}"))
        return [
            *common,
            "token_weights.method=tgdpo",
            f"token_weights.alpha={TGDPO_ALPHA}",
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
    from rlhf.eval.accuracy import heldout_gold
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
        from rlhf.eval.accuracy import heldout_gold

        data = _sort_data()
        run_dir = os.path.dirname(path)
        result["heldout"] = heldout_gold(_export(run_dir), data, max_new_tokens=34)["exact_match"]
        with open(path, "w") as handle:
            json.dump(result, handle)
    return result["heldout"]


def study_result(method: str, seed: int) -> dict:
    """A finished run's study_result.json."""
    with open(os.path.join(RUNS, method, f"seed{seed}", "study_result.json")) as handle:
        return json.load(handle)


def heldout_row(name: str, values: list[float]) -> str:
    per_seed = " / ".join(f"{100 * v:.1f}" for v in values)
    return f"| {name} | {100 * statistics.mean(values):.1f}% ({100 * statistics.stdev(values):.1f}) | {per_seed} |"


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


def pair_regions(chosen_ids, rejected_ids, chosen_mask, rejected_mask) -> dict[str, tuple[object, object]]:
    """Masks [P, T] of each pair's regions, as (chosen side, rejected side): "shared" (the common
    prefix, same tokens in the same context on both sides), "first" (the first token that differs)
    and "rest" (every later token)."""
    same = (chosen_ids == rejected_ids) & chosen_mask & rejected_mask
    shared = same.long().cumprod(-1).bool()
    regions = {"shared": (shared, shared)}
    firsts, rests = [], []
    for mask in (chosen_mask, rejected_mask):
        diverged = mask & ~shared
        first = diverged & (diverged.long().cumsum(-1) == 1)
        firsts.append(first)
        rests.append(diverged & ~first)
    regions["first"], regions["rest"] = tuple(firsts), tuple(rests)
    return regions


def tgdpo_anatomy(
    beta: float, seed: int, start: str, threads: int, variant: str = "tgdpo"
) -> dict[str, float]:
    """One TGDPO run (of `variant`) taken apart on its training pairs: per-pair sums of the guide's token reward
    g = log(pi_guide/pi_ref) and of each model's shift d = log(pi/pi_ref) by region, TGDPO's margin
    split into beta * (sum d_c - sum d_r) (DPO's) and what the weights 1 +- alpha * beta * g add to it,
    beta * alpha * beta * (sum g_c d_c + sum g_r d_r), and the chosen responses' log-probability."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.data.chat import prepare_pairs
    from rlhf.data.collate import collate_pairs
    from rlhf.losses.preference import sequence_logratios, tgdpo_token_weights
    from rlhf.models.forward import response_logprobs

    torch.set_num_threads(threads)
    paths = {
        name: _export(os.path.join(RUNS, f"{method}_b{beta}", f"seed{seed}"))
        for name, method in (("dpo", "dpo"), ("guide", GUIDE_OF[variant]), ("tgdpo", variant))
    }
    paths["ref"] = start
    tokenizer = AutoTokenizer.from_pretrained(start)
    with open(os.path.join(PAIRS, "pairs", "train.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    data_cfg = compose_config("dpo", ["+experiment=dpo_long_sort"]).data
    pairs = prepare_pairs(Dataset.from_list(rows), tokenizer, data_cfg, "the study's training pairs")
    tensors = collate_pairs(pairs[:], tokenizer.pad_token_id, torch.device("cpu"))
    logprobs = {}
    with torch.no_grad():
        for name, path in paths.items():
            if name == "guide" and path == paths["dpo"]:
                logprobs[name] = logprobs["dpo"]
                continue
            model = AutoModelForCausalLM.from_pretrained(path).eval()
            logprobs[name] = response_logprobs(model, *tensors)[0]
    count, ids, mask = len(rows), tensors[2], tensors[3]
    c, r = slice(0, count), slice(count, 2 * count)
    regions = pair_regions(ids[c], ids[r], mask[c], mask[r])
    ref, guide = logprobs["ref"], logprobs["guide"] - logprobs["ref"]
    # unfloored, so the guide part is exactly beta * alpha * beta * sum(g d); the runs' floor at 0
    # binds on at most 0.1% of tokens
    weights_c, weights_r, _ = tgdpo_token_weights(
        guide[c], guide[r], mask[c], mask[r], alpha=TGDPO_ALPHA, beta=beta, floor=-math.inf
    )

    def per_pair(values, where) -> float:
        return float(torch.where(where, values, 0.0).sum() / count)

    out = {"shared_tokens": float(regions["shared"][0].sum() / count)}
    out["tokens"] = float(mask[c].sum() / count)
    for region, (on_chosen, on_rejected) in regions.items():
        out[f"g_chosen_{region}"] = per_pair(guide[c], on_chosen)
        out[f"g_rejected_{region}"] = per_pair(guide[r], on_rejected)
    out["w_rejected_p99"] = float(torch.quantile(weights_r[mask[r]], 0.99))
    out["w_rejected_max"] = float(weights_r[mask[r]].max())

    def margin(policy, weights=(None, None)) -> float:
        chosen = sequence_logratios(policy[c], ref[c], mask[c], weights[0])
        rejected = sequence_logratios(policy[r], ref[r], mask[r], weights[1])
        return float(beta * (chosen - rejected).mean())

    for name in ("dpo", "tgdpo"):
        shift = logprobs[name] - ref
        for region, (on_chosen, on_rejected) in regions.items():
            out[f"{name}_d_chosen_{region}"] = per_pair(shift[c], on_chosen)
            out[f"{name}_d_rejected_{region}"] = per_pair(shift[r], on_rejected)
        out[f"{name}_margin_dpo"] = margin(logprobs[name])
        out[f"{name}_margin_guide"] = (
            margin(logprobs[name], (weights_c, weights_r)) - out[f"{name}_margin_dpo"]
        )
        out[f"{name}_chosen_logprob"] = per_pair(logprobs[name][c], mask[c])
    out["ref_chosen_logprob"] = per_pair(ref[c], mask[c])
    return out


def explain_tgdpo(seeds: list[int], start: str, threads: int, variant: str = "tgdpo") -> str:
    """The anatomy of every run of a TGDPO variant, as seed means (sd) per beta."""
    lines = []
    guide = {"dpo": "DPO", "cdpo": "cDPO"}[GUIDE_OF[variant]]
    rows = [(f"guide token reward g = the {guide} model's shift", "g"), ("TGDPO shift d", "tgdpo_d")]
    if guide != "DPO":
        rows.insert(1, ("DPO shift d", "dpo_d"))
    for beta in BETAS:
        runs = [tgdpo_anatomy(beta, seed, start, threads, variant) for seed in seeds]

        def cell(key: str, runs: list[dict[str, float]] = runs) -> str:
            values = [run[key] for run in runs]
            return f"{statistics.mean(values):+.2f} ({statistics.stdev(values):.2f})"

        lines += [
            f"{variant}, beta {beta}, alpha {TGDPO_ALPHA}, guide = the same seed's {guide} model; {runs[0]['tokens']:.0f} tokens a "
            f"response, {runs[0]['shared_tokens']:.1f} of them in the shared prefix; per-pair sums, "
            f"seed mean (sd) over {len(seeds)} seeds:",
            "",
            "| quantity | shared prefix | first differing token, chosen / rejected | rest, chosen / rejected |",
            "|---|---|---|---|",
        ]
        for label, key in rows:
            lines.append(
                f"| {label} | {cell(f'{key}_chosen_shared')} | {cell(f'{key}_chosen_first')} / "
                f"{cell(f'{key}_rejected_first')} | {cell(f'{key}_chosen_rest')} / {cell(f'{key}_rejected_rest')} |"
            )
        lines += [
            "",
            f"- rejected-token weights 1 - alpha*beta*g: 99th percentile {cell('w_rejected_p99')}, "
            f"max {cell('w_rejected_max')}",
            f"- chosen response log-probability: reference {cell('ref_chosen_logprob')}, DPO "
            f"{cell('dpo_chosen_logprob')}, TGDPO {cell('tgdpo_chosen_logprob')}",
            f"- margin of the final model, DPO part / guide part: DPO {cell('dpo_margin_dpo')} / "
            f"{cell('dpo_margin_guide')}, TGDPO {cell('tgdpo_margin_dpo')} / {cell('tgdpo_margin_guide')}",
            "",
        ]
    return "\n".join(lines)


def guide_control(seeds: list[int], start: str, jobs: int, threads: int) -> str:
    """TGDPO guided by each seed's cDPO model (which kept its correct answers) instead of its DPO
    model: whether the collapse follows the guide. Needs the study's finished DPO and cDPO runs."""
    for method in ("dpo", "cdpo"):
        for beta in BETAS:
            for seed in seeds:
                if not os.path.exists(
                    os.path.join(RUNS, f"{method}_b{beta}", f"seed{seed}", "study_result.json")
                ):
                    raise SystemExit(f"{method}_b{beta} seed {seed} is not finished: run the study first")
    built = build_pairs(start)
    jobs_list = [(f"tgdpo_cguide_b{b}", s, start, built) for s in seeds for b in BETAS]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        list(pool.map(train_dpo, jobs_list, [threads] * len(jobs_list)))
    lines = ["| method | held-out exact match: mean (sd) | per seed |", "|---|---|---|"]
    for beta in BETAS:
        for method in ("dpo", "cdpo", "tgdpo", "tgdpo_cguide"):
            name = f"{method}_b{beta}"
            lines.append(heldout_row(name, [study_result(name, seed)["heldout"] for seed in seeds]))
    lines += ["", explain_tgdpo(seeds, start, 2 * threads, "tgdpo_cguide")]
    return "\n".join(lines)


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


def plot_curves(methods: list[str], seeds: list[int], path: str) -> None:
    """Learning curves, one line per seed: PPO's and RTO's training reward, the DPO-family losses,
    and the DPO-family models' greedy accuracy on the held-out pairs' prompts during training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import moving_average
    from rlhf.loggers import read_metrics

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, method in enumerate(("ppo", "rto")):
        for seed in seeds:
            result = study_result(method, seed)
            axes[0].plot(
                result["train_steps"],
                moving_average(result["train_reward"], 10),
                color=colors[index],
                alpha=0.7,
                lw=1,
                label=method if seed == seeds[0] else None,
            )
    for index, method in enumerate(methods):
        for seed in seeds:
            rows = read_metrics(os.path.join(RUNS, method, f"seed{seed}"))
            label = method if seed == seeds[0] else None
            style = {"color": colors[(index + 2) % len(colors)], "alpha": 0.7, "lw": 1, "label": label}
            losses = [(row["step"], row["loss"]) for row in rows if "loss" in row]
            axes[1].plot([x for x, _ in losses], moving_average([y for _, y in losses], 10), **style)
            evals = [(row["step"], 100 * row["eval/accuracy"]) for row in rows if "eval/accuracy" in row]
            axes[2].plot([x for x, _ in evals], [y for _, y in evals], marker="o", ms=3, **style)
    axes[0].set(title="PPO and RTO: training reward (10-step mean)", xlabel="step")
    axes[1].set(title="DPO family: loss (10-step mean)", xlabel="step")
    axes[2].set(title="DPO family: greedy exact match, held-out pair prompts (%)", xlabel="step")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"sort-16, one line per seed ({len(seeds)} seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--explain-tgdpo", action="store_true", help="take the finished TGDPO runs apart")
    parser.add_argument(
        "--guide-control", action="store_true", help="TGDPO guided by the cDPO models (after the study)"
    )
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    start = sft_start(os.cpu_count() or 2)
    if args.explain_tgdpo:
        body = explain_tgdpo(args.seeds, start, os.cpu_count() or 2)
        report("Why TGDPO collapses on the sort pairs: its runs taken apart", body, not args.no_record)
        return
    if args.guide_control:
        body = guide_control(args.seeds, start, args.jobs, threads)
        report("TGDPO with a guide that did not collapse (cDPO), a diagnostic", body, not args.no_record)
        return
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
        heldout[method] = [study_result(method, seed)["heldout"] for seed in args.seeds]
    sft_heldout = heldout_of_start(start)
    lines = [
        f"SFT start: {100 * sft_heldout:.1f}% held-out exact match; {built['num_pairs']} pairs.",
        "",
        "| method | held-out exact match: mean (sd) | per seed |",
        "|---|---|---|",
    ]
    lines += [heldout_row(name, values) for name, values in heldout.items()]
    lines += ["", compare("rto", heldout["rto"], "ppo", heldout["ppo"])]
    for beta in BETAS:
        for name in ("tgdpo", "cdpo"):
            lines.append(
                compare(
                    f"{name}_b{beta}", heldout[f"{name}_b{beta}"], f"dpo_b{beta}", heldout[f"dpo_b{beta}"]
                )
            )
    plot(heldout, args.seeds, os.path.join(ROOT, "benchmarks", "plots", "token_rewards_sort.png"))
    plot_curves(
        first + second, args.seeds, os.path.join(ROOT, "benchmarks", "plots", "token_rewards_curves.png")
    )
    lines += ["", "Figures: benchmarks/plots/token_rewards_sort.png (final models), token_rewards_curves.png"]
    report(
        f"Token-level rewards on sort-16: RTO, DPO, TGDPO, cDPO, {len(args.seeds)} seeds",
        "\n".join(lines),
        not args.no_record,
    )


def heldout_of_start(start: str) -> float:
    from rlhf.eval.accuracy import heldout_gold

    return heldout_gold(start, _sort_data(), max_new_tokens=34)["exact_match"]


def _rto_overrides(seed: int) -> list[str]:
    dpo_model = _export(os.path.join(RUNS, "dpo_b0.1", f"seed{seed}"))
    return ["+experiment=[ppo_long_sort,ppo_rto]", f"rto.dpo_model={dpo_model}"]


if __name__ == "__main__":
    main()
