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

    @property
    def batch_size(self) -> int:
        return self.response_ids.shape[0]

    def reward_completions(self) -> list[Any]:
        """Completions as reward functions receive them, the way TRL's GRPOTrainer passes them:
        strings, or for conversational prompts one assistant message per completion."""
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

    def to(self, device: torch.device | str) -> RolloutBatch:
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)


class RewardFn(Protocol):
    """A task reward: one float per completion, or None where the completion cannot be scored.

    Extra dataset columns (the reference answer, test cases...) arrive as keyword lists aligned with
    `completions`. None values are left out of the group statistics.
    """

    __name__: str

    def __call__(
        self, prompts: list[str], completions: list[str], **columns: list[Any]
    ) -> list[float | None]: ...
