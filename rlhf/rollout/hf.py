"""Rollout with `transformers` generate: G samples per prompt, collated into a RolloutBatch.

Sampling uses an explicit GenerationConfig (temperature, top-k, top-p and nothing else), so a
model's own generation defaults (repetition penalty, min-p...) never change the distribution the
logprob passes score. The response mask covers tokens up to and including the first EOS; rows
with no EOS within `max_new_tokens` are flagged `truncated`. A shared-prefix model prefills each
prompt once per group (see `generate_groups`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, PreTrainedModel, PreTrainedTokenizerBase

from rlhf.intrinsic import TopKRecorder
from rlhf.models.shared_prefix import uses_shared_prefix
from rlhf.types import RolloutBatch


@dataclass
class SamplingParams:
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_config(cls, rollout: Any) -> SamplingParams:
        """From a RolloutConfig (rollout.max_new_tokens, temperature, top_k, top_p)."""
        return cls(rollout.max_new_tokens, rollout.temperature, rollout.top_k, rollout.top_p)

    def warp(self) -> dict[str, float]:
        """The logits warp of sampling, for every logprob pass to apply identically."""
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}

    def generation_config(
        self, tokenizer: PreTrainedTokenizerBase, do_sample: bool = True
    ) -> GenerationConfig:
        return GenerationConfig(
            do_sample=do_sample,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature if do_sample else None,
            top_k=self.top_k if do_sample else None,
            top_p=self.top_p if do_sample else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], apply_chat_template: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and bool mask."""
    if apply_chat_template:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        encoded = tokenizer(
            texts, padding=True, add_special_tokens=False, return_tensors="pt", padding_side="left"
        )
    else:
        encoded = tokenizer(prompts, padding=True, return_tensors="pt", padding_side="left")
    return encoded["input_ids"].to(device), encoded["attention_mask"].bool().to(device)


def response_mask_from_ids(
    response_ids: torch.Tensor, eos_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask up to and including the first EOS, truncated flag per row)."""
    is_eos = response_ids == eos_token_id
    eos_seen_before = (is_eos.cumsum(-1) - is_eos.long()) > 0
    mask = ~eos_seen_before
    truncated = ~is_eos.any(-1)
    return mask, truncated


@torch.no_grad()
def generate_rollouts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    columns: dict[str, list[Any]],
    *,
    group_size: int,
    sampling: SamplingParams,
    apply_chat_template: bool = False,
    do_sample: bool = True,
    record_topk: int | None = None,
) -> RolloutBatch:
    """Sample `group_size` completions for each prompt; rows of one prompt are contiguous. With
    `record_topk`, `outside_topk` marks the sampled tokens outside the k most likely ones of the
    distribution they were drawn from (recorded during generation, no extra pass)."""
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, apply_chat_template, device)
    was_training = model.training
    model.eval()
    recorder = TopKRecorder(record_topk) if record_topk else None
    extra = {"logits_processor": LogitsProcessorList([recorder])} if recorder else {}
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
    prompt_ids = prompt_ids.repeat_interleave(group_size, dim=0)
    prompt_mask = prompt_mask.repeat_interleave(group_size, dim=0)
    response_ids = output[:, prompt_ids.shape[1] :]
    response_mask, truncated = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    response_ids = torch.where(
        response_mask, response_ids, torch.full_like(response_ids, tokenizer.pad_token_id)
    )
    completions = tokenizer.batch_decode(
        torch.where(response_ids == tokenizer.eos_token_id, tokenizer.pad_token_id, response_ids),
        skip_special_tokens=True,
    )
    repeated_prompts = [p for p in prompts for _ in range(group_size)]
    repeated_columns = {k: [v for v in values for _ in range(group_size)] for k, values in columns.items()}
    group_ids = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
    return RolloutBatch(
        outside_topk=recorder.outside(response_ids) & response_mask if recorder else None,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        group_ids=group_ids,
        truncated=truncated,
        prompts=repeated_prompts,
        completions=completions,
        columns=repeated_columns,
    )


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
    return model.generate(
        input_ids=repeated_ids,
        attention_mask=repeated_mask,
        generation_config=generation_config,
        **generate_kwargs,
    )


def rollout_rows(
    engine: Any,
    tokenizer: PreTrainedTokenizerBase,
    rows: Any,
    *,
    prompt_column: str,
    group_size: int,
    sampling: SamplingParams,
    apply_chat_template: bool = False,
    record_topk: int | None = None,
) -> tuple[RolloutBatch, dict[str, float]]:
    """Step 1 of an RL loop: `group_size` samples for each dataset row, every other column handed on
    to the rewards, with the policy's ZeRO-3 parameters gathered once for the whole generation.
    Returns the batch and its length statistics."""
    columns = {k: list(rows[k]) for k in rows.column_names if k != prompt_column}
    with engine.gathered_parameters():
        batch = generate_rollouts(
            engine.module,
            tokenizer,
            list(rows[prompt_column]),
            columns,
            group_size=group_size,
            sampling=sampling,
            apply_chat_template=apply_chat_template,
            record_topk=record_topk,
        )
    lengths = batch.response_mask.sum(-1).float()
    metrics = {
        "response/length_mean": float(lengths.mean()),
        "response/truncated_fraction": float(batch.truncated.float().mean()),
        "rollout/tokens": float(batch.prompt_mask.sum() + lengths.sum()),
    }
    return batch, metrics
