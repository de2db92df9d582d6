"""The run lifecycle every recipe shares: run directory, config snapshot, resume, loggers,
checkpoints, time limit, preemption. The step body stays in the recipe; this is what surrounds it.

A recipe calls it in four places:

    run = Run.open("grpo", cfg, env)            # checks the run directory / resume; writes nothing
    ... build engines ...
    state = run.attach(engine, tokenizer, lambda: {"sampler": sampler.state_dict()})
    with run:                                    # loggers closed, signal handlers restored on exit
        for step in run.steps():                 # checkpoints, time limit and preemption between steps
            ... rollout, score, logprobs, advantages, update ...
            run.log(metrics, step)
        run.finish()                             # the final checkpoint

A run directory holds:
    run.json           the recipe, and one entry per start (when, from which checkpoint, how many ranks)
    config.yaml        the resolved config of the latest start; config_history/ keeps the earlier ones
    metrics.jsonl, rollouts.jsonl, checkpoints/step-NNNNNN/, plots, wandb/

Rules (README, "Runs, resume and preemption"):
- A new run in a directory that already holds a run is an error saying how to resume it or start fresh.
- `resume=<run dir or checkpoint>` continues that run in its own directory with its saved config;
  overrides given with it apply on top (see `resume_config`) and are printed. Fields that cannot
  change on resume (`FIXED_ON_RESUME`), another recipe, or another world size for the checkpoint are
  errors raised before anything in the run directory is touched.
- Resuming from a run directory takes its newest intact checkpoint (rlhf.checkpoint). Log rows after
  the checkpoint's step are removed from metrics.jsonl and rollouts.jsonl; checkpoints after it (a
  checkpoint named explicitly that is not the newest) are renamed `step-N.superseded`, never deleted.
- SIGTERM or SIGUSR1 (SLURM preemption, scancel) makes every rank finish its step, save a checkpoint
  and exit with `PREEMPTED_EXIT_CODE`; `train.time_limit_s` stops the same way with exit code 0.
Only rank 0 writes files other than its checkpoint shards.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import yaml

from rlhf.checkpoint import (
    CHECKPOINT_DIR,
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    find_resumable,
    load_checkpoint,
    remove_partial_saves,
    run_dir_of,
    save_checkpoint,
)
from rlhf.config import ConfigError
from rlhf.loggers import ROLLOUTS_FILE, build_loggers, rewind_jsonl
from rlhf.models.load import check_model_paths

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the job stopped cleanly and can be resumed
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
HISTORY_DIR = "config_history"
METRICS_FILE = "metrics.jsonl"
# What a run directory holds once a run has written to it (Hydra's own files are not ours).
RUN_MARKERS = (RUN_FILE, CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR)
# Config fields a resumed run must keep (prefixes): the model's shape and weights, the tokenizer,
# the data the sampler's position refers to, and the layout of the saved optimizer states.
FIXED_ON_RESUME = (
    "model.source",
    "model.name_or_path",
    "model.tokenizer_name_or_path",
    "model.tiny",
    "model.lora.enabled",
    "model.lora.r",
    "model.lora.target_modules",
    "model.pad_token",
    "data",
    "distributed.backend",
    "distributed.zero_stage",
    "critic.init",
    "critic.name_or_path",
    "reference.sync",  # a moving reference is restored from the checkpoint; it cannot start or stop
)
# Never taken from the composed defaults: the timestamped default run_dir differs every second.
NOT_DIFFED = ("run_dir", "resume")


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is saved; exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step, self.checkpoint = step, checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Resume: the saved config, with the command line's changes on top


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf}; lists are leaves."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: tree}


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def _under(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys named by command-line overrides (`a.b=1`, `+a.b=1`, `~a.b`); group choices
    (`model=pretrained`, `+experiment=x`) name no key: their effect is found by comparing configs."""
    keys = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if "=" in item and "/" not in key:
            keys.append(key)
    return keys


def saved_run(run_dir: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.yaml, run.json) of a run directory."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir} is not a run directory: it has no {CONFIG_FILE}")
    with open(path) as handle:
        config = yaml.safe_load(handle) or {}
    info = {}
    if os.path.isfile(os.path.join(run_dir, RUN_FILE)):
        with open(os.path.join(run_dir, RUN_FILE)) as handle:
            info = json.load(handle)
    return config, info


_verified: dict[tuple, tuple[str, dict[str, Any]]] = {}


def _state_of(path: str) -> tuple:
    """What a verification result depends on: the path and every file's size and mtime under it."""
    stats = []
    for root, _, names in os.walk(path):
        for name in names:
            info = os.stat(os.path.join(root, name))
            stats.append((root, name, info.st_size, info.st_mtime_ns))
    return (os.path.abspath(path), tuple(sorted(stats)))


def resume_target(resume: str) -> tuple[str, dict[str, Any], str]:
    """(checkpoint directory, its manifest, its run directory) for `resume=`. Checksums are read
    once per process while nothing under the path changes (the config and the run both ask)."""
    key = _state_of(resume)
    if key not in _verified:
        _verified[key] = find_resumable(resume, warn=lambda text: print(f"warning: {text}", flush=True))
    checkpoint, manifest = _verified[key]
    return checkpoint, manifest, run_dir_of(checkpoint)


def _migrate(saved: dict[str, Any]) -> None:
    """A GRPO or PPO config saved when `train.epochs` counted passes over each rollout: that is
    `train.updates_per_rollout` now (`train.epochs` counts passes over the prompts)."""
    train = saved.get("train") or {}
    if "prompts_per_step" in train and "updates_per_rollout" not in train and "epochs" in train:
        train["updates_per_rollout"] = train.pop("epochs")


def resume_config(
    schema: type, composed: dict[str, Any], defaults: dict[str, Any], overrides: list[str]
) -> tuple[Any, list[str]]:
    """The config a `resume=` run trains with, and the changes applied, as printable lines.

    `composed` is the config as the command line composed it, `defaults` the recipe's config with no
    overrides: every field where they differ, and every field an override names, is a change the
    user asked for; it applies on top of the run's saved config.yaml. Without `resume`, `composed`.
    """
    from omegaconf import OmegaConf

    if not composed.get("resume"):
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), composed)), []
    _, _, run_dir = resume_target(composed["resume"])
    saved, _ = saved_run(run_dir)
    _migrate(saved)
    new, old, flat_saved = flatten(composed), flatten(defaults), flatten(saved)
    named = override_keys(overrides)
    changed = sorted(
        key
        for key in new
        if not _under(key, NOT_DIFFED)
        and (new[key] != old.get(key, new[key]) or key not in old or _under(key, named))
    )
    merged = json.loads(json.dumps(saved))
    applied = []
    for key in changed:
        if flat_saved.get(key, object()) != new[key]:
            applied.append(f"{key}: {flat_saved.get(key)!r} -> {new[key]!r}")
        _set(merged, key, new[key])
    merged["resume"] = composed["resume"]
    if "run_dir" in named and os.path.abspath(composed["run_dir"]) != os.path.abspath(run_dir):
        raise ConfigError(
            f"run_dir={composed['run_dir']!r} with resume={composed['resume']!r}: a resumed run continues in its "
            f"own directory {run_dir}; drop run_dir, or start a new run from the checkpoint's weights with "
            "model=pretrained model.name_or_path=<checkpoint>/hf"
        )
    merged["run_dir"] = run_dir
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), merged))
    except Exception as exc:  # an unknown key: the saved config belongs to another recipe's schema
        raise ConfigError(
            f"resume={composed['resume']!r}: the run's {CONFIG_FILE} does not fit this recipe: {exc}"
        ) from exc
    return cfg, applied


def recipe_config(schema: type, dict_cfg: Any) -> Any:
    """The config of a recipe started from the command line (inside `@hydra.main`): as composed, or
    with `resume=` the resumed run's saved config with the command line's changes on top."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    composed = OmegaConf.to_container(dict_cfg, resolve=True)
    hydra_cfg = HydraConfig.get()
    if not composed.get("resume"):
        return _own_run_dir_per_job(OmegaConf.to_object(dict_cfg), hydra_cfg)

    defaults = OmegaConf.to_container(compose(hydra_cfg.job.config_name, overrides=[]), resolve=True)
    cfg, applied = resume_config(schema, composed, defaults, list(hydra_cfg.overrides.task))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"resuming {cfg.run_dir} with its saved config", flush=True)
        for line in applied:
            print(f"  override {line}", flush=True)
    return cfg


def _own_run_dir_per_job(cfg: Any, hydra_cfg: Any) -> Any:
    """Under `-m` (multirun) every job of the sweep resolves the default run_dir's timestamp to the
    same second, so each job gets `<run_dir>/job<N>` unless the command line sets run_dir itself."""
    from hydra.types import RunMode

    if hydra_cfg.mode != RunMode.MULTIRUN:
        return cfg
    if any(o.split("=", 1)[0].lstrip("+~") == "run_dir" for o in hydra_cfg.overrides.task):
        return cfg
    cfg.run_dir = os.path.join(cfg.run_dir, f"job{hydra_cfg.job.num}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"multirun job {hydra_cfg.job.num} ({hydra_cfg.job.override_dirname}): {cfg.run_dir}", flush=True
        )
    return cfg


def check_resumable(recipe: str, saved: dict[str, Any], info: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Errors for a resume that cannot continue the saved run: another recipe or a fixed field changed."""
    saved_recipe = info.get("recipe")
    if saved_recipe and saved_recipe != recipe:
        raise ConfigError(
            f"resume: this run was trained by recipes.{saved_recipe}, not recipes.{recipe}; resume it with recipes.{saved_recipe}"
        )
    old, new = flatten(saved), flatten(cfg)
    for key in sorted(set(old) | set(new)):
        if _under(key, FIXED_ON_RESUME) and old.get(key) != new.get(key):
            raise ConfigError(
                f"resume: {key} was {old.get(key)!r} in the saved run and is {new.get(key)!r} now; a resumed run "
                f"must keep it (fixed on resume: {', '.join(FIXED_ON_RESUME)}). Start a new run instead."
            )


# ---------------------------------------------------------------------------------------------
# The run object


class Run:
    """Owns the run directory, resume, loggers, checkpoints, time limit and signals of one run."""

    def __init__(
        self, recipe: str, cfg: Any, env: Any, checkpoint: str | None, manifest: dict | None, total_steps: int
    ):
        self.recipe, self.cfg, self.env = recipe, cfg, env
        self.total_steps = total_steps
        self._closers: list[Callable[[], None]] = []
        self.dir = run_dir_of(checkpoint) if checkpoint else cfg.run_dir
        self.checkpoint = checkpoint  # the checkpoint this start resumes, or None
        self.start_step = manifest["step"] if manifest else 0
        self.step = self.start_step
        self.last_checkpoint = checkpoint or ""
        self.elapsed = 0.0  # seconds of training (evaluation excluded), carried over a resume
        self._untimed_s = 0.0
        self.loggers: Any = None
        self._engine: Any = None
        self._stateful: dict[str, Any] = {}
        self._evaluate: Callable[[int], dict[str, float]] | None = None
        self._eval_every = 0
        self._tokenizer: Any = None
        self._extra_engines: dict[str, Any] = {}
        self._signal_received: str | None = None
        self._previous_handlers: dict[int, Any] = {}

    # -- before any model loads ------------------------------------------------------------------
    @classmethod
    def open(cls, recipe: str, cfg: Any, env: Any, total_steps: int | None = None) -> Run:
        """Check the run directory or the resume target, claim it (rank 0 writes its lock file, nothing
        else) and seed this rank.
        `total_steps`: the length of training when derived (from train.epochs), else train.steps."""
        check_model_paths(cfg)
        checkpoint = manifest = None
        if cfg.resume:
            checkpoint, manifest, run_dir = resume_target(cfg.resume)
            saved, info = saved_run(run_dir)
            check_resumable(recipe, saved, info, dataclasses.asdict(cfg))
            if manifest.get("world_size", 1) != env.world_size:
                raise ConfigError(
                    f"resume: checkpoint {checkpoint} was written by {manifest['world_size']} processes; resume it "
                    f"with {manifest['world_size']}, not {env.world_size} (its hf/ export loads at any size: "
                    "model=pretrained model.name_or_path=<checkpoint>/hf starts a new run from it)"
                )
        else:
            present = [m for m in RUN_MARKERS if os.path.exists(os.path.join(cfg.run_dir, m))]
            if present:
                raise ConfigError(
                    f"run_dir={cfg.run_dir!r} already holds a run ({', '.join(present)}). To continue it: "
                    f"resume={cfg.run_dir}. To start fresh: pass another run_dir, or delete that directory."
                )
        run = cls(
            recipe, cfg, env, checkpoint, manifest, cfg.train.steps if total_steps is None else total_steps
        )
        if env.rank == 0:  # two starts in one directory: the second is refused before any model loads
            run._closers.append(claim_run_dir(run_dir if cfg.resume else cfg.run_dir))
        seed_everything(cfg.seed + env.rank)  # ranks sample different completions
        return run

    # -- once the engines exist ------------------------------------------------------------------
    def attach(
        self,
        engine: Any,
        tokenizer: Any,
        stateful: dict[str, Any] | None = None,
        extra_engines: dict[str, Any] | None = None,
    ) -> bool:
        """Restore the checkpoint being resumed: the engines' weights and optimizer states, and each
        of `stateful` (name -> object with state_dict / load_state_dict: samplers, controllers,
        run-level values) from its entry; write config.yaml and run.json, rewind the logs to the
        checkpoint, open the loggers. Every checkpoint saves the same mapping. True when resumed."""
        self._engine, self._tokenizer = engine, tokenizer
        self._stateful, self._extra_engines = stateful or {}, extra_engines or {}
        self.dir = self._agree_on_dir(self.dir)
        if self.checkpoint:
            state = load_checkpoint(self.checkpoint, engine, self._extra_engines)
            self.elapsed = state.get("elapsed_s", 0.0)
            for name, holder in self._stateful.items():
                if name not in state:
                    raise CheckpointError(
                        f"{self.checkpoint} holds no {name!r} state (it has {sorted(state)}): it was "
                        "saved by a run with other options; resume with the options it was trained with"
                    )
                holder.load_state_dict(state[name])
        if engine.is_main:
            self._write_run_files()
        engine.barrier()
        self.loggers = build_loggers(
            self.cfg.logger if engine.is_main else None,
            self.dir,
            self.recipe,
            dataclasses.asdict(self.cfg),
            self.total_steps,
            self.start_step,
        )
        if self.checkpoint:
            self.message(f"resumed from {self.checkpoint} at step {self.start_step}")
        return self.checkpoint is not None

    def _agree_on_dir(self, run_dir: str) -> str:
        """Rank 0's run directory on every rank (a `${now:}` default can differ by a second)."""
        if self._engine.world_size == 1:
            return run_dir
        encoded = os.path.abspath(run_dir).encode()[:4096]
        codes = torch.zeros(4096, dtype=torch.float64, device=self._engine.device)
        if self._engine.is_main:
            codes[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.float64)
        codes = self._engine.all_reduce_sum(codes).long().tolist()
        return bytes(c for c in codes if c).decode()

    def _write_run_files(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        info: dict[str, Any] = {"recipe": self.recipe, "starts": []}
        config_path = os.path.join(self.dir, CONFIG_FILE)
        if self.checkpoint:
            info = saved_run(self.dir)[1] or info
            info.setdefault("recipe", self.recipe)
            history = os.path.join(self.dir, HISTORY_DIR)
            os.makedirs(history, exist_ok=True)
            shutil.copyfile(config_path, os.path.join(history, f"config-{len(os.listdir(history)):03d}.yaml"))
            self._retire_later_checkpoints()
            removed = remove_partial_saves(self.dir)
            if removed:
                self.message(f"removed what interrupted saves left (never checkpoints): {', '.join(removed)}")
            rewind_jsonl(os.path.join(self.dir, METRICS_FILE), self.start_step)
            rewind_jsonl(os.path.join(self.dir, ROLLOUTS_FILE), self.start_step)
        info["starts"].append(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "resumed_from": self.checkpoint,
                "step": self.start_step,
                "world_size": self.env.world_size,
                "command": " ".join(sys.argv),
            }
        )
        _write_atomically(config_path, yaml.safe_dump(dataclasses.asdict(self.cfg), sort_keys=False))
        _write_atomically(os.path.join(self.dir, RUN_FILE), json.dumps(info, indent=1))

    def _retire_later_checkpoints(self) -> None:
        """Checkpoints after the resumed step belong to the abandoned continuation: set aside, kept."""
        root = os.path.join(self.dir, CHECKPOINT_DIR)
        for name in sorted(os.listdir(root)):
            if name.startswith("step-") and "." not in name and checkpoint_step(name) > self.start_step:
                target = os.path.join(root, f"{name}.superseded")
                suffix = 1
                while os.path.exists(target):
                    target, suffix = os.path.join(root, f"{name}.superseded-{suffix}"), suffix + 1
                os.replace(os.path.join(root, name), target)
                self.message(
                    f"checkpoint {name} is after the resumed step {self.start_step}: moved to {target}"
                )

    def sampling_seed(self, step: int, round_index: int = 0) -> int:
        """The seed of this rank's rollout at `step` (and dynamic-sampling round), for engines that
        take per-request seeds: distinct per run seed, step, rank and round, and the same when the
        step is trained again after a resume."""
        rank, ranks = self.env.rank, self.env.world_size
        return (self.cfg.seed * 1_000_003 + step) * ranks + rank + round_index * 998_244_353

    # -- the loop ----------------------------------------------------------------------------------
    def steps(self) -> Iterator[int]:
        """Steps start_step+1 .. total_steps (train.steps unless derived). Between steps: a periodic checkpoint, then a stop for
        the time limit (exit 0) or a preemption signal (checkpoint, exit PREEMPTED_EXIT_CODE)."""
        for step in range(self.start_step + 1, self.total_steps + 1):
            started, self._untimed_s = time.perf_counter(), 0.0
            self.step = step
            yield step
            self.elapsed += time.perf_counter() - started - self._untimed_s
            every = self.cfg.checkpoint.every
            if every and step % every == 0:
                self.save()
            preempted, out_of_time = self._stop_flags()
            if preempted:
                if not self.last_checkpoint.endswith(checkpoint_name(step)):
                    self.save()
                self.message(
                    f"{self._signal_received or 'a signal'}: saved {self.last_checkpoint} after step {step}; "
                    f"exiting with code {PREEMPTED_EXIT_CODE} (resume={self.dir} continues)"
                )
                self.close()
                raise Preempted(step, self.last_checkpoint)
            if out_of_time:
                self.message(f"time limit {self.cfg.train.time_limit_s:g}s reached after step {step}")
                return

    def _stop_flags(self) -> tuple[bool, bool]:
        """(a preemption signal reached any rank, rank 0 is past the time limit): one all-reduce."""
        limit = getattr(self.cfg.train, "time_limit_s", None)
        flags = torch.tensor(
            [
                float(self._signal_received is not None),
                float(self.env.rank == 0 and limit is not None and self.elapsed >= limit),
            ],
            device=self._engine.device,
        )
        flags = self._engine.all_reduce_sum(flags)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Work inside this block (held-out evaluation) does not count toward train.time_limit_s."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._untimed_s += time.perf_counter() - started

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.loggers.log(metrics, step)

    # -- evaluation and logging cadence ------------------------------------------------------------
    def evaluate_with(self, evaluate: Callable[[int], dict[str, float]] | None, every: int) -> None:
        """The run's held-out evaluation: `evaluate(step)` gives its `eval/...` scores after `step`
        updates (None: the run has none), every `every` steps (0: before and after training only)."""
        self._evaluate, self._eval_every = evaluate, every

    def evaluate_before(self) -> dict[str, float]:
        """A new run's scores before training, logged at step 0, returned as `<key>_before`."""
        if self._evaluate is None or self.start_step != 0:
            return {}
        with self.untimed():
            scores = self._evaluate(0)
        if scores:
            self.log(scores, 0)
        return {f"{key}_before": value for key, value in scores.items()}

    def end_step(self, step: int, metrics: dict[str, float]) -> bool:
        """After a step: at every `every`-th step the scores join its metrics (evaluation does not
        count toward train.time_limit_s); the metrics are logged every logger.log_every steps and
        whenever they hold scores. True when they were logged."""
        evaluated = bool(self._evaluate and self._eval_every and step % self._eval_every == 0)
        if evaluated:
            with self.untimed():
                metrics.update(self._evaluate(step))
        if evaluated or step % self.cfg.logger.log_every == 0:
            self.log(metrics, step)
            return True
        return False

    def evaluate_after(self, metrics: dict[str, float]) -> dict[str, float]:
        """The final scores, after `finish`: the last step's when it evaluated, else new ones;
        logged at the last step."""
        if self._evaluate is None:
            return {}
        final = {key: value for key, value in metrics.items() if key.startswith("eval/")}
        if not final:
            with self.untimed():
                final = self._evaluate(self.step)
        if final:
            self.log(final, self.step)
        return final

    def message(self, text: str) -> None:
        if self.loggers is not None:
            self.loggers.message(text)
        elif self.env.is_main:
            print(text, flush=True)

    def save(self) -> str:
        """A checkpoint of the current step (collective)."""
        state = {name: holder.state_dict() for name, holder in self._stateful.items()}
        state["elapsed_s"] = self.elapsed
        self.last_checkpoint = save_checkpoint(
            self.dir,
            self.step,
            self._engine,
            self._tokenizer,
            state,
            self.cfg.checkpoint.keep_last,
            self._extra_engines,
        )
        return self.last_checkpoint

    def finish(self) -> str:
        """The final checkpoint (unless disabled or this step's is already saved); its path."""
        if self.cfg.checkpoint.save_final and not self.last_checkpoint.endswith(checkpoint_name(self.step)):
            self.save()
        return self.last_checkpoint

    def result(self, *metrics: dict[str, Any]) -> dict[str, Any]:
        """What `train` returns: the metrics, the last step, the last checkpoint and the run directory."""
        merged: dict[str, Any] = {}
        for part in metrics:
            merged.update(part)
        return {**merged, "step": self.step, "checkpoint": self.last_checkpoint, "run_dir": self.dir}

    # -- signals and closing -----------------------------------------------------------------------
    def _catch_signals(self) -> None:
        def received(signum, _frame):
            name = signal.Signals(signum).name
            if self._signal_received is None and self.env.is_main:
                print(f"{name} received: stopping after this step with a checkpoint", flush=True)
            self._signal_received = name

        for name in PREEMPTION_SIGNALS:
            try:
                number = getattr(signal, name)
                self._previous_handlers[number] = signal.signal(number, received)
            except (ValueError, AttributeError):  # not the main thread, or no such signal here
                continue

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the run's with-block is left (a rollout engine's shutdown, which must
        come before the process group goes)."""
        self._closers.append(callback)

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()
        if self.loggers is not None:
            self.loggers.close()
            self.loggers = None
        for number, handler in self._previous_handlers.items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def __enter__(self) -> Run:
        """Preemption signals are caught inside the `with` block, where a checkpoint can be saved;
        leaving it restores the previous handlers (and closes the loggers), however it is left."""
        self._catch_signals()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


LOCK_FILE = ".lock"


class RunValues(dict):
    """Run-level values kept in checkpoints (GTPO's initial entropy): a dict in `Run.attach`'s
    stateful mapping, saved and restored whole."""

    def state_dict(self) -> dict[str, Any]:
        return dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clear()
        self.update(state)


def claim_run_dir(run_dir: str) -> Callable[[], None]:
    """Claim `run_dir` for this process with an exclusive create of its lock file (pid, host, time),
    so that of two runs started at once in one directory the second is refused instead of both
    writing there; returns the release (also run at exit). A lock whose process is gone (killed,
    or this very process in an earlier run) is taken over."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    for _ in range(2):
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _live_holder(path)
            if holder is None:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise ConfigError(
                f"run_dir={run_dir!r} is in use: a run started there by process {holder.get('pid')} on "
                f"{holder.get('host')} is still running. To continue that run once it stops: resume={run_dir}. "
                f"To start fresh: pass another run_dir. (If that process is gone, delete {path}.)"
            ) from None
        with os.fdopen(handle, "w") as out:
            json.dump(mine, out)

        def release() -> None:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(open(path).read()).get("pid") == mine["pid"]:
                    os.remove(path)

        atexit.register(release)
        return release
    raise ConfigError(f"run_dir={run_dir!r}: could not claim {path}")


def _live_holder(path: str) -> dict[str, Any] | None:
    """The lock's holder while it may still run: another host's process (which cannot be checked),
    or a live process of this host other than this one; None for a stale lock."""
    try:
        holder = json.loads(open(path).read())
    except (OSError, ValueError):
        return None  # half-written by a process killed while claiming
    if holder.get("host") != socket.gethostname():
        return holder
    pid = holder.get("pid")
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except (PermissionError, TypeError):
        pass
    return holder


def _write_atomically(path: str, text: str) -> None:
    staging = f"{path}.tmp"
    with open(staging, "w") as handle:
        handle.write(text)
    os.replace(staging, path)


__all__ = [
    "PREEMPTED_EXIT_CODE",
    "CheckpointError",
    "Preempted",
    "Run",
    "recipe_config",
    "resume_config",
]
