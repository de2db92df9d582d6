"""Multi-turn episodes with tools (rlhf/agents): exact token bookkeeping, TRL's tool and environment
contracts, and every fault a tool call can have, on a scripted engine whose turns are chosen by the
test, so each expectation is written out by hand."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch
from trl.chat_template_utils import qwen2_5_chat_template

from rlhf.agents.chat import TemplateError, prepare_tool_calling, tool_suffix_ids
from rlhf.agents.environments import Environments
from rlhf.agents.episodes import Episode, EpisodeLimits, collate_episodes, episode_metrics, run_episodes
from rlhf.agents.tools import Toolbox, load_tools
from rlhf.config import ConfigError
from rlhf.data.chat import encode_prompt
from rlhf.rollout.sampling import Samples, SamplingParams
from tests.chat_model import build_chatml_tokenizer


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: the first factor
        b: the second factor
    """
    return a * b


async def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first term
        b: the second term
    """
    await asyncio.sleep(0)
    return a + b


def hang(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: how long
    """
    time.sleep(seconds)
    return "woke"


class GuessingGame:
    """An environment written exactly to TRL's documented contract: reset(**row) returns text for
    the last user message, public methods are tools, get_reward scores the episode."""

    def __init__(self):
        self.secret = None
        self.guesses = 0

    def reset(self, **kwargs) -> str | None:
        self.secret = int(kwargs["secret"])
        self.guesses = 0
        return " (between 1 and 9)"

    def guess(self, number: int) -> str:
        """Guess the secret number.

        Args:
            number: the guess
        """
        self.guesses += 1
        if number == self.secret:
            return "correct"
        return "higher" if number < self.secret else "lower"

    def get_reward(self) -> float:
        return 1.0 if self.guesses and self.guesses <= 3 else 0.0


def call(name: str, **arguments) -> str:
    import json

    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call><|im_end|>"


class ScriptedEngine:
    """A rollout engine whose completion of a context is `script(text of the context)`."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script = tokenizer, script
        self.policy = type("Policy", (), {"device": torch.device("cpu")})()
        self.calls: list[int] = []  # live episodes per engine call

    def sample(self, prompt_token_ids, group_size, sampling, **unused) -> Samples:
        assert group_size == 1
        self.calls.append(len(prompt_token_ids))
        rows = []
        for ids in prompt_token_ids:
            text = self.script(self.tokenizer.decode(ids))
            rows.append(
                self.tokenizer(text, add_special_tokens=False)["input_ids"][: sampling.max_new_tokens]
            )
        width = max(len(r) for r in rows)
        padded = [r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows]
        logprobs = torch.full((len(rows), width), -0.5)
        return Samples(torch.tensor(padded), logprobs=logprobs)


@pytest.fixture()
def tokenizer():
    tokenizer = build_chatml_tokenizer()
    tokenizer.chat_template = qwen2_5_chat_template  # trl knows its response parser and suffixes
    prepare_tool_calling(tokenizer)
    return tokenizer


def episode(tokenizer, question: str, functions, environment=None) -> Episode:
    messages = [{"role": "user", "content": question}]
    schemas = Toolbox(functions).schemas()
    ids, _ = encode_prompt(tokenizer, messages, True, tools=schemas)
    return Episode(ids, messages, Toolbox(functions, timeout_s=2.0), schemas, environment)


def test_an_episode_is_the_generated_ids_and_the_template_s_tool_suffix_concatenated(tokenizer):
    first, answer = call("multiply", a=123, b=456), "It is 56088.<|im_end|>"
    engine = ScriptedEngine(tokenizer, lambda text: answer if "56088" in text else first)
    played = episode(tokenizer, "What is 123 * 456?", [multiply])
    run_episodes(engine, [played], SamplingParams(max_new_tokens=128), EpisodeLimits(4, 400))
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    suffix = tool_suffix_ids(tokenizer, [{"role": "tool", "name": "multiply", "content": "56088"}])
    assert (
        tokenizer.decode(suffix)
        == "\n<|im_start|>user\n<tool_response>\n56088\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )
    assert played.response_ids == ids(first) + suffix + ids(answer)
    assert played.generated == [True] * len(ids(first)) + [False] * len(suffix) + [True] * len(ids(answer))
    assert played.ending == "answer" and played.tool_calls == 1 and played.tool_errors == 0
    assert [m["role"] for m in played.completion_messages] == ["assistant", "tool", "assistant"]
    assert played.completion_messages[0]["tool_calls"][0]["function"]["arguments"] == {"a": 123, "b": 456}
    assert played.completion_messages[2]["content"] == "It is 56088."
    batch = collate_episodes([played], tokenizer, ["q"], {}, 1, torch.device("cpu"))
    generated = torch.tensor(played.generated)
    assert torch.equal(batch.response_mask[0], generated) and torch.equal(
        batch.environment_mask[0], ~generated
    )
    assert torch.equal(batch.attended_mask[0], torch.ones(len(generated), dtype=torch.bool))
    assert torch.equal(batch.rollout_logprobs[0], torch.where(generated, -0.5, 0.0))
    assert batch.reward_completions() == [played.completion_messages] and not bool(batch.truncated[0])


def test_live_episodes_share_each_engine_call_and_finished_ones_leave(tokenizer):
    def script(text):
        if "Q1" in text:
            return "Done.<|im_end|>"
        return "Done.<|im_end|>" if "<tool_response>" in text else call("multiply", a=2, b=3)

    engine = ScriptedEngine(tokenizer, script)
    episodes = [episode(tokenizer, q, [multiply]) for q in ("Q1", "Q2", "Q3")]
    run_episodes(engine, episodes, SamplingParams(max_new_tokens=128), EpisodeLimits(4, 400))
    assert engine.calls == [3, 2]  # one call per turn; the episode that answered at once left
    assert [len(e.turns) for e in episodes] == [1, 2, 2]


def test_tool_faults_become_error_results_and_the_episode_goes_on(tokenizer):
    faults = [
        '<tool_call>\n{"name": "multiply", "argu</tool_call><|im_end|>',  # malformed JSON
        call("divide", a=1, b=2),  # unknown tool
        call("multiply", x=1),  # wrong arguments
        call("hang", seconds=30),  # past the timeout
    ]
    for fault in faults:
        engine = ScriptedEngine(tokenizer, lambda text, f=fault: "Sorry.<|im_end|>" if "error" in text else f)
        played = episode(tokenizer, "Q", [multiply, hang])
        played.toolbox.timeout_s = 0.2
        run_episodes(engine, [played], SamplingParams(max_new_tokens=128), EpisodeLimits(3, 600))
        assert played.tool_errors == 1 and played.ending == "answer", fault
        assert "error" in played.turns[0]["results"][0]["content"]


def test_async_tools_turn_and_token_limits(tokenizer):
    engine = ScriptedEngine(tokenizer, lambda text: call("add", a=2, b=3))
    played = episode(tokenizer, "Q", [add])
    run_episodes(engine, [played], SamplingParams(max_new_tokens=128), EpisodeLimits(3, 600))
    assert played.ending == "max_turns" and len(played.turns) == 3 and played.tool_calls == 2
    assert played.turns[0]["results"][0]["content"] == "5"
    tight = episode(tokenizer, "Q", [add])
    run_episodes(engine, [tight], SamplingParams(max_new_tokens=128), EpisodeLimits(3, 40))
    assert tight.ending == "token_budget" and len(tight.response_ids) <= 40
    metrics = episode_metrics([played, tight])
    assert metrics["episodes/truncated_fraction"] == 1.0 and metrics["episodes/ended_max_turns"] == 0.5


def test_a_trl_environment_runs_unchanged(tokenizer):
    environments = Environments({None: GuessingGame})
    game = environments.instances([None])[0]
    assert game.reset(secret=7) == " (between 1 and 9)"

    def script(text):
        if text.count("<tool_response>") >= 2:
            return "Found it.<|im_end|>"
        return call("guess", number=5) if "<tool_response>" not in text else call("guess", number=7)

    played = episode(tokenizer, "Guess my number", [], game)
    played.toolbox = Toolbox([game.guess])
    run_episodes(
        ScriptedEngine(tokenizer, script), [played], SamplingParams(max_new_tokens=128), EpisodeLimits(5, 400)
    )
    assert [r["content"] for t in played.turns for r in t["results"]] == ["higher", "correct"]
    ((name, reward),) = environments.reward_functions()
    assert name == "GuessingGame" and reward([""], [""], environments=[game]) == [1.0]


def test_templates_and_tools_that_cannot_work_are_refused():
    tokenizer = build_chatml_tokenizer()  # its template writes content only: no tool calls
    with pytest.raises(ConfigError, match="does not render a tool-calling conversation"):
        prepare_tool_calling(tokenizer)

    def undocumented(a):
        return a

    import tests.unit.test_agents as here

    here.undocumented = undocumented
    with pytest.raises(ConfigError, match="rollout.tools: tool 'undocumented' has no usable schema"):
        load_tools(["tests.unit.test_agents:undocumented"])
    with pytest.raises(ConfigError, match="could not be imported"):
        load_tools(["tests.unit.test_agents:missing"])


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # an assistant turn is rendered with a marker only once something follows it
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for c in m.tool_calls or [] %}{{ c.function.name }}{{ c.function.arguments | tojson }}{% endfor %}"
        "{% if m.role == 'assistant' and not loop.last %} (answered){% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(ConfigError, match="renders earlier turns differently"):
        prepare_tool_calling(tokenizer)
    with pytest.raises(TemplateError, match="rendered the assistant's turn differently"):
        tool_suffix_ids(tokenizer, [{"role": "tool", "name": "f", "content": "1"}])


class ForcedEngine:
    """The real model's engine, except that a turn with no tool result yet is the scripted call:
    every generated token's logprob is the model's, computed on that turn's own context alone."""

    def __init__(self, model, tokenizer, forced: str):
        self.model, self.tokenizer = model, tokenizer
        self.forced = tokenizer(forced, add_special_tokens=False)["input_ids"]
        self.policy = type("Policy", (), {"device": torch.device("cpu")})()

    @torch.no_grad()
    def sample(self, prompt_token_ids, group_size, sampling, **unused) -> Samples:
        rows, logprobs = [], []
        for context in prompt_token_ids:
            if "<tool_response>" in self.tokenizer.decode(context):
                ids = self.model.generate(
                    torch.tensor([context]),
                    do_sample=True,
                    max_new_tokens=sampling.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                )[0, len(context) :].tolist()
            else:
                ids = list(self.forced)
            full = torch.tensor([context + ids])
            scores = torch.log_softmax(self.model(full).logits[0, len(context) - 1 : -1].float(), -1)
            rows.append(ids)
            logprobs.append(scores.gather(-1, torch.tensor(ids)[:, None])[:, 0].tolist())
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return Samples(
            torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            logprobs=torch.tensor([p + [0.0] * (width - len(p)) for p in logprobs]),
        )


def test_the_trainer_s_logprobs_of_every_generated_token_equal_the_engine_s(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhf.models.forward import response_logprobs
    from tests.chat_model import save_chat_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(save_chat_model(str(tmp_path / "model"))).eval()
    engine = ForcedEngine(model, tokenizer, call("multiply", a=12, b=3))
    episodes = [episode(tokenizer, q, [multiply]) for q in ("What is 12 * 3?", "Multiply 12 by 3.")]
    run_episodes(engine, episodes, SamplingParams(max_new_tokens=24), EpisodeLimits(3, 400))
    batch = collate_episodes(episodes, tokenizer, ["a", "b"], {}, 1, torch.device("cpu"))
    assert bool(batch.environment_mask.any()) and all(e.tool_calls == 1 for e in episodes)
    with torch.no_grad():
        trainer, _ = response_logprobs(
            model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.attended_mask
        )
    generated = batch.response_mask
    difference = (trainer - batch.rollout_logprobs).abs()[generated]
    assert difference.max() < 2e-5, difference.max()
    # the same pass with the tool tokens hidden reads a different history: the check can fail
    with torch.no_grad():
        blind, _ = response_logprobs(
            model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask
        )
    assert (blind - batch.rollout_logprobs).abs()[generated].max() > 1e-3


LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up a word.",
        "parameters": {"type": "object", "properties": {}},
    },
}


class Counter:
    """A second environment (TRL's contract) for the mapping case."""

    def reset(self, **kwargs) -> None:
        self.count = 0

    def increment(self) -> int:
        """Add one to the counter."""
        self.count += 1
        return self.count


class Broken:
    def reset(self, **kwargs) -> None:
        raise KeyError("secret")


def test_the_agent_plays_rows_with_their_environment_system_turn_and_tools(tokenizer):
    from datasets import Dataset

    from rlhf.agents.agent import Agent

    environments = Environments({"game": GuessingGame, "counter": Counter})
    agent = Agent(tokenizer, [multiply], environments, EpisodeLimits(3, 400), tool_timeout_s=2.0)
    rows = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "Guess"}],
                "environment": "game",
                "secret": 5,
                "system": "Be quick.",
                "tools": json.dumps([LOOKUP]),  # a row's own tools column is rendered too
            },
            {
                "prompt": [{"role": "user", "content": "Count"}],
                "environment": "counter",
                "secret": 0,
                "system": None,
                "tools": "[]",
            },
        ]
    )

    def script(text):
        if "<tool_response>" in text:
            return "Done.<|im_end|>"
        return call("guess", number=5) if "Guess" in text else call("increment")

    engine = ScriptedEngine(tokenizer, script)
    batch, metrics = agent.rollout(
        engine, rows, prompt_column="prompt", group_size=2, sampling=SamplingParams(128)
    )
    assert batch.batch_size == 4 and batch.group_ids.tolist() == [0, 0, 1, 1]
    assert [type(e).__name__ for e in batch.environments] == ["GuessingGame"] * 2 + ["Counter"] * 2
    assert len({id(e) for e in batch.environments}) == 4  # one instance per episode
    game_prompt, counter_prompt = tokenizer.decode(batch.prompt_ids[0]), tokenizer.decode(batch.prompt_ids[2])
    assert "Be quick." in game_prompt and "Guess (between 1 and 9)" in game_prompt  # system turn, reset text
    assert '"name": "guess"' in game_prompt and '"name": "multiply"' in game_prompt
    assert '"name": "guess"' not in counter_prompt and '"name": "increment"' in counter_prompt
    assert '"name": "lookup"' in game_prompt and '"name": "lookup"' not in counter_prompt
    assert [c[1]["content"] for c in batch.completion_messages] == ["correct", "correct", "1", "1"]
    assert metrics["episodes/tool_calls_mean"] == 1.0 and metrics["episodes/ended_answer"] == 1.0
    ((name, reward),) = agent.reward_functions()
    assert reward(batch.prompts, batch.completion_messages, environments=batch.environments) == [
        1.0,
        1.0,
        None,
        None,
    ]
    with pytest.raises(ConfigError, match="row 0 has environment='nowhere'"):
        agent.rollout(
            engine,
            Dataset.from_list([{"prompt": "x", "environment": "nowhere"}]),
            prompt_column="prompt",
            group_size=1,
            sampling=SamplingParams(8),
        )
    broken = Agent(tokenizer, [], Environments({None: Broken}), EpisodeLimits(2, 100), None)
    with pytest.raises(RuntimeError, match=r"Broken.reset failed on row 0 .*KeyError\('secret'\)"):
        broken.rollout(
            engine,
            Dataset.from_list([{"prompt": "x"}]),
            prompt_column="prompt",
            group_size=1,
            sampling=SamplingParams(8),
        )


class Rated(Counter):
    def get_turn_rewards(self) -> list[float]:
        return [0.25, 1.0][: self.count + 1]


def test_per_turn_rewards_sit_on_each_turn_s_last_generated_token(tokenizer):
    from datasets import Dataset

    from rlhf.agents.agent import Agent

    agent = Agent(tokenizer, [], Environments({None: Rated}), EpisodeLimits(3, 400), tool_timeout_s=2.0)
    engine = ScriptedEngine(
        tokenizer, lambda text: "Done.<|im_end|>" if "<tool_response>" in text else call("increment")
    )
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "Count"}]}])
    batch, _ = agent.rollout(engine, rows, prompt_column="prompt", group_size=1, sampling=SamplingParams(128))
    assert "get_turn_rewards" not in tokenizer.decode(batch.prompt_ids[0])  # not offered as a tool
    generated = batch.response_mask[0].tolist()
    ends = [i for i, g in enumerate(generated) if g and (i + 1 == len(generated) or not generated[i + 1])]
    placed = {i: v for i, v in enumerate(batch.turn_rewards[0].tolist()) if v}
    assert placed == {ends[0]: 0.25, ends[1]: 1.0}
    Rated.get_turn_rewards = lambda self: [1.0, 1.0, 1.0]
    with pytest.raises(RuntimeError, match="Rated.get_turn_rewards returned 3 rewards on row 0, for 2 turns"):
        agent.rollout(engine, rows, prompt_column="prompt", group_size=1, sampling=SamplingParams(128))


def test_an_episode_that_cannot_fit_the_context_is_refused_naming_the_row(tokenizer):
    from datasets import Dataset

    from rlhf.agents.agent import Agent
    from rlhf.data.load import DataError

    agent = Agent(tokenizer, [multiply], None, EpisodeLimits(2, 300), tool_timeout_s=1.0, context=400)
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "Hi"}]}])
    engine = ScriptedEngine(tokenizer, lambda text: "Done.<|im_end|>")
    with pytest.raises(DataError, match=r"row 0's prompt is \d+ tokens; with rollout.max_episode_tokens=300"):
        agent.rollout(engine, rows, prompt_column="prompt", group_size=1, sampling=SamplingParams(8))
