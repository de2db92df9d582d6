"""Collators: prompt and completion text to the [left-padded prompt; right-padded target] layout."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from rlhf.rollout.hf import encode_prompts


def encode_targets(
    tokenizer: PreTrainedTokenizerBase, completions: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded completion ids with EOS appended, and the bool target mask."""
    rows = [
        tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for text in completions
    ]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
        mask[index, : len(row)] = True
    return ids.to(device), mask.to(device)


def collate_sft(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    completions: list[str],
    device: torch.device,
    apply_chat_template: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt_ids, prompt_mask, target_ids, target_mask) for an SFT micro-batch."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, apply_chat_template, device)
    target_ids, target_mask = encode_targets(tokenizer, completions, device)
    return prompt_ids, prompt_mask, target_ids, target_mask


def collate_pairs(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    device: torch.device,
    apply_chat_template: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows in one batch, so a pair goes through one forward:
    (prompt_ids, prompt_mask, completion_ids, completion_mask), each [2P, ...]."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts + prompts, apply_chat_template, device)
    completion_ids, completion_mask = encode_targets(tokenizer, chosen + rejected, device)
    return prompt_ids, prompt_mask, completion_ids, completion_mask
