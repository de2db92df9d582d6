"""Multi-turn episodes on any rollout engine: generate, parse tool calls, run them, append their
results, generate again, until the model answers without a call, `rollout.max_turns` turns are
taken, or the episode's token budget (`rollout.max_episode_tokens`) is spent.

Every live episode of a batch takes its turn in the same engine call; finished episodes leave the
batch. The trained sequence is exactly the ids the model generated and the ids the template wrote
for the tool messages, concatenated: nothing the model generated is re-tokenized. Only generated
tokens are trained (`response_mask`); tool and environment tokens are context (`environment_mask`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.agents.chat import parse_turn, tool_call_opener, tool_suffix_ids
from rlhf.agents.tools import Toolbox, ToolResult
from rlhf.rollout.sampling import (
    SamplingParams,
    pad_prompts,
    pad_right,
    response_mask_from_ids,
    stop_string_ends,
)
from rlhf.types import RolloutBatch

# how an episode ended: the model answered; it was still calling tools at the turn limit; its
# tokens (or the model's context) ran out mid-turn or before a tool result fitted
ENDINGS = ("answer", "max_turns", "token_budget")


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int
    max_episode_tokens: int  # generated and tool tokens of one episode, after its first prompt


@dataclass
class Episode:
    """One sample's conversation: the first prompt's ids, then every token after it."""

    prompt_ids: list[int]
    messages: list[dict[str, Any]]  # the prompt's messages, then each assistant and tool turn
    toolbox: Toolbox
    schemas: list[dict[str, Any]] | None = None
    environment: Any = None
    response_ids: list[int] = field(default_factory=list)
    generated: list[bool] = field(default_factory=list)  # the model sampled the token (it is trained)
    logprobs: list[float] = field(default_factory=list)  # the engine's, 0 for tool tokens
    turns: list[dict[str, Any]] = field(default_factory=list)  # per turn: text, calls, results
    tool_calls: int = 0
    tool_errors: int = 0
    ending: str | None = None
    prompt_messages: int = 0  # how many of `messages` the prompt holds
    turn_ends: list[int] = field(default_factory=list)  # index of each turn's last generated token
    turn_rewards: list[float] | None = None  # the environment's, one per model turn
    scored: bool = True  # the engine returned logprobs for every generated token
    weight_version: int | None = None  # the oldest policy version among its turns (vLLM servers)

    def __post_init__(self) -> None:
        self.prompt_messages = self.prompt_messages or len(self.messages)

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def completion_messages(self) -> list[dict[str, Any]]:
        return self.messages[self.prompt_messages :]

    def add(
        self, ids: list[int], generated: bool, logprobs: list[float] | None = None, version: int | None = None
    ) -> None:
        if version is not None:  # the oldest weights among the episode's turns
            self.weight_version = (
                version if self.weight_version is None else min(self.weight_version, version)
            )
        self.response_ids += ids
        self.generated += [generated] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.scored = self.scored and (logprobs is not None or not generated)


def _generated_turns(engine: Any, live: list[Episode], sampling: SamplingParams, limits: EpisodeLimits, **kw):
    """One engine call for every live episode: per episode (ids up to and including its end, the
    engine's logprobs or None, whether the turn ended within its room, its weight version or None)."""
    room = [limits.max_episode_tokens - len(e.response_ids) for e in live]
    turn_sampling = dataclasses.replace(
        sampling, max_new_tokens=max(1, min(sampling.max_new_tokens, max(room)))
    )
    samples = engine.sample([e.context for e in live], 1, turn_sampling, **kw)
    tokenizer = engine.tokenizer
    ids = samples.response_ids
    mask, unended = response_mask_from_ids(
        ids, tokenizer.eos_token_id, stop_string_ends(ids, tokenizer, sampling.stop)
    )
    turns = []
    for row, space in enumerate(room):
        length = min(int(mask[row].sum()), space)
        ended = not bool(unended[row]) and int(mask[row].sum()) <= space
        logprobs = None if samples.logprobs is None else samples.logprobs[row, :length].tolist()
        version = None if samples.weight_versions is None else samples.weight_versions[row]
        turns.append((ids[row, :length].tolist(), logprobs, ended, version))
    return turns


def _run_tools(episode: Episode, message: dict[str, Any], malformed: bool) -> list[ToolResult]:
    if malformed:
        return [ToolResult("unknown", str({"error": "the tool call could not be parsed"}), error=True)]
    return [episode.toolbox.call(call) for call in message["tool_calls"]]


def run_episodes(
    engine: Any,
    episodes: list[Episode],
    sampling: SamplingParams,
    limits: EpisodeLimits,
    *,
    do_sample: bool = True,
    seed: int = 0,
) -> None:
    """Play `episodes` to their end with `engine` (inside its `ready` block)."""
    tokenizer = engine.tokenizer
    opener = tool_call_opener(tokenizer)
    for turn in range(limits.max_turns):
        live = [e for e in episodes if e.ending is None]
        if not live:
            return
        generated = _generated_turns(
            engine, live, sampling, limits, do_sample=do_sample, seed=seed + 7919 * turn
        )
        for episode, (ids, logprobs, ended, version) in zip(live, generated):
            context = episode.context
            episode.add(ids, True, logprobs, version)
            if ids:
                episode.turn_ends.append(len(episode.response_ids) - 1)
            record = {"text": tokenizer.decode(ids, skip_special_tokens=True), "calls": [], "results": []}
            episode.turns.append(record)
            if not ended:
                episode.ending = "token_budget"
                continue
            message, malformed = parse_turn(tokenizer, ids, context, episode.schemas, opener)
            episode.messages.append(message)
            record["calls"] = message.get("tool_calls") or ([{"malformed": True}] if malformed else [])
            if not record["calls"]:
                episode.ending = "answer"
                continue
            if turn == limits.max_turns - 1:
                episode.ending = "max_turns"
                continue
            _answer_tools(tokenizer, episode, message, malformed, limits, record)


def _answer_tools(
    tokenizer: PreTrainedTokenizerBase,
    episode: Episode,
    message: dict[str, Any],
    malformed: bool,
    limits: EpisodeLimits,
    record: dict[str, Any],
) -> None:
    """Run the turn's calls and append their results, unless they would not fit the budget."""
    results = _run_tools(episode, message, malformed)
    episode.tool_calls += len(results)
    episode.tool_errors += sum(r.error for r in results)
    tool_messages = [{"role": "tool", "name": r.name, "content": r.content} for r in results]
    suffix = tool_suffix_ids(tokenizer, tool_messages)
    if len(episode.response_ids) + len(suffix) >= limits.max_episode_tokens:
        episode.ending = "token_budget"  # no room left to answer after the results
        return
    episode.add(suffix, False)
    episode.messages += tool_messages
    record["results"] = [{"name": r.name, "content": r.content, "error": r.error} for r in results]


def collate_episodes(
    episodes: list[Episode],
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Any],
    columns: dict[str, list[Any]],
    group_size: int,
    device: torch.device,
) -> RolloutBatch:
    """The RolloutBatch of finished episodes (rows of one prompt contiguous): `response_mask` the
    generated tokens, `environment_mask` the tool tokens between them; an episode that did not end
    with an answer is `truncated`."""
    prompt_ids, prompt_mask = pad_prompts([e.prompt_ids for e in episodes], tokenizer.pad_token_id, device)
    response_ids, attended = pad_right(
        [e.response_ids for e in episodes], tokenizer.pad_token_id, torch.long, device
    )
    generated, _ = pad_right([e.generated for e in episodes], False, torch.bool, device)
    logprobs, _ = pad_right([e.logprobs for e in episodes], 0.0, torch.float32, device)
    has_logprobs = all(e.scored for e in episodes)
    turn_rewards = None
    if any(e.turn_rewards is not None for e in episodes):  # each at its turn's last generated token
        turn_rewards = torch.zeros(response_ids.shape, dtype=torch.float32, device=device)
        for row, e in enumerate(episodes):
            for end, value in zip(e.turn_ends, e.turn_rewards or []):
                turn_rewards[row, end] += float(value)
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=generated & attended,
        environment_mask=attended & ~generated,
        group_ids=torch.arange(len(episodes) // group_size, device=device).repeat_interleave(group_size),
        truncated=torch.tensor([e.ending != "answer" for e in episodes], device=device),
        prompts=list(prompts),
        completions=[tokenizer.decode(e.response_ids, skip_special_tokens=True) for e in episodes],
        completion_messages=[e.completion_messages for e in episodes],
        columns=columns,
        prompt_texts=[tokenizer.decode(e.prompt_ids) for e in episodes],
        conversational=True,
        rollout_logprobs=logprobs if has_logprobs else None,
        weight_versions=[e.weight_version for e in episodes]
        if all(e.weight_version is not None for e in episodes)
        else [],
        environments=[e.environment for e in episodes]
        if any(e.environment is not None for e in episodes)
        else [],
        episodes=[
            {"turns": e.turns, "ending": e.ending, "tool_calls": e.tool_calls, "turn_rewards": e.turn_rewards}
            for e in episodes
        ],
        turn_rewards=turn_rewards,
    )


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    count = max(len(episodes), 1)
    return {
        "episodes/turns_mean": sum(len(e.turns) for e in episodes) / count,
        "episodes/tool_calls_mean": sum(e.tool_calls for e in episodes) / count,
        "episodes/tool_errors_mean": sum(e.tool_errors for e in episodes) / count,
        "episodes/truncated_fraction": sum(e.ending != "answer" for e in episodes) / count,
        **{f"episodes/ended_{name}": sum(e.ending == name for e in episodes) / count for name in ENDINGS},
    }
