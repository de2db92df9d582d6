"""Per-token values from frozen models for token-level preference methods.

For a collated pair batch (rows [chosen; rejected], prompt left-padded, completion right-padded),
`PairTokenScorer` returns the values the DPO recipe needs besides the policy's own logprobs, each
[2P, T] in float32 and meaningful only where the completion mask is True:
    ref_logprobs      log pi_ref(y_t) of the reference (DPO family, except SimPO)
    guide_logprobs    log pi_hat(y_t) of a frozen DPO-trained guide (TGDPO)
    contrast_scores   softmax((1 + b) z_pos - b z_neg)[y_t] of the positive and negative models (cDPO)
    treg_rewards      sigmoid(log pi(y_t | better prompt) - log pi(y_t | worse prompt)) - 0.5 (T-REG)
The same function serves the on-the-fly path (called per micro-batch) and the precomputed cache.
Also here, for GRPO rollouts: `nthr_token_scale`, NTHR's advantage multipliers from the old policy's
hidden states and sampling distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf.advantages import nthr_advantage_scale, nthr_scores
from rlhf.losses.preference import contrastive_prompt_token_rewards, contrastive_token_scores
from rlhf.models.forward import (
    chunked_token_loss,
    logprob_chunk,
    output_head,
    response_head_inputs,
    response_logits,
    response_logprobs,
)
from rlhf.models.options import ForwardOptions
from rlhf.ops import penalty_context, penalty_mask, warp_logits

PromptRewriter = Callable[[list[Any], str], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class PairTokenScorer:
    reference: torch.nn.Module | None = None
    guide: torch.nn.Module | None = None
    positive: torch.nn.Module | None = None
    negative: torch.nn.Module | None = None
    contrast_beta: float = 1.0
    treg_model: torch.nn.Module | None = None
    better_template: str = "{prompt}"
    worse_template: str = "{prompt}"
    # (raw prompts, template) -> left-padded (ids, mask) of each prompt rewritten by the template
    rewrite_prompts: PromptRewriter | None = None
    options: ForwardOptions = field(default_factory=ForwardOptions)  # the frozen models' layout

    @property
    def columns(self) -> list[str]:
        names = []
        if self.reference is not None:
            names.append("ref_logprobs")
        if self.guide is not None:
            names.append("guide_logprobs")
        if self.positive is not None:
            names.append("contrast_scores")
        if self.treg_model is not None:
            names.append("treg_rewards")
        return names

    def _contrast_scores(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """cDPO's scores [B, T]; with a logprob chunk (the forward options'), both models' heads a
        chunk of tokens at a time (no [B, T, V] logits)."""
        models, ids = (self.positive, self.negative), tensors[2]
        chunk = logprob_chunk(self.positive, self.options, ids)
        if not chunk:
            logits = [response_logits(m, *tensors, self.options) for m in models]
            return contrastive_token_scores(*logits, ids, beta=self.contrast_beta)
        hidden = [response_head_inputs(m, *tensors, self.options) for m in models]
        scores, _ = chunked_token_loss(
            list(models),
            hidden,
            chunk,
            lambda positive, negative, ids: (
                contrastive_token_scores(positive, negative, ids, beta=self.contrast_beta),
                {},
            ),
            per_token=(ids,),
        )
        return scores

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        completion_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Values for rows [chosen; rejected]; `prompts` are the 2P raw prompts of those rows."""
        tensors = (prompt_ids, prompt_mask, completion_ids, completion_mask)
        out: dict[str, torch.Tensor] = {}
        if self.reference is not None:
            out["ref_logprobs"] = response_logprobs(self.reference, *tensors, self.options)[0]
        if self.guide is not None:
            out["guide_logprobs"] = response_logprobs(self.guide, *tensors, self.options)[0]
        if self.positive is not None:
            out["contrast_scores"] = self._contrast_scores(tensors)
        if self.treg_model is not None:
            better = self.rewrite_prompts(prompts, self.better_template)
            worse = self.rewrite_prompts(prompts, self.worse_template)
            out["treg_rewards"] = contrastive_prompt_token_rewards(
                response_logprobs(self.treg_model, *better, completion_ids, completion_mask, self.options)[0],
                response_logprobs(self.treg_model, *worse, completion_ids, completion_mask, self.options)[0],
            )
        return out


@torch.no_grad()
def nthr_token_scale(
    model: torch.nn.Module,
    batch: Any,
    advantages: torch.Tensor,
    *,
    group_size: int,
    beta: float = 1.0,
    options: ForwardOptions | None = None,
    chunk_tokens: int = 128,
) -> tuple[torch.Tensor, dict[str, float]]:
    """NTHR's per-token advantage multipliers [B, T] for a GRPO rollout (rlhf.advantages.nthr_*),
    from one no-grad pass of the (old) policy per group: its final hidden states and its sampling
    distribution over the group's vocabulary (the tokens its responses contain). Positive rows are
    those with a positive advantage (the correct ones under a 0/1 reward)."""
    scales, damped = [], 0.0
    options = options or ForwardOptions()
    warp = options.warp
    mask_all = batch.response_mask
    for start in range(0, batch.batch_size, group_size):
        rows = torch.arange(start, start + group_size, device=mask_all.device)
        prompt_ids, prompt_mask = batch.prompt_ids[rows], batch.prompt_mask[rows]
        response_ids, mask = batch.response_ids[rows], mask_all[rows]
        group_advantages = advantages[rows] if advantages.dim() == 1 else advantages[rows, 0]
        if not ((group_advantages > 0).any() and (group_advantages < 0).any()):
            scales.append(torch.ones(mask.shape, dtype=torch.float32, device=mask.device))
            continue
        hidden = response_head_inputs(model, prompt_ids, prompt_mask, response_ids, mask, options)
        head = output_head(model)
        vocab = torch.unique(response_ids[mask])
        # the sampling distribution over the group's vocabulary, a chunk of tokens at a time (no
        # [G, T, V] tensor)
        first_seen = penalty_context(
            prompt_ids, prompt_mask, response_ids, mask, warp.get("repetition_penalty", 1.0)
        )
        parts = []
        for start in range(0, hidden.shape[1], chunk_tokens):
            logits = head(hidden[:, start : start + chunk_tokens]).float()
            logits = warp_logits(logits, **warp, seen=penalty_mask(first_seen, logits, start))
            parts.append(torch.softmax(logits, dim=-1)[..., vocab])
        probs = torch.cat(parts, dim=1)
        onehot = (response_ids.unsqueeze(-1) == vocab).float()
        scores = nthr_scores(onehot - probs, hidden, mask, group_advantages > 0)
        scale = nthr_advantage_scale(scores, mask, group_advantages, beta=beta)
        damped += float(((scale != 1) & mask).sum())
        scales.append(scale)
    metrics = {"nthr/damped_token_fraction": damped / max(float(mask_all.sum()), 1.0)}
    return torch.cat(scales), metrics
