"""Helpers shared by the benchmarks: machine/version description and RESULTS.md appending."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def versions() -> str:
    import torch
    import transformers
    import trl

    try:
        import deepspeed

        ds = deepspeed.__version__
    except Exception:  # noqa: BLE001 - deepspeed may be missing on a benchmark machine
        ds = "n/a"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, deepspeed {ds}"


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, {device}, torch threads {torch.get_num_threads()}"
    )


def compose_config(recipe: str, overrides: list[str]):
    """The typed config of `recipe` with `overrides`, as the command line would compose it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rlhf.config import register_configs

    register_configs()
    config_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return OmegaConf.to_object(compose(recipe, overrides=overrides))


def median_range(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def report(title: str, body: str, record: bool) -> None:
    """Print `body` and, with `record`, append it to RESULTS.md under the command line that ran."""
    print(body)
    if record:
        script = os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(os.path.dirname(RESULTS)))
        append_results(title, " ".join([f"python {script}", *sys.argv[1:]]), body)


def append_results(title: str, command: str, body: str) -> None:
    stamp = datetime.date.today().isoformat()
    with open(RESULTS, "a") as handle:
        handle.write(f"\n## {title} ({stamp})\n\n`{command}`\n\n{machine()}; {versions()}\n\n{body}\n")


def step_timer(times: list[float]):
    """A transformers `TrainerCallback` that appends each optimizer step's wall time to `times`."""
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    return StepTimer()


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
        for i in range(len(values))
    ]


def save_figure(fig, path: str) -> None:
    """Write a matplotlib figure as PNG (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
