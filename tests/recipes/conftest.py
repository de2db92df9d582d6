"""Compose recipe configs the way the command line does, with a small fast model."""

from __future__ import annotations

import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf import config as schemas
from rlhf.config import register_configs
from rlhf.run import resume_config

CONFIG_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "configs"))
SMALL_MODEL = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "logger=quiet",
]
SCHEMAS = {
    "grpo": schemas.GRPOConfig,
    "ppo": schemas.PPOConfig,
    "dpo": schemas.DPOConfig,
    "sft": schemas.SFTConfig,
    "reward_model": schemas.RewardModelConfig,
    "aligndistil": schemas.AlignDistilConfig,
}


def compose_recipe_config(name: str, overrides: list[str]):
    """What `python -m recipes.<name> <overrides>` trains with, `resume=` included (the recipes'
    `recipe_config` does the same from Hydra's record of the command line)."""
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        composed = OmegaConf.to_container(compose(name, overrides=overrides), resolve=True)
        defaults = OmegaConf.to_container(compose(name, overrides=[]), resolve=True)
    return resume_config(SCHEMAS[name], composed, defaults, overrides)[0]


@pytest.fixture()
def make_config(tmp_path):
    def make(name: str, *overrides: str, run_dir: str | None = None):
        resuming = any(o.startswith("resume=") for o in overrides)
        where = [] if resuming and run_dir is None else [f"run_dir={run_dir or tmp_path / name}"]
        return compose_recipe_config(name, [*SMALL_MODEL, *where, *overrides])

    return make
