"""Step 2 of the loop: score completions with weighted reward functions.

score_b = sum_i w_i * r_i(b) over the rewards that scored row b. A row that no reward could score
(all None) is invalid: it is excluded from group statistics and from the loss. Each reward is also
returned on its own so it can be logged separately. A reward that raises, returns NaN or (with a
timeout) does not return in time either stops the run with an error naming the function and the
row (on_error="raise"), or is counted in the metric `reward/<name>/errors` with exactly the rows
that failed treated as None (on_error="skip": a batch call that fails is retried row by row, so
one bad row does not unscore the others).

Timeouts (`timeout_s`) run each call in a daemon thread and stop waiting for it: Python cannot
stop a running function, so a reward that truly hangs keeps its thread (idle CPU, no progress)
while training goes on. Rewards that run untrusted code belong in a sandboxed process.
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

from rlhf.calls import CallTimeout, call_with_timeout
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


def build_rewards(reward_cfg: Any, data_cfg: Any, splits: dict[str, Any]) -> list[WeightedReward]:
    """`reward.functions` resolved and weighted, each checked against the columns of every split it
    will score (name -> rows, None for a missing split) before any model loads: a reward needing a
    column the data lacks would otherwise fail after the first generation."""
    from rewards import REWARD_FUNCTIONS

    rewards = [
        WeightedReward(term.name, resolve_reward(term.name, REWARD_FUNCTIONS), term.weight)
        for term in reward_cfg.functions
    ]
    for split, rows in splits.items():
        if rows is None:
            continue
        for reward in rewards:
            try:
                check_reward_columns(
                    reward.name,
                    reward.fn,
                    rows.column_names,
                    f"data.source={data_cfg.source!r} ({split} split)",
                )
            except RewardError as exc:
                names = [term.name for term in reward_cfg.functions]
                raise RewardError(
                    f"{exc}. reward.functions is {names}: score your data with your own function "
                    f"(reward.functions='[{{name: my_package.rewards:my_reward}}]', it gets the data's columns "
                    f"as keyword arguments) or one of {sorted(REWARD_FUNCTIONS)}"
                ) from None
    return rewards


class RewardTimeout(RewardError):
    """A reward call did not return within `reward.timeout_s`."""


def _with_timeout(fn: Callable[..., Any], timeout_s: float | None, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) (an async reward awaited), or RewardTimeout after `timeout_s` seconds."""
    try:
        return call_with_timeout(fn, timeout_s, *args, **kwargs)
    except CallTimeout as exc:
        raise RewardTimeout(f"did not return within reward.timeout_s={timeout_s}") from exc


def _row_by_row(
    reward: WeightedReward, prompts, completions, columns, timeout_s: float | None
) -> list[tuple[float | None, BaseException | None]]:
    """Each row's value alone, or the exception its call raised (a timeout included)."""
    results: list[tuple[float | None, BaseException | None]] = []
    for index in range(len(completions)):
        row = {k: [v[index]] for k, v in columns.items()}
        try:
            values = _with_timeout(reward.fn, timeout_s, [prompts[index]], [completions[index]], **row)
            results.append((list(values)[0], None))
        except Exception as exc:  # noqa: BLE001 - we report whatever the user's function raised
            results.append((None, exc))
    return results


def _call_reward(
    reward: WeightedReward,
    prompts: list[str],
    completions: list[str],
    columns: dict[str, list[Any]],
    on_error: str,
    timeout_s: float | None = None,
) -> tuple[list[float | None], int]:
    """The reward's values (None where unscorable) and how many rows failed."""
    count = len(completions)
    try:
        values = list(_with_timeout(reward.fn, timeout_s, prompts, completions, **columns))
    except Exception as exc:  # noqa: BLE001
        rows = _row_by_row(reward, prompts, completions, columns, timeout_s)
        failed = [(index, error) for index, (_, error) in enumerate(rows) if error is not None]
        if on_error == "skip":  # exactly the rows that fail alone go unscored
            values = [value for value, _ in rows]
            return _checked_values(reward, values, prompts, completions, on_error, len(failed))
        where = (
            f"row {failed[0][0]} (prompt {prompts[failed[0][0]]!r}): {failed[0][1]!r}"
            if failed
            else f"a batch of {count}: {exc!r}"
        )
        raise RewardError(f"reward function {reward.name!r} failed on {where}") from exc
    return _checked_values(reward, values, prompts, completions, on_error, 0)


def _checked_values(
    reward: WeightedReward, values: list[Any], prompts, completions, on_error: str, failures: int
) -> tuple[list[float | None], int]:
    """`values` as floats (None kept), refusing non-numbers; NaN or inf raise, or with skip count as
    failures. Returns them and the total failure count."""
    count = len(completions)
    if len(values) != count:
        raise RewardError(
            f"reward function {reward.name!r} returned {len(values)} values for {count} completions"
        )
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
    timeout_s: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """(scores [B], valid [B] bool, per-reward values [B] with NaN for None, metrics). `timeout_s`:
    the longest a reward call may take (None: no limit)."""
    count = len(completions)
    total = torch.zeros(count)
    scored = torch.zeros(count, dtype=torch.bool)
    per_reward: dict[str, torch.Tensor] = {}
    metrics: dict[str, float] = {}
    for reward in rewards:
        values, failures = _call_reward(reward, prompts, completions, columns, on_error, timeout_s)
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


def score_rollout(
    rewards: list[WeightedReward], batch: Any, reward_cfg: Any
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """`score_completions` of a RolloutBatch's rows (completions as TRL's GRPOTrainer passes them)
    under the config's `reward.on_error` and `reward.timeout_s`."""
    columns = batch.columns
    if batch.environments:  # episodes: each row's environment instance, as TRL passes them
        columns = {**columns, "environments": batch.environments}
    return score_completions(
        rewards,
        batch.prompts,
        batch.reward_completions(),
        columns,
        on_error=reward_cfg.on_error,
        timeout_s=reward_cfg.timeout_s,
    )


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


def task_reward(name: str | None):
    """The reward function named `name` (built in or "package.module:function"), or None."""
    if not name:
        return None
    from rewards import REWARD_FUNCTIONS

    return resolve_reward(name, REWARD_FUNCTIONS)
