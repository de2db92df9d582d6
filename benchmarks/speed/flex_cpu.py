"""The logprob pass on CPU with FlexAttention against SDPA, for each packed layout, without gradient.

torch 2.13 has no FlexAttention backward on CPU, so on CPU the flex path can serve only passes
without gradient (old-policy and reference logprobs, values, rewards); training there keeps SDPA
(the engine refuses flex). This measures whether flex would at least speed those passes up: a
GRPO-like batch (prompts repeated G times, responses of mixed lengths) through a random-init
Qwen2-shaped model (hidden 256, 2 layers, vocabulary 32000), response logprobs without gradient,
for the padded batch (SDPA only), padding-free rows, the shared prefix and both, each with SDPA
and with flex. Kernels are compiled in a warm-up pass; sides interleaved, 5 repeats, medians.

Usage: python benchmarks/speed/flex_cpu.py [--prompts 2] [--group 8] [--prompt 256 512]
       [--response 16 128] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.common import append_results, median_range  # noqa: E402

HIDDEN, VOCAB = 256, 32000


def grpo_batch(prompts: int, group: int, prompt: tuple[int, int], response: tuple[int, int], seed: int = 0):
    """Left-padded prompts, each repeated `group` times; right-padded responses of mixed lengths."""
    generator = torch.Generator().manual_seed(seed)
    prompt_lengths = torch.randint(prompt[0], prompt[1] + 1, (prompts,), generator=generator)
    response_lengths = torch.randint(response[0], response[1] + 1, (prompts * group,), generator=generator)
    width, length = int(prompt_lengths.max()), int(response_lengths.max())
    prompt_ids = torch.randint(0, VOCAB, (prompts, width), generator=generator).repeat_interleave(group, 0)
    starts = (width - prompt_lengths).repeat_interleave(group)
    prompt_mask = torch.arange(width)[None] >= starts[:, None]
    response_ids = torch.randint(0, VOCAB, (prompts * group, length), generator=generator)
    response_mask = torch.arange(length)[None] < response_lengths[:, None]
    return prompt_ids, prompt_mask, response_ids, response_mask


def model(attention: str):
    """padding_free.py's model (hidden 256, 2 layers, vocabulary 32000) with `attention` over the
    packed layouts."""
    from benchmarks.speed.padding_free import _model
    from rlhf.models.shared_prefix import shared_prefix_attention

    net = _model(4096)
    net.set_attn_implementation(shared_prefix_attention(attention))
    return net.eval()


def main() -> None:
    from rlhf.models.forward import response_logprobs
    from rlhf.models.options import ForwardOptions

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt", type=int, nargs=2, default=[256, 512])
    parser.add_argument("--response", type=int, nargs=2, default=[16, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    batch = grpo_batch(args.prompts, args.group, tuple(args.prompt), tuple(args.response))
    models = {"sdpa": model("sdpa"), "flex": model("flex_attention")}
    layouts = {
        "padding-free": ForwardOptions(padding_free=True),
        "shared prefix": ForwardOptions(shared_prefix=True),
        "shared prefix + padding-free": ForwardOptions(shared_prefix=True, padding_free=True),
    }
    sides = {("padded", "sdpa"): (models["sdpa"], ForwardOptions())}
    for layout, options in layouts.items():
        for attention in ("sdpa", "flex"):
            sides[(layout, attention)] = (models[attention], options)
    times: dict[tuple[str, str], list[float]] = {side: [] for side in sides}
    with torch.no_grad():
        reference = response_logprobs(models["sdpa"], *batch)[0]
        for side, (net, options) in sides.items():  # warm-up: compiles the flex kernels
            error = (response_logprobs(net, *batch, options)[0] - reference)[batch[3]].abs().max()
            assert error < 1e-4, (side, float(error))
        for _ in range(args.repeats):
            for side, (net, options) in sides.items():
                started = time.perf_counter()
                response_logprobs(net, *batch, options)
                times[side].append(time.perf_counter() - started)
    padded = statistics.median(times[("padded", "sdpa")])
    lines = [
        f"{args.prompts} prompts of {args.prompt[0]}-{args.prompt[1]} tokens x G={args.group}, responses of "
        f"{args.response[0]}-{args.response[1]} tokens; logprob pass without gradient:",
        "",
        "| layout | attention | s/pass (median, range) | padded SDPA / side | SDPA / flex, same layout |",
        "|---|---|---|---|---|",
    ]
    for (layout, attention), found in times.items():
        same = statistics.median(times[(layout, "sdpa")]) / statistics.median(found)
        lines.append(
            f"| {layout} | {attention} | {median_range(found)} | {padded / statistics.median(found):.2f}x | "
            f"{same:.2f}x |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.no_record:
        command = "python benchmarks/speed/flex_cpu.py " + " ".join(sys.argv[1:])
        append_results("FlexAttention against SDPA on CPU, logprob pass without gradient", command, body)


if __name__ == "__main__":
    main()
