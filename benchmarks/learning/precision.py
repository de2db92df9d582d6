"""Held-out accuracy of GRPO in each training precision, from one SFT checkpoint of the demo task.

One SFT warm start (the demo's: 35% check accuracy), then for each seed and each precision a GRPO
run with the demo's settings for a fixed number of steps (no time limit), loaded the way a user
loads their own model (`model=pretrained`, the default precision unless the variant changes it):
  fp32       the default pretrained config: float32 weights, optimizer and compute
  bf16       train.precision=bf16: bf16 compute, float32 master weights and optimizer state
  pure_bf16  model.dtype=bfloat16: bf16 weights and Adam state, no float32 master copy (the old
             pretrained default)
  trl        TRL 1.16's GRPOTrainer from the same export, its settings mapped from the same composed
             config (batch, group, completion length, sampling, clip band, loss aggregation as
             loss_type, std scaling, optimizer and schedule) in float32. TRL cannot drop
             zero-variance groups: their tokens stay in its token-mean denominator.
Accuracy is greedy exact match on the 1000 fixed held-out problems (ours evaluates TRL's model too).

Usage: python benchmarks/learning/precision.py [--seeds 1 2 3] [--steps 200] [--variants fp32 bf16 pure_bf16 trl]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.common import append_results  # noqa: E402

VARIANTS = {"fp32": [], "bf16": ["train.precision=bf16"], "pure_bf16": ["model.dtype=bfloat16"], "trl": []}


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


def grpo_config(start: str, root: str, seed: int, steps: int, variant: str):
    """The demo's GRPO settings, loaded from the SFT export as a user loads their model."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

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
        return OmegaConf.to_object(compose("grpo", overrides))


def grpo_accuracy(start: str, root: str, seed: int, steps: int, variant: str) -> tuple[float, float]:
    """(held-out accuracy after `steps` GRPO steps, seconds) from the SFT export."""
    from recipes import grpo

    cfg = grpo_config(start, root, seed, steps, variant)
    if variant == "trl":
        return trl_accuracy(cfg)
    started = time.perf_counter()
    result = grpo.train(cfg)
    return result["eval/accuracy"], time.perf_counter() - started


def trl_accuracy(cfg) -> tuple[float, float]:
    """TRL's GRPOTrainer on `cfg`'s settings, then our greedy held-out evaluation of its model."""
    from transformers import AutoModelForCausalLM
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.data.load import load_task_data
    from rlhf.eval.accuracy import heldout_accuracy
    from rlhf.rollout.engine import engine_for_model
    from rlhf.rollout.prompts import rl_prompts
    from rlhf.scoring import build_rewards, task_reward

    aggregation = {"token_mean": "dapo", "sequence_mean_token_mean": "grpo"}[cfg.loss.aggregation]
    train_rows, eval_rows = load_task_data(cfg.data)
    tokenizer, _, eval_rows = rl_prompts(cfg, train_rows, eval_rows)
    rewards = build_rewards(cfg.reward, cfg.data, {"train": train_rows})
    args = GRPOConfig(
        output_dir=os.path.join(cfg.run_dir, "trl"),
        per_device_train_batch_size=cfg.train.prompts_per_step * cfg.rollout.group_size,
        num_generations=cfg.rollout.group_size,
        max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_k=cfg.rollout.top_k,
        top_p=cfg.rollout.top_p,
        reward_weights=[r.weight for r in rewards],
        beta=cfg.loss.kl_coef,
        epsilon=cfg.loss.clip_low,
        epsilon_high=cfg.loss.clip_high,
        loss_type=aggregation,
        scale_rewards="group" if cfg.advantage.scale_by_std else "none",
        mask_truncated_completions=cfg.loss.mask_truncated,
        learning_rate=cfg.optim.lr,
        lr_scheduler_type=cfg.optim.scheduler,
        warmup_steps=cfg.optim.warmup_steps,
        weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.max_grad_norm,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        adam_epsilon=cfg.optim.eps,
        max_steps=cfg.train.steps,
        gradient_accumulation_steps=1,
        num_iterations=cfg.train.updates_per_rollout,
        seed=cfg.seed,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=50,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32),
        reward_funcs=[r.fn for r in rewards],
        args=args,
        train_dataset=train_rows,
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    accuracy = task_reward(cfg.reward.accuracy_reward)
    rollout = engine_for_model("hf", trainer.model, tokenizer, cfg.eval.max_new_tokens, cfg.seed)
    return heldout_accuracy(rollout, eval_rows, accuracy, cfg.data, cfg.eval), seconds


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
            f"python benchmarks/learning/precision.py --seeds {' '.join(map(str, args.seeds))} --steps {args.steps}",
            f"One SFT warm start (demo preset, seed {args.sft_seed}, held-out {100 * sft_accuracy:.1f}%), then GRPO "
            f"with the demo's settings for {args.steps} steps from its export with `model=pretrained`, tiny "
            "Llama, greedy exact match on 1000 held-out problems. `trl`: TRL's GRPOTrainer from the same export "
            "with the same settings in float32 (it has no zero-variance-group drop; those groups' tokens stay in "
            "its token-mean denominator), evaluated by our held-out evaluation.\n\n" + table,
        )


if __name__ == "__main__":
    main()
