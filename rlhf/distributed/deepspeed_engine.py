"""DeepSpeed ZeRO engine (stages 0-3, optional CPU offload) behind the TrainEngine protocol.

The DeepSpeed config is generated from our `distributed` and `optim` groups; a raw DeepSpeed JSON
(`distributed.deepspeed_config`) is merged over it. Gradient accumulation is left to us
(`managed_gradient_accumulation: false`): `backward` only accumulates and `step` is the boundary,
so the number of micro-batches per step may vary. DeepSpeed averages gradients over ranks, while
our losses are already divided by a global normalizer, so `backward` multiplies by the world size
to make the reduction a sum.
Frozen models (the reference) follow the policy's sharding: under ZeRO-3 they are partitioned too
(and offloaded with `offload_params`). Generation under ZeRO-3 gathers the policy's parameters
once per rollout (`gathered_parameters`), not once per generated token.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import deepspeed
import torch

from rlhf.config import ConfigError, DistributedConfig, OptimConfig
from rlhf.distributed.engine import ModelSource, build_optimizer, build_scheduler, materialize, resolve_device
from rlhf.distributed.env import DistEnv, all_gather_object, all_reduce_sum, barrier, init_process_group
from rlhf.models.flex import refuse_training_on_cpu
from rlhf.models.precision import warn_pure_low_precision

CHECKPOINT_TAG = "zero"


def deepspeed_config(
    dist_cfg: DistributedConfig, optim: OptimConfig, micro_batch_size: int, precision: str = "fp32"
) -> dict[str, Any]:
    """The DeepSpeed JSON our config implies, with a user file merged over it."""
    if dist_cfg.offload_params and dist_cfg.zero_stage != 3:
        raise ConfigError("distributed.offload_params needs distributed.zero_stage=3")
    if dist_cfg.offload_optimizer and dist_cfg.zero_stage == 0:
        raise ConfigError("distributed.offload_optimizer needs distributed.zero_stage >= 1")
    zero: dict[str, Any] = {"stage": dist_cfg.zero_stage}
    if dist_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dist_cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # our AdamW also runs on offloaded (CPU) optimizer state
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # bf16 weights and compute, float32 master weights and optimizer state in the ZeRO optimizer
        "bf16": {"enabled": precision == "bf16"},
    }
    # DeepSpeed clips at 1.0 unless told otherwise; 0 turns clipping off like max_grad_norm=null
    config["gradient_clipping"] = optim.max_grad_norm if optim.max_grad_norm is not None else 0.0
    if dist_cfg.deepspeed_config:
        with open(dist_cfg.deepspeed_config) as handle:
            config = _merge(config, json.load(handle))
    return config


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value)
            if isinstance(value, dict) and isinstance(merged.get(key), dict)
            else value
        )
    return merged


class DeepSpeedEngine:
    def __init__(
        self,
        model: ModelSource,
        optim: OptimConfig,
        dist_cfg: DistributedConfig,
        total_steps: int,
        micro_batch_size: int,
        env: DistEnv,
        precision: str = "fp32",
    ):
        init_process_group(dist_cfg.timeout_s, always=True)
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world_size = env.rank, env.world_size
        self.device = resolve_device(dist_cfg.device, env.local_rank)
        self.dist_cfg = dist_cfg
        self.config = deepspeed_config(dist_cfg, optim, micro_batch_size, precision)
        self.bf16 = precision == "bf16"
        self.stage = self.config["zero_optimization"]["stage"]
        with self.construction_context():
            model = materialize(model)
        model = model.to(self.device)
        warn_pure_low_precision(model)
        refuse_training_on_cpu(model, self.device)
        optimizer = build_optimizer(model, optim)
        scheduler = build_scheduler(optimizer, optim, total_steps)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        # Forward passes go through the DeepSpeed engine: its forward does ZeRO-3's micro-step
        # bookkeeping, without which a second backward overwrites instead of accumulating.
        self.model = self.ds
        self.module = self.ds.module

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> dict[str, float]:
        self.ds.step()
        stats = {"optim/lr": self.scheduler.get_last_lr()[0]}
        norm = self.ds.get_global_grad_norm()
        if norm is not None:
            stats["optim/grad_norm"] = float(norm)
        return stats

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(value)

    def all_gather_object(self, value: Any) -> list[Any]:
        return all_gather_object(value)

    def barrier(self) -> None:
        barrier()

    def gathered_parameters(
        self, parameters=None, writable: bool = False
    ) -> contextlib.AbstractContextManager:
        """Under ZeRO-3, the whole policy (or just `parameters`, which may belong to any ZeRO-3
        model) materialised on every rank; read-only, or `writable`: rank 0's values are
        partitioned back on exit (every rank should write the same)."""
        if self.stage != 3:
            return contextlib.nullcontext()
        chosen = list(self.module.parameters() if parameters is None else parameters)
        return deepspeed.zero.GatheredParameters(chosen, modifier_rank=0 if writable else None)

    @contextlib.contextmanager
    def construction_context(self) -> Iterator[None]:
        """Under ZeRO-3, `from_pretrained` inside this block partitions parameters as it loads them
        (transformers sees the DeepSpeed config), so no rank ever holds the whole model. Models built
        from a config (the tiny random-init ones) are partitioned by deepspeed.initialize instead."""
        if self.stage != 3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig

        alive = HfDeepSpeedConfig(self.config)  # transformers holds it weakly: keep it alive here only
        try:
            yield
        finally:
            del alive

    def prepare_frozen(self, model: ModelSource) -> torch.nn.Module:
        with self.construction_context():
            model = materialize(model)
        model = model.eval().requires_grad_(False)
        if self.bf16:  # the same numbers as the bf16 policy (the reference's KL is 0 at the start)
            model = model.to(torch.bfloat16)
        if self.stage != 3:
            return model.to(self.device)
        zero: dict[str, Any] = {"stage": 3}
        if self.dist_cfg.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        config = {
            "train_micro_batch_size_per_gpu": self.config["train_micro_batch_size_per_gpu"],
            "zero_optimization": zero,
            "bf16": {"enabled": self.bf16},
        }
        engine, *_ = deepspeed.initialize(model=model.to(self.device), config=config)
        return engine.module

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (gathered from the shards under ZeRO-3); None on other ranks."""
        if self.stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
            return state if self.is_main else None
        return self.module.state_dict() if self.is_main else None

    def save_state(self, directory: str) -> None:
        self.ds.save_checkpoint(directory, tag=CHECKPOINT_TAG, save_latest=False)

    def load_state(self, directory: str) -> None:
        path, _ = self.ds.load_checkpoint(
            directory, tag=CHECKPOINT_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(
                f"no DeepSpeed checkpoint under {os.path.join(directory, CHECKPOINT_TAG)}"
            )
