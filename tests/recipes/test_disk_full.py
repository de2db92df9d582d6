"""A disk that fills up during a save, on a real filesystem (a small tmpfs, so the writers fail as
they do on a full disk: torch.save with "unexpected pos", safetensors with its own error): the run
stops saying the disk is full, with the path and the free space, the partial checkpoint is gone,
the previous one is intact, and the run resumes once there is room. Mounting needs root; without
it the test is skipped with that reason."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from recipes import grpo
from rlhf.checkpoint import CheckpointError, list_checkpoints
from tests.recipes.test_grpo_smoke import FAST, VARIED_REWARD

COMMON = [*FAST, *VARIED_REWARD, "checkpoint.every=2", "eval.every=0", "logger.rollout_samples=0"]
# a model whose files are large beside the run's logs, so the free space is set to the page
MODEL = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128"]
COMMON += MODEL
PAGE = 4096


def _allocated(path: str) -> int:
    """Bytes a file takes on tmpfs (whole pages)."""
    return -(-os.path.getsize(path) // PAGE) * PAGE


@pytest.fixture()
def small_filesystem(tmp_path):
    """A tmpfs mounted under tmp_path; resize it with `.resize(bytes)`."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")

    class Filesystem:
        path = mount_point

        @staticmethod
        def resize(size: int) -> None:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    yield Filesystem
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("runs_out_in", ["engine/engine.pt", "hf/model.safetensors"])
def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so(
    make_config, tmp_path, small_filesystem, runs_out_in
):
    # the sizes of one checkpoint's files, from the same run on an ordinary disk
    reference = grpo.train(make_config("grpo", *COMMON, "train.steps=2", run_dir=str(tmp_path / "reference")))
    checkpoint = reference["checkpoint"]
    others = sum(  # the logs and run files written before the step-4 save (the plot comes last)
        _allocated(os.path.join(reference["run_dir"], name))
        for name in os.listdir(reference["run_dir"])
        if os.path.isfile(os.path.join(reference["run_dir"], name)) and not name.endswith(".png")
    )
    # room for the run's own files, the step-2 checkpoint, and step 4's files written before
    # `runs_out_in` plus half of it (the save writes the engine state first, then the export)
    before = {"engine/engine.pt": [], "hf/model.safetensors": ["engine/engine.pt", "rng-rank0.pt"]}[
        runs_out_in
    ]
    whole = sum(_allocated(os.path.join(root, f)) for root, _, files in os.walk(checkpoint) for f in files)
    room = 2 * others + 16 * 1024 + whole + sum(_allocated(os.path.join(checkpoint, f)) for f in before)
    small_filesystem.resize(room + _allocated(os.path.join(checkpoint, runs_out_in)) // 2)

    cfg = make_config("grpo", *COMMON, "train.steps=4", run_dir=str(small_filesystem.path / "run"))
    with pytest.raises(
        CheckpointError, match=r"the disk is full: saving .*step-000004 failed with [0-9.]+ MiB free"
    ) as error:
        grpo.train(cfg)
    expected_writer = {"engine/engine.pt": "RuntimeError", "hf/model.safetensors": "SafetensorError"}[
        runs_out_in
    ]
    assert expected_writer in str(error.value)
    assert "previous checkpoint is intact" in str(error.value)
    assert sorted(os.listdir(os.path.join(cfg.run_dir, "checkpoints"))) == ["step-000002"]  # no .tmp left

    small_filesystem.resize(room + 2 * whole)  # space freed: the run resumes from step 2
    resumed = grpo.train(make_config("grpo", f"resume={cfg.run_dir}", *MODEL))
    assert (
        resumed["step"] == 4
        and [os.path.basename(c) for c in list_checkpoints(cfg.run_dir)][-1] == "step-000004"
    )


def test_what_a_killed_save_left_is_removed_at_the_next_start(make_config, tmp_path):
    cfg = make_config("grpo", *COMMON, "train.steps=2")
    grpo.train(cfg)
    checkpoints = os.path.join(cfg.run_dir, "checkpoints")
    # a save killed after its staging directory was written, before the manifest (a step the
    # resumed run does not save again, which would clear it on its own)
    shutil.copytree(os.path.join(checkpoints, "step-000002"), os.path.join(checkpoints, "step-000003.tmp"))
    os.remove(os.path.join(checkpoints, "step-000003.tmp", "manifest.json"))
    resumed = grpo.train(make_config("grpo", "train.steps=4", f"resume={cfg.run_dir}", *MODEL))
    assert resumed["step"] == 4
    assert sorted(os.listdir(checkpoints)) == ["step-000002", "step-000004"]
