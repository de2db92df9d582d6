"""GRPO over tool episodes on the colocated vLLM engine and on a launched vLLM server: the turns vLLM samples after a tool result
come with vLLM's own processed logprobs, and the trainer's logprobs of the episode (the tool tokens
in place, nothing re-tokenized) match them as closely as on single-turn rollouts. The first turn of
each episode is the tool call (the random model would rarely call it; see tests/recipes/test_agents.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from recipes import grpo  # noqa: E402
from rlhf.loggers import read_metrics  # noqa: E402
from rlhf.rollout.server import VllmServerEngine  # noqa: E402
from rlhf.rollout.vllm import VllmEngine  # noqa: E402
from tests.recipes.conftest import compose_recipe_config  # noqa: E402
from tests.recipes.test_agents import SEEN, force_tool_call_first, tool_task  # noqa: E402, F401


@pytest.mark.parametrize("engine", ["vllm", "vllm_server"])
def test_grpo_episodes_on_vllm_match_the_trainer(tmp_path, tool_task, monkeypatch, engine):  # noqa: F811
    force_tool_call_first(monkeypatch, VllmEngine if engine == "vllm" else VllmServerEngine)
    cfg = compose_recipe_config(
        "grpo",
        [
            *tool_task,
            "logger=quiet",
            f"run_dir={tmp_path / 'run'}",
            f"rollout.engine={engine}",
            "rollout.vllm.enforce_eager=true",
            "rollout.max_new_tokens=24",
        ],
    )
    result = grpo.train(cfg)
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert len(rows) == 2
    # weights sent once per update: version 0 before the held-out evaluation that opens the run
    assert rows[0]["time/weight_sync"] == 0.0 and rows[1]["time/weight_sync"] > 0
    for row in rows:
        assert row["episodes/tool_calls_mean"] == 1.0 and row["episodes/turns_mean"] >= 2.0
        # kernel differences only, as on single-turn rollouts (tests/vllm/test_vllm_recipes.py)
        assert row["rollout/logprob_diff_max"] < 1e-4 and row["rollout/kl"] < 1e-6
    assert SEEN and all(c[1]["role"] == "tool" and c[1]["content"] == "36" for c in SEEN)
