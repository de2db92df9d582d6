"""Rollouts generated ahead of the trainer, with bounded staleness (`rollout.max_staleness=k`).

With generation on vLLM servers, nothing forces the trainer and the generator to take turns: a
background thread generates the rollout of step s as soon as the servers hold weights no older than
version s - 1 - k (version v: the policy after v optimizer steps), while the trainer updates on
step s - 1. k = 0 is the synchronous loop; with k >= 1 generation of the next k steps overlaps the
update. Every sample records the oldest weight version among its tokens (vLLM labels them: weights
may change while a request runs), so its staleness is known and bounded by k by construction;
the trainer's importance-sampling correction (rollout.vllm.correction) weighs each token by its
trainer/engine probability ratio, which now includes the policy's drift.

The thread only generates: it reads the training rows in its own copy of the epoch order and calls
the engine, nothing collective. Weights are sent by the trainer's thread (it owns the parameters)
after each update, through `publish`. GRPO and PPO start it with `start_rollouts_ahead` and read
each step's rollout with `take_rollout`; `rollout_of_step` is the one rollout call of a training
step, made in turn or ahead.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import Any

from rlhf.data.sampler import rank_slice
from rlhf.rollout.engine import rollout_rows


class RolloutsAhead:
    """Generates `produce(step)` for steps first..last in order on a background thread, each once
    the weights published reach step - 1 - max_staleness; `take(step)` hands them out in order."""

    def __init__(
        self, produce: Callable[[int], Any], first: int, last: int, max_staleness: int, published: int
    ):
        self.produce, self.max_staleness = produce, max_staleness
        self.first, self.last = first, last
        self.published = published  # the newest weight version the servers hold
        self.ready: dict[int, Any] = {}
        self.failure: BaseException | None = None
        self.closed = False
        self.generator_idle_s = 0.0
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="rollouts-ahead", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for step in range(self.first, self.last + 1):
                waited = time.perf_counter()
                with self.condition:
                    # at most max_staleness + 1 rollouts waiting, each from recent enough weights
                    self.condition.wait_for(
                        lambda s=step: (
                            self.closed
                            or (
                                self.published >= s - 1 - self.max_staleness
                                and len(self.ready) <= self.max_staleness
                            )
                        )
                    )
                    if self.closed:
                        return
                    self.generator_idle_s += time.perf_counter() - waited
                result = self.produce(step)
                with self.condition:
                    self.ready[step] = result
                    self.condition.notify_all()
        except BaseException as exc:  # handed to the trainer's thread at its next take
            with self.condition:
                self.failure = exc
                self.condition.notify_all()

    def take(self, step: int) -> tuple[Any, dict[str, float]]:
        """The rollout of `step` (waiting for it) and the pipeline's metrics: how long the trainer
        waited, how long the generator waited for weights since the last take, how many rollouts
        were ready beyond this one."""
        waited = time.perf_counter()
        with self.condition:
            self.condition.wait_for(lambda: step in self.ready or self.failure is not None)
            if step not in self.ready:
                raise RuntimeError(f"generating the rollout of step {step} failed") from self.failure
            result = self.ready.pop(step)
            metrics = {
                "async/trainer_wait_s": time.perf_counter() - waited,
                "async/generator_wait_s": self.generator_idle_s,
                "async/queue_depth": float(len(self.ready)),
            }
            self.generator_idle_s = 0.0
            self.condition.notify_all()
        return result, metrics

    def publish(self, version: int) -> None:
        """The servers now hold weight version `version`."""
        with self.condition:
            self.published = version
            self.condition.notify_all()

    def close(self) -> None:
        """Stop after the rollout in progress (its requests finish or time out); safe to call twice."""
        with self.condition:
            self.closed = True
            self.condition.notify_all()
        self.thread.join(timeout=60)


def staleness_metrics(batch: Any, step: int, max_staleness: int) -> dict[str, float]:
    """How many updates older than the trained weights (version step - 1) each sample's oldest
    token is: mean, max and the share at each lag 0..max_staleness (a histogram over steps)."""
    if not batch.weight_versions:
        return {}
    lags = [step - 1 - version for version in batch.weight_versions]
    if max(lags) > max_staleness or min(lags) < 0:
        raise RuntimeError(
            f"step {step} would train on samples {max(lags)} updates stale (rollout.max_staleness={max_staleness}) "
            f"or from weights it has not made yet: weight versions {sorted(set(batch.weight_versions))}"
        )
    metrics = {"async/staleness_mean": sum(lags) / len(lags), "async/staleness_max": float(max(lags))}
    for lag in range(max_staleness + 1):
        metrics[f"async/staleness_{lag}_fraction"] = lags.count(lag) / len(lags)
    return metrics


def rollout_of_step(
    cfg: Any,
    run: Any,
    rollout: Any,
    rows: Any,
    sampling: Any,
    agent: Any,
    step: int,
    weights_version: int,
    record_topk: int | None = None,
    round_index: int = 0,
) -> tuple[Any, dict[str, float]]:
    """Step `step`'s rollout of this rank's `rows` (GRPO and PPO, in turn or ahead): G samples each
    with the weights after `weights_version` updates, seeded per step, rank and sampling round."""
    return rollout_rows(
        rollout,
        rows,
        prompt_column=cfg.data.prompt_column,
        group_size=cfg.rollout.group_size,
        sampling=sampling,
        record_topk=record_topk,
        weights_version=weights_version,
        seed=run.sampling_seed(step, round_index),
        agent=agent,
    )


def start_rollouts_ahead(
    cfg: Any,
    run: Any,
    rollout: Any,
    train_rows: Any,
    sampler: Any,
    sampling: Any,
    agent: Any,
    record_topk=None,
) -> RolloutsAhead | None:
    """With rollout.max_staleness > 0, the thread generating the coming steps' rollouts (GRPO and
    PPO alike): it reads the rows in a copy of the epoch order (the checkpointed sampler advances as
    steps are trained) and leaves sending weights to the trainer's thread. None otherwise."""
    if not cfg.rollout.max_staleness:
        return None
    order = copy.deepcopy(sampler)
    version = run.step  # the weights of the last trained step, which the evaluation before sent
    rollout.sync_weights(version)
    rollout.synced_by_trainer = True

    def produce(step: int):
        indices = order.next_indices(cfg.train.prompts_per_step)
        rows = train_rows.select(rank_slice(indices, run.env.rank, run.env.world_size))
        return indices, rollout_of_step(
            cfg, run, rollout, rows, sampling, agent, step, rollout.synced_step, record_topk
        )

    ahead = RolloutsAhead(produce, run.step + 1, run.total_steps, cfg.rollout.max_staleness, version)
    run.on_close(ahead.close)
    return ahead


def take_rollout(ahead: RolloutsAhead, step: int, indices: list[int]) -> tuple[Any, dict[str, float]]:
    """The rollout of `step` generated ahead, for the rows the trainer's own sampler chose, with the
    pipeline's and the staleness metrics."""
    (generated_indices, (batch, metrics)), pipeline = ahead.take(step)
    if list(generated_indices) != list(indices):
        raise RuntimeError(f"step {step}: the generating thread left the epoch order")
    return batch, {**metrics, **pipeline, **staleness_metrics(batch, step, ahead.max_staleness)}
