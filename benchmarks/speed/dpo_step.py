"""Seconds per DPO step, this project against TRL's DPOTrainer, on the same tiny model and pairs.

Work per step: 8 pairs (prompt + chosen + rejected), prompt lengths 64 and 220 tokens, completions
of 24-40 characters, sigmoid DPO with beta 0.1, the reference computed on the fly (a frozen copy of
the initial model on both sides; no precomputation), one optimizer step, fp32, 2 torch threads.
TRL runs as shipped (`bf16=False`, no gradient checkpointing, `max_length` large enough that no pair
is truncated or dropped: the row count is checked). The two sides are interleaved (ours, TRL, ours,
...), 3 repeats, 8 steps per run, the first step of each run dropped; medians and ranges reported.

Usage: python benchmarks/speed/dpo_step.py [--repeats 3] [--steps 8] [--no-record]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.common import append_results, median_range, step_timer  # noqa: E402

PAIRS = 8


def make_pairs(prompt_length: int, count: int = 128, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)

    def text(length: int) -> str:
        return "".join(rng.choice("0123456789+=") for _ in range(length))

    return [
        {
            "prompt": text(prompt_length),
            "chosen": text(rng.randint(24, 40)),
            "rejected": text(rng.randint(24, 40)),
        }
        for _ in range(count)
    ]


def run_ours(prompt_length: int, steps: int, workdir: str) -> list[float]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from recipes import dpo
    from rlhf.config import register_configs
    from rlhf.loggers import read_metrics

    data = os.path.join(workdir, f"pairs_{prompt_length}.jsonl")
    with open(data, "w") as handle:
        for row in make_pairs(prompt_length):
            handle.write(json.dumps(row) + "\n")
    register_configs()
    config_dir = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
    )
    run_dir = tempfile.mkdtemp(dir=workdir)
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = OmegaConf.to_object(
            compose(
                "dpo",
                overrides=[
                    f"run_dir={run_dir}",
                    f"data.source={data}",
                    "data.eval_split=null",
                    "data.completion_column=null",
                    "model.tiny.max_position_embeddings=512",
                    f"train.steps={steps}",
                    f"train.batch_size={PAIRS}",
                    f"train.micro_batch_size={PAIRS}",
                    "loss.beta=0.1",
                    "optim.lr=1e-4",
                    "eval.every=0",
                    "checkpoint.every=0",
                    "checkpoint.save_final=false",
                    "logger=quiet",
                ],
            )
        )
    dpo.train(cfg)
    return [r["time/step"] for r in read_metrics(run_dir) if "time/step" in r][1:]


def run_trl(prompt_length: int, steps: int, workdir: str) -> list[float]:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm

    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(TinyModelSpec(max_position_embeddings=512), tokenizer, seed=0)
    times: list[float] = []

    args = DPOConfig(
        output_dir=tempfile.mkdtemp(dir=workdir),
        per_device_train_batch_size=PAIRS,
        gradient_accumulation_steps=1,
        beta=0.1,
        loss_type=["sigmoid"],
        learning_rate=1e-4,
        max_steps=steps,
        max_length=512,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        precompute_ref_log_probs=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    rows = make_pairs(prompt_length)
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),  # TRL would reload the reference from a path; ours is in memory
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[step_timer(times)],
    )
    trainer.remove_callback(PrinterCallback)
    if len(trainer.train_dataset) != len(rows):
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(rows)} pairs; raise max_length")
    trainer.train()
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 220])
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("WANDB_MODE", "disabled")
    workdir = tempfile.mkdtemp(prefix="dpo_step_")
    sides = {"ours": run_ours, "trl": run_trl}
    results: dict[int, dict[str, list[float]]] = {}
    for length in args.prompt_lengths:
        results[length] = {name: [] for name in sides}
        for repeat in range(args.repeats):
            for name, run in sides.items():
                times = run(length, args.steps, workdir)
                results[length][name].extend(times)
                print(
                    f"prompt {length} repeat {repeat} {name}: median step {statistics.median(times):.4f}s",
                    flush=True,
                )
    lines = ["| prompt tokens | ours s/step | TRL s/step | TRL / ours |", "|---|---|---|---|"]
    for length, out in results.items():
        ratio = statistics.median(out["trl"]) / statistics.median(out["ours"])
        lines.append(
            f"| {length} | {median_range(out['ours'])} | {median_range(out['trl'])} | {ratio:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        settings = (
            f"Tiny Llama (hidden 64, 4 layers, 0.26M parameters), {PAIRS} pairs per step, completions of 24-40 "
            "tokens, sigmoid DPO beta 0.1, reference forward every step on both sides, fp32; "
            f"{args.repeats} interleaved repeats x {args.steps} steps (first dropped); medians (min-max). "
            "A ratio above 1 means this project is faster."
        )
        append_results(
            "DPO step time against TRL DPOTrainer",
            "python benchmarks/speed/dpo_step.py",
            f"{settings}\n\n{table}",
        )


if __name__ == "__main__":
    main()
