"""The agent of a run: the configured tools and environments, and the rollout of a batch of rows as
multi-turn episodes (rlhf/agents/episodes.py). Built once from `rollout` settings; None when the
run has neither tools nor environments (single-turn rollouts, unchanged).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf.agents.chat import prepare_tool_calling
from rlhf.agents.environments import Environments, environment_methods, reset_environment
from rlhf.agents.episodes import Episode, EpisodeLimits, collate_episodes, episode_metrics, run_episodes
from rlhf.agents.tools import Toolbox, load_tools, tool_schema
from rlhf.calls import call_maybe_async
from rlhf.config import ConfigError
from rlhf.data.chat import as_conversation, clean_messages, encode_prompt, reward_columns, row_extras
from rlhf.data.load import DataError
from rlhf.rollout.sampling import SamplingParams
from rlhf.types import RolloutBatch


class Agent:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        tools: list[Any],
        environments: Environments | None,
        limits: EpisodeLimits,
        tool_timeout_s: float | None,
        context: int | None = None,
    ):
        prepare_tool_calling(tokenizer)
        self.tokenizer, self.tools, self.environments = tokenizer, tools, environments
        self.limits, self.tool_timeout_s, self.context = limits, tool_timeout_s, context

    @classmethod
    def from_config(
        cls, rollout: Any, tokenizer: PreTrainedTokenizerBase, context: int | None = None
    ) -> Agent | None:
        """From `rollout.tools`, `rollout.environment`, `rollout.max_turns`,
        `rollout.max_episode_tokens` (None: rollout.max_new_tokens, TRL's completion budget) and
        `rollout.tool_timeout_s`; None without tools or environments."""
        environments = Environments.from_config(rollout.environment)
        if not rollout.tools and environments is None:
            return None
        budget = rollout.max_episode_tokens or rollout.max_new_tokens
        return cls(
            tokenizer,
            load_tools(list(rollout.tools)),
            environments,
            EpisodeLimits(rollout.max_turns, budget),
            rollout.tool_timeout_s,
            context,
        )

    def reward_functions(self) -> list[tuple[str, Any]]:
        """The environments' `get_reward`, one reward per class (weight 1, as TRL adds them)."""
        return self.environments.reward_functions() if self.environments else []

    def _episode(
        self, prompt: Any, row: dict[str, Any], index: int, instance: Any, extras, where: str
    ) -> Episode:
        system, data_tools = extras
        functions = self.tools + (environment_methods(instance) if instance is not None else [])
        toolbox = Toolbox(functions, self.tool_timeout_s)
        named = {fn.__name__ for fn in functions}
        schemas = [tool_schema(fn) for fn in functions]
        schemas += [t for t in data_tools or [] if t.get("function", t).get("name") not in named]
        messages = clean_messages(as_conversation(prompt, "user", system), "prompt", index, where)
        observation = reset_environment(instance, row, index) if instance is not None else None
        if observation:
            messages = [*messages[:-1], {**messages[-1], "content": messages[-1]["content"] + observation}]
        ids, _ = encode_prompt(self.tokenizer, messages, True, index, where, tools=schemas or None)
        if self.context is not None and len(ids) + self.limits.max_episode_tokens > self.context:
            raise DataError(
                f"{where}: row {index}'s prompt is {len(ids)} tokens; with rollout.max_episode_tokens="
                f"{self.limits.max_episode_tokens} it does not fit the context of {self.context} (the model's, "
                "or rollout.vllm.max_model_len)"
            )
        return Episode(ids, list(messages), toolbox, schemas or None, instance)

    def rollout(
        self,
        engine: Any,
        rows: Any,
        *,
        prompt_column: str,
        group_size: int,
        sampling: SamplingParams,
        do_sample: bool = True,
        seed: int = 0,
    ) -> tuple[RolloutBatch, dict[str, float]]:
        """`group_size` episodes of each row (inside the engine's `ready` block), collated."""
        where = "rollout"
        prompts = [p for p in rows[prompt_column] for _ in range(group_size)]
        table = [row for row in rows for _ in range(group_size)]
        systems, data_tools = row_extras(rows, True, where)
        extras = [(s, t) for s, t in zip(systems, data_tools) for _ in range(group_size)]
        instances: list[Any] = [None] * len(prompts)
        if self.environments is not None:
            names = self.environments.names_of(rows)
            instances = self.environments.instances([n for n in names for _ in range(group_size)])
        episodes = [
            self._episode(prompt, row, index // group_size, instance, extra, where)
            for index, (prompt, row, instance, extra) in enumerate(zip(prompts, table, instances, extras))
        ]
        run_episodes(engine, episodes, sampling, self.limits, do_sample=do_sample, seed=seed)
        for index, episode in enumerate(episodes):
            episode.turn_rewards = turn_rewards(episode, index // group_size)
        columns = {
            k: [v for v in values for _ in range(group_size)]
            for k, values in reward_columns(rows, prompt_column).items()
        }
        batch = collate_episodes(episodes, self.tokenizer, prompts, columns, group_size, engine.policy.device)
        return batch, episode_metrics(episodes)


def turn_rewards(episode: Episode, row: int) -> list[float] | None:
    """The environment's `get_turn_rewards()` for a finished episode (None when it has none): one
    number per model turn, in order; fewer leave the later turns at 0."""
    method = getattr(episode.environment, "get_turn_rewards", None)
    if method is None:
        return None
    values = call_maybe_async(method)
    name = type(episode.environment).__name__
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (int, float)) for v in values):
        raise RuntimeError(
            f"{name}.get_turn_rewards returned {values!r} on row {row}; give a list of numbers"
        )
    if len(values) > len(episode.turns):
        raise RuntimeError(
            f"{name}.get_turn_rewards returned {len(values)} rewards on row {row}, for {len(episode.turns)} turns"
        )
    return [float(v) for v in values]


def build_agent(
    cfg: Any, tokenizer: PreTrainedTokenizerBase, train_rows: Any, rewards: list[Any]
) -> Agent | None:
    """The run's agent from a GRPO or PPO config (None without tools and environments), its data
    checked; the environments' `get_reward` join `rewards` (weight 1, named after the class)."""
    from rlhf.data.chat import is_templated
    from rlhf.models.load import model_context
    from rlhf.scoring import WeightedReward

    context = model_context(cfg.model)
    engine_limit = cfg.rollout.vllm.max_model_len if cfg.rollout.engine in ("vllm", "vllm_server") else None
    if engine_limit is not None:  # the colocated engine's own context is what an episode must fit
        context = engine_limit if context is None else min(context, engine_limit)
    agent = Agent.from_config(cfg.rollout, tokenizer, context)
    if agent is None:
        return None
    if getattr(getattr(cfg, "curiosity", None), "eta", 0.0):
        raise ConfigError("curiosity.eta: CD-RLHF's curiosity does not run on multi-turn episodes yet")
    if not is_templated(train_rows, cfg.data):
        raise ConfigError(
            f"rollout.tools / rollout.environment: data.source={cfg.data.source!r} has plain-text prompts; "
            "episodes are conversations: give message-list prompts or set data.apply_chat_template=true"
        )
    rewards += [WeightedReward(name, fn, 1.0) for name, fn in agent.reward_functions()]
    return agent
