#!/usr/bin/env bash
# Several nodes with the deepspeed launcher and a hostfile ("host slots=8" per line), run on the
# first host; it starts the others over ssh:
#   HOSTFILE=hosts.txt launch/multinode_deepspeed.sh grpo distributed=zero3 [overrides...]
set -euo pipefail
recipe=${1:?usage: HOSTFILE=FILE launch/multinode_deepspeed.sh RECIPE [overrides...]}
shift
hostfile=${HOSTFILE:?set HOSTFILE to a DeepSpeed hostfile}
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" --module "recipes.$recipe" "$@"
