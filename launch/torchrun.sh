#!/usr/bin/env bash
# One node, N processes with torchrun:  NPROC=2 launch/torchrun.sh grpo distributed=zero2 [overrides...]
# NPROC defaults to the number of GPUs (or 2 on a CPU machine, where ranks use gloo).
set -euo pipefail
recipe=${1:?usage: NPROC=N launch/torchrun.sh RECIPE [overrides...]}
shift
cd "$(dirname "$0")/.."
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
nproc=${NPROC:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec torchrun --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --standalone --nproc_per_node "$nproc" -m "recipes.$recipe" "$@"
