"""Shapes and masks shared by every module, defined once.

Vocabulary: B sequences, T response tokens, P prompts, G samples per prompt. `response_mask` is a
bool [B, T] tensor where True marks a trained (valid) response token; the same polarity everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import torch


@dataclass
class LossOutput:
    """A scalar loss (already reduced with its normalizer) and detached metric tensors."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class RolloutBatch:
    """Sampled completions of one rollout, right-padded responses after left-padded prompts.

    prompt_ids [B, Lp] (left-padded), prompt_mask [B, Lp] bool, response_ids [B, T] (right-padded),
    response_mask [B, T] bool (True up to and including the first EOS), group_ids [B] (rows of one
    prompt share an id and are contiguous), truncated [B] bool (no EOS within the token budget).
    The tensors below are filled by later steps of the training loop.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    group_ids: torch.Tensor
    truncated: torch.Tensor
    prompts: list[Any] = field(default_factory=list)  # as the data has them: strings or message lists
    completions: list[str] = field(default_factory=list)
    columns: dict[str, list[Any]] = field(default_factory=dict)
    prompt_texts: list[str] = field(default_factory=list)  # what the model was fed (chat template applied)
    conversational: bool = False  # prompts are message lists: rewards get completions as messages
    old_logprobs: torch.Tensor | None = None  # [B, T]
    rollout_logprobs: torch.Tensor | None = None  # [B, T] the rollout engine's (vLLM), when it returns them
    rollout_weights: torch.Tensor | None = None  # [B, T] or [B, 1] importance weights for the engine mismatch
    ref_logprobs: torch.Tensor | None = None  # [B, T]
    advantages: torch.Tensor | None = None  # [B] or [B, T]
    outside_topk: torch.Tensor | None = None  # [B, T] bool: sampled token not in the top-k (CD-RLHF)
    ref_states: torch.Tensor | None = None  # [B, T, h] reference last hidden state predicting token t
    ref_next_states: torch.Tensor | None = None  # [B, T, h] ... at token t itself
    token_weights: torch.Tensor | None = None  # [B, T] per-token loss weights (GTPO's conflict weights)
    old_values: torch.Tensor | None = None  # [B, T] the critic's values at rollout time (PPO)
    returns: torch.Tensor | None = None  # [B, T] the critic's regression targets (PPO)
    segment_ids: torch.Tensor | None = None  # [B, T] macro-action segment of each token (MA-RLHF)
    # multi-turn episodes (rlhf/agents): tokens tools and environments wrote between the model's
    # turns, attended to and never trained ([B, T] bool; None: single-turn, the model wrote every
    # response token); each row's turns after the prompt as messages; its environment instance;
    # what happened in each turn (for the rollout records)
    environment_mask: torch.Tensor | None = None
    turn_rewards: torch.Tensor | None = None  # [B, T] an environment's per-turn rewards, at turn ends
    completion_messages: list[list[dict[str, Any]]] = field(default_factory=list)
    environments: list[Any] = field(default_factory=list)
    episodes: list[dict[str, Any]] = field(default_factory=list)
    # the oldest policy version (optimizer steps) among each row's generated tokens, when the
    # engine reports it (vLLM servers); empty otherwise
    weight_versions: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    @property
    def attended_mask(self) -> torch.Tensor:
        """[B, T] bool: every response token the model reads (its own and, in episodes, the tools')."""
        if self.environment_mask is None:
            return self.response_mask
        return self.response_mask | self.environment_mask

    def reward_completions(self) -> list[Any]:
        """Completions as reward functions receive them, the way TRL's GRPOTrainer passes them:
        strings, or for conversational prompts the assistant's messages (an episode's whole
        conversation after the prompt: assistant turns, tool calls and tool results)."""
        if self.completion_messages:
            return self.completion_messages
        if not self.conversational:
            return self.completions
        return [[{"role": "assistant", "content": text}] for text in self.completions]

    def select(self, index: torch.Tensor | Sequence[int]) -> RolloutBatch:
        """Rows `index` of every per-row field (tensors and python lists alike)."""
        index = torch.as_tensor(index, dtype=torch.long)
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                picked[f.name] = value[index.to(value.device)]
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in index.tolist()] if value else []
            elif isinstance(value, dict):
                picked[f.name] = {k: [v[i] for i in index.tolist()] for k, v in value.items()}
            else:
                picked[f.name] = value
        return replace(self, **picked)

    @classmethod
    def concat(cls, batches: Sequence[RolloutBatch], pad_token_id: int) -> RolloutBatch:
        """The rows of several rollouts in order, prompts re-padded on the left and per-token fields
        on the right to the widest; group ids stay unique."""
        prompt_width = max(b.prompt_ids.shape[1] for b in batches)
        token_width = max(b.response_ids.shape[1] for b in batches)

        def padded(name: str, value: torch.Tensor) -> torch.Tensor:
            fill = pad_token_id if name in ("prompt_ids", "response_ids") else 0
            if name in _PROMPT_FIELDS:
                return torch.nn.functional.pad(value, (prompt_width - value.shape[1], 0), value=fill)
            if name in _TOKEN_FIELDS:
                pad = [0, 0] * (value.dim() - 2) + [0, token_width - value.shape[1]]
                return torch.nn.functional.pad(value, pad, value=fill)
            return value

        joined: dict[str, Any] = {}
        offset = 0
        group_ids = []
        for b in batches:
            group_ids.append(b.group_ids + offset)
            offset += int(b.group_ids.max()) + 1 if b.group_ids.numel() else 0
        for f in fields(cls):
            parts = [getattr(b, f.name) for b in batches]
            if f.name == "group_ids":
                joined[f.name] = torch.cat(group_ids)
            elif all(isinstance(p, torch.Tensor) for p in parts):
                joined[f.name] = torch.cat([padded(f.name, p) for p in parts])
            elif all(isinstance(p, list) for p in parts):
                joined[f.name] = [item for p in parts for item in p]
            elif all(isinstance(p, dict) for p in parts):
                joined[f.name] = {k: [item for p in parts for item in p[k]] for k in parts[0]}
            elif all(p is None for p in parts) or not isinstance(parts[0], (torch.Tensor, list, dict)):
                joined[f.name] = parts[0]
            else:
                raise ValueError(f"cannot concatenate rollouts: {f.name} is set in some and not in others")
        return cls(**joined)

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


_PROMPT_FIELDS = ("prompt_ids", "prompt_mask")
_TOKEN_FIELDS = (
    "response_ids",
    "response_mask",
    "environment_mask",
    "turn_rewards",
    "old_logprobs",
    "rollout_logprobs",
    "ref_logprobs",
    "outside_topk",
    "ref_states",
    "ref_next_states",
    "token_weights",
    "old_values",
    "returns",
    "segment_ids",
)


class RewardFn(Protocol):
    """A task reward: one float per completion, or None where the completion cannot be scored.

    Extra dataset columns (the reference answer, test cases...) arrive as keyword lists aligned with
    `completions`. None values are left out of the group statistics.
    """

    __name__: str

    def __call__(
        self, prompts: list[str], completions: list[str], **columns: list[Any]
    ) -> list[float | None]: ...
