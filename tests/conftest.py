"""Shared fixtures: offline environment, fixed torch threads, tiny models and tokenizers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm  # noqa: E402

# two threads on these two cores; one per worker when pytest-xdist runs two tests at a time
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


# the slow tiers, by folder: `make test-fast` deselects them (pytest -m "not recipe and ...")
FOLDER_MARKERS = {"recipes": "recipe", "distributed": "distributed", "vllm": "vllm"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        folder = item.path.parent.name
        if folder in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[folder])
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture()
def tiny_llama(tokenizer):
    return build_tiny_causal_lm(
        TinyModelSpec(arch="llama", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
        tokenizer,
        seed=0,
    )


@pytest.fixture()
def tiny_qwen2(tokenizer):
    return build_tiny_causal_lm(
        TinyModelSpec(arch="qwen2", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
        tokenizer,
        seed=0,
    )
