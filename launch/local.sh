#!/usr/bin/env bash
# Run a recipe in one process on this machine: launch/local.sh grpo [hydra overrides...]
# Hyperparameters belong in configs/, never here.
set -euo pipefail
recipe=${1:?usage: launch/local.sh RECIPE [overrides...]  (RECIPE: sft, grpo)}
shift
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" -m "recipes.$recipe" "$@"
