"""Rollouts generated ahead of the trainer (rlhf/rollout/ahead.py): each step's rollout starts only
once weights recent enough are published, generation overlaps the update when staleness allows it
and never otherwise, failures reach the trainer, and staleness metrics are what they say."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from rlhf.rollout.ahead import RolloutsAhead, staleness_metrics


def _run(max_staleness: int, steps: int = 5) -> list[tuple[int, int]]:
    """(step, newest published version when its generation started) for a trainer that publishes
    version s after taking step s."""
    started: list[tuple[int, int]] = []
    published = [0]

    def produce(step: int) -> int:
        started.append((step, published[0]))
        time.sleep(0.01)
        return step

    ahead = RolloutsAhead(produce, 1, steps, max_staleness, published=0)
    for step in range(1, steps + 1):
        value, metrics = ahead.take(step)
        assert value == step and metrics["async/queue_depth"] <= max_staleness
        time.sleep(0.05)  # the update
        published[0] = step
        ahead.publish(step)
    ahead.close()
    return started


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_each_rollout_starts_from_weights_at_most_max_staleness_old(max_staleness):
    started = _run(max_staleness)
    assert [s for s, _ in started] == [1, 2, 3, 4, 5]
    for step, version in started:
        assert version >= step - 1 - max_staleness
    if max_staleness == 0:  # generate, then train, in turn
        assert all(version == step - 1 for step, version in started)
    else:  # some rollout was generated while an update ran
        assert any(version < step - 1 for step, version in started)


def test_a_generation_failure_reaches_the_trainer():
    def produce(step: int) -> int:
        if step == 2:
            raise ValueError("server gone")
        return step

    ahead = RolloutsAhead(produce, 1, 3, 1, published=0)
    assert ahead.take(1)[0] == 1
    ahead.publish(1)
    with pytest.raises(RuntimeError, match="rollout of step 2 failed") as failure:
        ahead.take(2)
    assert isinstance(failure.value.__cause__, ValueError)
    ahead.close()


def test_close_stops_a_generator_waiting_for_weights():
    ahead = RolloutsAhead(lambda step: step, 1, 10, 0, published=0)
    ahead.take(1)  # step 2 now waits for version 1, which never comes
    ahead.close()
    assert not ahead.thread.is_alive()
    assert not any(t.name == "rollouts-ahead" and t.is_alive() for t in threading.enumerate())


def test_staleness_metrics():
    batch = SimpleNamespace(weight_versions=[4, 4, 3, 5])
    metrics = staleness_metrics(batch, step=6, max_staleness=2)  # trained from version 5
    assert metrics["async/staleness_mean"] == pytest.approx((1 + 1 + 2 + 0) / 4)
    assert metrics["async/staleness_max"] == 2.0
    assert [metrics[f"async/staleness_{lag}_fraction"] for lag in range(3)] == [0.25, 0.5, 0.25]
    assert staleness_metrics(SimpleNamespace(weight_versions=[]), 6, 2) == {}
    with pytest.raises(RuntimeError, match="3 updates stale"):
        staleness_metrics(SimpleNamespace(weight_versions=[2]), step=6, max_staleness=2)
