"""Training engines: the only package that imports deepspeed or torch.distributed.

`TrainEngine` hides single-process vs data-parallel training. Its contract: after `step()` the update
equals the one a single process would make on the whole batch, given losses already divided by the
step-wide normalizer (see rlhf.losses.reduce).
"""

from rlhf.distributed.engine import SingleProcessEngine, TrainEngine, build_engine, resolve_device
from rlhf.distributed.env import DistEnv, launcher_env, run_entry_point

__all__ = [
    "DistEnv",
    "SingleProcessEngine",
    "TrainEngine",
    "build_engine",
    "launcher_env",
    "resolve_device",
    "run_entry_point",
]
