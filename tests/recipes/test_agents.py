"""GRPO over multi-turn episodes with a tool, through the recipe: a chat model with a template trl
knows (Qwen2.5's), conversational prompts, `rollout.tools`, and a reward that reads the whole
conversation. The random model would rarely call the tool, so each episode's first turn is the
call (the engine's sampling is replaced for turns with no tool result yet); later turns are
sampled. The engine returns each row's logprobs scored on its own context, as vLLM does, so the
recipe's `rollout/logprob_diff` shows whether the trainer reads the episodes as they were played.
The test checks what only the tool path produces."""

from __future__ import annotations

import json
import os

import pytest
import torch
from trl.chat_template_utils import qwen2_5_chat_template

from recipes import grpo, ppo
from rlhf.inspect import load_run
from rlhf.loggers import read_metrics
from rlhf.rollout import hf
from rlhf.rollout.sampling import Samples
from tests.chat_model import save_chat_model

CALL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 3}}\n</tool_call><|im_end|>'
SEEN: list = []


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


class Calculator:
    """An environment to TRL's contract (reset, tool methods), with per-turn rewards (ours)."""

    def reset(self, **row) -> None:
        self.calls = 0

    def multiply(self, a: int, b: int) -> int:
        """Multiply two integers.

        Args:
            a: the first factor
            b: the second factor
        """
        self.calls += 1
        return a * b

    def get_turn_rewards(self) -> list[float]:
        return [0.5 * self.calls]  # the first turn, which called the tool


def used_the_result(prompts, completions, answer, **columns):
    """1 when the tool's result came back and the last turn states it (TRL's signature: the whole
    conversation after the prompt, as messages)."""
    SEEN.extend(completions)
    return [
        float(any(m["role"] == "tool" and m["content"] == a for m in c) and a in c[-1].get("content", ""))
        for c, a in zip(completions, answer)
    ]


@torch.no_grad()
def _teacher_forced(model, contexts: list[list[int]], ids: torch.Tensor) -> torch.Tensor:
    """The engine's logprobs as vLLM returns them: each row's tokens scored on its own context."""
    scores = torch.zeros(ids.shape)
    for row, context in enumerate(contexts):
        logits = model(torch.tensor([context + ids[row].tolist()])).logits[0, len(context) - 1 : -1]
        scores[row] = torch.log_softmax(logits.float(), -1).gather(-1, ids[row][:, None])[:, 0]
    return scores


def force_tool_call_first(monkeypatch, engine_class) -> None:
    """`engine_class` samples as usual, except that a turn with no tool result yet is the call.
    The returned logprobs are the engine's own for the turns it sampled (vLLM's), and for the
    forced call (and an engine without logprobs) the model's on each row's own context."""
    sample = engine_class.sample

    def first_turn_calls(self, prompt_token_ids, group_size, sampling, **kwargs):
        samples = sample(self, prompt_token_ids, group_size, sampling, **kwargs)
        forced = self.tokenizer(CALL, add_special_tokens=False)["input_ids"]
        rows = [
            forced if "<tool_response>" not in self.tokenizer.decode(ids) else None
            for ids in prompt_token_ids
        ]
        sampled = samples.response_ids.cpu()
        width = max([sampled.shape[1]] + [len(r) for r in rows if r])
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        ids[:, : sampled.shape[1]] = sampled
        for index, row in enumerate(rows):
            if row:
                ids[index] = self.tokenizer.pad_token_id
                ids[index, : len(row)] = torch.tensor(row)
        scores = _teacher_forced(self.policy.module, prompt_token_ids, ids)
        if samples.logprobs is not None:
            for index, row in enumerate(rows):
                if not row:
                    scores[index] = 0.0
                    scores[index, : sampled.shape[1]] = samples.logprobs[index].cpu()
        return Samples(ids, logprobs=scores)

    monkeypatch.setattr(engine_class, "sample", first_turn_calls)


@pytest.fixture()
def calling_engine(monkeypatch):
    force_tool_call_first(monkeypatch, hf.TransformersEngine)


@pytest.fixture()
def tool_task(tmp_path) -> list[str]:
    """A chat model whose template trl knows, a multiplication question per row, the tool and a
    reward reading the conversation: the overrides both recipes share."""
    model = save_chat_model(str(tmp_path / "model"))
    template = tmp_path / "template.jinja"
    template.write_text(qwen2_5_chat_template)
    data = tmp_path / "data"
    data.mkdir()
    questions = {
        "train": ("What is 12 * 3?", "Multiply 12 by 3.", "12 times 3?"),
        "eval": ("Compute 12 * 3.",),
    }
    for split, texts in questions.items():
        with open(data / f"{split}.jsonl", "w") as handle:
            for question in texts:
                row = {"prompt": [{"role": "user", "content": question}], "answer": "36"}
                handle.write(json.dumps(row) + "\n")
    SEEN.clear()
    return [
        "model.source=pretrained",
        f"model.name_or_path={model}",
        f"data.source={data}",
        f"data.chat_template={template}",
        "reward.functions=[{name: tests.recipes.test_agents:used_the_result}]",
        "rollout.tools=[tests.recipes.test_agents:multiply]",
        "rollout.max_turns=3",
        "rollout.max_new_tokens=16",
        "rollout.max_episode_tokens=160",
        "rollout.group_size=2",
        "train.prompts_per_step=2",
        "train.micro_batch_size=4",
        "train.steps=2",
        "eval.every=0",
        "logger.rollout_samples=2",
    ]


@pytest.mark.parametrize("layout", ["plain", "shared_prefix"])
def test_grpo_trains_on_tool_episodes(make_config, tool_task, calling_engine, layout):
    # the shared-prefix forward encodes each group's first prompt once, its episodes after it
    cfg = make_config("grpo", *tool_task, f"model.shared_prefix={layout == 'shared_prefix'}")
    result = grpo.train(cfg)
    evaluated = [r for r in read_metrics(result["run_dir"]) if "eval/reward" in r]
    assert [r["step"] for r in evaluated] == [0, 2]  # greedy episodes on the eval split, before and after
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert len(rows) == 2
    for row in rows:
        assert row["episodes/tool_calls_mean"] == 1.0 and row["episodes/tool_errors_mean"] == 0.0
        assert row["episodes/turns_mean"] >= 2.0
        assert row["response/length_mean"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
        # the trainer reads each episode as the engine did: tool tokens in place, nothing re-tokenized
        assert row["rollout/logprob_diff_max"] < 1e-4, row["rollout/logprob_diff_max"]
    # the reward saw each conversation: the call, the tool's result, the sampled answer
    assert SEEN and all([m["role"] for m in c][:2] == ["assistant", "tool"] for c in SEEN)
    assert all(c[0]["tool_calls"][0]["function"]["arguments"] == {"a": 12, "b": 3} for c in SEEN)
    assert all(c[1]["content"] == "36" for c in SEEN)
    with open(os.path.join(result["run_dir"], "rollouts.jsonl")) as handle:
        record = json.loads(handle.readline())
    trained = record["trained"]
    assert len(trained) == len(record["tokens"]) and not all(trained) and trained[0]
    assert record["length"] == sum(trained)  # only the generated tokens are trained
    assert "".join(t for t, keep in zip(record["tokens"], trained) if not keep).startswith(
        "\n<|im_start|>user\n<tool_response>\n36"
    )
    assert record["conversation"][1] == {"role": "tool", "name": "multiply", "content": "36"}


def test_ppo_takes_each_model_turn_as_a_macro_action(make_config, tool_task, calling_engine):
    task = [o for o in tool_task if not o.startswith("rollout.tools=")]
    environment = "rollout.environment=tests.recipes.test_agents:Calculator"  # the tool is its method
    cfg = make_config("ppo", *task, environment, "critic.init=policy", "advantage.macro.segmenter=turns")
    result = ppo.train(cfg)
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert len(rows) == 2 and all(r["episodes/tool_calls_mean"] == 1.0 for r in rows)
    assert all(r["reward/turns_sum"] == 0.5 for r in rows)  # the environment's per-turn reward, placed
    assert all(r["rollout/logprob_diff_max"] < 1e-4 for r in rows)
    with open(os.path.join(result["run_dir"], "rollouts.jsonl")) as handle:
        record = json.loads(handle.readline())
    segments, trained = record["segment_ids"], record["trained"]
    assert record["episode"]["turn_rewards"] == [0.5]
    first_turn = trained.index(False)
    # the call is one macro action, the tool's tokens none, the answer the next (its last token alone)
    assert set(segments[:first_turn]) == {0} and set(s for s, t in zip(segments, trained) if not t) == {-1}
    answer = [s for s, t in zip(segments[first_turn:], trained[first_turn:]) if t]
    assert answer[0] == 1 and answer[-1] == max(segments)
    # the notebook view: the tool's tokens grey, the model's coloured by their advantage
    run = load_run(result["run_dir"])
    heatmap = run.heatmap(run.rollouts.iloc[0], "advantages")
    assert heatmap.html.count("background:#eeeeee") == trained.count(False) > 0


def test_grpo_adds_an_environment_s_turn_rewards_to_the_score(make_config, tool_task, calling_engine):
    task = [o for o in tool_task if not o.startswith("rollout.tools=")]
    cfg = make_config("grpo", *task, "rollout.environment=tests.recipes.test_agents:Calculator")
    rows = [r for r in read_metrics(grpo.train(cfg)["run_dir"]) if "loss" in r]
    for row in rows:  # every episode called once: 0.5 on top of the reward function's score
        assert row["reward/mean"] - row[
            "reward/tests.recipes.test_agents:used_the_result/mean"
        ] == pytest.approx(0.5)
