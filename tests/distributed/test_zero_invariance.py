"""Data-parallel invariance on 2 CPU ranks (gloo): ZeRO-2 and ZeRO-3 make the single-process update.

One optimizer step of GRPO (fixed rollout) and of SFT (real recipe) with 2 ranks, each on half the
batch, must give the parameters one process computes on the whole batch; and a gradient-
accumulation split must give the same as none.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
WORKER = os.path.join(ROOT, "tests", "distributed", "grpo_update_worker.py")
# Adam's first step is lr * g / (|g| + eps): with eps=1 it is ~g, linear in the gradient, so a wrong
# gradient scale (a missing or doubled world-size factor) changes the result.
LINEAR_ADAM = ["optim.lr=1.0", "optim.eps=1.0", "optim.max_grad_norm=null"]
SMALL = [
    "model.tiny.hidden_size=32",
    "model.tiny.num_layers=2",
    "model.tiny.num_heads=2",
    "model.tiny.intermediate_size=64",
    "logger=quiet",
]


def _env() -> dict[str, str]:
    env = dict(
        os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1"
    )
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={_free_port()}",
        *args,
    ]
    done = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def single(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


GRPO_SINGLE: list[str] = []  # the single-process run's output path, for its metrics


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        # fp32 sums in a different order (reduce-scatter vs one process): float rounding only
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def grpo_reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo") / "single.pt"
    single([WORKER, str(path), "single", "8"])
    GRPO_SINGLE[:] = [str(path)]
    return torch.load(path)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_grpo_step_two_ranks_equals_one_process(stage, grpo_reference, tmp_path):
    out = tmp_path / f"{stage}.pt"
    torchrun([WORKER, str(out), stage, "2"])  # 2 ranks x 2 micro-batches of 2 rows
    _assert_same_weights(torch.load(out), grpo_reference)
    # the logged token means are the whole step's (the ranks hold different token counts), not the
    # mean of each rank's mean
    two, one = (json.loads(open(f"{p}.metrics.json").read()) for p in (out, GRPO_SINGLE[0]))
    for key in ("kl/mean", "entropy", "ratio/mean", "loss/policy_token_mean"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key


def test_top_entropy_quantile_is_taken_over_both_ranks(tmp_path):
    """The 80/20 mask's threshold is the quantile of the micro-batch's tokens on every rank (TRL's
    rule): 2 ranks with 4 rows each make the update of one process with all 8 rows in one
    micro-batch. A threshold per rank keeps other tokens, and another update."""
    single([WORKER, str(tmp_path / "one.pt"), "single", "8", "token_mean", "0.5"])
    torchrun([WORKER, str(tmp_path / "two.pt"), "zero2", "4", "token_mean", "0.5"])
    _assert_same_weights(torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt"))


def test_grpo_accumulation_split_equals_none(grpo_reference, tmp_path):
    out = tmp_path / "split.pt"
    single([WORKER, str(out), "single", "2"])
    _assert_same_weights(torch.load(out), grpo_reference)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_sft_step_two_ranks_equals_one_process(stage, tmp_path):
    common = [
        *SMALL,
        "train.steps=1",
        "train.batch_size=16",
        "train.check_every=0",
        "eval.num_samples=8",
        "optim.warmup_steps=0",
        *LINEAR_ADAM,
    ]
    single(["-m", "recipes.sft", *common, "train.micro_batch_size=16", f"run_dir={tmp_path / 'one'}"])
    torchrun(
        [
            "-m",
            "recipes.sft",
            *common,
            f"distributed={stage}",
            "train.micro_batch_size=4",
            f"run_dir={tmp_path / 'two'}",
        ]
    )
    one = AutoModelForCausalLM.from_pretrained(
        tmp_path / "one" / "checkpoints" / "step-000001" / "hf"
    ).state_dict()
    two = AutoModelForCausalLM.from_pretrained(
        tmp_path / "two" / "checkpoints" / "step-000001" / "hf"
    ).state_dict()
    _assert_same_weights(two, one)
