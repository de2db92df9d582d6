"""The TrainEngine protocol and the single-process engine (one device, no data parallelism)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers import get_scheduler

from rlhf.config import ConfigError, DistributedConfig, OptimConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class TrainEngine(Protocol):
    model: torch.nn.Module
    device: torch.device
    world_size: int
    rank: int

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> dict[str, float]: ...

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @property
    def is_main(self) -> bool: ...


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; biases and norm weights (1-D parameters) get no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    if len(cfg.betas) != 2:
        raise ConfigError(f"optim.betas must have 2 values, got {cfg.betas}")
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.betas[0], cfg.betas[1]),
        eps=cfg.eps,
    )


class SingleProcessEngine:
    """Optimizer, scheduler and gradient clipping for a model on one device."""

    world_size = 1
    rank = 0

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, total_steps: int, device: torch.device):
        self.device = device
        self.model = model.to(device)
        self.optim_cfg = optim
        self.optimizer = build_optimizer(self.model, optim)
        self.scheduler = get_scheduler(
            optim.scheduler,
            self.optimizer,
            num_warmup_steps=optim.warmup_steps,
            num_training_steps=max(total_steps, 1),
        )

    @property
    def is_main(self) -> bool:
        return True

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> dict[str, float]:
        grad_norm = None
        if self.optim_cfg.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = {"optim/lr": self.scheduler.get_last_lr()[0]}
        if grad_norm is not None:
            stats["optim/grad_norm"] = float(grad_norm)
        return stats

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_engine(
    model: torch.nn.Module, optim: OptimConfig, dist: DistributedConfig, total_steps: int
) -> SingleProcessEngine:
    if dist.backend != "single":
        raise ConfigError(f"distributed.backend={dist.backend!r} is not available; use 'single'")
    return SingleProcessEngine(model, optim, total_steps, resolve_device(dist.device))
