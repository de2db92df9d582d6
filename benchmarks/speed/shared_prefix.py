"""Shared-prefix forward (Prefix Grouper) against the repeated layout: forward+backward seconds and
peak memory of one GRPO-shaped logprob pass, beside the theoretical ratios of Lemma 2.2.

One group: a prompt of P tokens and G responses of S tokens, all valid. "repeated" runs G rows of
[prompt; response]; "shared" packs [prompt; response_1; ...; response_G] into one row. Each
measurement runs in a fresh process: peak memory of the first pass (growth of peak RSS over the
resident size before it on CPU; `max_memory_allocated` on GPU), seconds of a second pass; the two
layouts alternate, `--repeats` times, medians reported.
Theory (d = head dim, n = heads): attention base G(P+S)^2 dn, shared P^2 dn + G S (2P + S) dn;
pointwise base G(P+S), shared P + G S tokens.

Usage: python benchmarks/speed/shared_prefix.py [--prefix 256 1024 4096] [--suffix 64 256] [--groups 4 8 16]
       [--attention sdpa] [--dtype float32] [--repeats 2] [--no-record]
On a GPU: --device cuda --dtype bfloat16 --hidden 896 --layers 24 --heads 14 --kv-heads 2 (0.5B
Qwen2 shape) or --hidden 1536 --layers 28 --heads 12 --kv-heads 2 --intermediate 8960 (1.5B).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def theory(prefix: int, suffix: int, group: int) -> tuple[float, float]:
    """(attention FLOP ratio, pointwise FLOP ratio), repeated / shared."""
    attention = group * (prefix + suffix) ** 2 / (prefix**2 + group * suffix * (2 * prefix + suffix))
    pointwise = group * (prefix + suffix) / (prefix + group * suffix)
    return attention, pointwise


def measure(args: argparse.Namespace, prefix: int, suffix: int, group: int, shared: bool) -> dict[str, float]:
    """One forward+backward in this process; returns seconds and peak memory in MB."""
    import resource
    import time

    import torch

    from rlhf.config import ModelConfig
    from rlhf.models.forward import response_logprobs
    from rlhf.models.load import load_causal_lm
    from rlhf.models.options import ForwardOptions
    from rlhf.models.tiny import build_char_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    cfg = ModelConfig(attn_implementation=args.attention, shared_prefix=shared, dtype=args.dtype)
    t = cfg.tiny
    t.arch, t.hidden_size, t.num_layers, t.num_heads = "qwen2", args.hidden, args.layers, args.heads
    t.num_kv_heads, t.intermediate_size = args.kv_heads, args.intermediate
    t.max_position_embeddings = prefix + suffix + 8
    device = torch.device(args.device)
    model = load_causal_lm(cfg, tokenizer).to(device)
    vocab = len(tokenizer)
    prompt = torch.randint(4, vocab, (1, prefix), device=device).expand(group, -1)
    batch = (
        prompt,
        torch.ones(group, prefix, dtype=torch.bool, device=device),
        torch.randint(4, vocab, (group, suffix), device=device),
        torch.ones(group, suffix, dtype=torch.bool, device=device),
    )

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        logprobs, _ = response_logprobs(model, *batch, ForwardOptions.from_config(cfg))
        logprobs.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    # Memory from the first pass: on CPU the process's peak RSS only grows, so the first pass is the
    # one whose peak shows (its growth over the resident size before it); time from a second pass.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as handle:
            base = int(handle.read().split()[1]) * resource.getpagesize()
    step()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)
    seconds = step()
    return {"seconds": seconds, "peak_mb": peak / 2**20}


def measure_fresh(args: argparse.Namespace, prefix: int, suffix: int, group: int, shared: bool) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        json.dumps([prefix, suffix, group, shared]),
    ]
    command += _model_flags(args)
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {prefix}/{suffix}/{group}/{shared} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _model_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--attention={args.attention}",
        f"--dtype={args.dtype}",
        f"--device={args.device}",
        f"--hidden={args.hidden}",
        f"--layers={args.layers}",
        f"--heads={args.heads}",
        f"--kv-heads={args.kv_heads}",
        f"--intermediate={args.intermediate}",
        f"--threads={args.threads}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefix", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--suffix", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--groups", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--attention", default="sdpa")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        prefix, suffix, group, shared = json.loads(args.child)
        print(json.dumps(measure(args, prefix, suffix, group, shared)))
        return

    lines = [
        "| prefix | suffix | G | repeated s | shared s | time ratio | repeated MB | shared MB | memory ratio | theory: attention / pointwise FLOP ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for prefix in args.prefix:
        for suffix in args.suffix:
            for group in args.groups:
                runs: dict[bool, list[dict]] = {False: [], True: []}
                for _ in range(args.repeats):
                    for shared in (False, True):
                        runs[shared].append(measure_fresh(args, prefix, suffix, group, shared))
                seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
                memory = {k: statistics.median(r["peak_mb"] for r in v) for k, v in runs.items()}
                attention, pointwise = theory(prefix, suffix, group)
                line = (
                    f"| {prefix} | {suffix} | {group} | {seconds[False]:.3f} | {seconds[True]:.3f} "
                    f"| {seconds[False] / seconds[True]:.2f}x | {memory[False]:.0f} | {memory[True]:.0f} "
                    f"| {memory[False] / max(memory[True], 1e-9):.2f}x | {attention:.2f}x / {pointwise:.2f}x |"
                )
                lines.append(line)
                print(line, flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        from benchmarks.common import append_results

        command = "python benchmarks/speed/shared_prefix.py " + " ".join(
            [*_model_flags(args), f"--repeats={args.repeats}"]
        )
        append_results(
            f"Shared-prefix forward against the repeated layout ({args.device}, {args.dtype}, {args.attention})",
            command,
            f"Qwen2-shaped random-init model (hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
            f"{args.kv_heads} KV heads), one group of G responses, all tokens valid, one forward+backward of the "
            "response logprobs; each measurement in a fresh process (memory: first pass, time: second); medians of "
            f"{args.repeats}; ratios are repeated / shared (above 1: shared is cheaper). Memory: peak growth "
            "(RSS on CPU, allocated on GPU) during the pass.\n\n" + table,
        )


if __name__ == "__main__":
    main()
