"""A rollout's rows as plain records for the run directory (rollouts.jsonl) and the wandb table.

Each record holds the prompt as the model was fed it (`prompt`, chat template applied) and as the
data has it (`raw_prompt`, when they differ), the completion, its score and, token by token over the
response, the decoded tokens and whichever per-token quantities the recipe computed (logprobs,
ref_logprobs, kl, rewards, values, advantages, segment_ids). A multi-turn episode's record also
marks which tokens the model generated (`trained`; the others are tool results) and holds its
`conversation` after the prompt and its `episode` (each turn's text, tool calls and results, and how
it ended). A per-sequence advantage (GRPO) is stored
as `advantage`; a sample from vLLM servers records the oldest `weight_version` (policy after that
many updates) among its tokens. Records are what `rlhf.inspect` reads back and draws as token heatmaps.
"""

from __future__ import annotations

from typing import Any

import torch

from rlhf.types import RolloutBatch


def sample_rows(batch_size: int, count: int, step: int) -> list[int]:
    """`count` rows spread over the batch, shifting with the step so every prompt position shows up."""
    if count <= 0 or batch_size == 0:
        return []
    count = min(count, batch_size)
    stride = batch_size / count
    offset = step % max(1, int(stride))
    return sorted({min(batch_size - 1, int(i * stride) + offset) for i in range(count)})


def rollout_records(
    batch: RolloutBatch,
    tokenizer,
    rows: list[int],
    step: int,
    scores: torch.Tensor | None = None,
    per_token: dict[str, torch.Tensor | None] | None = None,
) -> list[dict[str, Any]]:
    """One record per row in `rows`; `per_token` maps names to [B, T] tensors (None entries skipped)
    or to [B] tensors (stored as one number per record)."""
    per_token = {k: v for k, v in (per_token or {}).items() if v is not None}
    records = []
    for row in rows:
        mask = batch.attended_mask[row].bool()  # an episode's tool tokens too, marked `trained: false`
        ids = batch.response_ids[row][mask].tolist()
        fed = batch.prompt_texts[row] if batch.prompt_texts else None
        raw = batch.prompts[row] if batch.prompts else ""
        record: dict[str, Any] = {
            "step": step,
            "prompt": fed if fed is not None else raw,
            "completion": batch.completions[row] if batch.completions else tokenizer.decode(ids),
            "score": None if scores is None else float(scores[row]),
            "length": int(batch.response_mask[row].sum()),
            "tokens": [tokenizer.decode([i]) for i in ids],
        }
        if batch.environment_mask is not None:  # a multi-turn episode
            record["trained"] = batch.response_mask[row][mask].tolist()
            record["conversation"] = batch.completion_messages[row]
            record["episode"] = batch.episodes[row]
        if batch.weight_versions:
            record["weight_version"] = batch.weight_versions[row]
        if fed is not None and fed != raw:
            record["raw_prompt"] = raw
        for name, values in per_token.items():
            value = values[row].detach().cpu()
            value = value.float() if value.is_floating_point() else value.long()
            if value.dim() == 0:
                record[name] = value.item()
            else:
                record[name] = value[mask.cpu()].tolist()
        records.append(record)
    return records


def log_rollout_sample(
    loggers: Any,
    cfg: Any,
    batch: Any,
    tokenizer: Any,
    step: int,
    scores: torch.Tensor,
    per_token: dict[str, torch.Tensor | None],
) -> None:
    """Save `logger.rollout_samples` rows of this step's rollout (rank 0; other ranks have no sinks)
    with the distributions of the whole rollout's scores, advantages and response lengths."""
    if not loggers.sinks or cfg.rollout_samples <= 0:
        return
    rows = sample_rows(batch.batch_size, cfg.rollout_samples, step)
    mask = batch.response_mask.bool()
    advantages = batch.advantages
    if advantages is not None and advantages.dim() == 2:  # per token: one value per trained token
        advantages = advantages[mask]
    distributions = {
        "reward": scores.float().cpu().tolist(),
        "response_length": mask.sum(-1).float().cpu().tolist(),
    }
    if advantages is not None:
        distributions["advantage"] = advantages.float().cpu().tolist()
    records = rollout_records(batch, tokenizer, rows, step, scores, per_token)
    loggers.log_rollouts(records, step, distributions)
