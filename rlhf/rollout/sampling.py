"""What every rollout engine shares: the sampling settings, and the collation of sampled token ids
into a RolloutBatch.

`SamplingParams` holds temperature, top-k, top-p, min-p, the repetition penalty, stop strings and the
token budget; its `warp()` is the logits warp every logprob pass applies so that log pi(a_t) is the
probability of the distribution a token was drawn from. `collate_rollout` turns an engine's padded
response ids into a RolloutBatch the same way whichever engine sampled: the response mask covers
tokens up to and including the first EOS or the token that completes a stop string; rows with
neither within `max_new_tokens` are flagged `truncated`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from rlhf.data.chat import CONVERSATIONAL, PROMPT_IDS, PROMPT_TEXT, reward_columns
from rlhf.types import RolloutBatch


@dataclass
class SamplingParams:
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0

    @classmethod
    def from_config(cls, rollout: Any) -> SamplingParams:
        """From a RolloutConfig (rollout.max_new_tokens, temperature, top_k, top_p, min_p, stop,
        repetition_penalty)."""
        return cls(
            rollout.max_new_tokens,
            rollout.temperature,
            rollout.top_k,
            rollout.top_p,
            rollout.min_p,
            tuple(rollout.stop),
            rollout.repetition_penalty,
        )

    def warp(self) -> dict[str, float]:
        """The logits warp of sampling, for every logprob pass to apply identically (stop strings
        end a sequence but change no token's distribution, so they are not part of it)."""
        return {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }

    def generation_config(
        self, tokenizer: PreTrainedTokenizerBase, do_sample: bool = True
    ) -> GenerationConfig:
        return GenerationConfig(
            do_sample=do_sample,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature if do_sample else None,
            top_k=self.top_k if do_sample else None,
            top_p=self.top_p if do_sample else None,
            min_p=self.min_p if do_sample and self.min_p > 0 else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )


def pad_prompts(
    token_ids: list[list[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and bool mask from per-row token ids (rlhf.data.chat prepares them)."""
    width = max((len(row) for row in token_ids), default=0)
    ids = torch.full((len(token_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.bool)
    for index, row in enumerate(token_ids):
        if row:
            ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[index, width - len(row) :] = True
    return ids.to(device), mask.to(device)


def pad_right(
    rows: list[list[Any]], fill: float, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, longest] values of `dtype` and their bool mask."""
    width = max((len(row) for row in rows), default=0)
    values = torch.full((len(rows), width), fill, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, row in enumerate(rows):
        values[index, : len(row)] = torch.tensor(row, dtype=dtype)
        mask[index, : len(row)] = True
    return values.to(device), mask.to(device)


def pad_targets(
    token_ids: list[list[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their bool mask."""
    return pad_right(token_ids, pad_token_id, torch.long, device)


def prompt_inputs(rows: Any, prompt_column: str) -> dict[str, Any]:
    """`generate_rollouts`' prompt arguments from dataset rows (a Dataset or a dict of columns):
    the raw prompts and reward columns, and for rows prepared by rlhf.data.chat the token ids and
    text the model is fed."""
    names = rows.column_names if hasattr(rows, "column_names") else list(rows)
    inputs: dict[str, Any] = {
        "prompts": list(rows[prompt_column]),
        "columns": reward_columns(rows, prompt_column),
    }
    if PROMPT_IDS in names:
        inputs["prompt_token_ids"] = list(rows[PROMPT_IDS])
        inputs["prompt_texts"] = list(rows[PROMPT_TEXT])
        inputs["conversational"] = (
            bool(rows[CONVERSATIONAL][0]) if CONVERSATIONAL in names and len(rows[CONVERSATIONAL]) else False
        )
    return inputs


def response_mask_from_ids(
    response_ids: torch.Tensor, eos_token_id: int, ends: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask up to and including the first EOS, truncated flag per row). `ends` [B, T] bool marks
    other tokens that end a response (the last token of a stop string)."""
    is_end = response_ids == eos_token_id
    if ends is not None:
        is_end = is_end | ends
    end_seen_before = (is_end.cumsum(-1) - is_end.long()) > 0
    mask = ~end_seen_before
    truncated = ~is_end.any(-1)
    return mask, truncated


def stop_string_ends(
    response_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]
) -> torch.Tensor | None:
    """[B, T] bool: the token at which the response's text first contains a stop string."""
    if not stop:
        return None
    ends = torch.zeros_like(response_ids, dtype=torch.bool)
    longest = max(len(s) for s in stop)
    for row, ids in enumerate(response_ids.tolist()):
        text = ""
        for position, token in enumerate(ids):
            if token == tokenizer.eos_token_id:
                break
            text += tokenizer.decode([token])
            if any(s in text[-(longest + 32) :] for s in stop):
                ends[row, position] = True
                break
    return ends


@dataclass
class Samples:
    """What an engine returns for a batch of prompts: `group_size` samples of each prompt, rows of a
    prompt contiguous. response_ids [B, T] (anything after a row's end is ignored by collation),
    the engine's own logprobs of the distribution it sampled from [B, T] (None when the engine
    does not return them), outside_topk [B, T] bool (with `record_topk`, else None), and the
    weight version of each row when the engine reports it."""

    response_ids: torch.Tensor
    logprobs: torch.Tensor | None = None
    outside_topk: torch.Tensor | None = None
    weight_versions: list[int] | None = None  # per row: the oldest policy version among its tokens


def collate_rollout(
    samples: Samples,
    tokenizer: PreTrainedTokenizerBase,
    prompt_token_ids: list[list[int]],
    prompts: list[Any],
    columns: dict[str, list[Any]],
    *,
    group_size: int,
    stop: tuple[str, ...] = (),
    prompt_texts: list[str] | None = None,
    conversational: bool = False,
) -> RolloutBatch:
    """The RolloutBatch of `samples`, the same whichever engine sampled: masks end at EOS or a stop
    string, rows with neither are `truncated`, pads after the end."""
    response_ids = samples.response_ids
    device = response_ids.device
    prompt_ids, prompt_mask = pad_prompts(prompt_token_ids, tokenizer.pad_token_id, device)
    response_mask, truncated = response_mask_from_ids(
        response_ids, tokenizer.eos_token_id, stop_string_ends(response_ids, tokenizer, stop)
    )
    response_ids = torch.where(
        response_mask, response_ids, torch.full_like(response_ids, tokenizer.pad_token_id)
    )
    completions = tokenizer.batch_decode(
        torch.where(response_ids == tokenizer.eos_token_id, tokenizer.pad_token_id, response_ids),
        skip_special_tokens=True,
    )

    def repeat(values: list[Any]) -> list[Any]:
        return [v for v in values for _ in range(group_size)]

    logprobs, outside = samples.logprobs, samples.outside_topk
    return RolloutBatch(
        outside_topk=None if outside is None else outside & response_mask,
        rollout_logprobs=None if logprobs is None else torch.where(response_mask, logprobs, 0.0),
        prompt_ids=prompt_ids.repeat_interleave(group_size, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(group_size, dim=0),
        response_ids=response_ids,
        response_mask=response_mask,
        group_ids=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
        truncated=truncated,
        prompts=repeat(prompts),
        completions=completions,
        columns={k: repeat(values) for k, values in columns.items()},
        prompt_texts=repeat(prompt_texts or []),
        conversational=conversational,
        weight_versions=list(samples.weight_versions or []),
    )
