"""Environments of episodes, with TRL's `environment_factory` semantics unchanged.

`rollout.environment` names a factory ("module:factory", a class or any callable returning an
instance) or a mapping of names to factories, one of which each row's `environment` column picks.
Every episode gets an instance of its own (instances are kept in a pool and reused across batches,
as TRL does: construct once, reset often). An instance:
- `reset(**row)` before the episode, with the row's columns (without `environment`); text it
  returns is appended to the last user message;
- its public methods (not `reset`, `get_reward` or `_private`) are the episode's tools;
- an optional `get_reward()` scores the finished episode: a reward named after the class, weight 1;
- an optional `get_turn_rewards()` (ours; TRL has none) gives one reward per model turn of the
  finished episode: PPO places each on its turn's last token, GRPO adds their sum to the score.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from rlhf.agents.tools import import_object, tool_schema
from rlhf.calls import call_maybe_async
from rlhf.config import ConfigError

ENVIRONMENT_COLUMN = "environment"
RESERVED_METHODS = ("reset", "get_reward", "get_turn_rewards")


def environment_methods(instance: Any) -> list[Callable[..., Any]]:
    """The instance's tools: its public methods, looked up on the class (so properties are not run)."""
    return [
        getattr(instance, name)
        for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
        if name not in RESERVED_METHODS and not name.startswith("_")
    ]


class Environments:
    """The configured factories and their pools of instances."""

    def __init__(self, factories: dict[str | None, Callable[[], Any]]):
        self.factories = factories
        self.by_column = None not in factories  # a mapping: rows pick theirs by the `environment` column
        self.pool: dict[str | None, list[Any]] = {}
        self.reward_classes: list[type] = []
        for name in factories:  # one instance of each now: its reset, tools and reward checked early
            instance = self._new(name)
            self.pool[name] = [instance]
            if (
                callable(getattr(type(instance), "get_reward", None))
                and type(instance) not in self.reward_classes
            ):
                self.reward_classes.append(type(instance))

    @classmethod
    def from_config(cls, spec: Any) -> Environments | None:
        if not spec:
            return None
        if isinstance(spec, str):
            return cls({None: import_object(spec, "rollout.environment")})
        if hasattr(spec, "items"):
            return cls({str(k): import_object(v, f"rollout.environment.{k}") for k, v in spec.items()})
        raise ConfigError(
            f"rollout.environment={spec!r}: give 'module:factory' or a mapping of names to 'module:factory'"
        )

    def _new(self, name: str | None) -> Any:
        instance = self.factories[name]()
        where = "rollout.environment" + (f".{name}" if name else "")
        if not callable(getattr(instance, "reset", None)):
            raise ConfigError(f"{where}: the environment {type(instance).__name__} has no callable reset()")
        for method in environment_methods(instance):
            tool_schema(method, where)
        return instance

    def names_of(self, rows: Any) -> list[str | None]:
        """Each row's environment name (None for a single factory); `rows` a Dataset."""
        if not self.by_column:
            return [None] * len(rows)
        if ENVIRONMENT_COLUMN not in rows.column_names:
            raise ConfigError(
                f"rollout.environment is a mapping ({sorted(self.factories)}): the data needs an "
                f"{ENVIRONMENT_COLUMN!r} column naming each row's environment"
            )
        names = [str(v) for v in rows[ENVIRONMENT_COLUMN]]
        for row, name in enumerate(names):
            if name not in self.factories:
                raise ConfigError(
                    f"row {row} has environment={name!r}, which is not one of rollout.environment's "
                    f"{sorted(self.factories)}"
                )
        return names

    def instances(self, names: list[str | None]) -> list[Any]:
        """One instance per episode, from the pools (grown when a batch needs more)."""
        handed: dict[str | None, int] = {}
        instances = []
        for name in names:
            index = handed.get(name, 0)
            pool = self.pool[name]
            if index == len(pool):
                pool.append(self._new(name))
            handed[name] = index + 1
            instances.append(pool[index])
        return instances

    def reward_functions(self) -> list[tuple[str, Callable[..., list[float | None]]]]:
        """(name, reward function) for each environment class with `get_reward`: the reward of an
        episode whose environment is exactly that class, None for the others (TRL's rule)."""

        def reward_of(kind: type) -> Callable[..., list[float | None]]:
            def get_reward(prompts, completions, environments=None, **unused) -> list[float | None]:
                return [
                    call_maybe_async(e.get_reward) if type(e) is kind else None
                    for e in environments or [None] * len(completions)
                ]

            get_reward.__name__ = kind.__name__
            return get_reward

        return [(kind.__name__, reward_of(kind)) for kind in self.reward_classes]


def reset_environment(instance: Any, row: dict[str, Any], index: int) -> str | None:
    """`instance.reset(**row)` (the `environment` column left out); an exception names the row."""
    arguments = {k: v for k, v in row.items() if k != ENVIRONMENT_COLUMN}
    try:
        observation = instance.reset(**arguments)
    except Exception as exc:  # noqa: BLE001 - a user's environment can raise anything
        raise RuntimeError(
            f"the environment {type(instance).__name__}.reset failed on row {index} ({row!r}): {exc!r}"
        ) from exc
    if observation is not None and not isinstance(observation, str):
        raise RuntimeError(
            f"the environment {type(instance).__name__}.reset returned {type(observation).__name__} on row "
            f"{index}; it must return None or text to append to the last user message"
        )
    return observation
