"""Time of a per-token logprob pass with gradient on a mixed-length batch: padded rows against
padding-free rows (model.padding_free), and TRL's pass on the same padded batch, on CPU.

Rows of a GRPO-like batch whose prompts and responses have different lengths (lengths drawn
uniformly in the given ranges) through a random-init Qwen2-shaped model (hidden 256, 2 layers,
vocabulary 32000). Sides, each computing the response tokens' logprobs and the backward of their sum:
- ours, padded: prompts left-padded and responses right-padded to the longest in the batch;
- ours, padding-free: every row's valid tokens in one sequence, positions restarting per row;
- TRL: GRPOTrainer's pass as TRL 1.16 ships it (`add_fused_lm_head`, labels on the completion,
  one padded batch with its attention mask).
Sides are interleaved in one process, 3 repeats after a warm-up, medians.

Usage: python benchmarks/speed/padding_free.py [--rows 8] [--prompt 64 1024] [--response 16 512] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

HIDDEN, VOCAB = 256, 32000


def _batch(rows: int, prompt: tuple[int, int], response: tuple[int, int], seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(prompt[0], prompt[1] + 1, (rows,), generator=generator)
    response_lengths = torch.randint(response[0], response[1] + 1, (rows,), generator=generator)
    width, length = int(prompt_lengths.max()), int(response_lengths.max())
    prompt_ids = torch.randint(0, VOCAB, (rows, width), generator=generator)
    prompt_mask = torch.arange(width).unsqueeze(0) >= (width - prompt_lengths).unsqueeze(1)  # left-padded
    response_ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
    response_mask = torch.arange(length).unsqueeze(0) < response_lengths.unsqueeze(1)
    return prompt_ids, prompt_mask, response_ids, response_mask


def _model(max_len: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=4 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_len,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


def main() -> None:
    import torch

    from rlhf.models.forward import response_logprobs
    from rlhf.models.options import ForwardOptions

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, nargs=2, default=[64, 1024])
    parser.add_argument("--response", type=int, nargs=2, default=[16, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    batch = _batch(args.rows, tuple(args.prompt), tuple(args.response))
    prompt_ids, prompt_mask, response_ids, response_mask = batch
    max_len = prompt_ids.shape[1] + response_ids.shape[1] + 8
    padded, packed, trl = _model(max_len), _model(max_len), _model(max_len)
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(trl, outputs=("log_probs", "entropy"))
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention = torch.cat([prompt_mask, response_mask], 1).long()
    labels = torch.where(attention.bool(), input_ids, -100)
    labels[:, : prompt_ids.shape[1]] = -100

    def ours(model):
        options = ForwardOptions(padding_free=model is packed, logprob_chunk_tokens=0)
        logprobs, _ = response_logprobs(model, *batch, options, with_entropy=True)
        torch.where(response_mask, logprobs, 0.0).sum().backward()
        return logprobs

    def theirs():
        out = trl(input_ids=input_ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        logprobs = out.log_probs[:, -response_ids.shape[1] :]
        torch.where(response_mask, logprobs, 0.0).sum().backward()
        return logprobs

    sides = {"ours_padded": lambda: ours(padded), "ours_padding_free": lambda: ours(packed), "trl": theirs}
    times: dict[str, list[float]] = {s: [] for s in sides}
    values = {}
    for repeat in range(args.repeats + 1):
        for side, run in sides.items():
            started = time.perf_counter()
            values[side] = run().detach()
            if repeat:  # the first round warms up
                times[side].append(time.perf_counter() - started)
            print(f"{side}: {time.perf_counter() - started:.2f} s", flush=True)
    gap = float((values["ours_padding_free"] - values["ours_padded"])[response_mask].abs().max())
    med = {s: statistics.median(t) for s, t in times.items()}
    valid = int(prompt_mask.sum() + response_mask.sum())
    total = prompt_mask.numel() + response_mask.numel()
    table = "\n".join(
        [
            "| rows | prompt tokens | response tokens | valid / padded tokens | ours padded s | ours padding-free s | TRL s | padding-free / padded | padding-free / TRL |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {args.rows} | {args.prompt[0]}-{args.prompt[1]} | {args.response[0]}-{args.response[1]} "
            f"| {valid} / {total} | {med['ours_padded']:.2f} | {med['ours_padding_free']:.2f} | {med['trl']:.2f} "
            f"| {med['ours_padding_free'] / med['ours_padded']:.2f} | {med['ours_padding_free'] / med['trl']:.2f} |",
        ]
    )
    print(table)
    print(f"largest logprob difference padding-free vs padded: {gap:.2e}")
    if not args.no_record:
        from benchmarks.common import append_results

        settings = (
            f"Qwen2-shaped random init (hidden {HIDDEN}, 2 layers, vocabulary {VOCAB}), fp32, lengths uniform in the "
            f"ranges, logprobs and entropy with the backward of the logprobs' sum, {args.repeats} interleaved repeats "
            f"after a warm-up, medians; largest logprob difference padding-free vs padded {gap:.1e}."
        )
        append_results(
            "Padding-free logprob pass on a mixed-length batch",
            "python benchmarks/speed/padding_free.py",
            f"{settings}\n\n{table}",
        )


if __name__ == "__main__":
    main()
