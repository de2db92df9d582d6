"""Step 2 of the loop: score completions with weighted reward functions.

score_b = sum_i w_i * r_i(b) over the rewards that scored row b. A row that no reward could score
(all None) is invalid: it is excluded from group statistics and from the loss. Each reward is also
returned on its own so it can be logged separately. A reward that raises or returns NaN either stops
the run with an error naming the function and the row (on_error="raise"), or is counted in the
metric `reward/<name>/errors` and its affected rows treated as None (on_error="skip").
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rlhf.types import RewardFn


class RewardError(RuntimeError):
    """A reward function failed; the message names the function and the row."""


@dataclass(frozen=True)
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float


def resolve_reward(name: str, registry: dict[str, Callable]) -> RewardFn:
    """A function from the registry by name, or an importable "package.module:function"."""
    if name in registry:
        return registry[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise RewardError(f"reward function {name!r} could not be imported: {exc}") from exc
    raise RewardError(f"reward function {name!r} is not one of {sorted(registry)} and not 'module:function'")


def check_reward_columns(name: str, fn: RewardFn, columns: list[str], where: str) -> None:
    """A reward whose keyword parameters (other than prompts and completions) name columns the data
    lacks would fail at its first call, possibly after hours; this says so before training."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):
        return
    missing = [
        p.name
        for p in parameters
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and p.name not in columns
    ]
    if missing:
        raise RewardError(
            f"reward function {name!r} needs column(s) {missing}, which {where} lacks (it has {sorted(columns)})"
        )


def _row_failure(fn: RewardFn, prompts, completions, columns) -> tuple[int, BaseException] | None:
    """Re-run a failing reward row by row to find the first row that raises."""
    for index in range(len(completions)):
        try:
            fn([prompts[index]], [completions[index]], **{k: [v[index]] for k, v in columns.items()})
        except Exception as exc:  # noqa: BLE001 - we report whatever the user's function raised
            return index, exc
    return None


def _call_reward(
    reward: WeightedReward,
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
    on_error: str,
) -> tuple[list[float | None], int]:
    """The reward's values (None where unscorable) and how many rows failed."""
    count = len(completions)
    try:
        values = list(reward.fn(prompts, completions, **columns))
    except Exception as exc:  # noqa: BLE001
        if on_error == "skip":
            return [None] * count, count
        found = _row_failure(reward.fn, prompts, completions, columns)
        where = (
            f"row {found[0]} (prompt {prompts[found[0]]!r}): {found[1]!r}"
            if found
            else f"a batch of {count}: {exc!r}"
        )
        raise RewardError(f"reward function {reward.name!r} raised on {where}") from exc
    if len(values) != count:
        raise RewardError(
            f"reward function {reward.name!r} returned {len(values)} values for {count} completions"
        )
    failures = 0
    for index, value in enumerate(values):
        if value is None:
            continue
        if torch.is_tensor(value) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):
            raise RewardError(
                f"reward function {reward.name!r} returned {value!r} ({type(value).__name__}) for row {index}; "
                "a reward must be a number, or None for a row it cannot score"
            )
        number = float(value)
        if math.isnan(number) or math.isinf(number):
            if on_error == "skip":
                values[index] = None
                failures += 1
                continue
            raise RewardError(
                f"reward function {reward.name!r} returned {number} for row {index} "
                f"(prompt {prompts[index]!r}, completion {completions[index]!r}); return None for unscorable rows"
            )
        values[index] = number
    return values, failures


def score_completions(
    rewards: list[WeightedReward],
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
    *,
    on_error: str = "raise",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """(scores [B], valid [B] bool, per-reward values [B] with NaN for None, metrics)."""
    count = len(completions)
    total = torch.zeros(count)
    scored = torch.zeros(count, dtype=torch.bool)
    per_reward: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    for reward in rewards:
        values, failures = _call_reward(reward, prompts, completions, columns, on_error)
        tensor = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
        present = ~torch.isnan(tensor)
        total = total + torch.where(present, reward.weight * tensor, torch.zeros_like(tensor))
        scored |= present
        per_reward[reward.name] = tensor
        metrics[f"reward/{reward.name}/errors"] = float(failures)
        metrics[f"reward/{reward.name}/none_fraction"] = float((~present).float().mean())
        # the same keys on every call (and rank); none_fraction says when nothing was scored
        metrics[f"reward/{reward.name}/mean"] = float(tensor[present].mean()) if present.any() else 0.0
        metrics[f"reward/{reward.name}/std"] = float(tensor[present].std()) if present.sum() > 1 else 0.0
    return total, scored, per_reward, metrics


def score_metrics(
    scores: torch.Tensor,
    valid: torch.Tensor,
    per_reward: dict[str, torch.Tensor],
    accuracy_reward: str | None,
) -> dict[str, float]:
    """reward/mean and reward/std over the scored rows, the unscored fraction, and `accuracy` (the
    fraction of rows where `accuracy_reward` is 1) when that reward ran."""
    metrics = {
        "reward/mean": float(scores[valid].mean()) if valid.any() else 0.0,
        "reward/std": float(scores[valid].std()) if valid.sum() > 1 else 0.0,
        "reward/unscored_fraction": float((~valid).float().mean()),
    }
    if accuracy_reward in per_reward:
        metrics["accuracy"] = float((per_reward[accuracy_reward] >= 1.0).float().mean())
    return metrics
