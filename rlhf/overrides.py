"""The command line's overrides checked against a recipe's config schema before Hydra composes it.

Hydra refuses an unknown key given as `key=value` with a hint to write `+key=value`, and then
accepts `+key=value` into the composed config, where the schema drops it: a user who follows the
hint trains with the default silently. Every dotted key of the command line, with or without `+`,
must name a field of the schema (or sit under a free-form mapping); an unknown key is an error that
names the nearest real key, and TRL's name for it when the user wrote TRL's.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from typing import Any

from rlhf.config import ConfigError

# TRL's trainer arguments and where the same setting lives here
TRL_NAMES = {
    "num_generations": "rollout.group_size",
    "max_completion_length": "rollout.max_new_tokens",
    "max_prompt_length": "data.max_prompt_length",
    "max_length": "data.max_length",
    "learning_rate": "optim.lr",
    "lr_scheduler_type": "optim.scheduler",
    "warmup_steps": "optim.warmup_steps",
    "weight_decay": "optim.weight_decay",
    "max_grad_norm": "optim.max_grad_norm",
    "max_steps": "train.steps",
    "num_train_epochs": "train.epochs",
    "num_iterations": "train.updates_per_rollout",
    "per_device_train_batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.micro_batch_size (the step's batch is split into micro-batches)",
    "epsilon": "loss.clip_low",
    "epsilon_high": "loss.clip_high",
    "loss_type": "loss.aggregation (GRPO) or loss.type (DPO)",
    "scale_rewards": "advantage.scale_by_std / advantage.std_scope",
    "beta": "loss.kl_coef (GRPO, PPO) or loss.beta (DPO)",
    "use_vllm": "rollout.engine=vllm",
    "vllm_gpu_memory_utilization": "rollout.vllm.gpu_memory_utilization",
    "mask_truncated_completions": "loss.mask_truncated",
    "output_dir": "run_dir",
    "logging_steps": "logger.log_every",
    "save_steps": "checkpoint.every",
    "save_total_limit": "checkpoint.keep_last",
    "eval_steps": "eval.every",
    "bf16": "train.precision=bf16",
    "report_to": "logger=wandb_online",
}


def schema_keys(schema: type, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every dotted field of `schema`, the dotted fields under which any key is free: mappings)."""
    keys, free = set(), set()
    hints = typing.get_type_hints(schema)
    for spec in dataclasses.fields(schema):
        path = prefix + spec.name
        keys.add(path)
        kind = hints[spec.name]
        if dataclasses.is_dataclass(kind):
            inner, inner_free = schema_keys(kind, path + ".")
            keys |= inner
            free |= inner_free
        elif _mapping(kind):
            free.add(path)
    return keys, free


def _mapping(kind: Any) -> bool:
    """A free-form field (dict or Any, possibly optional), whose keys the schema does not list."""
    if kind is Any or kind is dict or typing.get_origin(kind) is dict:
        return True
    return (
        any(_mapping(arg) for arg in typing.get_args(kind) if arg is not type(None))
        if typing.get_args(kind) and typing.get_origin(kind) is not list
        else False
    )


def check_command_line(schema: type, argv: list[str], config_dir: str) -> None:
    """Refuse the overrides of `argv` whose key is neither a schema field (at any depth), a config
    group under `config_dir`, Hydra's own (`hydra.*`) nor under a free-form mapping."""
    keys, free = schema_keys(schema)
    groups = {name for name in os.listdir(config_dir) if os.path.isdir(os.path.join(config_dir, name))}
    for argument in argv:
        if argument.startswith("-") or "=" not in argument:
            continue  # Hydra's flags (-m, --cfg job, ...)
        key = argument.split("=", 1)[0].lstrip("+~")
        top = key.split(".")[0]
        if top == "hydra" or key in keys or key in groups or any(key.startswith(f + ".") for f in free):
            continue
        raise ConfigError(unknown_key_message(key, argument, keys))


def unknown_key_message(key: str, argument: str, keys: set[str]) -> str:
    leaf = key.split(".")[-1]
    message = f"unknown config key {key!r} (in {argument!r}): nothing was started"
    if leaf in TRL_NAMES:
        return f"{message}; TRL's {leaf} is {TRL_NAMES[leaf]} here"
    same_leaf = sorted(k for k in keys if k.split(".")[-1] == leaf)
    near = same_leaf or difflib.get_close_matches(key, sorted(keys), n=3, cutoff=0.6)
    if near:
        return f"{message}; did you mean {' or '.join(near)}?"
    return f"{message}; see the recipe's config with --cfg job, or docs/methods.md"


def refuse_unknown_keys(schema: type, argv: list[str], recipe_file: str) -> None:
    """`check_command_line` for a recipe started from the command line (its configs/ beside the
    recipes/ folder): an unknown key ends the process with the message, before Hydra or any model."""
    config_dir = os.path.join(os.path.dirname(os.path.abspath(recipe_file)), os.pardir, "configs")
    try:
        check_command_line(schema, argv, config_dir)
    except ConfigError as error:
        raise SystemExit(f"error: {error}") from None


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


RECIPE_SCHEMAS = {
    "grpo": "GRPOConfig",
    "ppo": "PPOConfig",
    "sft": "SFTConfig",
    "dpo": "DPOConfig",
    "reward_model": "RewardModelConfig",
    "aligndistil": "AlignDistilConfig",
}


def check_recipe_command_line(recipe: str, recipe_file: str) -> None:
    """Run first thing by a recipe started as a script, before its heavy imports (transformers,
    deepspeed, about 10 s): the launcher's `--local_rank` dropped from sys.argv, and an unknown key
    refused in the time it takes to import the config schemas."""
    import sys

    from rlhf import config

    sys.argv = drop_launcher_arguments(sys.argv)
    refuse_unknown_keys(getattr(config, RECIPE_SCHEMAS[recipe]), sys.argv[1:], recipe_file)
