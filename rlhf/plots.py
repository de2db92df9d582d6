"""Curves people would rather look at: PNG plots of a run's metrics.jsonl."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlhf.loggers import read_metrics  # noqa: E402


def plot_metrics(run_dir: str, keys: list[str], filename: str, title: str, smooth: int = 10) -> str | None:
    """One panel per metric key present in the run; a moving average over `smooth` steps on top."""
    rows = read_metrics(run_dir)
    present = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.6 * len(present)), sharex=True, squeeze=False)
    for axis, key in zip(axes[:, 0], present):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        steps, values = zip(*points)
        marker = "o" if len(points) < 30 else None
        axis.plot(steps, values, alpha=0.35 if len(points) >= 30 else 1.0, marker=marker, label=key)
        if len(points) >= 30:
            window = max(1, min(smooth, len(points) // 5))
            averaged = [
                sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                for i in range(len(values))
            ]
            axis.plot(steps, averaged, label=f"{key} (avg {window})")
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(run_dir, filename)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
