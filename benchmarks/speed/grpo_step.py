"""Seconds per GRPO step, this project against TRL's GRPOTrainer, on the same tiny model and work.

Work per step: 2 prompts x G=8 samples, up to 32 new tokens, prompt lengths 64 and 256 tokens, a
shaped reward (fraction of digits in the completion, so advantages are not all zero), no KL
(no reference model on either side), one optimizer step per rollout, fp32, 2 torch threads.
Our step is split into generation, logprob passes and update. TRL is measured as shipped and with
its per-token logprob function replaced by one that applies the LM head only at completion
positions (older TRL versions applied it to every prompt position on CPU); the replacement changes
no loss value.
The two sides are interleaved (ours, TRL, TRL-patched, ours, ...), 3 repeats, 6 steps per run,
the first step of each run dropped; medians and ranges are reported.

With --shared-prefix, ours also runs with `model.shared_prefix=true` (each prompt encoded once per
group in generation's prefill and in every training forward), interleaved with the others.

With --engine vllm, the sides are TRL (its default transformers generation), ours with the
transformers engine, ours with the colocated vLLM engine (rollout.engine=vllm, weights synced every
step), and ours with vLLM and the shared-prefix forward, on a tiny model whose head_dim (32) vLLM's
CPU attention accepts; `--groups` adds group sizes. The generation share of each step and the
weight-sync time are reported.

Usage: python benchmarks/speed/grpo_step.py [--repeats 3] [--steps 6] [--shared-prefix] [--no-record]
       python benchmarks/speed/grpo_step.py --engine vllm --prompt-lengths 64 256 512 --groups 8 16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.common import append_results, median_range, step_timer  # noqa: E402

GROUP, PROMPTS, NEW_TOKENS = 8, 2, 32
HEADS = 4  # --engine vllm: 2 (head_dim 32)


def digit_fraction(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def make_prompts(length: int, count: int = 64, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("0123456789+=") for _ in range(length)) for _ in range(count)]


def build_model(seed: int = 0):
    from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm

    tokenizer = build_char_tokenizer()
    spec = TinyModelSpec(max_position_embeddings=1024, num_heads=HEADS)
    return build_tiny_causal_lm(spec, tokenizer, seed=seed), tokenizer


def run_ours(
    prompt_length: int,
    steps: int,
    workdir: str,
    shared_prefix: bool = False,
    engine: str = "hf",
    group: int = GROUP,
) -> dict[str, list[float]]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import rewards
    from recipes import grpo
    from rlhf.config import register_configs
    from rlhf.loggers import read_metrics

    rewards.REWARD_FUNCTIONS["digit_fraction"] = digit_fraction
    data = os.path.join(workdir, f"prompts_{prompt_length}.jsonl")
    with open(data, "w") as handle:
        for p in make_prompts(prompt_length):
            handle.write(json.dumps({"prompt": p}) + "\n")
    register_configs()
    config_dir = os.path.join(
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs"
    )
    run_dir = tempfile.mkdtemp(dir=workdir)
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = OmegaConf.to_object(
            compose(
                "grpo",
                overrides=[
                    f"run_dir={run_dir}",
                    f"data.source={data}",
                    "data.eval_split=null",
                    "data.completion_column=null",
                    "reward.functions=[{name: digit_fraction, weight: 1.0}]",
                    "reward.accuracy_reward=null",
                    "model.tiny.max_position_embeddings=1024",
                    f"model.tiny.num_heads={HEADS}",
                    "data.max_prompt_length=null",
                    f"rollout.engine={engine}",
                    f"train.steps={steps}",
                    f"train.prompts_per_step={PROMPTS}",
                    f"rollout.group_size={group}",
                    f"rollout.max_new_tokens={NEW_TOKENS}",
                    f"train.micro_batch_size={PROMPTS * group}",
                    "optim.lr=1e-4",
                    "loss.kl_coef=0.0",
                    "checkpoint.every=0",
                    "checkpoint.save_final=false",
                    "logger=quiet",
                    f"model.shared_prefix={shared_prefix}",
                ],
            )
        )
    grpo.train(cfg)
    rows = [r for r in read_metrics(run_dir) if "time/step" in r][1:]
    keys = ["time/step", "time/generate", "time/logprob_passes", "time/update", "response/length_mean"]
    keys += ["time/weight_sync"] if engine == "vllm" else []
    return {k: [r[k] for r in rows] for k in keys}


def patch_trl_logprobs(trainer) -> None:
    """Compute logits only at the positions that predict completion tokens."""
    from rlhf.ops import entropy_from_logits, logprobs_from_logits

    temperature = trainer.temperature

    def per_token_logps(
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **_,
    ):
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep + 1
        ).logits
        logits = logits[:, :-1] / temperature
        logps = logprobs_from_logits(logits, input_ids[:, -logits_to_keep:])
        return logps, entropy_from_logits(logits) if compute_entropy else None, None

    trainer._get_per_token_logps_and_entropies = per_token_logps


def run_trl(
    prompt_length: int, steps: int, workdir: str, patched: bool, group: int = GROUP
) -> dict[str, list[float]]:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = build_model()
    times: list[float] = []

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(dir=workdir),
        per_device_train_batch_size=PROMPTS * group,  # counts completions, not prompts
        num_generations=group,
        max_completion_length=NEW_TOKENS,
        gradient_accumulation_steps=1,
        beta=0.0,
        learning_rate=1e-4,
        max_steps=steps,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        loss_type="grpo",
        seed=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[digit_fraction],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": make_prompts(prompt_length)}),
        processing_class=tokenizer,
        callbacks=[step_timer(times)],
    )
    trainer.remove_callback(PrinterCallback)
    if patched:
        patch_trl_logprobs(trainer)
    trainer.train()
    lengths = [
        h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h
    ]
    return {"time/step": times[1:], "response/length_mean": lengths[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    parser.add_argument("--groups", type=int, nargs="+", default=[GROUP])
    parser.add_argument(
        "--shared-prefix", action="store_true", help="also run ours with model.shared_prefix=true"
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.environ.setdefault("WANDB_MODE", "disabled")
    workdir = tempfile.mkdtemp(prefix="grpo_step_")
    if args.engine == "vllm":
        engine_comparison(args, workdir)
        return
    sides = {
        "ours": lambda n: run_ours(n, args.steps, workdir),
        "trl": lambda n: run_trl(n, args.steps, workdir, False),
        "trl_patched": lambda n: run_trl(n, args.steps, workdir, True),
    }
    if args.shared_prefix:
        sides["ours_shared"] = lambda n: run_ours(n, args.steps, workdir, shared_prefix=True)
    results: dict[int, dict[str, dict[str, list[float]]]] = {}
    for length in args.prompt_lengths:
        results[length] = {name: {} for name in sides}
        for repeat in range(args.repeats):
            for name, run in sides.items():
                out = run(length)
                for key, values in out.items():
                    results[length][name].setdefault(key, []).extend(values)
                print(
                    f"prompt {length} repeat {repeat} {name}: median step {statistics.median(out['time/step']):.3f}s",
                    flush=True,
                )
    lines = [
        "| prompt tokens | ours s/step | gen / logprob / update | TRL s/step | TRL patched s/step | TRL / ours | TRL patched / ours | mean completion length ours / TRL |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for length, sides_out in results.items():
        ours, trl_raw, trl_patched = sides_out["ours"], sides_out["trl"], sides_out["trl_patched"]
        m = {k: statistics.median(v) for k, v in ours.items()}
        lines.append(
            f"| {length} | {median_range(ours['time/step'])} | {m['time/generate']:.3f} / {m['time/logprob_passes']:.3f} / {m['time/update']:.3f} "
            f"| {median_range(trl_raw['time/step'])} | {median_range(trl_patched['time/step'])} "
            f"| {statistics.median(trl_raw['time/step']) / m['time/step']:.2f}x | {statistics.median(trl_patched['time/step']) / m['time/step']:.2f}x "
            f"| {m['response/length_mean']:.1f} / {statistics.median(trl_raw['response/length_mean']):.1f} |"
        )
    if args.shared_prefix:
        lines += [
            "",
            "| prompt tokens | ours shared-prefix s/step | gen / logprob / update | ours / shared | TRL / shared | TRL patched / shared |",
            "|---|---|---|---|---|---|",
        ]
        for length, sides_out in results.items():
            shared = sides_out["ours_shared"]
            m = {k: statistics.median(v) for k, v in shared.items()}
            step = m["time/step"]
            lines.append(
                f"| {length} | {median_range(shared['time/step'])} | {m['time/generate']:.3f} / {m['time/logprob_passes']:.3f} / {m['time/update']:.3f} "
                f"| {statistics.median(sides_out['ours']['time/step']) / step:.2f}x "
                f"| {statistics.median(sides_out['trl']['time/step']) / step:.2f}x "
                f"| {statistics.median(sides_out['trl_patched']['time/step']) / step:.2f}x |"
            )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        settings = (
            f"Tiny Llama (hidden 64, 4 layers, 0.26M parameters), {PROMPTS} prompts x G={GROUP}, up to {NEW_TOKENS} new tokens, "
            f"shaped reward, no KL, fp32; {args.repeats} interleaved repeats x {args.steps} steps (first dropped); medians (min-max). "
            "A ratio above 1 means this project is faster."
        )
        append_results(
            "GRPO step time against TRL GRPOTrainer",
            "python benchmarks/speed/grpo_step.py" + (" --shared-prefix" if args.shared_prefix else ""),
            f"{settings}\n\n{table}",
        )


def engine_comparison(args, workdir: str) -> None:
    """TRL, ours (transformers generate), ours (vLLM), ours (vLLM + shared prefix), interleaved."""
    global HEADS
    HEADS = 2  # head_dim 32 for every side, the smallest vLLM's CPU attention takes
    sides = {
        "trl": lambda n, g: run_trl(n, args.steps, workdir, False, g),
        "ours_hf": lambda n, g: run_ours(n, args.steps, workdir, group=g),
        "ours_vllm": lambda n, g: run_ours(n, args.steps, workdir, engine="vllm", group=g),
        "ours_vllm_shared": lambda n, g: run_ours(n, args.steps, workdir, True, engine="vllm", group=g),
    }
    results: dict[tuple[int, int], dict[str, dict[str, list[float]]]] = {}
    for length in args.prompt_lengths:
        for group in args.groups:
            results[length, group] = {name: {} for name in sides}
            for repeat in range(args.repeats):
                for name, run in sides.items():
                    out = run(length, group)
                    for key, values in out.items():
                        results[length, group][name].setdefault(key, []).extend(values)
                    print(
                        f"prompt {length} G={group} repeat {repeat} {name}: "
                        f"median step {statistics.median(out['time/step']):.3f}s",
                        flush=True,
                    )
    lines = [
        "| prompt tokens | G | TRL s/step | ours HF s/step (gen share) | ours vLLM s/step (gen share, sync s) "
        "| ours vLLM + shared prefix s/step (gen share) | TRL / ours HF | TRL / ours vLLM | TRL / ours vLLM + shared |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def share(side: dict[str, list[float]]) -> str:
        return f"{statistics.median(side['time/generate']) / statistics.median(side['time/step']):.0%}"

    for (length, group), out in results.items():
        trl = statistics.median(out["trl"]["time/step"])
        hf, v, vs = out["ours_hf"], out["ours_vllm"], out["ours_vllm_shared"]
        lines.append(
            f"| {length} | {group} | {median_range(out['trl']['time/step'])} "
            f"| {median_range(hf['time/step'])} ({share(hf)}) "
            f"| {median_range(v['time/step'])} ({share(v)}, {statistics.median(v['time/weight_sync']):.3f}) "
            f"| {median_range(vs['time/step'])} ({share(vs)}) "
            f"| {trl / statistics.median(hf['time/step']):.2f}x | {trl / statistics.median(v['time/step']):.2f}x "
            f"| {trl / statistics.median(vs['time/step']):.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        settings = (
            f"Tiny Llama (hidden 64, 4 layers, 2 heads: head_dim 32), {PROMPTS} prompts x G, up to {NEW_TOKENS} new "
            f"tokens, shaped reward, no KL, fp32, 2 threads; {args.repeats} interleaved repeats x {args.steps} steps "
            "(first dropped); medians (min-max). Gen share: generation's part of the step; sync: the weight "
            "sync into the engine before each rollout. TRL generates with transformers (its default); a ratio "
            "above 1 means this project is faster."
        )
        command = (
            "python benchmarks/speed/grpo_step.py --engine vllm --prompt-lengths "
            + " ".join(map(str, args.prompt_lengths))
            + " --groups "
            + " ".join(map(str, args.groups))
        )
        append_results(
            "GRPO step time with the vLLM engine against TRL GRPOTrainer", command, f"{settings}\n\n{table}"
        )


if __name__ == "__main__":
    main()
