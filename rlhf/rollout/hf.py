"""Rollout: G samples per prompt, collated into a RolloutBatch, with `transformers` generate or a
colocated vLLM engine (rlhf/rollout/vllm.py).

Sampling uses an explicit GenerationConfig (temperature, top-k, top-p, min-p and nothing else), and
the model's own generation defaults are set aside while it runs (transformers would otherwise fill
every field we leave unset from them: a chat model's repetition penalty, say), so they never change
the distribution the logprob passes score. A repetition penalty (`rollout.repetition_penalty`) is
applied by our own logits processor over each row's real context, with the same functions as the
logprob passes (transformers' own would also penalise the pad token of left-padded rows). The
response mask covers tokens up to and including the first EOS or the token that completes a stop
string; rows with neither within `max_new_tokens` are flagged `truncated`. A
shared-prefix model prefills each prompt once per group (see `generate_groups`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from rlhf.data.chat import CONVERSATIONAL, PROMPT_IDS, PROMPT_TEXT, reward_columns
from rlhf.intrinsic import TopKRecorder
from rlhf.models.shared_prefix import uses_shared_prefix
from rlhf.ops import first_seen_positions, seen_in_context, warp_logits
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


class StopStrings(StoppingCriteria):
    """Ends a row once its response's text contains a stop string. It decodes the response's last
    few tokens with the tokenizer itself (transformers' own stop-string matcher needs a vocabulary
    it can map to bytes, which not every tokenizer has)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stop, self.prompt_length = tokenizer, stop, prompt_length
        self.window = max(len(s) for s in stop) + 1  # tokens: each covers at least one character

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        tails = input_ids[:, max(self.prompt_length, input_ids.shape[1] - self.window) :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in text for s in self.stop) for text in texts], device=input_ids.device)


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


@torch.no_grad()
def generate_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Any],
    columns: dict[str, list[Any]],
    *,
    group_size: int,
    sampling: SamplingParams,
    prompt_token_ids: list[list[int]] | None = None,
    prompt_texts: list[str] | None = None,
    conversational: bool = False,
    do_sample: bool = True,
    record_topk: int | None = None,
    vllm: Any = None,
    seed: int = 0,
) -> RolloutBatch:
    """Sample `group_size` completions for each prompt; rows of one prompt are contiguous. The
    prompts are fed as `prompt_token_ids` (prepared by rlhf.data.chat) or, without them, as plain
    text. With `record_topk`, `outside_topk` marks the sampled tokens outside the k most likely ones
    of the distribution they were drawn from (recorded during generation, no extra pass). With
    `vllm` (a synced rlhf.rollout.vllm.VllmRollout) the engine samples instead of `model`, with
    per-prompt seeds derived from `seed`, and its logprobs come back as `rollout_logprobs`."""
    device = next(model.parameters()).device
    if prompt_token_ids is None:  # plain text, with the tokenizer's own special tokens
        prompt_token_ids = [tokenizer(p)["input_ids"] for p in prompts]
        prompt_texts = list(prompts)
    prompt_ids, prompt_mask = pad_prompts(prompt_token_ids, tokenizer.pad_token_id, device)
    rollout_logprobs = None
    if vllm is not None:
        seeds = [seed * 100_003 + i for i in range(len(prompt_token_ids))]
        response_ids, rollout_logprobs, outside_topk = _vllm_generate(
            vllm, tokenizer, prompt_token_ids, group_size, sampling, seeds, do_sample, record_topk, device
        )
    else:
        response_ids, outside_topk = _hf_generate(
            model, tokenizer, prompt_ids, prompt_mask, group_size, sampling, do_sample, record_topk
        )
    # the same collation whichever engine sampled: masks end at EOS or a stop string, rows with
    # neither are `truncated`, pads after the end
    response_mask, truncated = response_mask_from_ids(
        response_ids, tokenizer.eos_token_id, stop_string_ends(response_ids, tokenizer, sampling.stop)
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

    return RolloutBatch(
        outside_topk=outside_topk & response_mask if outside_topk is not None else None,
        rollout_logprobs=None
        if rollout_logprobs is None
        else torch.where(response_mask, rollout_logprobs, 0.0),
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
    )


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


def _vllm_generate(
    vllm, tokenizer, prompt_token_ids, group_size, sampling, seeds, do_sample, record_topk, device
):
    """(response ids [B, T], the engine's logprobs [B, T], outside_topk or None) from a vLLM engine."""
    tokens, logprobs, outside = vllm.generate(
        prompt_token_ids, group_size, sampling, seeds=seeds, do_sample=do_sample, record_topk=record_topk
    )
    response_ids = pad_targets(tokens, tokenizer.pad_token_id, device)[0]
    logprobs = pad_right(logprobs, 0.0, torch.float32, device)[0]
    outside_topk = pad_right(outside, 0.0, torch.float32, device)[0].bool() if record_topk else None
    return response_ids, logprobs, outside_topk


def _hf_generate(model, tokenizer, prompt_ids, prompt_mask, group_size, sampling, do_sample, record_topk):
    """(response ids [B, T], outside_topk or None) from transformers generate."""
    was_training = model.training
    model.eval()
    processors: list[Any] = []
    if do_sample and sampling.repetition_penalty != 1.0:
        processors.append(
            ContextRepetitionPenalty(sampling.repetition_penalty, prompt_ids, prompt_mask, group_size)
        )
    recorder = TopKRecorder(record_topk) if record_topk else None
    processors += [recorder] if recorder else []  # after the penalty: it records the sampled distribution
    extra: dict[str, Any] = {"logits_processor": LogitsProcessorList(processors)} if processors else {}
    if sampling.stop:
        extra["stopping_criteria"] = StoppingCriteriaList(
            [StopStrings(tokenizer, sampling.stop, prompt_ids.shape[1])]
        )
    try:
        output = generate_groups(
            model,
            prompt_ids,
            prompt_mask,
            group_size,
            sampling.generation_config(tokenizer, do_sample),
            **extra,
        )
    finally:
        model.train(was_training)
    response_ids = output[:, prompt_ids.shape[1] :]
    return response_ids, recorder.outside(response_ids) if recorder else None


def generate_groups(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    group_size: int,
    generation_config: GenerationConfig,
    **generate_kwargs,
):
    """`group_size` continuations of each (left-padded) prompt, rows of one prompt contiguous.

    With a shared-prefix model (`model.shared_prefix`), each prompt but its last token is prefilled
    once and its key/value cache repeated for the group, instead of prefilling G copies; generate
    then feeds the last prompt token, so the first sampled token sees the same logits."""
    repeated_ids = prompt_ids.repeat_interleave(group_size, dim=0)
    repeated_mask = prompt_mask.repeat_interleave(group_size, dim=0).long()
    if group_size > 1 and prompt_ids.shape[1] > 1 and uses_shared_prefix(model):
        head_mask = prompt_mask[:, :-1].long()
        prefill = model(
            input_ids=prompt_ids[:, :-1],
            attention_mask=head_mask,
            position_ids=(head_mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
        )
        cache = prefill.past_key_values
        cache.batch_repeat_interleave(group_size)
        generate_kwargs["past_key_values"] = cache
    with _only_generation_config(model, generation_config):
        return model.generate(
            input_ids=repeated_ids,
            attention_mask=repeated_mask,
            generation_config=generation_config,
            **generate_kwargs,
        )


@contextlib.contextmanager
def _only_generation_config(model: PreTrainedModel, generation_config: GenerationConfig):
    """Make `generation_config` the model's own while generate runs: transformers fills the fields a
    passed config leaves unset from the model's defaults (generation_config.json), which would put
    sampling settings that no logprob pass knows of into the rollout."""
    owner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = owner.generation_config
    owner.generation_config = generation_config
    try:
        yield
    finally:
        owner.generation_config = saved


class ContextRepetitionPenalty(LogitsProcessor):
    """The repetition penalty (CTRL's, as transformers and vLLM define it) over each row's real
    context, as the logprob passes define it (`first_seen_positions`: the prompt without its left
    pads and the tokens generated so far) and through their own `warp_logits`. Rows come as
    generate gets them: each prompt `group_size` times."""

    def __init__(self, penalty: float, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, group_size: int):
        self.penalty = penalty
        self.prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
        self.prompt_mask = prompt_mask.bool().repeat_interleave(group_size, dim=0)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_ids.shape[1] :]
        first = first_seen_positions(
            self.prompt_ids, self.prompt_mask, generated, torch.ones_like(generated, dtype=torch.bool)
        )
        next_position = torch.tensor([generated.shape[1]], device=scores.device)
        seen = seen_in_context(first, next_position, scores.shape[-1])[:, 0]
        return warp_logits(scores, repetition_penalty=self.penalty, seen=seen).to(scores.dtype)


def rollout_rows(
    engine: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: Any,
    *,
    prompt_column: str,
    group_size: int,
    sampling: SamplingParams,
    record_topk: int | None = None,
    vllm: Any = None,
    weights_version: int = 0,
    seed: int = 0,
) -> tuple[RolloutBatch, dict[str, float]]:
    """Step 1 of an RL loop: `group_size` samples for each dataset row, every other column handed on
    to the rewards, with the policy's ZeRO-3 parameters gathered once for the whole generation.
    With `vllm` (rlhf.rollout.vllm), the engine samples after its weights are synced to
    `weights_version` (the number of updates so far; a sync happens once per version), with seeds
    from `seed`. Returns the batch and its length statistics."""
    metrics: dict[str, float] = {}
    if vllm is not None:
        metrics["time/weight_sync"] = vllm.sync_weights(engine, weights_version)
        gathered = contextlib.nullcontext()
    else:
        gathered = engine.gathered_parameters()
    with gathered:
        batch = generate_rollouts(
            engine.module,
            tokenizer,
            **prompt_inputs(rows, prompt_column),
            group_size=group_size,
            sampling=sampling,
            record_topk=record_topk,
            vllm=vllm,
            seed=seed,
        )
    if vllm is not None:
        vllm.sleep()  # GPU with rollout.vllm.sleep: free the engine's memory for the update
    lengths = batch.response_mask.sum(-1).float()
    metrics |= {
        "response/length_mean": float(lengths.mean()),
        "response/truncated_fraction": float(batch.truncated.float().mean()),
        "rollout/tokens": float(batch.prompt_mask.sum() + lengths.sum()),
    }
    return batch, metrics
