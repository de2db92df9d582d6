"""Compose recipe configs the way the command line does, with a small fast model."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf.config import register_configs

CONFIG_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
SMALL_MODEL = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "logger=quiet",
]


@pytest.fixture()
def make_config(tmp_path):
    register_configs()

    def make(name: str, *overrides: str, run_dir: str | None = None):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose(name, overrides=[*SMALL_MODEL, f"run_dir={run_dir or tmp_path / name}", *overrides])
        return OmegaConf.to_object(cfg)

    return make
