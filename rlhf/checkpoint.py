"""Checkpoints: full training state plus a Hugging Face export, complete only when a manifest says so.

Layout: <run_dir>/checkpoints/step-000050/
    hf/                 save_pretrained export (model + tokenizer), loads with from_pretrained;
                        with LoRA the merged model, and adapter/ beside it holds the adapter
    engine/             optimizer and scheduler (DeepSpeed: its ZeRO shards, one set per rank)
    rng-rank{r}.pt      RNG states of every rank
    state.pt            step counters, sampler position, controllers
    manifest.json       every other file with its size and SHA-256, the step and the world size;
                        written last: a directory without it is not a checkpoint
Every rank calls `save_checkpoint`. It writes into a staging directory that is renamed into place
only when complete. A write that fails on any rank (a full disk, say) removes the staging directory
on every rank and raises `CheckpointError` naming the directory, so the previous checkpoint stays the
newest loadable one. `find_resumable` skips an incomplete or corrupt newest checkpoint of a run with a
warning; a corrupt checkpoint named explicitly is an error naming the file. ZeRO checkpoints resume at
the same world size.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlhf.models.lora import export_pretrained

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.pt"
EXPORT_DIR = "hf"
ENGINE_DIR = "engine"
MANIFEST_FILE = "manifest.json"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE_BYTES = 16 * 2**20  # a write that fails with less free than this ran out of space


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the directory or file."""


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


def checkpoint_step(checkpoint_dir: str) -> int:
    return int(os.path.basename(os.path.normpath(checkpoint_dir)).split("-")[1])


def _step_dirs(run_dir: str) -> list[str]:
    """Every step-NNNNNN directory of a run, complete or not, oldest first."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and "." not in n)
    return [os.path.join(root, n) for n in names]


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoints of a run whose manifest was written, oldest first (contents not verified)."""
    return [d for d in _step_dirs(run_dir) if os.path.isfile(os.path.join(d, MANIFEST_FILE))]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_under(directory: str) -> list[str]:
    found = []
    for root, _, names in os.walk(directory):
        found += [os.path.relpath(os.path.join(root, n), directory) for n in names]
    return sorted(found)


def write_manifest(directory: str, step: int, world_size: int) -> None:
    files = {
        name: {
            "bytes": os.path.getsize(os.path.join(directory, name)),
            "sha256": _sha256(os.path.join(directory, name)),
        }
        for name in _files_under(directory)
        if name != MANIFEST_FILE
    }
    manifest = {"step": step, "world_size": world_size, "files": files}
    with open(os.path.join(directory, MANIFEST_FILE), "w") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def read_manifest(checkpoint_dir: str) -> dict[str, Any]:
    path = os.path.join(checkpoint_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{checkpoint_dir} is incomplete: it has no {MANIFEST_FILE} (the save did not finish)"
        )
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from exc


def verify_checkpoint(checkpoint_dir: str) -> dict[str, Any]:
    """The manifest, once every file it lists is present with its size and checksum; else
    CheckpointError naming the first bad file."""
    manifest = read_manifest(checkpoint_dir)
    for name, expected in manifest["files"].items():
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing from checkpoint {checkpoint_dir}")
        size = os.path.getsize(path)
        if size != expected["bytes"]:
            raise CheckpointError(
                f"{path} is {size} bytes; the manifest says {expected['bytes']} (truncated or replaced)"
            )
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its checksum in {MANIFEST_FILE} (corrupt)")
    return manifest


def find_resumable(path: str, warn=warnings.warn) -> tuple[str, dict[str, Any]]:
    """(checkpoint directory, its manifest) for `resume=path`: the checkpoint itself when `path` is
    one (an error if it is incomplete or corrupt), else the run's newest intact checkpoint, skipping
    newer broken ones with a warning that names them."""
    if not os.path.exists(path):
        raise CheckpointError(f"resume={path!r}: no such run directory or checkpoint")
    if os.path.basename(os.path.normpath(path)).startswith("step-"):
        return path, verify_checkpoint(path)
    candidates = _step_dirs(path)
    for candidate in reversed(candidates):
        try:
            return candidate, verify_checkpoint(candidate)
        except CheckpointError as problem:
            warn(f"skipping checkpoint {candidate}: {problem}")
    raise CheckpointError(
        f"resume={path!r}: no intact checkpoint there (looked in {os.path.join(path, CHECKPOINT_DIR)}, "
        f"found {len(candidates)} step directories)"
    )


def run_dir_of(checkpoint_dir: str) -> str:
    """The run directory that owns a checkpoint directory."""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_dir)))


def _write_rank_files(staging, step, engine, tokenizer, training_state, weights, extra) -> None:
    engine.save_state(os.path.join(staging, ENGINE_DIR))
    for name, (extra_engine, extra_weights) in extra.items():
        extra_engine.save_state(os.path.join(staging, f"{name}_{ENGINE_DIR}"))
        if engine.is_main:
            export_pretrained(
                extra_engine.module, extra_weights, os.path.join(staging, f"{name}_{EXPORT_DIR}")
            )
    torch.save(rng_state(), os.path.join(staging, f"rng-rank{engine.rank}.pt"))
    if engine.is_main:
        export = os.path.join(staging, EXPORT_DIR)
        export_pretrained(engine.module, weights, export)
        tokenizer.save_pretrained(export)
        torch.save(
            {**training_state, "step": step, "world_size": engine.world_size},
            os.path.join(staging, STATE_FILE),
        )


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
    Pruning removes only older checkpoints of this run's own history (steps before `step`).
    """
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    final = os.path.join(root, checkpoint_name(step))
    staging = f"{final}.tmp"
    # full weights first: gathering them is collective under ZeRO-3, so no rank may skip it on an error
    weights = engine.full_state_dict()
    extra = {name: (e, e.full_state_dict()) for name, e in (extra_engines or {}).items()}
    failure: WriteFailure | None = None
    if engine.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    engine.barrier()
    try:
        _write_rank_files(staging, step, engine, tokenizer, training_state, weights, extra)
    except Exception as exc:  # torch.save reports a full disk as RuntimeError, safetensors as its own
        failure = WriteFailure(exc, free_bytes(root))
    failed_ranks = engine.all_reduce_sum(torch.tensor(float(failure is not None), device=engine.device))
    if float(failed_ranks) == 0 and engine.is_main:
        try:
            write_manifest(staging, step, engine.world_size)
        except Exception as exc:
            failure = WriteFailure(exc, free_bytes(root))
    failed_ranks = engine.all_reduce_sum(torch.tensor(float(failure is not None), device=engine.device))
    if float(failed_ranks):
        engine.barrier()
        if engine.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise _save_error(final, failure, int(failed_ranks)) from (failure.error if failure else None)
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
            older = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) < step]
            for old in older[: max(0, len(older) - (keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return final


@dataclass(frozen=True)
class WriteFailure:
    """An exception raised while writing a checkpoint, with the free space measured right then
    (before the partial files are removed, which frees space again)."""

    error: BaseException
    free: int

    @property
    def disk_full(self) -> bool:
        """ENOSPC / EDQUOT however it is reported: as an OSError, in the message of safetensors'
        error, or (torch.save says only "unexpected pos ...") by the space left when it failed."""
        return (
            getattr(self.error, "errno", None) in DISK_FULL
            or "No space left on device" in str(self.error)
            or "Disk quota exceeded" in str(self.error)
            or self.free < LOW_SPACE_BYTES
        )


def free_bytes(path: str) -> int:
    """Free space for an unprivileged writer on the filesystem holding `path` (its nearest existing
    parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path or ".").free


def _save_error(final: str, failure: WriteFailure | None, failed_ranks: int) -> CheckpointError:
    where = os.path.dirname(final)
    if failure is None:  # this rank wrote its part; another did not
        return CheckpointError(f"saving {final} failed on {failed_ranks} other rank(s); nothing was kept")
    if failure.disk_full:
        return CheckpointError(
            f"the disk is full: saving {final} failed with {failure.free / 2**20:.1f} MiB free in {where} "
            f"({type(failure.error).__name__}: {failure.error}). The partial checkpoint was removed; the "
            "previous checkpoint is intact. Free space (or set checkpoint.keep_last lower), then resume."
        )
    return CheckpointError(f"saving {final} failed: {failure.error!r}; the partial checkpoint was removed")


def remove_partial_saves(run_dir: str) -> list[str]:
    """Staging directories (`step-N.tmp`, `step-N.old`) left by a save that was killed: never
    checkpoints (the manifest is written last), only disk space. Removed; returns their names."""
    root = os.path.join(run_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return []
    partial = sorted(n for n in os.listdir(root) if n.startswith("step-") and n.endswith((".tmp", ".old")))
    for name in partial:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return partial


def load_checkpoint(
    checkpoint_dir: str, engine: Any, extra_engines: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Restore the engines and this rank's RNG; returns the saved training state."""
    state = _load(os.path.join(checkpoint_dir, STATE_FILE))
    saved_world = state.get("world_size", 1)
    if saved_world != engine.world_size:
        raise CheckpointError(
            f"checkpoint {checkpoint_dir} was written by {saved_world} processes; resume it with {saved_world}, "
            f"not {engine.world_size} (its hf/ export loads at any size)"
        )
    engine.load_state(os.path.join(checkpoint_dir, ENGINE_DIR))
    for name, extra in (extra_engines or {}).items():
        extra.load_state(os.path.join(checkpoint_dir, f"{name}_{ENGINE_DIR}"))
    set_rng_state(_load(os.path.join(checkpoint_dir, f"rng-rank{engine.rank}.pt")))
    return state


def _load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path} could not be read ({exc}); the checkpoint is corrupt") from exc


def export_dir(checkpoint_dir: str) -> str:
    return os.path.join(checkpoint_dir, EXPORT_DIR)
