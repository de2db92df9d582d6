#!/usr/bin/env bash
# The GPU measurements of the FlexAttention path, on one H100/H200, in two parts each sized for under
# 10 minutes, an estimate until a GPU has run them (`timing`, then `memory`; no argument runs both):
# - timing: the GRPO update alone (logprob passes, forward and backward, optimizer step), ours
#   against TRL's, at Qwen2-0.5B's shape with prompts of 1k tokens and G=8, then 2k tokens and
#   G=16, and at Qwen2-1.5B's shape with 2k tokens and G=16 (activation checkpointing on both
#   sides). Each line prints its table (s/update, TRL / ours, peak GiB of the update) and the
#   update's tokens/s and MFU.
# - memory: the largest G that trains at prompt 2k on one GPU, TRL against ours (chunked logprob
#   pass, activation checkpointing on both sides), G doubled from 16 up to 256.
# 256 new tokens, bf16 mixed precision, HF generate on both sides; every table is appended to
# benchmarks/RESULTS.md with its command. Needs the project's Python dependencies (no vLLM) on a
# CUDA machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
PART=${1:-all}
case "$PART" in timing | memory | all) ;; *) echo "usage: $0 [timing|memory|all]" >&2; exit 2 ;; esac
BEST="ours shared prefix + padding-free + chunked, flex"
SIDES=(TRL "ours padded" "ours shared prefix + padding-free + chunked" "$BEST")
run() {
    "$PYTHON" benchmarks/speed/real_size.py --device cuda --recipes grpo --timing update --prompts 1 \
        --new-tokens 256 "$@"
}
if [[ "$PART" != memory ]]; then
    run --steps 3 --repeats 1 --sides "${SIDES[@]}" --shape qwen2-0.5b --prompt-lengths 1024 1024 --group 8
    run --steps 3 --repeats 1 --sides "${SIDES[@]}" --shape qwen2-0.5b --prompt-lengths 2048 2048 --group 16
    run --steps 3 --repeats 1 --sides "${SIDES[@]}" --shape qwen2-1.5b --prompt-lengths 2048 2048 --group 16 \
        --gradient-checkpointing
fi
if [[ "$PART" != timing ]]; then
    run --sides TRL "$BEST" --shape qwen2-0.5b --prompt-lengths 2048 2048 --gradient-checkpointing \
        --largest-group 16 256
fi
