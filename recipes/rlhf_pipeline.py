"""The synthetic RLHF pipeline on a CPU: SFT, sample pairs, gold labels, reward model, PPO.

1. SFT the tiny policy on 2-digit addition (stop at 35% check accuracy).
2. Sample two completions per training prompt from the SFT policy (temperature 1).
3. Label each pair with a hidden gold rule, the fraction of correct answer digits (`digit_match`);
   ties are dropped.
4. Train a reward model (from the SFT weights) on those labels.
5. PPO against the reward model (critic from the reward model). The gold score and exact-match
   accuracy are logged with weight 0, so PPO never sees them: the plot shows gold reward, reward
   model reward and KL over training, whether the gold metric improves and where the reward model
   is over-optimised (its reward keeps rising while the gold score falls).

Launch:  make pipeline    or   python -m recipes.rlhf_pipeline [seed=1] [ppo.train.steps=400]
Overrides prefixed with "sft.", "rm." or "ppo." go to that stage; others go to every stage.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from recipes import ppo, reward_model, sft
from rewards import digit_match
from rlhf.checkpoint import export_dir
from rlhf.config import ModelConfig, register_configs
from rlhf.data.load import load_task_data
from rlhf.data.preferences import label_pairs
from rlhf.loggers import read_metrics
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.plots import plot_metrics
from rlhf.rollout.hf import SamplingParams, generate_rollouts

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
STAGES = ("sft", "rm", "ppo")


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
            model,
            tokenizer,
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


def run_pipeline(
    args: list[str], run_dir: str | None = None, num_pair_prompts: int = 6000
) -> dict[str, float | str]:
    register_configs()
    run_dir = run_dir or os.path.join("runs", "rlhf_pipeline", time.strftime("%Y-%m-%d_%H-%M-%S"))
    overrides = split_overrides(args)
    started = time.perf_counter()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        sft_cfg = OmegaConf.to_object(
            compose(
                "sft",
                overrides=["+experiment=sft_arithmetic_demo", f"run_dir={run_dir}/sft", *overrides["sft"]],
            )
        )
        print(f"[pipeline] 1/4 SFT -> {run_dir}/sft", flush=True)
        sft_result = sft.train(sft_cfg)
        sft_model = export_dir(sft_result["checkpoint"])

        print(
            f"[pipeline] 2/4 sampling pairs from the SFT policy, gold labels -> {run_dir}/pairs", flush=True
        )
        pair_stats = sample_preference_pairs(
            sft_model, sft_cfg.data, f"{run_dir}/pairs", num_pair_prompts, sft_cfg.seed
        )

        pretrained = ["model=pretrained", f"model.name_or_path={sft_model}", "model.dtype=float32"]
        rm_cfg = OmegaConf.to_object(
            compose(
                "reward_model",
                overrides=[
                    "+experiment=rm_pipeline",
                    *pretrained,
                    f"data.source={run_dir}/pairs",
                    f"run_dir={run_dir}/rm",
                    *overrides["rm"],
                ],
            )
        )
        print(
            f"[pipeline] 3/4 reward model on {pair_stats['pairs']} gold-labelled pairs -> {run_dir}/rm",
            flush=True,
        )
        rm_result = reward_model.train(rm_cfg)
        rm_model = export_dir(rm_result["checkpoint"])

        ppo_cfg = OmegaConf.to_object(
            compose(
                "ppo",
                overrides=[
                    "+experiment=ppo_pipeline",
                    *pretrained,
                    f"reward_model.name_or_path={rm_model}",
                    f"run_dir={run_dir}/ppo",
                    *overrides["ppo"],
                ],
            )
        )
    print(f"[pipeline] 4/4 PPO against the reward model -> {run_dir}/ppo", flush=True)
    ppo_result = ppo.train(ppo_cfg)
    plot_metrics(
        ppo_result["run_dir"],
        ["reward/digit_match/mean", "reward/model_mean", "kl/sequence_mean", "eval/accuracy"],
        "pipeline.png",
        "PPO against a learned reward model: gold vs proxy",
    )
    summary = summarize(ppo_result["run_dir"])
    summary.update(
        sft_accuracy=sft_result.get("eval/accuracy", float("nan")),
        rm_pair_accuracy=rm_result.get("eval/pair_accuracy", float("nan")),
        pairs=pair_stats["pairs"],
        seconds=time.perf_counter() - started,
        run_dir=run_dir,
    )
    print(
        f"[pipeline] RM pair accuracy {summary['rm_pair_accuracy']:.3f}; gold (digit match) {summary['gold_start']:.3f} -> "
        f"{summary['gold_end']:.3f} (best {summary['gold_best']:.3f} at step {summary['gold_best_step']}); RM reward "
        f"{summary['rm_start']:.3f} -> {summary['rm_end']:.3f}; KL {summary['kl_end']:.2f}; held-out exact match "
        f"{summary['accuracy_start']:.3f} -> {summary['accuracy_end']:.3f}; {summary['seconds']:.0f}s",
        flush=True,
    )
    print(f"[pipeline] plot: {ppo_result['run_dir']}/pipeline.png")
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
    best = max(range(len(gold)), key=gold.__getitem__)
    overoptimised = best < len(gold) - 1 and proxy[-1] > proxy[best] and gold[-1] < gold[best] - 0.01
    evals = [r for r in read_metrics(ppo_dir) if "eval/accuracy" in r]
    return {
        "gold_start": gold[0],
        "gold_end": gold[-1],
        "gold_best": gold[best],
        "gold_best_step": rows[best]["step"],
        "rm_start": proxy[0],
        "rm_end": proxy[-1],
        "kl_end": smoothed("kl/sequence_mean")[-1],
        "overoptimisation_after_step": rows[best]["step"] if overoptimised else None,
        "accuracy_start": evals[0]["eval/accuracy"],
        "accuracy_end": evals[-1]["eval/accuracy"],
    }


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_pipeline(sys.argv[1:])
