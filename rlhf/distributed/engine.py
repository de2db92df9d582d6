"""The TrainEngine protocol and the single-process engine.

An engine owns the optimizer, the scheduler and everything data parallelism needs. Its contract:
losses arrive already divided by the step-wide normalizer (summed over micro-batches and ranks),
`backward` accumulates, and `step` applies exactly the update a single process would make on the
whole batch. Checkpoint methods are collective: every rank calls them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any, Protocol

import torch
from transformers import get_scheduler

from rlhf.config import ConfigError, DistributedConfig, OptimConfig
from rlhf.distributed.env import DistEnv, launcher_env
from rlhf.models.flex import refuse_training_on_cpu
from rlhf.models.precision import autocast_forward, innermost_model, warn_pure_low_precision


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TrainEngine(Protocol):
    model: torch.nn.Module  # call this for training and logprob forward passes
    module: torch.nn.Module  # the underlying Hugging Face module: generate, save_pretrained, config
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> dict[str, float]: ...

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor: ...

    def all_gather_object(self, value: Any) -> list[Any]: ...

    def barrier(self) -> None: ...

    def gathered_parameters(
        self, parameters=None, writable: bool = False
    ) -> contextlib.AbstractContextManager: ...

    def prepare_frozen(self, model: torch.nn.Module | Callable[[], torch.nn.Module]) -> torch.nn.Module: ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None: ...

    def save_state(self, directory: str) -> None: ...

    def load_state(self, directory: str) -> None: ...


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    if len(cfg.betas) != 2:
        raise ConfigError(f"optim.betas must have 2 values, got {cfg.betas}")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # an empty group (LoRA trains only 2-D matrices) breaks DeepSpeed's ZeRO partitioning
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
        # torch's own kernel choice, not fused=True (the transformers Trainer's): the fused kernel
        # takes the same steps up to rounding and saved 1.5 ms per step on the CPU benchmark, but
        # the demo's SFT warm start, whose escape from a loss plateau hangs on rounding, then
        # missed its 35% check in 2000 steps at seed 0 (1460 steps without it)
    )


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return get_scheduler(
        cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(total_steps, 1)
    )


class SingleProcessEngine:
    """Optimizer, scheduler and gradient clipping for a model on one device."""

    world_size = 1
    rank = 0

    def __init__(
        self,
        model: torch.nn.Module,
        optim: OptimConfig,
        total_steps: int,
        device: torch.device,
        precision: str = "fp32",
    ):
        self.device = device
        self.precision = precision
        warn_pure_low_precision(model)
        refuse_training_on_cpu(model, device)
        self.model = self.module = self._in_precision(model.to(device))
        self.optim_cfg = optim
        self.optimizer = build_optimizer(self.model, optim)
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps)

    @property
    def is_main(self) -> bool:
        return True

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        if self.optim_cfg.max_grad_norm is not None:
            stats["optim/grad_norm"] = float(
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.max_grad_norm)
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats["optim/lr"] = self.scheduler.get_last_lr()[0]
        return stats

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_gather_object(self, value: Any) -> list[Any]:
        return [value]

    def barrier(self) -> None:
        pass

    def gathered_parameters(
        self, parameters=None, writable: bool = False
    ) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def prepare_frozen(self, model: ModelSource) -> torch.nn.Module:
        return self._in_precision(materialize(model).to(self.device).eval().requires_grad_(False))

    def _in_precision(self, model: torch.nn.Module) -> torch.nn.Module:
        """bf16: the model's forward (training passes and generation alike) under autocast; its
        weights, and so the optimizer's, stay float32."""
        if self.precision == "bf16":
            autocast_forward(innermost_model(model), self.device)
        return model

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def save_state(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        torch.save(state, os.path.join(directory, "engine.pt"))

    def load_state(self, directory: str) -> None:
        state = torch.load(os.path.join(directory, "engine.pt"), map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


ModelSource = torch.nn.Module | Callable[[], torch.nn.Module]


def materialize(model: ModelSource) -> torch.nn.Module:
    return model if isinstance(model, torch.nn.Module) else model()


def build_engine(
    model: ModelSource,
    optim: OptimConfig,
    dist_cfg: DistributedConfig,
    total_steps: int,
    micro_batch_size: int = 1,
    precision: str = "fp32",
) -> TrainEngine:
    """The engine `distributed.backend` names, on the launcher's processes.

    `model` is a module or a function that builds one; pass a function so that under ZeRO-3 the
    parameters are partitioned while the model is built instead of after. `precision` is
    train.precision: "bf16" trains in mixed precision (autocast in one process, DeepSpeed's bf16
    mode under ZeRO), with float32 master weights either way.
    """
    env: DistEnv = launcher_env()
    if dist_cfg.backend == "single":
        if env.world_size > 1:
            raise ConfigError(
                f"distributed.backend=single but the launcher started {env.world_size} processes; "
                "use distributed=zero1, zero2 or zero3 (or launch one process)"
            )
        device = resolve_device(dist_cfg.device)
        return SingleProcessEngine(materialize(model), optim, total_steps, device, precision)
    if dist_cfg.backend == "deepspeed":
        from rlhf.distributed.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, optim, dist_cfg, total_steps, micro_batch_size, env, precision)
    raise ConfigError(f"distributed.backend={dist_cfg.backend!r} is not one of ['single', 'deepspeed']")
