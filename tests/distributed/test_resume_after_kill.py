"""Faults on 2 CPU ranks: a killed job resumes exactly (torchrun and the deepspeed launcher), SIGTERM
saves a checkpoint on every rank and exits with the preemption code, a hung rank ends the job.

Both launchers start their workers in process groups of their own, so killing the launcher's
group leaves the workers training: the tests kill every process of the job and check that none
is left before resuming.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from rlhf.checkpoint import list_checkpoints
from rlhf.loggers import read_metrics
from rlhf.run import PREEMPTED_EXIT_CODE
from tests.distributed.test_zero_invariance import ROOT, SMALL, _env, _free_port, torchrun
from tests.resume_checks import assert_learned, assert_resumed_at, assert_same_training_state

COMPARED = ("loss", "reward/mean", "ratio/mean", "optim/grad_norm", "response/length_mean")


def _args(run_dir, data, steps: int = 10) -> list[str]:
    return [
        *SMALL,
        "distributed=zero2",
        f"run_dir={run_dir}",
        f"data.source={data}",
        "data.eval_split=null",
        "reward.functions=[{name: 'tests.distributed.slow_reward:slow_digit_sum', weight: 1.0}]",
        "reward.accuracy_reward=null",
        "train.prompts_per_step=4",
        "rollout.group_size=2",
        "rollout.max_new_tokens=4",
        "train.micro_batch_size=2",
        "train.num_minibatches=2",
        f"train.steps={steps}",
        "checkpoint.every=3",
        "checkpoint.keep_last=5",
        "optim.lr=1e-2",
    ]


def _torchrun(args: list[str]) -> list[str]:
    port = f"--master_port={_free_port()}"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        port,
        "-m",
        "recipes.grpo",
        *args,
    ]


def _deepspeed(args: list[str]) -> list[str]:
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [
        launcher,
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        "--module",
        "recipes.grpo",
        *args,
    ]


LAUNCHERS = {"torchrun": _torchrun, "deepspeed": _deepspeed}


def _start(command: list[str], log) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def _job(process: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and every process it started, however they were grouped."""
    root = psutil.Process(process.pid)
    return [root, *root.children(recursive=True)]


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _wait_for_workers(process: subprocess.Popen, count: int = 2) -> list[psutil.Process]:
    deadline = time.time() + 120
    while time.time() < deadline:
        job = _job(process)
        if sum("recipes.grpo" in " ".join(p.cmdline()) for p in job[1:]) >= count:
            return job
        time.sleep(0.2)
    raise AssertionError("the job's workers did not start")


def _six_prompts(path):
    """6 prompts, 4 per step: every step after the first crosses an epoch of the data."""
    rows = [
        {"prompt": f"{a}{b}+{b}{a}=", "answer": f"{(a + b) % 10}{(a + b) % 10}0"}
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 0), (4, 4)]
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The uninterrupted 10-step run every fault test compares against."""
    directory = tmp_path_factory.mktemp("straight")
    data = _six_prompts(directory / "six.jsonl")
    torchrun(["-m", "recipes.grpo", *_args(directory / "run", data)])
    assert_learned(str(directory / "run"), list(range(1, 11)))
    rows = {r["step"]: r for r in read_metrics(str(directory / "run")) if "loss" in r}
    return rows, data, str(directory / "run")


def _assert_continues(run_dir, straight_run, first_step: int) -> None:
    """The resumed job began at `first_step`, its metrics and its final training state (both ranks'
    weights and optimizer shards, samplers, RNG) equal the uninterrupted job's."""
    expected, _, straight_dir = straight_run
    assert_resumed_at(str(run_dir), first_step - 1, 10)
    resumed = {r["step"]: r for r in read_metrics(str(run_dir)) if "loss" in r}
    for step in range(first_step, 11):
        for key in COMPARED:
            # gloo sums the two ranks' gradients in the same order every run; the tolerance covers
            # only the sum order inside DeepSpeed's flattened buckets
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert_same_training_state(
        list_checkpoints(str(run_dir))[-1], list_checkpoints(straight_dir)[-1], rel=1e-5
    )


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sigkill_of_the_whole_job_then_resume_matches_uninterrupted(tmp_path, straight_run, launcher):
    data = straight_run[1]
    killed = tmp_path / "killed"
    with open(tmp_path / "log.txt", "w") as log:
        process = _start(LAUNCHERS[launcher](_args(killed, data)), log)
        job = _wait_for_workers(process)
        deadline = time.time() + 300
        while not list_checkpoints(str(killed)) and time.time() < deadline and process.poll() is None:
            time.sleep(0.1)
        job = _job(process)  # every process at the moment of the kill, like a lost node
        for member in job:
            try:
                member.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        process.wait()
        psutil.wait_procs(job, timeout=10)
    assert not _alive(job), f"still running after the kill: {[p.pid for p in _alive(job)]}"
    saved = list_checkpoints(str(killed))
    assert saved and saved[-1].endswith("step-000003"), saved
    assert max(r["step"] for r in read_metrics(str(killed)) if "loss" in r) < 10, "finished before the kill"

    torchrun(["-m", "recipes.grpo", f"resume={killed}"])  # the run's saved config does the rest
    _assert_continues(killed, straight_run, 4)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sigterm_saves_on_every_rank_and_exits_with_the_preemption_code(tmp_path, straight_run, launcher):
    """SIGTERM reaches the workers, they finish the step, save one checkpoint together and exit with
    PREEMPTED_EXIT_CODE; the resumed run matches the uninterrupted one. torchrun forwards the
    signal itself; DeepSpeed's single-node `deepspeed` command does not (its runner installs no
    handler there), so the test signals every process of that job, as SLURM and Kubernetes do."""
    data = straight_run[1]
    run_dir = tmp_path / "preempted"
    with open(tmp_path / "log.txt", "w") as log:
        process = _start(LAUNCHERS[launcher](_args(run_dir, data)), log)
        _wait_for_workers(process)
        deadline = time.time() + 300
        while not any("loss" in r for r in _rows(run_dir)) and time.time() < deadline:
            time.sleep(0.1)
        job = _job(process)
        for member in job[:1] if launcher == "torchrun" else job:
            member.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        psutil.wait_procs(job, timeout=120)  # the workers, which may outlive the launcher's own exit
    assert not _alive(job)
    output = (tmp_path / "log.txt").read_text()
    assert process.returncode != 0  # the launcher reports the workers' non-zero exit
    assert f"exiting with code {PREEMPTED_EXIT_CODE}" in output, output[-3000:]
    saved = list_checkpoints(str(run_dir))
    stopped_at = max(r["step"] for r in _rows(run_dir) if "loss" in r)
    assert stopped_at < 10 and saved[-1].endswith(f"step-{stopped_at:06d}"), (saved, stopped_at)
    assert sorted(os.listdir(saved[-1])).count("rng-rank1.pt") == 1  # rank 1 wrote its part too

    torchrun(["-m", "recipes.grpo", f"resume={run_dir}"])
    _assert_continues(run_dir, straight_run, stopped_at + 1)


def _rows(run_dir) -> list[dict]:
    return read_metrics(str(run_dir)) if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) else []


def test_a_hung_rank_ends_the_job_within_the_timeout(tmp_path):
    """Rank 1 stops answering in its second step; rank 0's next collective times out after
    distributed.timeout_s and the launcher ends the job instead of waiting forever."""
    args = [
        *_args(tmp_path / "hung", _six_prompts(tmp_path / "six.jsonl"), steps=50),
        "reward.functions=[{name: 'tests.distributed.slow_reward:hangs_on_rank_1', weight: 1.0}]",
        "distributed.timeout_s=10",
    ]
    started = time.time()
    with open(tmp_path / "log.txt", "w") as log:
        process = _start(LAUNCHERS["torchrun"](args), log)
        job = _wait_for_workers(process)
        try:
            code = process.wait(timeout=240)
        finally:
            for member in _alive(job):
                member.kill()
    elapsed = time.time() - started
    output = (tmp_path / "log.txt").read_text()
    assert code != 0 and elapsed < 150, (code, elapsed, output[-3000:])
    assert "timed out" in output.lower() or "timeout" in output.lower(), output[-3000:]
    assert not _alive(job)
