"""Helpers the recipes share: the RL recipes' tokenizer and prompts, reward functions, rank shares
of a batch, rollout samples for the logs, and the launcher's argv. The run lifecycle (directory,
resume, checkpoints, signals) is rlhf/run.py; collectives are rlhf/distributed/collectives.py."""

from __future__ import annotations

from typing import Any

import torch

from rlhf.config import LoggerConfig
from rlhf.data.chat import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS
from rlhf.rollout.records import rollout_records, sample_rows
from rlhf.scoring import resolve_reward


def rl_prompts(cfg: Any, train_rows: Any, eval_rows: Any) -> tuple[Any, Any, Any]:
    """(tokenizer, train rows, eval rows) for GRPO and PPO: the prompts rendered and tokenized
    (rlhf.data.chat) to fit the model's context with the longer of the rollout and eval budgets,
    unknown characters warned about, and the rollout engine's settings checked; the model's config
    is read once and no weights load."""
    from rlhf.data.chat import PROMPT_IDS, PROMPT_TEXT, prepare_splits
    from rlhf.data.load import warn_unknown_tokens
    from rlhf.models.load import load_tokenizer, model_shape
    from rlhf.rollout.engine import check_rollout_engine

    tokenizer = load_tokenizer(cfg.model)
    shape = model_shape(cfg.model)
    train_rows, eval_rows = prepare_splits(
        "prompts",
        train_rows,
        eval_rows,
        tokenizer,
        cfg.data,
        response_budget=max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens),
        context=getattr(shape, "max_position_embeddings", None),
    )
    warn_unknown_tokens(tokenizer, train_rows, [PROMPT_TEXT])
    check_rollout_engine(
        cfg, shape, train_rows[PROMPT_IDS], eval_rows[PROMPT_IDS] if eval_rows is not None else None
    )
    return tokenizer, train_rows, eval_rows


def task_reward(name: str | None):
    """The reward function named `name` (built in or "package.module:function"), or None."""
    if not name:
        return None
    from rewards import REWARD_FUNCTIONS

    return resolve_reward(name, REWARD_FUNCTIONS)


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch of row indices (groups stay whole)."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank : (rank + 1) * per_rank]


def pair_tokens(rows) -> torch.Tensor:
    """Valid tokens of each preference pair's two sequences (prompt + chosen, prompt + rejected)."""
    return torch.tensor(
        [
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(rows[PROMPT_IDS], rows[CHOSEN_IDS], rows[REJECTED_IDS], strict=True)
        ]
    )


def log_rollout_sample(
    loggers: Any,
    cfg: LoggerConfig,
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
