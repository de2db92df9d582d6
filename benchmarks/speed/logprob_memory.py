"""Peak memory and time of a per-token logprob pass with gradient, ours against TRL's, on CPU.

One row of a 16-token prompt and T response tokens through a random-init Qwen2-shaped model
(hidden 256, 2 layers) with vocabulary V; the pass computes the response tokens' logprobs and
entropies, and the backward of their sum. Sides:
- ours, plain: the full [rows, T, V] logits, warped, log-softmax, gather (model.logprob_chunk_tokens=0);
- ours, chunked: model.logprob_chunk_tokens=--chunk (512 by default; head, log-softmax and gather per
  chunk, recomputed in the backward);
- TRL: GRPOTrainer's pass as TRL 1.16 ships it: `add_fused_lm_head` (log-probs and entropy in
  tiles, no full logits) and `model(..., labels=..., fused_lm_head=True)`.
Each measurement runs in a fresh process; memory is the peak resident set size during the pass
minus the resident size just before it (the model and inputs already built). 2 repeats, medians.

Usage: python benchmarks/speed/logprob_memory.py [--vocab 32000 151936] [--tokens 2048 4096] [--chunk 512] [--no-record]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

PROMPT, HIDDEN, CHUNK = 16, 256, 512


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(side: str, vocab: int, tokens: int, chunk: int = CHUNK) -> dict[str, float]:
    """In this process: build the model, run one pass with gradient, report memory and seconds."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=PROMPT + tokens + 8,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    prompt_ids = torch.randint(0, vocab, (1, PROMPT))
    response_ids = torch.randint(0, vocab, (1, tokens))
    prompt_mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    response_mask = torch.ones_like(response_ids, dtype=torch.bool)
    if side == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        input_ids = torch.cat([prompt_ids, response_ids], 1)

        def run():
            labels = input_ids.clone()
            labels[:, :-tokens] = -100
            out = model(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                labels=labels,
                fused_lm_head=True,
            )
            return out.log_probs[:, -tokens:], out.entropy[:, -tokens:]
    else:
        from rlhf.models.forward import response_logprobs
        from rlhf.models.options import ForwardOptions

        options = ForwardOptions(logprob_chunk_tokens=chunk if side == "ours_chunked" else 0)

        def run():
            return response_logprobs(
                model, prompt_ids, prompt_mask, response_ids, response_mask, options, with_entropy=True
            )

    before = _rss_mb()
    started = time.perf_counter()
    logprobs, entropy = run()
    logprobs.sum().backward()
    seconds = time.perf_counter() - started
    return {"peak_mb": _peak_rss_mb() - before, "seconds": seconds, "logprob_mean": float(logprobs.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--chunk", type=int, default=CHUNK, help="model.logprob_chunk_tokens of the chunked side"
    )
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument(
        "--child", nargs=4, metavar=("SIDE", "VOCAB", "TOKENS", "CHUNK"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        side, vocab, tokens, chunk = args.child
        print(json.dumps(measure(side, int(vocab), int(tokens), int(chunk))))
        return
    sides = ("ours_plain", "ours_chunked", "trl")
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            found: dict[str, list[dict]] = {s: [] for s in sides}
            for _ in range(args.repeats):
                for side in sides:  # interleaved
                    done = subprocess.run(
                        [sys.executable, __file__, "--child", side, str(vocab), str(tokens), str(args.chunk)],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    found[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"V={vocab} T={tokens} {side}: {found[side][-1]}", flush=True)
            med = {
                s: {k: statistics.median(r[k] for r in found[s]) for k in ("peak_mb", "seconds")}
                for s in sides
            }
            rows.append(
                f"| {vocab} | {tokens} | {med['ours_plain']['peak_mb']:.0f} / {med['ours_plain']['seconds']:.2f} "
                f"| {med['ours_chunked']['peak_mb']:.0f} / {med['ours_chunked']['seconds']:.2f} "
                f"| {med['trl']['peak_mb']:.0f} / {med['trl']['seconds']:.2f} "
                f"| {med['ours_chunked']['peak_mb'] / med['trl']['peak_mb']:.2f} "
                f"| {med['ours_chunked']['peak_mb'] / med['ours_plain']['peak_mb']:.2f} |"
            )
    table = "\n".join(
        [
            "| vocab | response tokens | ours plain MB / s | ours chunked MB / s | TRL fused MB / s | chunked / TRL memory | chunked / plain memory |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if not args.no_record:
        from benchmarks.common import append_results

        settings = (
            f"One row, prompt {PROMPT} tokens, Qwen2-shaped random init (hidden {HIDDEN}, 2 layers, untied head), "
            f"fp32, logprobs and entropy with the backward of the logprobs' sum; chunk {args.chunk} tokens; "
            f"peak RSS above the pre-pass RSS, fresh process per measurement, {args.repeats} interleaved repeats, medians."
        )
        append_results(
            "Per-token logprob pass with gradient: peak memory and time against TRL",
            "python benchmarks/speed/logprob_memory.py " + " ".join(sys.argv[1:]),
            f"{settings}\n\n{table}",
        )


if __name__ == "__main__":
    main()
