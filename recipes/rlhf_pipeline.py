"""The synthetic RLHF pipeline on a CPU: SFT, gold-labelled pairs, a reward model, then PPO, RTO,
DPO and TGDPO from the same start on the same pairs.

1. SFT the tiny policy on 2-digit addition (stop at 35% check accuracy).
2. Sample 4 completions per training prompt from the SFT policy (temperature 1); every two with
   different gold scores make a pair, labelled by a hidden gold rule: the fraction of correct answer
   digits (`digit_match`).
3. Train a reward model on those labels, from a stronger backbone (the SFT model trained on to 90%).
4. The methods, each from the SFT policy:
   ppo    PPO against the reward model (critic from the reward model). The gold score and
          exact-match accuracy are logged with weight 0, so PPO never sees them: the plot shows gold
          reward, reward-model reward and KL over training, whether the gold metric improves and where
          the reward model is over-optimised (its reward keeps rising while the gold score falls).
   rto    the same PPO, plus RTO's DPO token reward from the DPO model (same budget)
   dpo    DPO on the pairs
   tgdpo  TGDPO on the pairs, guided by the DPO model
   Every final model then answers the task's held-out problems greedily: exact match and gold.

Launch:  make pipeline    or   python -m recipes.rlhf_pipeline [seed=1] [ppo.train.steps=400] [methods=ppo,dpo]
Overrides prefixed with "sft.", "rm_backbone.", "rm.", "ppo." or "dpo." go to that stage ("ppo." also
to RTO, "dpo." also to TGDPO); others go to every stage.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recipes import dpo, ppo, reward_model, sft
from rewards import digit_match
from rlhf.checkpoint import export_dir
from rlhf.config import ModelConfig, register_configs
from rlhf.data.load import load_task_data
from rlhf.data.preferences import label_pairs
from rlhf.eval.accuracy import heldout_gold
from rlhf.loggers import read_metrics
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.plots import plot_metrics
from rlhf.rollout.engine import generate_rollouts
from rlhf.rollout.hf import TransformersEngine
from rlhf.rollout.sampling import SamplingParams

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
STAGES = ("sft", "rm_backbone", "rm", "ppo", "dpo")


def split_overrides(args: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for arg in args:
        stage = arg.split(".", 1)[0]
        if stage in out:
            out[stage].append(arg.split(".", 1)[1])
        else:
            for stage_args in out.values():
                stage_args.append(arg)
    return out


@torch.no_grad()
def sample_preference_pairs(
    model_dir: str, data_cfg, out_dir: str, num_prompts: int, seed: int, samples_per_prompt: int = 4
) -> dict[str, int]:
    """`samples_per_prompt` samples per prompt from the policy at `model_dir`; every two of them with
    different gold scores make a pair (the higher one chosen). Writes train.jsonl and eval.jsonl (the
    pairs of the first 10% of the prompts, so no prompt is in both) under `out_dir`."""
    model_cfg = ModelConfig(source="pretrained", name_or_path=model_dir)
    tokenizer = load_tokenizer(model_cfg)
    model = load_causal_lm(model_cfg, tokenizer).eval()
    train_rows, _ = load_task_data(data_cfg)
    rows = train_rows.shuffle(seed=seed).select(range(min(num_prompts, len(train_rows))))
    torch.manual_seed(seed)
    k = samples_per_prompt
    held_out_prompts = max(1, len(rows) // 10)
    splits: dict[str, list] = {"eval": [], "train": []}
    for start in range(0, len(rows), 250):
        chunk = rows[start : start + 250]
        batch = generate_rollouts(
            TransformersEngine.for_model(model, tokenizer),
            chunk["prompt"],
            {"answer": chunk["answer"]},
            group_size=k,
            sampling=SamplingParams(max_new_tokens=5),
        )
        prompts = [p for p in chunk["prompt"] for _ in range(k)]
        answers = [a for a in chunk["answer"] for _ in range(k)]
        gold = digit_match(prompts, batch.completions, answer=answers)
        # All pairs (i, j), i < j, inside each prompt's group of k samples.
        first = [(g * k + i) for g in range(len(chunk["prompt"])) for i in range(k) for j in range(i + 1, k)]
        second = [(g * k + j) for g in range(len(chunk["prompt"])) for i in range(k) for j in range(i + 1, k)]
        pairs = label_pairs(
            [prompts[i] for i in first],
            [batch.completions[i] for i in first],
            [batch.completions[j] for j in second],
            [gold[i] for i in first],
            [gold[j] for j in second],
            {"answer": [answers[i] for i in first]},
        )
        for row in pairs:
            index = start + chunk["prompt"].index(row["prompt"])
            splits["eval" if index < held_out_prompts else "train"].append(row)
    os.makedirs(out_dir, exist_ok=True)
    for name, split in splits.items():
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as handle:
            for row in split:
                handle.write(json.dumps(row) + "\n")
    return {
        "prompts": len(rows),
        "pairs": len(splits["train"]) + len(splits["eval"]),
        "eval_pairs": len(splits["eval"]),
    }


METHODS = ("ppo", "rto", "dpo", "tgdpo")


def run_pipeline(
    args: list[str],
    run_dir: str | None = None,
    num_pair_prompts: int = 9000,
    methods: tuple[str, ...] = METHODS,
) -> dict[str, float | str]:
    """Every stage for one seed; returns the summary (PPO curves, and each method's held-out gold)."""
    register_configs()
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods {sorted(unknown)} unknown; choose from {METHODS}")
    run_dir = run_dir or os.path.join("runs", "rlhf_pipeline", time.strftime("%Y-%m-%d_%H-%M-%S"))
    overrides = split_overrides(args)
    started = time.perf_counter()
    trained = set(methods) | ({"dpo"} if {"tgdpo", "rto"} & set(methods) else set())
    total = 4 + len(trained)
    stage = iter(range(1, total + 1))

    def say(text: str) -> None:
        print(f"[pipeline] {next(stage)}/{total} {text}", flush=True)

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):

        def config(name: str, *items: str):
            return OmegaConf.to_object(compose(name, overrides=list(items)))

        sft_cfg = config(
            "sft", "+experiment=sft_arithmetic_demo", f"run_dir={run_dir}/sft", *overrides["sft"]
        )
        say(f"SFT -> {run_dir}/sft")
        sft_result = sft.train(sft_cfg)
        sft_model = export_dir(sft_result["checkpoint"])

        say(f"sampling pairs from the SFT policy, gold labels -> {run_dir}/pairs")
        pair_stats = sample_preference_pairs(
            sft_model, sft_cfg.data, f"{run_dir}/pairs", num_pair_prompts, sft_cfg.seed
        )

        # The reward model starts from a stronger backbone than the policy (as in practice, where the
        # reward model is at least as capable): the SFT model trained on until 90% check accuracy. From
        # the 35%-accuracy policy itself, Bradley-Terry training stayed near chance (see RESULTS.md).
        pretrained = ["model=pretrained", f"model.name_or_path={sft_model}"]
        backbone_cfg = config(
            "sft",
            "+experiment=sft_arithmetic_demo",
            *pretrained,
            "train.stop_at_accuracy=0.9",
            "optim.warmup_steps=0",
            f"run_dir={run_dir}/rm_backbone",
            *overrides["sft"],
            *overrides["rm_backbone"],
        )
        say(f"reward-model backbone: SFT continued to 90% -> {run_dir}/rm_backbone")
        backbone = export_dir(sft.train(backbone_cfg)["checkpoint"])
        rm_cfg = config(
            "reward_model",
            "+experiment=rm_pipeline",
            "model=pretrained",
            f"model.name_or_path={backbone}",
            f"data.source={run_dir}/pairs",
            f"run_dir={run_dir}/rm",
            *overrides["rm"],
        )
        say(f"reward model on {pair_stats['pairs']} gold-labelled pairs -> {run_dir}/rm")
        rm_result = reward_model.train(rm_cfg)
        rm_model = export_dir(rm_result["checkpoint"])

        results: dict[str, dict] = {}
        ppo_common = ["+experiment=ppo_pipeline", *pretrained, f"reward_model.name_or_path={rm_model}"]
        dpo_common = ["+experiment=dpo_pipeline", *pretrained, f"data.source={run_dir}/pairs"]
        if {"dpo", "tgdpo", "rto"} & set(methods):
            say(f"DPO on the same pairs -> {run_dir}/dpo")
            results["dpo"] = dpo.train(
                config("dpo", *dpo_common, f"run_dir={run_dir}/dpo", *overrides["dpo"])
            )
        dpo_model = export_dir(results["dpo"]["checkpoint"]) if "dpo" in results else None
        if "tgdpo" in methods:
            say(f"TGDPO guided by the DPO model -> {run_dir}/tgdpo")
            results["tgdpo"] = dpo.train(
                config(
                    "dpo",
                    *dpo_common,
                    "token_weights.method=tgdpo",  # the dpo_tgdpo preset's settings
                    "token_weights.alpha=0.5",
                    f"token_weights.guide_model={dpo_model}",
                    f"run_dir={run_dir}/tgdpo",
                    *overrides["dpo"],
                )
            )
        if "ppo" in methods:
            say(f"PPO against the reward model -> {run_dir}/ppo")
            results["ppo"] = ppo.train(
                config("ppo", *ppo_common, f"run_dir={run_dir}/ppo", *overrides["ppo"])
            )
        if "rto" in methods:
            say(f"RTO: PPO with the DPO token reward, same budget -> {run_dir}/rto")
            results["rto"] = ppo.train(
                config(
                    "ppo",
                    *ppo_common,
                    f"rto.dpo_model={dpo_model}",  # the ppo_rto preset's settings
                    "rto.scale=0.05",
                    "rto.clip=0.05",
                    f"run_dir={run_dir}/rto",
                    *overrides["ppo"],
                )
            )
    stages = {"sft": sft_result, "rm": rm_result, **results}
    return _report(
        stages, sft_model, sft_cfg.data, pair_stats["pairs"], time.perf_counter() - started, run_dir
    )


def _report(
    stages: dict[str, dict], sft_model: str, data_cfg, pairs: int, seconds: float, run_dir: str
) -> dict:
    """Plots, the held-out gold of every model on one test, and the printed summary."""
    results = {k: v for k, v in stages.items() if k not in ("sft", "rm")}
    summary: dict[str, float | str] = {}
    for name in ("ppo", "rto"):
        if name in results:
            plot_metrics(
                results[name]["run_dir"],
                ["reward/digit_match/mean", "reward/model_mean", "kl/sequence_mean", "eval/accuracy"],
                "pipeline.png",
                f"{name.upper()} against a learned reward model: gold vs proxy",
            )
    if "ppo" in results:
        summary.update(summarize(results["ppo"]["run_dir"]))
    # The same held-out test for every model: greedy answers to the task's held-out problems.
    summary["heldout/sft"] = heldout_gold(sft_model, data_cfg)
    for name, result in results.items():
        summary[f"heldout/{name}"] = heldout_gold(export_dir(result["checkpoint"]), data_cfg)
    summary.update(
        sft_accuracy=stages["sft"].get("eval/accuracy", float("nan")),
        rm_pair_accuracy=stages["rm"].get("eval/pair_accuracy", float("nan")),
        pairs=pairs,
        seconds=seconds,
        run_dir=run_dir,
    )
    if "ppo" in results:
        print(
            f"[pipeline] RM pair accuracy {summary['rm_pair_accuracy']:.3f}; PPO rollouts gold (digit match) "
            f"{summary['gold_start']:.3f} -> {summary['gold_end']:.3f} (best {summary['gold_best']:.3f} at step "
            f"{summary['gold_best_step']}); RM reward {summary['rm_start']:.3f} -> {summary['rm_end']:.3f}; "
            f"KL {summary['kl_end']:.2f}",
            flush=True,
        )
    for key, value in summary.items():
        if key.startswith("heldout/"):
            print(
                f"[pipeline] held-out {key.split('/')[1]:>6}: exact match {value['exact_match']:.3f}, "
                f"digit match {value['digit_match']:.3f}",
                flush=True,
            )
    print(
        f"[pipeline] {summary['seconds']:.0f}s; plots: {run_dir}/*/pipeline.png, {run_dir}/*/dpo_curves.png"
    )
    return summary


def summarize(ppo_dir: str, window: int = 20) -> dict[str, float]:
    """Start/end/best of the gold and proxy rewards (moving averages over `window` steps), and the
    step after which the gold score fell while the reward model's score still rose."""
    rows = [r for r in read_metrics(ppo_dir) if "reward/digit_match/mean" in r]

    def smoothed(key: str) -> list[float]:
        values = [r[key] for r in rows]
        return [
            sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]

    gold, proxy = smoothed("reward/digit_match/mean"), smoothed("reward/model_mean")
    # Only full windows: the first steps' partial averages are too noisy to call a best.
    best = max(range(min(window, len(gold)) - 1, len(gold)), key=gold.__getitem__)
    overoptimised = best < len(gold) - 1 and proxy[-1] > proxy[best] and gold[-1] < gold[best] - 0.01
    evals = [r for r in read_metrics(ppo_dir) if "eval/accuracy" in r]
    return {
        "gold_start": gold[min(window, len(gold)) - 1],  # the mean of the first `window` steps
        "gold_end": gold[-1],
        "gold_best": gold[best],
        "gold_best_step": rows[best]["step"],
        "rm_start": proxy[min(window, len(proxy)) - 1],
        "rm_end": proxy[-1],
        "kl_end": smoothed("kl/sequence_mean")[-1],
        "overoptimisation_after_step": rows[best]["step"] if overoptimised else None,
        "accuracy_start": evals[0]["eval/accuracy"],
        "accuracy_end": evals[-1]["eval/accuracy"],
    }


def parse_methods(args: list[str]) -> tuple[list[str], tuple[str, ...]]:
    """(the other arguments, the methods named by a `methods=a,b` argument or all of them)."""
    chosen = [a.split("=", 1)[1] for a in args if a.startswith("methods=")]
    rest = [a for a in args if not a.startswith("methods=")]
    return rest, tuple(chosen[-1].split(",")) if chosen else METHODS


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    arguments, chosen_methods = parse_methods(sys.argv[1:])
    run_pipeline(arguments, methods=chosen_methods)
