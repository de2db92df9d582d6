"""Metric sinks: a console progress bar, metrics.jsonl in the run directory, and wandb.

wandb runs offline by default (no network needed; `wandb sync <run_dir>/wandb/offline-run-*` uploads
later); `logger.wandb_mode=online` logs live. Metric names are grouped by section with "/"
(reward/..., clip/..., kl/...), which wandb shows as panels; names without a section go under
train/ in wandb only (metrics.jsonl keeps them as the recipes wrote them).

Rollout samples (rlhf/rollout/records.py) go to <run_dir>/rollouts.jsonl, one record per line, and
to wandb as a table per step ("rollouts/samples") with histograms of the whole rollout's rewards,
advantages and lengths under hist/.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from tqdm.auto import tqdm

from rlhf.config import LoggerConfig

# Shown in the progress bar when present, in this order, under these short names.
HEADLINE_METRICS = {
    "reward/mean": "reward",
    "accuracy": "acc",
    "loss": "loss",
    "kl/mean": "kl",
    "check/accuracy": "check_acc",
    "eval/accuracy": "eval_acc",
}


class ConsoleLogger:
    def __init__(self, total_steps: int, description: str, initial: int = 0):
        self.bar = tqdm(total=total_steps, initial=initial, desc=description, dynamic_ncols=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        shown = {HEADLINE_METRICS[k]: metrics[k] for k in HEADLINE_METRICS if k in metrics}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        self.bar.update(step - self.bar.n)

    def message(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


ROLLOUTS_FILE = "rollouts.jsonl"
# Columns of the wandb rollout table; the per-token lists stay in rollouts.jsonl.
# `prompt` is the text the model was fed (chat template applied), `raw_prompt` the data's (as JSON
# for a message list); they are the same for plain-text data.
TABLE_COLUMNS = ("step", "prompt", "raw_prompt", "completion", "score", "length", "advantage")
# multi-turn episodes add their turns after the prompt (assistant, tool calls, tool results)
EPISODE_COLUMNS = ("conversation",)


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def wandb_name(key: str) -> str:
    """Metric names with a section keep it; the rest are grouped under train/."""
    return key if "/" in key else f"train/{key}"


class JsonlLogger:
    """Appends one JSON object per logged step; a resumed run keeps appending to the same file."""

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, "time": time.time()}
        row.update({k: _finite_or_none(v) for k, v in metrics.items()})
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def log_rollouts(self, records: list[dict[str, Any]], step: int, distributions: dict) -> None:
        with open(os.path.join(os.path.dirname(self.path), ROLLOUTS_FILE), "a") as handle:
            for record in records:
                clean = {
                    k: [_finite_or_none(x) for x in v] if isinstance(v, list) else _finite_or_none(v)
                    for k, v in record.items()
                }
                handle.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        pass


class WandbLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: str, name: str, config: dict[str, Any]):
        import wandb

        if cfg.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.wandb_mode must be offline, online or disabled, got {cfg.wandb_mode!r}")
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity,
            name=name,
            dir=run_dir,
            mode=cfg.wandb_mode,
            config=config,
            resume="allow",
            id=_stable_run_id(run_dir),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({wandb_name(k): v for k, v in metrics.items()}, step=step)

    def log_rollouts(self, records: list[dict[str, Any]], step: int, distributions: dict) -> None:
        columns = TABLE_COLUMNS + (EPISODE_COLUMNS if any("conversation" in r for r in records) else ())
        table = self.wandb.Table(columns=list(columns))
        for record in records:
            advantage = record.get("advantage")
            if advantage is None and record.get("advantages"):
                advantage = sum(record["advantages"]) / len(record["advantages"])
            raw = record.get("raw_prompt", record.get("prompt"))
            cells = {"advantage": advantage, "raw_prompt": raw if isinstance(raw, str) else json.dumps(raw)}
            if "conversation" in record:
                cells["conversation"] = json.dumps(record["conversation"])
            table.add_data(*[cells[c] if c in cells else record.get(c) for c in columns])
        logged = {"rollouts/samples": table}
        for name, values in distributions.items():
            values = [float(v) for v in values if math.isfinite(float(v))]
            if values:
                logged[f"hist/{name}"] = self.wandb.Histogram(values)
        self.run.log(logged, step=step)

    def close(self) -> None:
        self.run.finish()


def _stable_run_id(run_dir: str) -> str:
    """One wandb run per run directory, so a resumed run continues the same wandb run."""
    path = os.path.join(run_dir, "wandb_run_id")
    if os.path.exists(path):
        with open(path) as handle:
            return handle.read().strip()
    import uuid

    run_id = uuid.uuid4().hex[:12]
    with open(path, "w") as handle:
        handle.write(run_id)
    return run_id


class Loggers:
    """Fans metrics out to every configured sink."""

    def __init__(self, sinks: list[Any], console: ConsoleLogger | None, quiet: bool = False):
        self.sinks = sinks
        self.console = console
        self.quiet = quiet

    def log(self, metrics: dict[str, float], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)

    def log_rollouts(
        self, records: list[dict[str, Any]], step: int, distributions: dict[str, list[float]] | None = None
    ) -> None:
        """Rollout samples and the whole rollout's distributions (rewards, advantages, lengths)."""
        for sink in self.sinks:
            if hasattr(sink, "log_rollouts"):
                sink.log_rollouts(records, step, distributions or {})

    def message(self, text: str) -> None:
        if self.console is not None:
            self.console.message(text)
        elif not self.quiet:
            print(text, flush=True)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_loggers(
    cfg: LoggerConfig | None,
    run_dir: str,
    name: str,
    config: dict[str, Any],
    total_steps: int,
    initial_step: int = 0,
) -> Loggers:
    """The configured sinks; `cfg=None` (ranks other than 0) logs nothing."""
    if cfg is None:
        return Loggers([], None, quiet=True)
    sinks: list[Any] = []
    console = None
    if cfg.console:
        console = ConsoleLogger(total_steps, name, initial_step)
        sinks.append(console)
    if cfg.jsonl:
        sinks.append(JsonlLogger(os.path.join(run_dir, "metrics.jsonl")))
    if cfg.wandb:
        sinks.append(WandbLogger(cfg, run_dir, name, config))
    return Loggers(sinks, console)


def _jsonl_rows(path: str) -> list[dict[str, Any]]:
    """The rows of a jsonl log. A half-written last line (a crash or a full disk mid-write) is
    skipped; a bad line elsewhere is an error naming the file and the line."""
    with open(path) as handle:
        lines = handle.read().split("\n")
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            if number >= len(lines) - 1:  # the last line, possibly with no newline yet
                continue
            raise ValueError(f"{path} line {number} is not valid JSON: {exc}") from exc
    return rows


def rewind_jsonl(path: str, last_step: int | None = None) -> int:
    """Rewrite a jsonl log without a half-written last line and, with `last_step`, without rows of
    later steps (what a resumed run will write again). Returns how many rows were removed."""
    if not os.path.exists(path):
        return 0
    with open(path) as handle:
        lines = [line for line in handle.read().split("\n") if line.strip()]
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if last_step is None or row.get("step", 0) <= last_step:
            kept.append(line)
    if len(kept) != len(lines):
        staging = f"{path}.tmp"
        with open(staging, "w") as handle:
            handle.write("".join(line + "\n" for line in kept))
        os.replace(staging, path)
    return len(lines) - len(kept)


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """Rows of a run's metrics.jsonl, one per step (rows of one step merged)."""
    rows: dict[int, dict[str, Any]] = {}
    for row in _jsonl_rows(os.path.join(run_dir, "metrics.jsonl")):
        rows.setdefault(row["step"], {}).update(row)
    return [rows[s] for s in sorted(rows)]


def read_rollouts(run_dir: str) -> list[dict[str, Any]]:
    """Records of a run's rollouts.jsonl (empty when it saved none), in step order."""
    path = os.path.join(run_dir, ROLLOUTS_FILE)
    if not os.path.exists(path):
        return []
    return sorted(_jsonl_rows(path), key=lambda record: record["step"])
