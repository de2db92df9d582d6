"""CD-RLHF curiosity (arXiv 2501.11463): an intrinsic token reward from the prediction error of a
forward model, given only to tokens sampled outside the policy's top-k.

States are the frozen reference model's last hidden states (s_t predicts action a_t, s_{t+1} follows
it); the action feature is the policy's input embedding of a_t. The module (an encoder MLP h → 2h →
2h → h applied to both states, and a forward model [phi(s_t); psi(a_t)] → I → I → h) trains on its own
optimizer with the loss 0.5 * ||phi_hat(s_{t+1}) - phi(s_{t+1})||_2 (the plain norm, as the authors'
code). The reward is that error from the module before its update, whitened per sequence over the
valid tokens, then gated: tokens inside the top-k get 0, the others keep their z-score (which can be
negative), as the authors' code orders it. Scaled by eta it is a dense source of `rlhf.shaping`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from rlhf.ops import masked_mean, masked_var


class CuriosityModel(nn.Module):
    """Encoder phi and forward model f of the intrinsic curiosity module (no inverse model)."""

    def __init__(self, hidden_size: int, action_size: int, intermediate_size: int):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(hidden_size, 2 * hidden_size),
            nn.ReLU(),
            nn.Linear(2 * hidden_size, 2 * hidden_size),
            nn.ReLU(),
            nn.Linear(2 * hidden_size, hidden_size),
        )
        self.forward_model = nn.Sequential(
            nn.Linear(hidden_size + action_size, intermediate_size),
            nn.ReLU(),
            nn.Linear(intermediate_size, intermediate_size),
            nn.ReLU(),
            nn.Linear(intermediate_size, hidden_size),
        )

    def forward(
        self, states: torch.Tensor, next_states: torch.Tensor, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(phi(s_{t+1}), predicted phi(s_{t+1})), each [B, T, h]."""
        predicted = self.forward_model(torch.cat([self.encoder(states), actions], dim=-1))
        return self.encoder(next_states), predicted


def prediction_error(target: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """[B, T] 0.5 * ||predicted - target||_2 per token."""
    return 0.5 * (predicted.float() - target.float()).norm(dim=-1)


def curiosity_loss(error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean prediction error over the valid response tokens."""
    return masked_mean(error, mask)


def whiten_per_sequence(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) within each row's valid tokens (the authors whiten each one-
    sequence micro-batch); masked positions become 0."""
    mean = masked_mean(values, mask, dim=1).unsqueeze(1)
    var = masked_var(values, mask, dim=1).unsqueeze(1)
    return torch.where(mask, (values - mean) * torch.rsqrt(var + eps), torch.zeros_like(values))


def outside_topk(logits: torch.Tensor, tokens: torch.Tensor, k: int = 1) -> torch.Tensor:
    """[B] or [B, T] bool: True where the sampled token is not among the k most likely."""
    top = logits.topk(k, dim=-1).indices
    return ~(top == tokens.unsqueeze(-1)).any(-1)


def intrinsic_reward(error: torch.Tensor, mask: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Whitened per sequence, then gated (True = the token gets curiosity)."""
    return whiten_per_sequence(error.detach().float(), mask) * gate.float()


class TopKRecorder:
    """A generation logits processor that records for every step which ids are the k most likely
    under the distribution sampled from; the scores pass through unchanged. It runs after our
    repetition penalty and before transformers' temperature, top-k, top-p and min-p warpers, which
    keep the order of the tokens they keep: a sampled token is among its k most likely exactly when
    it is among the sampled distribution's. After generate, `outside(response_ids)` is the gate [B, T]."""

    def __init__(self, k: int):
        self.k = k
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.steps.append(scores.topk(self.k, dim=-1).indices)
        return scores

    def outside(self, response_ids: torch.Tensor) -> torch.Tensor:
        top = torch.stack(self.steps, dim=1)[:, : response_ids.shape[1]]  # [B, T, k]
        gate = ~(top == response_ids[:, : top.shape[1], None]).any(-1)
        if gate.shape[1] < response_ids.shape[1]:  # generation stopped early for every row
            pad = torch.zeros(gate.shape[0], response_ids.shape[1] - gate.shape[1], dtype=torch.bool)
            gate = torch.cat([gate, pad.to(gate.device)], dim=1)
        return gate


class Curiosity:
    """The dense source `eta * r_intrinsic` and the module's own training.

    `embed` maps token ids to the policy's input embeddings; `all_reduce_sum` averages the module's
    gradients over data-parallel ranks so every rank keeps the same module."""

    name = "curiosity"

    def __init__(
        self,
        model: CuriosityModel,
        embed: Callable[[torch.Tensor], torch.Tensor],
        eta: float,
        lr: float,
        weight_decay: float = 0.1,
        all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
        world_size: int = 1,
    ):
        self.model, self.embed, self.eta = model, embed, eta
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay
        )
        self.all_reduce_sum, self.world_size = all_reduce_sum, world_size

    def _error(self, batch) -> torch.Tensor:
        actions = self.embed(batch.response_ids).detach().float()
        target, predicted = self.model(batch.ref_states.float(), batch.ref_next_states.float(), actions)
        return prediction_error(target, predicted)

    def __call__(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Token rewards [B, T] from the module as it is before this step's update."""
        mask = batch.response_mask
        with torch.no_grad():
            error = self._error(batch)
        reward = intrinsic_reward(error, mask, batch.outside_topk)
        gated = mask & batch.outside_topk
        return self.eta * reward, {
            "curiosity/error_mean": float(masked_mean(error, mask)),
            "curiosity/gated_fraction": float(gated.sum() / mask.sum().clamp(min=1)),
            "curiosity/reward_mean": float(masked_mean(reward, gated)) if gated.any() else 0.0,
        }

    def update(self, batch) -> dict[str, float]:
        """One optimizer step of the module on the step's rollout."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = curiosity_loss(self._error(batch), batch.response_mask)
        loss.backward()
        if self.all_reduce_sum is not None and self.world_size > 1:
            for parameter in self.model.parameters():
                if parameter.grad is not None:
                    parameter.grad = self.all_reduce_sum(parameter.grad) / self.world_size
        self.optimizer.step()
        return {"curiosity/loss": float(loss.detach())}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
