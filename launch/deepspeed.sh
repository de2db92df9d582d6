#!/usr/bin/env bash
# One node with the deepspeed launcher:  NPROC=2 launch/deepspeed.sh grpo distributed=zero3 [overrides...]
set -euo pipefail
recipe=${1:?usage: NPROC=N launch/deepspeed.sh RECIPE [overrides...]}
shift
cd "$(dirname "$0")/.."
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
nproc=${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec deepspeed --num_gpus "$nproc" --module "recipes.$recipe" "$@"
