"""Seconds per vLLM rollout on CPU under the engine settings `rollout.vllm` chooses between, side by side.

One rollout: 2 prompts x G samples of exactly 32 new tokens (min_tokens = max_tokens, so every setting
does the same work), seeded, processed logprobs of the sampled tokens, prefix caching on, on the tiny
Llama of benchmarks/speed/grpo_step.py --engine vllm (hidden 64, 4 layers, 2 heads: head_dim 32), fp32,
2 threads, the in-process engine. The settings, as rlhf/rollout/vllm.py passes them:
  eager            enforce_eager=true, text detokenized (the engine's defaults until this benchmark)
  compiled         enforce_eager=false (vLLM's default: torch.compile on CPU)
  compiled_ids     and no detokenizing (the engine asks for text only when stop strings need it;
                   with the defaults, this is the engine now)
  compiled_async   and async_scheduling=true (rollout.vllm.async_scheduling; vLLM chooses by default)
Each setting starts its own engine in a fresh process (start time reported, not counted); settings
are interleaved over `--repeats`, each timing 6 rollouts per shape with the first dropped.

Usage: python benchmarks/speed/vllm_generation.py [--repeats 2] [--no-record]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.common import append_results, median_range  # noqa: E402

SETTINGS = {
    "eager": {"enforce_eager": True, "async_scheduling": False, "detokenize": True},
    "compiled": {"enforce_eager": False, "async_scheduling": False, "detokenize": True},
    "compiled_ids": {"enforce_eager": False, "async_scheduling": False, "detokenize": False},
    "compiled_async": {"enforce_eager": False, "async_scheduling": True, "detokenize": False},
}
SHAPES = ((256, 8), (512, 16))  # (prompt tokens, G): the speed targets of the vLLM issue
NEW_TOKENS, CALLS = 32, 6


def measure(setting: str) -> dict[str, list[float]]:
    """One engine with `setting`: its start time and every timed rollout per shape."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import random

    import torch
    from vllm import LLM, SamplingParams

    from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm

    torch.set_num_threads(2)
    options = SETTINGS[setting]
    tokenizer = build_char_tokenizer("0123456789+-*=,. ")
    spec = TinyModelSpec(
        hidden_size=64, num_layers=4, num_heads=2, intermediate_size=256, max_position_embeddings=1024
    )
    directory = tempfile.mkdtemp(prefix="vllm_generation_")
    build_tiny_causal_lm(spec, tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    started = time.perf_counter()
    llm = LLM(
        model=directory,
        dtype="float32",
        seed=0,
        enforce_eager=options["enforce_eager"],
        async_scheduling=options["async_scheduling"],
        enable_prefix_caching=True,
        max_model_len=1024,
        logprobs_mode="processed_logprobs",
        generation_config="vllm",
    )
    out = {"start": [time.perf_counter() - started]}
    rng = random.Random(0)
    for length, group in SHAPES:
        prompts = [{"prompt_token_ids": [rng.randrange(3, 15) for _ in range(length)]} for _ in range(2)]
        times = []
        for call in range(CALLS):
            params = [
                SamplingParams(
                    n=group,
                    max_tokens=NEW_TOKENS,
                    min_tokens=NEW_TOKENS,
                    temperature=1.0,
                    logprobs=0,
                    seed=100 * call + i,
                    detokenize=options["detokenize"],
                )
                for i in range(len(prompts))
            ]
            llm.reset_prefix_cache()  # a new rollout after a weight sync starts with an empty cache
            tick = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - tick)
        out[f"{length}/{group}"] = times[1:]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {name: {} for name in SETTINGS}
    context = multiprocessing.get_context("spawn")
    for repeat in range(args.repeats):
        for name in SETTINGS:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                out = pool.submit(measure, name).result()
            for key, values in out.items():
                results[name].setdefault(key, []).extend(values)
            print(
                f"repeat {repeat} {name}: "
                + ", ".join(f"{k} {statistics.median(v):.3f}s" for k, v in out.items())
            )
    shapes = [f"{length}/{group}" for length, group in SHAPES]
    lines = [
        "| setting | engine start s | "
        + " | ".join(f"prompt {s.replace('/', ', G ')}: s per rollout" for s in shapes)
        + " | "
        + " | ".join(f"eager / setting at {s}" for s in shapes)
        + " |",
        "|---|---|" + "---|" * (2 * len(shapes)),
    ]
    base = {s: statistics.median(results["eager"][s]) for s in shapes}
    for name, out in results.items():
        lines.append(
            f"| {name} | {statistics.median(out['start']):.1f} | "
            + " | ".join(median_range(out[s]) for s in shapes)
            + " | "
            + " | ".join(f"{base[s] / statistics.median(out[s]):.2f}x" for s in shapes)
            + " |"
        )
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        settings = (
            f"Tiny Llama (hidden 64, 4 layers, head_dim 32), 2 prompts x G, exactly {NEW_TOKENS} new tokens, "
            f"fp32, 2 threads, in-process engine; {args.repeats} interleaved repeats, each a fresh engine timing "
            f"{CALLS} rollouts per shape (first dropped); medians (min-max)."
        )
        append_results(
            "vLLM rollout time on CPU by engine setting",
            "python benchmarks/speed/vllm_generation.py"
            + (f" --repeats {args.repeats}" if args.repeats != 2 else ""),
            f"{settings}\n\n{table}",
        )


if __name__ == "__main__":
    main()
