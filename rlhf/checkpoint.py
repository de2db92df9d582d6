"""Checkpoints: full training state plus a Hugging Face export, written atomically.

Layout: <run_dir>/checkpoints/step-000050/
    hf/                 save_pretrained export (model + tokenizer), loads with from_pretrained;
                        with LoRA the merged model, and adapter/ beside it holds the adapter
    engine/             optimizer and scheduler (DeepSpeed: its ZeRO shards, one set per rank)
    rng-rank{r}.pt      RNG states of every rank
    state.pt            step counters, sampler position, controllers (written last)
Every rank calls `save_checkpoint`. It writes into a staging directory that is renamed into place
only when complete, so a crash during a save leaves the previous checkpoint loadable and no
half-written one ever has a final name. ZeRO checkpoints resume at the same world size.
"""

from __future__ import annotations

import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from rlhf.models.lora import export_pretrained

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
EXPORT_DIR = "hf"
ENGINE_DIR = "engine"


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
    engine: Any,
    tokenizer: Any,
    training_state: dict[str, Any],
    keep_last: int | None = None,
    extra_engines: dict[str, Any] | None = None,
) -> str:
    """Write checkpoint `step` (collective: every rank calls it) and prune beyond `keep_last`.

    `extra_engines` (a PPO critic...) are saved beside the policy as <name>_engine/ and <name>_hf/.
    """
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    final = os.path.join(root, checkpoint_name(step))
    staging = f"{final}.tmp"
    if engine.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    engine.barrier()
    engine.save_state(os.path.join(staging, ENGINE_DIR))
    weights = engine.full_state_dict()  # collective under ZeRO-3
    for name, extra in (extra_engines or {}).items():
        extra.save_state(os.path.join(staging, f"{name}_{ENGINE_DIR}"))
        extra_weights = extra.full_state_dict()
        if engine.is_main:
            export_pretrained(extra.module, extra_weights, os.path.join(staging, f"{name}_{EXPORT_DIR}"))
    torch.save(rng_state(), os.path.join(staging, f"rng-rank{engine.rank}.pt"))
    if engine.is_main:
        export = os.path.join(staging, EXPORT_DIR)
        export_pretrained(engine.module, weights, export)
        tokenizer.save_pretrained(export)
        torch.save(
            {**training_state, "step": step, "world_size": engine.world_size},
            os.path.join(staging, STATE_FILE),
        )
    engine.barrier()
    if engine.is_main:
        if os.path.exists(final):  # re-saving a step after a resume: swap the whole directory
            retired = f"{final}.old"
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
        if keep_last:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return final


def load_checkpoint(
    checkpoint_dir: str, engine: Any, extra_engines: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Restore the engines and this rank's RNG; returns the saved training state."""
    state = torch.load(os.path.join(checkpoint_dir, STATE_FILE), map_location="cpu", weights_only=False)
    saved_world = state.get("world_size", 1)
    if saved_world != engine.world_size:
        raise ValueError(
            f"checkpoint {checkpoint_dir} was written by {saved_world} processes; resume it with {saved_world}, "
            f"not {engine.world_size} (its hf/ export loads at any size)"
        )
    engine.load_state(os.path.join(checkpoint_dir, ENGINE_DIR))
    for name, extra in (extra_engines or {}).items():
        extra.load_state(os.path.join(checkpoint_dir, f"{name}_{ENGINE_DIR}"))
    set_rng_state(torch.load(os.path.join(checkpoint_dir, f"rng-rank{engine.rank}.pt"), weights_only=False))
    return state


def export_dir(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, EXPORT_DIR)
