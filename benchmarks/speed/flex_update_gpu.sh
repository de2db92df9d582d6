#!/usr/bin/env bash
# The GPU measurements of the FlexAttention path, in one run of under 10 minutes on one H100/H200:
# the GRPO update alone (logprob passes, forward and backward, optimizer step), ours against TRL's,
# at Qwen2-0.5B's shape with prompts of 1k tokens and G=8, then 2k tokens and G=16, and at
# Qwen2-1.5B's shape with 2k tokens and G=16 (activation checkpointing on both sides); 256 new
# tokens, bf16 mixed precision, HF generate on both sides. Each line prints its table (s/update,
# TRL / ours, peak GiB of the update) and the update's tokens/s and MFU, and appends it to
# benchmarks/RESULTS.md. Needs the project's Python dependencies (no vLLM) on a CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
SIDES=(TRL "ours padded" "ours shared prefix + padding-free + chunked" "ours shared prefix + padding-free + chunked, flex")
run() {
    "$PYTHON" benchmarks/speed/real_size.py --device cuda --recipes grpo --timing update --prompts 1 \
        --new-tokens 256 --steps 3 --repeats 1 --sides "${SIDES[@]}" "$@"
}
run --shape qwen2-0.5b --prompt-lengths 1024 1024 --group 8
run --shape qwen2-0.5b --prompt-lengths 2048 2048 --group 16
run --shape qwen2-1.5b --prompt-lengths 2048 2048 --group 16 --gradient-checkpointing
