"""Collators: prepared token ids (rlhf.data.chat) to the [left-padded prompt; right-padded target]
layout every forward of the framework takes."""

from __future__ import annotations

import torch

from rlhf.data.chat import CHOSEN_IDS, COMPLETION_IDS, COMPLETION_MASK, PROMPT_IDS, REJECTED_IDS
from rlhf.rollout.sampling import pad_prompts, pad_targets


def collate_sft(
    rows, pad_token_id: int, device: torch.device, completion_only: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt_ids, prompt_mask, target_ids, target_mask) for an SFT micro-batch. With
    `completion_only=False` every token but the first is a target (the loss covers the prompt too)."""
    prompts, completions = list(rows[PROMPT_IDS]), list(rows[COMPLETION_IDS])
    if not completion_only:
        whole = [p + c for p, c in zip(prompts, completions)]
        prompts, completions = [w[:1] for w in whole], [w[1:] for w in whole]
    prompt_ids, prompt_mask = pad_prompts(prompts, pad_token_id, device)
    target_ids, target_mask = pad_targets(completions, pad_token_id, device)
    return prompt_ids, prompt_mask, target_ids, target_mask


def sft_loss_mask(rows, target_mask: torch.Tensor) -> torch.Tensor:
    """The target tokens the SFT loss covers: all of `target_mask`, or with rows prepared under
    train.assistant_only_loss only the assistant turns' tokens (the user and tool turns between
    them stay in `target_mask`, attended to but not learned)."""
    names = rows.column_names if hasattr(rows, "column_names") else list(rows)
    if COMPLETION_MASK not in names:
        return target_mask
    learned, _ = pad_targets([list(m) for m in rows[COMPLETION_MASK]], 0, target_mask.device)
    return target_mask & learned[:, : target_mask.shape[1]].bool()


def collate_pairs(
    rows, pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen rows then rejected rows in one batch, so a pair goes through one forward:
    (prompt_ids, prompt_mask, completion_ids, completion_mask), each [2P, ...]."""
    prompts = list(rows[PROMPT_IDS])
    prompt_ids, prompt_mask = pad_prompts(prompts + prompts, pad_token_id, device)
    completion_ids, completion_mask = pad_targets(
        list(rows[CHOSEN_IDS]) + list(rows[REJECTED_IDS]), pad_token_id, device
    )
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def token_budget_micro_batches(
    rows: torch.Tensor, tokens: torch.Tensor, *, budget: int, max_rows: int, count: int | None = None
) -> list[torch.Tensor]:
    """`rows` split, in order, into micro-batches of at most `max_rows` rows whose summed `tokens`
    (each row's valid prompt and response tokens) stay within `budget`; a row longer than the
    budget goes alone. With `count`, the largest micro-batches are halved until there are `count`
    of them (every rank must run the same number of forwards under ZeRO-3); `count` may not exceed
    the number of rows."""
    parts: list[list[int]] = []
    used = 0
    for row, cost in zip(rows.tolist(), tokens.tolist()):
        if not parts or len(parts[-1]) >= max_rows or used + cost > budget:
            parts.append([])
            used = 0
        parts[-1].append(row)
        used += cost
    if count is not None:
        if count < len(parts) or count > rows.numel():
            raise ValueError(
                f"cannot make {count} micro-batches of {rows.numel()} rows split into {len(parts)}"
            )
        while len(parts) < count:
            largest = max(range(len(parts)), key=lambda i: len(parts[i]))
            half = (len(parts[largest]) + 1) // 2
            parts[largest : largest + 1] = [parts[largest][:half], parts[largest][half:]]
    return [torch.tensor(part, dtype=torch.long) for part in parts]


def pair_tokens(rows) -> torch.Tensor:
    """Valid tokens of each preference pair's two sequences (prompt + chosen, prompt + rejected)."""
    return torch.tensor(
        [
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(rows[PROMPT_IDS], rows[CHOSEN_IDS], rows[REJECTED_IDS], strict=True)
        ]
    )
