"""Helpers the recipes share: the RL recipes' tokenizer and prompts, reward functions, rank shares
of a batch, metrics averaged over ranks, rollout samples for the logs, and the launcher's argv. The run lifecycle
(directory, resume, checkpoints, signals) is rlhf/run.py."""

from __future__ import annotations

from typing import Any

import torch

from rlhf.config import LoggerConfig, RewardConfig
from rlhf.data.chat import CHOSEN_IDS, PROMPT_IDS, REJECTED_IDS
from rlhf.data.collate import token_budget_micro_batches
from rlhf.rollout.records import rollout_records, sample_rows
from rlhf.scoring import WeightedReward, resolve_reward


def rl_prompts(cfg: Any, train_rows: Any, eval_rows: Any) -> tuple[Any, Any, Any]:
    """(tokenizer, train rows, eval rows) for GRPO and PPO: the prompts rendered and tokenized
    (rlhf.data.chat) to fit the model's context with the longer of the rollout and eval budgets,
    unknown characters warned about, and the rollout engine's settings checked; the model's config
    is read once and no weights load."""
    from rlhf.data.chat import PROMPT_IDS, PROMPT_TEXT, prepare_splits
    from rlhf.data.load import warn_unknown_tokens
    from rlhf.models.load import load_tokenizer, model_shape
    from rlhf.rollout.vllm import check_engine

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
    check_engine(cfg, shape, train_rows[PROMPT_IDS])
    return tokenizer, train_rows, eval_rows


def build_rewards(cfg: RewardConfig) -> list[WeightedReward]:
    from rewards import REWARD_FUNCTIONS

    return [
        WeightedReward(term.name, resolve_reward(term.name, REWARD_FUNCTIONS), term.weight)
        for term in cfg.functions
    ]


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


def mean_over_ranks(metrics: dict[str, float], engine: Any) -> dict[str, float]:
    """Average scalar metrics over ranks, except maxima (`*_max`, as MetricAccumulator keeps them),
    which take the largest rank's value (every rank must log the same keys)."""
    if engine.world_size == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    # each rank fills its own row of zeros: the sum over ranks holds every rank's values
    per_rank = torch.zeros(engine.world_size, len(keys), dtype=torch.float64, device=engine.device)
    per_rank[engine.rank] = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    per_rank = engine.all_reduce_sum(per_rank)
    means, maxima = per_rank.mean(0).tolist(), per_rank.max(0).values.tolist()
    return {k: maxima[i] if k.endswith("_max") else means[i] for i, k in enumerate(keys)}


def gathered_values(values: torch.Tensor, engine: Any) -> torch.Tensor:
    """Every rank's 1-D `values` (lengths may differ) concatenated in rank order, on every rank
    (collective: every rank must call it)."""
    if engine.world_size == 1:
        return values
    counts = torch.zeros(engine.world_size, dtype=torch.float64, device=engine.device)
    counts[engine.rank] = values.numel()
    counts = engine.all_reduce_sum(counts).long().tolist()
    # each rank fills its own row of zeros: the sum over ranks is every row, exactly
    rows = torch.zeros(engine.world_size, max(max(counts), 1), dtype=values.dtype, device=engine.device)
    rows[engine.rank, : values.numel()] = values
    rows = engine.all_reduce_sum(rows)
    return torch.cat([rows[rank, :count] for rank, count in enumerate(counts)])


def micro_batches(
    engine: Any, rows: torch.Tensor, max_rows: int, budget: int = 0, tokens: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """`rows` (indices into this rank's batch) in micro-batches of `max_rows`, or with a token
    `budget` (`tokens`: each row's valid tokens) micro-batches that stay within it, as many on every
    rank as the most any needs (collective then: every rank must call it)."""
    if not budget:
        return list(rows.split(max_rows))
    rows, tokens = rows.cpu(), torch.as_tensor(tokens).cpu()
    parts = token_budget_micro_batches(rows, tokens, budget=budget, max_rows=max_rows)
    counts = torch.zeros(engine.world_size, device=engine.device)
    counts[engine.rank] = len(parts)
    count = int(engine.all_reduce_sum(counts).max())
    return token_budget_micro_batches(rows, tokens, budget=budget, max_rows=max_rows, count=count)


def pair_tokens(rows) -> torch.Tensor:
    """Valid tokens of each preference pair's two sequences (prompt + chosen, prompt + rejected)."""
    return torch.tensor(
        [
            2 * len(p) + len(c) + len(r)
            for p, c, r in zip(rows[PROMPT_IDS], rows[CHOSEN_IDS], rows[REJECTED_IDS], strict=True)
        ]
    )


def drop_launcher_arguments(argv: list[str]) -> list[str]:
    """argv without the `--local_rank=N` the deepspeed launcher appends (LOCAL_RANK is in the
    environment too); Hydra would reject it as an override."""
    kept, skip_next = [], False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip_next = True
        else:
            kept.append(arg)
    return kept


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


class HeldoutAccuracy:
    """Greedy accuracy of an RL run's policy on the held-out split: before training (a new run),
    every `eval.every` steps, and at the end; logged as eval/accuracy. Off when no reward function
    is the configured accuracy reward or the data has no eval split."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        eval_rows: Any,
        rewards: list[WeightedReward],
        cfg: Any,
        vllm: Any = None,
    ):
        from rlhf.eval.accuracy import heldout_accuracy

        accuracy_fn = next((r.fn for r in rewards if r.name == cfg.reward.accuracy_reward), None)
        self.enabled = accuracy_fn is not None and eval_rows is not None
        self.every = cfg.eval.every
        # `version`: updates so far, so a vLLM engine syncs once per set of weights
        self._evaluate = lambda version: heldout_accuracy(
            engine,
            tokenizer,
            eval_rows,
            accuracy_fn,
            cfg.data,
            cfg.eval,
            cfg.eval.num_samples,
            vllm=vllm,
            weights_version=version,
        )

    def before(self, run: Any) -> dict[str, float]:
        if not self.enabled or run.start_step != 0:
            return {}
        accuracy = self._evaluate(0)
        run.log({"eval/accuracy": accuracy}, 0)
        return {"eval/accuracy_before": accuracy}

    def during(self, run: Any, step: int, metrics: dict[str, float]) -> None:
        if self.enabled and self.every and step % self.every == 0:
            with run.untimed():  # evaluation does not count toward train.time_limit_s
                metrics["eval/accuracy"] = self._evaluate(step)

    def after(self, run: Any, metrics: dict[str, float]) -> dict[str, float]:
        if not self.enabled:
            return {}
        accuracy = metrics["eval/accuracy"] if "eval/accuracy" in metrics else self._evaluate(run.step)
        run.log({"eval/accuracy": accuracy}, run.step)
        return {"eval/accuracy": accuracy}
