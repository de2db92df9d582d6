"""What every resume and preemption test checks beyond its logged metrics: the runs learned (non-zero
gradients, so a resume that loads nothing cannot match by accident), the resumed start began at the
checkpoint and trained each remaining step once, and the final checkpoint's whole training state
(weights, optimizer moments, scheduler, sampler, controllers, RNG states) equals the uninterrupted
run's."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from rlhf.loggers import read_metrics

NOT_COMPARED = {"elapsed_s"}  # wall-clock seconds differ between any two runs


def checkpoint_tensors(checkpoint: str) -> dict[str, torch.Tensor]:
    """Every tensor and number of a checkpoint's .pt files (each rank's ZeRO shards included),
    keyed by file and path inside it."""
    values: dict[str, torch.Tensor] = {}
    for root, _, files in os.walk(checkpoint):
        for name in sorted(files):
            if name.endswith(".pt"):
                path = os.path.join(root, name)
                state = torch.load(path, map_location="cpu", weights_only=False)
                _flatten(state, os.path.relpath(path, checkpoint), values)
    return values


def _flatten(value: Any, key: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out[key] = value.detach().float() if value.is_floating_point() else value.detach()
    elif isinstance(value, np.ndarray):
        out[key] = torch.from_numpy(value.copy())
    elif isinstance(value, dict):
        for name, item in value.items():
            if name not in NOT_COMPARED:
                _flatten(item, f"{key}/{name}", out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _flatten(item, f"{key}/{index}", out)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[key] = torch.tensor(float(value), dtype=torch.float64)


def assert_same_training_state(checkpoint: str, expected: str, rel: float = 0.0) -> None:
    """The checkpoint's training state equals `expected`'s: exactly by default, or within `rel`
    (where ranks sum gradients in bucket orders that may differ)."""
    got, want = checkpoint_tensors(checkpoint), checkpoint_tensors(expected)
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    assert any("exp_avg" in key for key in got), "no optimizer moments in the checkpoint"
    differing = [
        key
        for key in want
        if got[key].shape != want[key].shape
        or not (
            torch.equal(got[key], want[key])
            if rel == 0.0
            # `rel` only where a caller says why exact equality cannot hold (2 ranks: DeepSpeed sums
            # gradients in bucket orders that may differ, measured within 1e-5; vLLM: a restarted
            # engine's logprobs differ in the last float bits, 1e-4); atol 1e-7 covers Adam's second
            # moments, which sit near 1e-10 where a relative bound means nothing
            else torch.allclose(got[key].double(), want[key].double(), rtol=rel, atol=1e-7)
        )
    ]
    assert not differing, f"{len(differing)} of {len(want)} values differ, e.g. {differing[:5]}"


def assert_resumed_at(run_dir: str, step: int, last_step: int) -> None:
    """The last start of the run resumed from its step-`step` checkpoint, and steps 1..last_step
    are each in the metrics once."""
    with open(os.path.join(run_dir, "run.json")) as handle:
        start = json.load(handle)["starts"][-1]
    assert start["step"] == step and str(start["resumed_from"]).endswith(f"step-{step:06d}"), start
    trained = [row["step"] for row in read_metrics(run_dir) if "loss" in row]
    assert trained == list(range(1, last_step + 1)), trained


def assert_learned(run_dir: str, steps: list[int]) -> None:
    """Gradients were non-zero at `steps`: a run that learns nothing matches any resume."""
    norms = {row["step"]: row.get("optim/grad_norm", 0.0) for row in read_metrics(run_dir) if "loss" in row}
    assert all(norms[step] > 1e-6 for step in steps), norms


def assert_resume_matches(straight: dict, resumed: dict, step: int, last_step: int, rel: float = 0.0) -> None:
    """A run resumed from its step-`step` checkpoint to `last_step` (`resumed`, a recipe's result)
    ends in the uninterrupted run's training state, having learned on the way."""
    assert_learned(straight["run_dir"], list(range(step + 1, last_step + 1)))
    assert_resumed_at(resumed["run_dir"], step, last_step)
    assert_same_training_state(resumed["checkpoint"], straight["checkpoint"], rel)
