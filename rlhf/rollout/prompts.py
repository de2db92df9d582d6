"""The prompts of an RL run (GRPO, PPO, AlignDistil on-policy): rendered and tokenized to fit the
model's context with the response budget, checked against the rollout engine, before any weights
load."""

from __future__ import annotations

from typing import Any


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
