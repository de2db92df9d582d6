"""Process-group set-up from the launcher's environment (torchrun, deepspeed, SLURM via either).

RANK, LOCAL_RANK and WORLD_SIZE come from the launcher; one process without them is rank 0 of 1.
The backend is NCCL on CUDA machines and gloo on CPU machines.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_env() -> DistEnv:
    return DistEnv(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(timeout_s: float = 1800, always: bool = False) -> DistEnv:
    """Join the launcher's process group (once); returns this process's place in it.

    `always`: form a one-process group when no launcher started us (DeepSpeed needs a group even
    for a single process, e.g. `python -m recipes.grpo distributed=zero3_offload` on one GPU).
    """
    env = launcher_env()
    if env.world_size == 1 and always and "MASTER_ADDR" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    if (env.world_size > 1 or always) and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(env.local_rank)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        # Without an explicit destroy, gloo's worker threads outlive the interpreter's teardown and
        # the process can die with SIGABRT after a successful run ("terminate called without an
        # active exception"); destroying the group while Python is still alive joins them.
        atexit.register(destroy_process_group)
        _joined.append(True)
    return env


_joined: list[bool] = []


def run_entry_point(main: Callable[[], object]) -> None:
    """Run a launched script's `main` and exit with its code. A process that joined a process group
    leaves through `os._exit` once the exit handlers have run and output is flushed: even with the
    group destroyed, a rank's C++ teardown after DeepSpeed on gloo intermittently aborts
    ("terminate called without an active exception", SIGABRT, about one run in ten with 2 CPU
    ranks), with no Python frame left, after the run has finished and saved; the launcher then
    reports the whole job as failed. One process without a group exits the ordinary way."""
    try:
        main()
        code = 0
    except SystemExit as stop:
        if not _joined:
            raise
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        if not _joined:
            raise
        traceback.print_exc()
        code = 1
    if not _joined:
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy); identity in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's picklable `value`, in rank order (collective); [value] in a single process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        dist.destroy_process_group()
        remove_deepspeed_shm_buffer(rank)


def remove_deepspeed_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce segment, if it made one.

    Under the deepspeed launcher on CPU (all ranks on one machine), DeepSpeed's communication backend
    creates a 69 MB shared-memory segment per rank, named after the uid, master address, master port
    and rank, and never unlinks it: without this every run would leave its segments in /dev/shm, in
    RAM, until the machine reboots. Mapped memory stays valid after the unlink."""
    name = "_".join(
        [
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ.get("MASTER_ADDR", ""),
            os.environ.get("MASTER_PORT", ""),
            str(rank),
        ]
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join("/dev/shm", name))
