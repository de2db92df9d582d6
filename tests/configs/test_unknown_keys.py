"""Unknown keys on the command line are refused before anything starts, with or without Hydra's `+`
(which Hydra accepts and the schema then drops), naming the nearest real key or TRL's name for it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rlhf.config import AlignDistilConfig, ConfigError, DPOConfig, GRPOConfig, PPOConfig, SFTConfig
from rlhf.overrides import check_command_line

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIG_DIR = os.path.join(ROOT, "configs")


@pytest.mark.parametrize("prefix", ["", "+", "++"])
def test_trl_names_are_refused_with_ours(prefix):
    with pytest.raises(ConfigError, match="TRL's num_generations is rollout.group_size here"):
        check_command_line(GRPOConfig, [f"{prefix}rollout.num_generations=8"], CONFIG_DIR)
    with pytest.raises(ConfigError, match="TRL's learning_rate is optim.lr"):
        check_command_line(DPOConfig, [f"{prefix}learning_rate=1e-6"], CONFIG_DIR)


def test_a_misspelt_key_names_the_nearest_real_one():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'rollout.group_sise'.*did you mean rollout.group_size"
    ):
        check_command_line(GRPOConfig, ["rollout.group_sise=4"], CONFIG_DIR)
    with pytest.raises(ConfigError, match="did you mean model.lora.alpha"):
        check_command_line(SFTConfig, ["+lora.alpha=8"], CONFIG_DIR)  # a field of another section


@pytest.mark.parametrize("schema", [GRPOConfig, PPOConfig, DPOConfig, SFTConfig, AlignDistilConfig])
def test_real_keys_groups_and_hydra_flags_pass(schema):
    check_command_line(
        schema,
        ["-m", "--cfg", "job", "seed=1,2", "model=pretrained", "+experiment=grpo_dapo", "hydra.run.dir=x"]
        + ["model.lora.target_modules=[q_proj,v_proj]", "optim.lr=1e-5", "resume=runs/x", "~logger"],
        CONFIG_DIR,
    )
    check_command_line(
        GRPOConfig, ["loss=gspo", "loss.args.cispo.max_weight=2", "rollout.vllm.max_model_len=64"], CONFIG_DIR
    )


def test_the_recipe_refuses_before_anything_starts(tmp_path):
    """Following Hydra's own hint (+key=value) used to start a default run with the key dropped."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "recipes.grpo",
            "+rollout.num_generations=8",
            f"run_dir={run_dir}",
        ],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "TRL's num_generations is rollout.group_size here" in done.stderr, done.stderr[-2000:]
    assert not run_dir.exists()
    # refused before the recipe's heavy imports: only the config schemas (and torch) were loaded
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "torch" in imported and not {"transformers", "deepspeed", "hydra", "datasets"} & imported
