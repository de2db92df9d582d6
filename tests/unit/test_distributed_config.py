"""DeepSpeed config generation, the import boundary of rlhf/distributed, and resume world size."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest
import torch

from rlhf.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from rlhf.config import ConfigError, DistributedConfig, OptimConfig
from rlhf.distributed.deepspeed_engine import deepspeed_config
from rlhf.distributed.engine import SingleProcessEngine, build_engine
from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_generated_config_follows_our_fields():
    config = deepspeed_config(
        DistributedConfig(backend="deepspeed", zero_stage=3, offload_optimizer=True, offload_params=True),
        OptimConfig(max_grad_norm=0.5),
        micro_batch_size=4,
    )
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["gradient_clipping"] == 0.5 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["managed_gradient_accumulation"] is False


def test_no_clipping_is_explicit():
    """DeepSpeed clips at 1.0 by default; max_grad_norm=None must turn that off."""
    config = deepspeed_config(
        DistributedConfig(backend="deepspeed", zero_stage=2), OptimConfig(max_grad_norm=None), 1
    )
    assert config["gradient_clipping"] == 0.0


def test_raw_json_is_merged_over(tmp_path):
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123}, "gradient_clipping": 2.0}))
    config = deepspeed_config(
        DistributedConfig(backend="deepspeed", zero_stage=2, deepspeed_config=str(raw)), OptimConfig(), 1
    )
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 123}
    assert config["gradient_clipping"] == 2.0


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(zero_stage=4), "distributed.zero_stage=4 is not one of \\[0, 1, 2, 3\\]"),
        (dict(zero_stage=2, offload_params=True), "offload_params needs"),
        (dict(zero_stage=0, offload_optimizer=True), "offload_optimizer needs"),
    ],
)
def test_impossible_combinations_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(DistributedConfig(backend="deepspeed", **fields), OptimConfig(), 1)


def test_single_backend_refuses_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="distributed=zero1, zero2 or zero3"):
        build_engine(torch.nn.Linear(2, 2), OptimConfig(), DistributedConfig(), 1)


def test_resume_at_another_world_size_is_refused(tmp_path):
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(
        TinyModelSpec(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16), tokenizer
    )
    engine = SingleProcessEngine(model, OptimConfig(), 1, torch.device("cpu"))
    path = save_checkpoint(str(tmp_path), 1, engine, tokenizer, {"sampler": {}})
    state = torch.load(f"{path}/state.pt", weights_only=False)
    torch.save({**state, "world_size": 2}, f"{path}/state.pt")
    with pytest.raises(CheckpointError, match="written by 2 processes; resume it with 2"):
        load_checkpoint(path, engine)


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_distributed_package_imports_deepspeed_or_torch_distributed():
    offenders = []
    for folder in ("rlhf", "recipes", "rewards"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.is_relative_to(ROOT / "rlhf" / "distributed"):
                continue
            bad = {
                n
                for n in _imports(path)
                if n.split(".")[0] == "deepspeed" or n.startswith("torch.distributed")
            }
            if bad:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(bad)}")
    assert not offenders, offenders


def test_process_group_is_destroyed_at_exit():
    """A gloo group left alive into interpreter teardown can abort a finished run (SIGABRT)."""
    import subprocess
    import sys

    script = (
        "import atexit, torch.distributed as dist\n"
        "from rlhf.distributed.env import init_process_group\n"
        # registered first, so it runs after the handler init_process_group registers
        "atexit.register(lambda: print('alive at exit:', dist.is_initialized()))\n"
        "init_process_group(always=True)\n"
        "assert dist.is_initialized()\n"
    )
    env = {"PATH": "", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "alive at exit: False" in done.stdout
