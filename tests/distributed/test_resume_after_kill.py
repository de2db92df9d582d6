"""Exact resume: SIGKILL a 2-rank ZeRO-2 GRPO run after a checkpoint, resume it, and get the same
metrics for the following steps as an uninterrupted run (across an epoch boundary of the data)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlhf.checkpoint import list_checkpoints
from rlhf.loggers import read_metrics
from tests.distributed.test_zero_invariance import ROOT, SMALL, _env, _free_port, torchrun


def _args(run_dir, data) -> list[str]:
    return [
        "-m",
        "recipes.grpo",
        *SMALL,
        "distributed=zero2",
        f"run_dir={run_dir}",
        f"data.source={data}",
        "data.eval_split=null",
        "reward.functions=[{name: 'tests.distributed.slow_reward:slow_exact_match', weight: 1.0}]",
        "reward.accuracy_reward=null",
        "train.prompts_per_step=4",
        "rollout.group_size=2",
        "rollout.max_new_tokens=4",
        "train.micro_batch_size=2",
        "train.num_minibatches=2",
        "train.steps=10",
        "checkpoint.every=3",
        "checkpoint.keep_last=5",
        "optim.lr=1e-2",
    ]


@pytest.fixture()
def tiny_dataset(tmp_path):
    path = tmp_path / "six.jsonl"  # 6 prompts, 4 per step: every step after the first crosses an epoch
    rows = [
        {"prompt": f"{a}{b}+{b}{a}=", "answer": f"{(a + b) % 10}{(a + b) % 10}0"}
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 0), (4, 4)]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_dataset):
    straight = tmp_path / "straight"
    torchrun(_args(straight, tiny_dataset))

    killed = tmp_path / "killed"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        *_args(killed, tiny_dataset),
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not list_checkpoints(str(killed)) and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)  # the whole job dies at once, like a lost node
    process.wait()
    saved = list_checkpoints(str(killed))
    assert saved and saved[-1].endswith("step-000003"), saved
    done = [r["step"] for r in read_metrics(str(killed)) if "loss" in r]
    assert max(done) < 10, "the run finished before it was killed; nothing was tested"

    torchrun(_args(killed, tiny_dataset) + [f"resume={killed}"])
    expected = {r["step"]: r for r in read_metrics(str(straight)) if "loss" in r}
    resumed = {r["step"]: r for r in read_metrics(str(killed)) if "loss" in r}
    for step in range(4, 11):
        for key in ("loss", "reward/mean", "ratio/mean", "optim/grad_norm", "response/length_mean"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-6), (step, key)
