#!/usr/bin/env bash
# Several nodes with torchrun's rendezvous; run the same command on every node:
#   NNODES=2 NPROC=8 RDZV_HOST=node0 launch/multinode_torchrun.sh grpo distributed=zero3 [overrides...]
set -euo pipefail
recipe=${1:?usage: NNODES=N NPROC=P RDZV_HOST=HOST launch/multinode_torchrun.sh RECIPE [overrides...]}
shift
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec torchrun --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --nnodes "${NNODES:?}" --nproc_per_node "${NPROC:?}" --rdzv_backend c10d \
    --rdzv_endpoint "${RDZV_HOST:?}:${RDZV_PORT:-29500}" --rdzv_id "${RDZV_ID:-rlhf}" -m "recipes.$recipe" "$@"
