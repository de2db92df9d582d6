"""Checkpoints: full training state plus a Hugging Face export, written atomically.

Layout: <run_dir>/checkpoints/step-000050/{hf/ (save_pretrained: model + tokenizer), state.pt}.
A checkpoint is written into a temporary sibling directory and renamed into place only when it is
complete, so a crash during a save leaves the previous checkpoint loadable; a half-written one
never has the final name. `state.pt` holds the engine state (optimizer, scheduler), the RNG states,
the data sampler position and the step counters.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
EXPORT_DIR = "hf"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and "." not in n)
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, STATE_FILE))]


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from a checkpoint path or a run directory (its latest checkpoint)."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"resume={path!r}: no complete checkpoint there (looked for {CHECKPOINT_DIR}/step-*/{STATE_FILE})"
        )
    return found[-1]


def save_checkpoint(
    run_dir: str,
    step: int,
    model: torch.nn.Module,
    tokenizer: Any,
    training_state: dict[str, Any],
    keep_last: int | None = None,
) -> str:
    """Write checkpoint `step` atomically and prune older ones beyond `keep_last`."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, checkpoint_name(step))
    staging = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    model.save_pretrained(os.path.join(staging, EXPORT_DIR), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(staging, EXPORT_DIR))
    torch.save({**training_state, "step": step, "rng": rng_state()}, os.path.join(staging, STATE_FILE))
    if os.path.exists(final):  # re-saving the same step (a resumed run): replace it whole
        retired = f"{final}.old-{os.getpid()}"
        os.replace(final, retired)
        os.replace(staging, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, final)
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(checkpoint_dir: str) -> dict[str, Any]:
    """The saved training state; restores the RNG states as a side effect."""
    state = torch.load(os.path.join(checkpoint_dir, STATE_FILE), map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    return state


def export_dir(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, EXPORT_DIR)
