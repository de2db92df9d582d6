"""Token-level reward methods on the long-response sort task, 5 seeds: RTO against PPO, and DPO,
TGDPO and cDPO against each other, each DPO-family method at the paper's beta (0.1) and at 0.5, with
a control for each method's confound; verdicts from paired bootstrap intervals.

By default each seed has its own SFT warm start (long_horizon.py's, `--starts per-seed`) and its own
pairs: 8 samples (T = 1) for each of 3000 training lists from that start, verified by exact match;
one exact (chosen) and one wrong (rejected) sample per list that has both (recipes/cdpo_models.py,
which also trains cDPO's positive and negative LoRA models on the exact and the wrong samples).
`--starts shared` is the earlier protocol (one start and one pair set for every seed). Per seed:
  dpo_b<beta>      DPO on the pairs (+experiment=dpo_long_sort, 200 steps x 32 pairs, lr 1e-4)
  tgdpo_b<beta>    TGDPO on the pairs, guided by the same seed's DPO model of that beta
  cdpo_b<beta>     cDPO on the pairs (rejected-token weights from the positive and negative models)
  uniform_b<beta>  control for cDPO: every rejected token at cDPO's mean weight (the same seed's
                   cdpo run), so a smaller push on rejected tokens without cDPO's token credit
  placebo_b0.1     DPO on the pairs with each pair's sides swapped by a fair coin: a model that moved
                   from the start as DPO's did but carries no preference
  rto              PPO (+experiment=ppo_long_sort) plus RTO's DPO token reward from dpo_b0.1
  rto_placebo      control for RTO: the same, the token reward from placebo_b0.1 (same scale and
                   clipping, no preference information)
  ppo              long_horizon.py's PPO runs (same start, steps and evaluation)
  ppo_kl_n5        control for RTO: long_horizon.py's PPO at kl_coef 0.01 (a fifth of the preset's),
                   which earlier runs found at RTO's KL: RTO's dense reward also weakens the KL's share
  ppo_tuned        long_horizon.py's PPO tuned on the validation lists (lam 1), shown beside RTO
  tgdpo_cguide_b<beta>  (with --guide-control, a diagnostic outside the verdicts) TGDPO guided by
                   the same seed's cDPO model instead, a guide whose correct answers did not collapse
Every final model answers the 1000 held-out lists greedily (exact match), and its KL to its start is
measured the same way for every arm (k1 on its own samples at T = 1 on 200 held-out lists). The
samples behind the pairs (24,000) are charged in the table's note. Verdicts, by a rule fixed before
the runs: a claim is reproduced only where the paired interval (method - baseline, same seed) excludes
zero in the method's favour and, where a control was run, the interval against the control does too.
Finished runs are reused (`study_result.json`).

`--explain-tgdpo` takes TGDPO's finished runs apart on the training pairs (no training): where the
guide's token rewards and each model's log-ratio shift sit along a pair (the shared prefix, the first
diverging token, the rest), and how much of TGDPO's margin comes from the plain DPO sum and how much
from the guide's weights.

`--tune` runs the DPO family's grid (DPO_GRID: learning rate x steps) for DPO, cDPO and TGDPO alike
at beta 0.1, at the warm starts and pairs of seeds 1 and 2, scored on the validation lists. `--tuned`
then runs each at its own chosen point at every seed (cDPO's uniform control at cDPO's point), scored
on the held-out lists, with the same paired comparisons and verdict rule (arms `<method>_tuned`).

Usage: python benchmarks/studies/token_rewards.py [--seeds 1 2 3 4 5] [--starts per-seed|shared]
           [--jobs 2] [--no-record] [--guide-control] [--explain-tgdpo] [--tune] [--tuned]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.common import compose_config, report, save_figure  # noqa: E402
from benchmarks.studies.intervals import bootstrap_interval, format_interval, mean_text, per_seed, verdict  # noqa: E402
from benchmarks.studies.long_horizon import (  # noqa: E402
    RUNS,
    SEEDED_DATA,
    SEEDED_RUNS,
    TUNE_SEEDS,
    run_method,
    sft_start,
)

BETAS = (0.1, 0.5)
PAIR_PROMPTS, PAIR_SAMPLES = 3000, 8  # lists sampled for the pairs, samples per list
# --tune: learning rate x steps (200 steps x 32 pairs is 4.5-7.9 epochs over a seed's pairs, 30 steps
# about one; the TGDPO paper trains one epoch at lr 7e-7, near lr1e-6_30steps), the same grid for
# DPO, cDPO and TGDPO
DPO_GRID: dict[str, list[str]] = {
    f"lr{lr}_{steps}steps": [f"optim.lr={lr}", f"train.steps={steps}"]
    for lr, steps in [
        *((lr, steps) for lr in ("1e-6", "3e-6", "1e-5", "3e-5", "1e-4") for steps in (30, 200)),
        # the 10-point grid's choice for all three methods sat on its step edge (200 at lr 1e-6):
        # longer at that rate only; at every larger rate 200 steps already over-train DPO and TGDPO
        ("1e-6", 600),
    ]
}
TUNED_METHODS = ("dpo_b0.1", "cdpo_b0.1", "tgdpo_b0.1")  # tuned alike on DPO_GRID, beta 0.1
RL_ARMS = ("ppo", "ppo_kl_n5", "ppo_tuned", "rto", "rto_placebo")  # run by long_horizon.py's runner
GUIDE_OF = {"tgdpo": "dpo", "tgdpo_cguide": "cdpo"}  # TGDPO variant -> the method of its guide
TGDPO_ALPHA = 0.5  # the paper's default
PPO_STEPS, PPO_EVAL_EVERY = 120, 20  # long_horizon.py's defaults: its PPO runs are the baseline


@dataclass(frozen=True)
class Layout:
    """Where a study's runs live and what each seed starts from: `seeded`, every seed its own SFT
    start and its own pairs (under long_horizon.py's SEEDED_RUNS, validation lists carved out);
    otherwise one start and one pair set for every seed (the earlier protocol, under RUNS)."""

    seeded: bool
    starts: dict[int, str]

    @property
    def root(self) -> str:
        return SEEDED_RUNS if self.seeded else RUNS

    def run_dir(self, method: str, seed: int) -> str:
        return os.path.join(self.root, method, f"seed{seed}")

    def pairs_dir(self, seed: int) -> str:
        return os.path.join(self.root, "pairs", f"seed{seed}") if self.seeded else os.path.join(RUNS, "pairs")


def build_pairs(job: tuple[Layout, int], threads: int) -> dict:
    """Seed `seed`'s pairs (its start's samples) and cDPO's positive and negative models, built once
    and reused; with them, a placebo copy of the pairs whose chosen and rejected sides are swapped
    at random (no preference information left), for the placebo DPO model behind RTO's control."""
    layout, seed = job
    directory = layout.pairs_dir(seed)
    done = os.path.join(directory, "built.json")
    if os.path.exists(done):
        with open(done) as handle:
            return json.load(handle)
    import torch

    # two jobs at torch's default of one thread per core each oversubscribe the cores: the LoRA
    # steps took 2-16 s against 0.5 s
    torch.set_num_threads(threads)
    from recipes.cdpo_models import build_cdpo_models

    shutil.rmtree(directory, ignore_errors=True)
    built = build_cdpo_models(
        layout.starts[seed],
        directory,
        samples=PAIR_SAMPLES,
        temperature=1.0,
        num_prompts=PAIR_PROMPTS,
        max_new_tokens=34,
        seed=seed if layout.seeded else 0,
        task_overrides=("data=sort", *(SEEDED_DATA if layout.seeded else ())),
        sft_overrides=("logger=quiet",),
    )
    built["placebo_pairs"] = write_placebo_pairs(
        built["pairs"], os.path.join(directory, "placebo_pairs"), seed
    )
    with open(done, "w") as handle:
        json.dump(built, handle)
    return built


def pairs_of_seeds(pool: concurrent.futures.Executor, layout: Layout, seeds: list[int], threads: int) -> dict:
    """build_pairs for every seed on the pool: seed -> its built pairs and cDPO models."""
    jobs = [(layout, s) for s in seeds]
    return dict(zip(seeds, pool.map(build_pairs, jobs, [threads] * len(seeds)), strict=True))


def write_placebo_pairs(pairs: str, out: str, seed: int) -> str:
    """The pairs with each pair's sides swapped by a fair coin: a DPO model trained on them moves as
    far from the reference, but learns no preference."""
    import random

    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    for split in ("train", "eval"):
        with open(os.path.join(pairs, f"{split}.jsonl")) as handle:
            rows = [json.loads(line) for line in handle]
        with open(os.path.join(out, f"{split}.jsonl"), "w") as handle:
            for row in rows:
                if rng.random() < 0.5:
                    row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
                handle.write(json.dumps(row) + "\n")
    return out


def dpo_overrides(method: str, seed: int, layout: Layout, built: dict, tuned: bool = False) -> list[str]:
    """The DPO recipe's overrides for one arm of one seed; `tuned`: the uniform control takes its
    weight from the tuned cDPO run (the same grid point) instead of the preset one."""
    name, beta = method.rsplit("_b", 1)
    common = [
        "+experiment=dpo_long_sort",
        f"model.name_or_path={layout.starts[seed]}",
        f"data.source={built['placebo_pairs' if name == 'placebo' else 'pairs']}",
        f"loss.beta={beta}",
        f"seed={seed}",
    ]
    if name == "uniform":  # cDPO's control: its mean rejected-token weight on every rejected token
        cdpo = f"cdpo_b{beta}"
        rows = read_run_metrics(layout.run_dir(tuned_arm(cdpo) if tuned else cdpo, seed))
        mean_weight = statistics.fmean(
            r["cdpo/rejected_weight_mean"] for r in rows if "cdpo/rejected_weight_mean" in r
        )
        return [
            *common,
            "token_weights.method=uniform",
            f"token_weights.uniform_rejected_weight={mean_weight:.6f}",
        ]
    if name in GUIDE_OF:
        guide = _export(layout.run_dir(f"{GUIDE_OF[name]}_b{beta}", seed))
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


KL_PROMPTS = 200  # held-out lists each final model samples (T = 1) for its KL to its start


@functools.lru_cache(maxsize=1)
def kl_prompts() -> list[str]:
    """The first KL_PROMPTS held-out lists (the sort task is built once per process)."""
    from rlhf.data.load import load_task_data

    _, held_out = load_task_data(_sort_data())
    return list(held_out["prompt"][:KL_PROMPTS])


def policy_kl(model_dir: str, reference_dir: str, seed: int = 0) -> float:
    """The final model's mean per-token KL to its start (k1 on its own samples at T = 1, the first
    KL_PROMPTS held-out lists): one measure for every arm, PPO-trained or DPO-trained."""
    import torch

    from rlhf.config import ModelConfig
    from rlhf.models.forward import response_logprobs
    from rlhf.models.load import load_causal_lm, load_tokenizer
    from rlhf.ops import masked_mean
    from rlhf.rollout.engine import generate_rollouts
    from rlhf.rollout.hf import TransformersEngine
    from rlhf.rollout.sampling import SamplingParams

    tokenizer = load_tokenizer(ModelConfig(source="pretrained", name_or_path=model_dir))
    model, reference = (
        load_causal_lm(ModelConfig(source="pretrained", name_or_path=path), tokenizer).eval()
        for path in (model_dir, reference_dir)
    )
    prompts = kl_prompts()
    torch.manual_seed(seed)
    batch = generate_rollouts(
        TransformersEngine.for_model(model, tokenizer),
        prompts,
        {},
        group_size=1,
        sampling=SamplingParams(max_new_tokens=34, temperature=1.0),
        seed=seed,
    )
    tensors = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.attended_mask)
    with torch.no_grad():
        shift = response_logprobs(model, *tensors)[0] - response_logprobs(reference, *tensors)[0]
    return float(masked_mean(shift, batch.response_mask))


def read_run_metrics(run_dir: str) -> list[dict]:
    from rlhf.loggers import read_metrics

    return read_metrics(run_dir)


def _sort_data(validation: bool = False):
    """The sort task's data config: its held-out lists are every model's evaluation; `validation`:
    the 500 lists carved from the training lists instead (for tuning)."""
    if validation:
        return compose_config("sft", ["data=sort", *SEEDED_DATA, "data.eval_split=validation"]).data
    return compose_config("sft", ["data=sort"]).data


def _export(run_dir: str) -> str:
    from rlhf.checkpoint import export_dir, list_checkpoints

    return export_dir(list_checkpoints(run_dir)[-1])


def train_dpo(job: tuple, threads: int) -> str:
    """One seed of one DPO-family method, then its held-out exact match on the sort task and its KL
    to its start. job = (method, seed, layout, built[, grid point[, tuned]]): with a point of
    DPO_GRID, a tuning run (its overrides added) scored on the validation lists instead; with tuned
    as well, the method's chosen point as its own arm (tuned_arm(method)), scored on held-out."""
    method, seed, layout, built, point, tuned = (*job, None, False)[:6]
    if tuned:
        run_dir = layout.run_dir(tuned_arm(method), seed)
    else:
        run_dir = layout.run_dir(f"tune_{method}_{point}" if point else method, seed)
    done = os.path.join(run_dir, "study_result.json")
    if os.path.exists(done):
        with open(done) as handle:
            # a tuned arm is reused only at the point it ran at: a wider grid may choose another
            if json.load(handle).get("point") == point:
                return run_dir
    import torch

    torch.set_num_threads(threads)
    from recipes import dpo
    from rlhf.eval.accuracy import heldout_gold
    from rlhf.loggers import read_metrics

    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*dpo_overrides(method, seed, layout, built, tuned), *(DPO_GRID[point] if point else [])]
    dpo.train(compose_config("dpo", [*overrides, f"run_dir={run_dir}", "logger=quiet"]))
    rows = read_metrics(run_dir)
    export = _export(run_dir)
    result = {"method": method, "seed": seed, "point": point}
    if point and not tuned:
        result["validation"] = heldout_gold(export, _sort_data(validation=True), max_new_tokens=34)[
            "exact_match"
        ]
    else:
        result["heldout"] = heldout_gold(export, _sort_data(), max_new_tokens=34)["exact_match"]
        result["kl"] = policy_kl(export, layout.starts[seed], seed)
    result["loss_steps"] = [r["step"] for r in rows if "loss" in r]
    result["loss"] = [r["loss"] for r in rows if "loss" in r]
    with open(done, "w") as handle:
        json.dump(result, handle)
    return run_dir


def tune_dpo_family(layout: Layout, jobs: int, threads: int) -> str:
    """DPO, cDPO and TGDPO (beta 0.1; TGDPO guided by the preset DPO model) at every DPO_GRID point,
    at the tuning seeds' starts and pairs, scored on the validation lists: the same budget for each."""
    seeds = [s for s in TUNE_SEEDS if s in layout.starts]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        built = pairs_of_seeds(pool, layout, seeds, threads)
        for stage in (["dpo_b0.1", "cdpo_b0.1"], ["tgdpo_b0.1"]):  # the guide first
            guides = [(m, s, layout, built[s]) for s in seeds for m in stage]
            list(pool.map(train_dpo, guides, [threads] * len(guides)))
            grid = [(m, s, layout, built[s], point) for s in seeds for m in stage for point in DPO_GRID]
            list(pool.map(train_dpo, grid, [threads] * len(grid)))
    lines = [
        "| method | grid point | overrides | validation exact match, per seed | mean |",
        "|---|---|---|---|---|",
    ]
    for method in TUNED_METHODS:
        scores = validation_scores(method, layout)
        chosen = best_point(scores)
        for point in sorted(scores, key=lambda p: -statistics.fmean(scores[p])):
            lines.append(
                f"| {method} | {point}{' (chosen)' if point == chosen else ''} | {' '.join(DPO_GRID[point])} | "
                + per_seed(scores[point])
                + f" | {100 * statistics.fmean(scores[point]):.1f}% |"
            )
    return "\n".join(lines)


def validation_scores(method: str, layout: Layout) -> dict[str, list[float]]:
    """Grid point -> the method's validation exact match at each tuning seed (--tune's runs)."""
    seeds = [s for s in TUNE_SEEDS if s in layout.starts]
    scores = {}
    for point in DPO_GRID:
        try:
            scores[point] = [study_result(f"tune_{method}_{point}", s, layout)["validation"] for s in seeds]
        except FileNotFoundError as missing:
            raise SystemExit(
                f"{method} has no tuning run at {point} ({missing.filename}): run --tune first"
            ) from None
    return scores


def best_point(scores: dict[str, list[float]]) -> str:
    """The grid point of highest mean validation score; a tie goes to the earlier point in
    DPO_GRID's order (the smaller learning rate, then the fewer steps)."""
    order = list(DPO_GRID)
    return max(scores, key=lambda p: (statistics.fmean(scores[p]), -order.index(p)))


def tuned_arm(method: str) -> str:
    """The arm of `method` at its validation-chosen grid point ("cdpo_b0.1" -> "cdpo_b0.1_tuned")."""
    return f"{method}_tuned"


def run_tuned_arms(layout: Layout, seeds: list[int], jobs: int, threads: int) -> str:
    """DPO, cDPO and TGDPO at their own chosen grid points (--tune's validation scores at the tuning
    seeds), at every seed, scored on the held-out lists; cDPO's uniform control at cDPO's chosen point
    and its tuned run's mean weight; the preset DPO beside them (and as TGDPO's guide, as in the grid).
    Returns the table, the paired comparisons and the verdicts."""
    points = {m: best_point(validation_scores(m, layout)) for m in TUNED_METHODS}
    points["uniform_b0.1"] = points["cdpo_b0.1"]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        built = pairs_of_seeds(pool, layout, seeds, threads)
        stages = [
            [("dpo_b0.1", None)] + [(m, points[m]) for m in ("dpo_b0.1", "cdpo_b0.1")],
            [(m, points[m]) for m in ("tgdpo_b0.1", "uniform_b0.1")],  # after their guide and weight
        ]
        for stage in stages:
            runs = [(m, s, layout, built[s], p, p is not None) for s in seeds for m, p in stage]
            list(pool.map(train_dpo, runs, [threads] * len(runs)))
    dpo, cdpo, uniform, tgdpo = (
        tuned_arm(m) for m in ("dpo_b0.1", "cdpo_b0.1", "uniform_b0.1", "tgdpo_b0.1")
    )
    arms = ["dpo_b0.1", dpo, cdpo, uniform, tgdpo]
    heldout = {m: {s: study_result(m, s, layout)["heldout"] for s in seeds} for m in arms}
    kl = {m: [study_result(m, s, layout).get("kl") for s in seeds] for m in arms}
    chosen = ", ".join(f"{m} {points[m]}" for m in points)
    pairs = [
        (dpo, "dpo_b0.1", "tuning's gain for DPO itself"),
        (cdpo, dpo, "as configured, each tuned on validation"),
        (cdpo, uniform, "cDPO's token credit against its mean weight on every rejected token"),
        (uniform, dpo, "a smaller push on rejected tokens alone"),
        (tgdpo, dpo, "as configured, each tuned on validation"),
    ]
    claims = {cdpo: (dpo, (uniform,)), tgdpo: (dpo, ())}
    return f"Chosen points (validation lists, seeds {list(TUNE_SEEDS)}): {chosen}.\n\n" + summary(
        heldout, kl, seeds, pairs, claims
    )


def heldout_of_ppo_run(job: tuple[str, int, Layout], threads: int) -> float:
    """The held-out exact match and the KL to the start of a long_horizon.py PPO-style run's final
    export, by the same evaluation as the DPO-family models (cached in its study_result.json)."""
    method, seed, layout = job
    path = os.path.join(layout.run_dir(method, seed), "study_result.json")
    with open(path) as handle:
        result = json.load(handle)
    if "heldout" not in result or "kl" not in result:
        import torch

        torch.set_num_threads(threads)
        from rlhf.eval.accuracy import heldout_gold

        export = _export(os.path.dirname(path))
        result["heldout"] = heldout_gold(export, _sort_data(), max_new_tokens=34)["exact_match"]
        result["kl"] = policy_kl(export, layout.starts[seed], seed)
        with open(path, "w") as handle:
            json.dump(result, handle)
    return result["heldout"]


def study_result(method: str, seed: int, layout: Layout) -> dict:
    """A finished run's study_result.json."""
    with open(os.path.join(layout.run_dir(method, seed), "study_result.json")) as handle:
        return json.load(handle)


def heldout_row(name: str, values: list[float]) -> str:
    spread = f"{100 * statistics.mean(values):.1f}% ({100 * statistics.stdev(values):.1f})"
    return f"| {name} | {spread} | {per_seed(values)} |"


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
    beta: float, seed: int, layout: Layout, threads: int, variant: str = "tgdpo"
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
        name: _export(layout.run_dir(f"{method}_b{beta}", seed))
        for name, method in (("dpo", "dpo"), ("guide", GUIDE_OF[variant]), ("tgdpo", variant))
    }
    paths["ref"] = layout.starts[seed]
    tokenizer = AutoTokenizer.from_pretrained(paths["ref"])
    with open(os.path.join(layout.pairs_dir(seed), "pairs", "train.jsonl")) as handle:
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


def explain_tgdpo(seeds: list[int], layout: Layout, threads: int, variant: str = "tgdpo") -> str:
    """The anatomy of every run of a TGDPO variant, as seed means (sd) per beta."""
    lines = []
    guide = {"dpo": "DPO", "cdpo": "cDPO"}[GUIDE_OF[variant]]
    rows = [(f"guide token reward g = the {guide} model's shift", "g"), ("TGDPO shift d", "tgdpo_d")]
    if guide != "DPO":
        rows.insert(1, ("DPO shift d", "dpo_d"))
    for beta in BETAS:
        runs = [tgdpo_anatomy(beta, seed, layout, threads, variant) for seed in seeds]

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


def guide_control(seeds: list[int], layout: Layout, jobs: int, threads: int) -> str:
    """TGDPO guided by each seed's cDPO model (which kept its correct answers) instead of its DPO
    model: whether the collapse follows the guide. Needs the study's finished DPO and cDPO runs."""
    for method in ("dpo", "cdpo"):
        for beta in BETAS:
            for seed in seeds:
                if not os.path.exists(
                    os.path.join(layout.run_dir(f"{method}_b{beta}", seed), "study_result.json")
                ):
                    raise SystemExit(f"{method}_b{beta} seed {seed} is not finished: run the study first")
    built = {seed: build_pairs((layout, seed), threads) for seed in seeds}
    jobs_list = [(f"tgdpo_cguide_b{b}", s, layout, built[s]) for s in seeds for b in BETAS]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        list(pool.map(train_dpo, jobs_list, [threads] * len(jobs_list)))
    lines = ["| method | held-out exact match: mean (sd) | per seed |", "|---|---|---|"]
    for beta in BETAS:
        for method in ("dpo", "cdpo", "tgdpo", "tgdpo_cguide"):
            name = f"{method}_b{beta}"
            lines.append(heldout_row(name, [study_result(name, seed, layout)["heldout"] for seed in seeds]))
    lines += ["", explain_tgdpo(seeds, layout, 2 * threads, "tgdpo_cguide")]
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


def plot_curves(methods: list[str], seeds: list[int], path: str, layout: Layout) -> None:
    """Learning curves, one line per seed: the PPO arms' and RTO's training reward, the DPO-family losses,
    and the DPO-family models' greedy accuracy on the held-out pairs' prompts during training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import moving_average
    from rlhf.loggers import read_metrics

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, method in enumerate(RL_ARMS):
        for seed in seeds:
            result = study_result(method, seed, layout)
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
            rows = read_metrics(layout.run_dir(method, seed))
            label = method if seed == seeds[0] else None
            style = {
                "color": colors[(index + len(RL_ARMS)) % len(colors)],
                "alpha": 0.7,
                "lw": 1,
                "label": label,
            }
            losses = [(row["step"], row["loss"]) for row in rows if "loss" in row]
            axes[1].plot([x for x, _ in losses], moving_average([y for _, y in losses], 10), **style)
            evals = [(row["step"], 100 * row["eval/accuracy"]) for row in rows if "eval/accuracy" in row]
            axes[2].plot([x for x, _ in evals], [y for _, y in evals], marker="o", ms=3, **style)
    axes[0].set(
        title="PPO arms, RTO, RTO with the placebo reward: training reward (10-step mean)", xlabel="step"
    )
    axes[1].set(title="DPO family: loss (10-step mean)", xlabel="step")
    axes[2].set(title="DPO family: greedy exact match, held-out pair prompts (%)", xlabel="step")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.suptitle(f"sort-16, one line per seed ({len(seeds)} seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def comparisons() -> list[tuple[str, str, str]]:
    """(arm, baseline, what the pair separates): each claim, and each control for its confound."""
    pairs = [
        ("rto", "ppo", "as configured"),
        ("rto", "rto_placebo", "RTO's DPO token reward against a placebo of the same scale and clipping"),
        ("rto_placebo", "ppo", "dense shaping without preference information"),
        ("rto", "ppo_kl_n5", "against PPO at kl_coef 0.01 (RTO's KL; each arm's KL in the table above)"),
        ("ppo_kl_n5", "ppo", "PPO at a fifth of its KL coefficient (the KL confound alone)"),
        ("rto", "ppo_tuned", "against PPO tuned on validation lists (RTO untuned: shown, not in the rule)"),
    ]
    for beta in BETAS:
        pairs += [
            (f"cdpo_b{beta}", f"dpo_b{beta}", "as configured"),
            (
                f"cdpo_b{beta}",
                f"uniform_b{beta}",
                "cDPO's token credit against its mean weight on every rejected token",
            ),
            (f"uniform_b{beta}", f"dpo_b{beta}", "a smaller push on rejected tokens alone"),
            (f"tgdpo_b{beta}", f"dpo_b{beta}", "as configured"),
        ]
    return pairs


def preset_claims() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each preset arm's claim: arm -> (its baseline, the controls for its confound)."""
    claims: dict[str, tuple[str, tuple[str, ...]]] = {"rto": ("ppo", ("rto_placebo", "ppo_kl_n5"))}
    for beta in BETAS:
        claims |= {
            f"cdpo_b{beta}": (f"dpo_b{beta}", (f"uniform_b{beta}",)),
            f"tgdpo_b{beta}": (f"dpo_b{beta}", ()),
        }
    return claims


def claim_verdicts(
    paired: dict[tuple[str, str], str], claims: dict[str, tuple[str, tuple[str, ...]]] | None = None
) -> list[str]:
    """Each paper's claim, by a rule fixed before the runs: reproduced only where the paired
    interval against the baseline excludes zero in the method's favour and, where a control was
    run, the interval against the control does too; better than the baseline but not than the
    control means the control explains the gain."""
    lines = []
    for arm, (baseline, controls) in (preset_claims() if claims is None else claims).items():
        if (arm, baseline) not in paired:
            continue
        against_baseline = paired[(arm, baseline)]
        ran = [c for c in controls if (arm, c) in paired]
        failed = [c for c in ran if paired[(arm, c)] != "better"]
        if against_baseline != "better":
            word = f"not reproduced ({against_baseline} against {baseline})"
        elif failed:
            word = f"not reproduced: better than {baseline}, but " + ", ".join(
                f"{paired[(arm, c)]} against the control {c}" for c in failed
            )
        else:
            word = f"reproduced (better than {' and than '.join([baseline, *ran])})"
        lines.append(f"- {arm}: {word}")
    return lines


def summary(
    heldout: dict[str, dict[int, float]],
    kl: dict[str, list[float | None]],
    seeds: list[int],
    pairs: list[tuple[str, str, str]] | None = None,
    claims: dict[str, tuple[str, tuple[str, ...]]] | None = None,
) -> str:
    """The arms' table (final held-out with intervals, KL), the paired comparisons (default: the
    preset study's) and the verdicts."""
    lines = [
        f"| arm | held-out exact match, mean [95% CI] | per seed | KL to the start per token (its samples at T = 1, {KL_PROMPTS} held-out lists) |",
        "|---|---|---|---|",
    ]
    for name, by_seed in heldout.items():
        values = [by_seed[s] for s in seeds]
        interval = format_interval(*bootstrap_interval(values))
        lines.append(f"| {name} | {interval} | {per_seed(values)} | {mean_text(kl.get(name, [None]))} |")
    lines += [
        "",
        "| arm - baseline | what it separates | paired difference [95% CI] | verdict |",
        "|---|---|---|---|",
    ]
    paired = {}
    for arm, baseline, what in comparisons() if pairs is None else pairs:
        if arm not in heldout or baseline not in heldout:
            continue
        interval = bootstrap_interval([heldout[arm][s] - heldout[baseline][s] for s in seeds])
        paired[(arm, baseline)] = verdict(interval[1], interval[2])
        lines.append(
            f"| {arm} - {baseline} | {what} | {format_interval(*interval)} | {paired[(arm, baseline)]} |"
        )
    return "\n".join([*lines, "", *claim_verdicts(paired, claims)])


def run_arms(layout: Layout, seeds: list[int], jobs: int, threads: int) -> dict[int, dict]:
    """Every arm of every seed, in the order their inputs need: pairs, then DPO, the placebo DPO and
    cDPO, then TGDPO (guided by DPO) and the uniform control (at cDPO's mean weight), then the PPO
    arms, RTO and RTO with the placebo's reward (long_horizon.py's runner). Returns each seed's pairs."""
    stages = [
        [f"dpo_b{b}" for b in BETAS] + ["placebo_b0.1"] + [f"cdpo_b{b}" for b in BETAS],
        [f"{m}_b{b}" for m in ("tgdpo", "uniform") for b in BETAS],
    ]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        built = pairs_of_seeds(pool, layout, seeds, threads)
        for methods in stages:
            stage = [(m, s, layout, built[s]) for s in seeds for m in methods]
            for job, run_dir in zip(stage, pool.map(train_dpo, stage, [threads] * len(stage)), strict=True):
                print(f"{job[0]} seed {job[1]} done: {run_dir}", flush=True)
        rl = [
            (
                method,
                "ppo",
                s,
                PPO_STEPS,
                PPO_EVAL_EVERY,
                layout.starts[s],
                _rl_overrides(method, s, layout),
                layout.seeded,
            )
            for s in seeds
            for method in RL_ARMS
        ]
        list(pool.map(run_method, rl, [threads] * len(rl)))
        evaluated = [(job[0], job[2], layout) for job in rl]
        list(pool.map(heldout_of_ppo_run, evaluated, [threads] * len(evaluated)))
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--starts",
        choices=("per-seed", "shared"),
        default="per-seed",
        help="per-seed: each seed its own SFT start and pairs; shared: one of each (the earlier protocol)",
    )
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="the DPO family's lr x steps grid on the validation lists (per-seed starts)",
    )
    parser.add_argument(
        "--tuned",
        action="store_true",
        help="DPO, cDPO (with its uniform control) and TGDPO at their --tune points, on held-out lists",
    )
    parser.add_argument("--explain-tgdpo", action="store_true", help="take the finished TGDPO runs apart")
    parser.add_argument(
        "--guide-control", action="store_true", help="TGDPO guided by the cDPO models (after the study)"
    )
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    threads = max(1, (os.cpu_count() or 2) // max(1, args.jobs))
    if args.starts == "per-seed":
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            starts = pool.map(sft_start, [threads] * len(args.seeds), args.seeds)
            layout = Layout(True, dict(zip(args.seeds, starts, strict=True)))
    else:
        layout = Layout(False, dict.fromkeys(args.seeds, sft_start(os.cpu_count() or 2)))
    if args.tune:
        if not layout.seeded:
            parser.error("--tune needs per-seed starts (their validation lists)")
        body = tune_dpo_family(layout, args.jobs, threads)
        report("Tuning the DPO family on sort-16, on validation lists", body, not args.no_record)
        return
    if args.tuned:
        if not layout.seeded:
            parser.error("--tuned needs per-seed starts (the --tune runs)")
        body = run_tuned_arms(layout, args.seeds, args.jobs, threads)
        title = f"The DPO family at its validation-tuned points on sort-16, {len(args.seeds)} seeds"
        report(title, body, not args.no_record)
        return
    if args.explain_tgdpo:
        body = explain_tgdpo(args.seeds, layout, os.cpu_count() or 2)
        report("Why TGDPO collapses on the sort pairs: its runs taken apart", body, not args.no_record)
        return
    if args.guide_control:
        body = guide_control(args.seeds, layout, args.jobs, threads)
        report("TGDPO with a guide that did not collapse (cDPO), a diagnostic", body, not args.no_record)
        return
    built = run_arms(layout, args.seeds, args.jobs, threads)
    dpo_family = [f"{m}_b{b}" for m in ("dpo", "cdpo", "uniform", "tgdpo") for b in BETAS] + ["placebo_b0.1"]
    heldout = {
        m: {s: study_result(m, s, layout)["heldout"] for s in args.seeds} for m in (*RL_ARMS, *dpo_family)
    }
    kl = {m: [study_result(m, s, layout).get("kl") for s in args.seeds] for m in heldout}
    starts = sorted(set(layout.starts.values()))
    lines = [
        (
            "One SFT start and one pair set per seed"
            if layout.seeded
            else "One SFT start and one pair set for every seed"
        )
        + f"; start held-out exact match: {' / '.join(f'{100 * heldout_of_start(s):.1f}%' for s in starts)}; "
        f"pairs per seed: {' / '.join(str(built[s]['num_pairs']) for s in args.seeds)}. Samples drawn: PPO "
        f"{PPO_STEPS * 64:,} (RL); RTO and its placebo the same plus {PAIR_PROMPTS * PAIR_SAMPLES:,} for the pairs "
        f"behind their DPO models, which every DPO-family arm also uses. Intervals: percentile bootstrap over seeds.",
        "",
        summary(heldout, kl, args.seeds),
    ]
    plot(
        {m: list(v.values()) for m, v in heldout.items()},
        args.seeds,
        os.path.join(ROOT, "benchmarks", "plots", "token_rewards_sort.png"),
    )
    plot_curves(
        dpo_family, args.seeds, os.path.join(ROOT, "benchmarks", "plots", "token_rewards_curves.png"), layout
    )
    lines += ["", "Figures: benchmarks/plots/token_rewards_sort.png (final models), token_rewards_curves.png"]
    report(
        f"Token-level rewards on sort-16: RTO, DPO, TGDPO, cDPO and their controls, {len(args.seeds)} seeds",
        "\n".join(lines),
        not args.no_record,
    )


def heldout_of_start(start: str) -> float:
    from rlhf.eval.accuracy import heldout_gold

    return heldout_gold(start, _sort_data(), max_new_tokens=34)["exact_match"]


def _rl_overrides(method: str, seed: int, layout: Layout) -> list[str] | None:
    """An RL arm's overrides: RTO's token reward from the same seed's DPO model (rto_placebo: from
    the placebo DPO model); None for the PPO arms, which take long_horizon.py's presets."""
    dpo_method = {"rto": "dpo_b0.1", "rto_placebo": "placebo_b0.1"}.get(method)
    if dpo_method is None:
        return None
    dpo_model = _export(layout.run_dir(dpo_method, seed))
    return ["+experiment=[ppo_long_sort,ppo_rto]", f"rto.dpo_model={dpo_model}"]


if __name__ == "__main__":
    main()
