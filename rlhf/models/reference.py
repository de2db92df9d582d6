"""A reference model that follows the policy: TR-DPO's update (Gorbatovski et al. 2024, "Learn Your
Reference Model for Real Good Alignment", arXiv 2404.09656), TRL's `sync_ref_model`.

Every `sync_steps` training steps the frozen reference moves toward the policy,
    ref <- alpha * policy + (1 - alpha) * ref
(alpha = 1 replaces it: the paper's hard update; alpha < 1 is its soft update; TRL's default 0.6).
Under ZeRO-3 the two models are gathered one module at a time, so no rank holds more than one
module of either beyond its shards. The mixed weights are part of the training state: a resumed run
continues from the reference it had, not from the initial model.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from rlhf.checkpoint import CheckpointError
from rlhf.config import ConfigError


def _paired_modules(policy: torch.nn.Module, reference: torch.nn.Module) -> Iterator[tuple[list, list, list]]:
    """Per module owning weights: (the parameters' full names, the policy's parameters, the
    reference's same parameters), each parameter once (a tied LM head is mixed with the embedding it
    shares, not a second time)."""
    reference_modules = dict(reference.named_modules())
    seen: set[int] = set()
    for name, module in policy.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for _, p in own)
        twin = dict(reference_modules[name].named_parameters(recurse=False))
        prefix = f"{name}." if name else ""
        yield [prefix + n for n, _ in own], [p for _, p in own], [twin[n] for n, _ in own]


def check_same_layout(policy: torch.nn.Module, reference: torch.nn.Module) -> None:
    """The reference must be a second copy of the policy's architecture (not a LoRA view of it)."""
    mine = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in policy.named_parameters()}
    theirs = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in reference.named_parameters()}
    if mine != theirs:
        missing = sorted(set(mine) ^ set(theirs))[:3] or [n for n in mine if mine[n] != theirs[n]][:3]
        raise ConfigError(
            f"reference.sync needs a reference with the policy's parameters; they differ at {missing}"
        )


class ReferenceSync:
    """Mixes the policy into the frozen reference every `sync_steps` steps; saves and restores it."""

    def __init__(self, policy_engine: Any, reference: torch.nn.Module, alpha: float, sync_steps: int):
        check_same_layout(policy_engine.module, reference)
        self.engine, self.reference = policy_engine, reference
        self.alpha, self.sync_steps = alpha, sync_steps

    def after_step(self, step: int) -> dict[str, float]:
        """Call after each training step's optimizer steps (collective under ZeRO-3)."""
        if step % self.sync_steps:
            return {}
        started = time.perf_counter()
        with torch.no_grad():
            for _, policy_params, reference_params in _paired_modules(self.engine.module, self.reference):
                with (
                    self.engine.gathered_parameters(policy_params),
                    self.engine.gathered_parameters(reference_params, writable=True),
                ):
                    for mine, theirs in zip(policy_params, reference_params, strict=True):
                        theirs.mul_(1.0 - self.alpha).add_(mine.to(theirs.dtype), alpha=self.alpha)
        return {"time/reference_sync": time.perf_counter() - started}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reference's full weights on the main rank (collective; empty elsewhere)."""
        state: dict[str, torch.Tensor] = {}
        for names, _, params in _paired_modules(self.engine.module, self.reference):
            with self.engine.gathered_parameters(params):
                if self.engine.is_main:
                    state.update({n: p.detach().cpu().clone() for n, p in zip(names, params, strict=True)})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the weights `state_dict` saved (every rank reads the same state)."""
        with torch.no_grad():
            for names, _, params in _paired_modules(self.engine.module, self.reference):
                missing = [n for n in names if n not in state]
                if missing:
                    raise CheckpointError(f"the checkpoint's reference weights lack {missing[0]}")
                with self.engine.gathered_parameters(params, writable=True):
                    for n, p in zip(names, params, strict=True):
                        p.copy_(state[n].to(p.device, p.dtype))
