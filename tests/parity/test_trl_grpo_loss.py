"""Parity of our GRPO per-token loss and aggregation with TRL's own `GRPOTrainer._compute_loss`.

TRL computes the loss inside a trainer method; we call that method on a minimal stand-in object
whose model forward returns our random per-token logprobs, so TRL's own code does the arithmetic.
Mode map (TRL loss_type -> our aggregation): grpo -> sequence_mean_token_mean, dr_grpo ->
sequence_mean_token_sum_norm (token budget = max_completion_length), dapo -> token_mean with the
step's token count, bnpo -> token_mean with one micro-batch per step.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

from rlhf.losses.kl import k3  # noqa: E402
from rlhf.losses.policy import policy_gradient_loss  # noqa: E402
from rlhf.losses.reduce import get_reduction  # noqa: E402

MODES = {
    "grpo": "sequence_mean_token_mean",
    "dr_grpo": "sequence_mean_token_sum_norm",
    "dapo": "token_mean",
    "bnpo": "token_mean",
}


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def _trl_loss(
    per_token_logps,
    inputs,
    *,
    loss_type,
    beta,
    eps_low,
    eps_high,
    max_completion_length,
    vllm_correction=False,
    importance_sampling_level="token",
    top_entropy_quantile=1.0,
    off_policy_mask_threshold=None,
    entropies=None,
    **loss_args,
):
    """TRL's loss for `inputs`, with its forward replaced by the given per-token logprobs; with
    `vllm_correction`, TRL multiplies by `inputs["importance_sampling_ratio"]` as with vLLM.
    `loss_args`: TRL's per-loss arguments (sapo_temperature_pos, vespo_k_pos, ...)."""
    stand_in = SimpleNamespace(
        top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=vllm_correction,
        vllm_importance_sampling_correction=vllm_correction,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        accelerator=_Accelerator(),
        args=SimpleNamespace(
            **{"use_bias_correction_kl": False, "delta": None, "steps_per_generation": 1, **loss_args}
        ),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        get_gamma_weights=trl_grpo.GRPOTrainer.get_gamma_weights,
        get_off_policy_mask=trl_grpo.GRPOTrainer.get_off_policy_mask,
    )
    stand_in.get_high_entropy_mask = lambda *a: trl_grpo.GRPOTrainer.get_high_entropy_mask(stand_in, *a)
    stand_in._get_per_token_logps_and_entropies = lambda *a, **k: (
        per_token_logps,
        torch.zeros_like(per_token_logps) if entropies is None else entropies,
        None,
    )
    return trl_grpo.GRPOTrainer._compute_loss(stand_in, None, inputs)


def _random_case(
    seed: int, batch: int = 8, prompt_len: int = 3, length: int = 9, old_is_current: bool = False
):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=generator) * 4
    logprobs = (old + 0.4 * torch.randn(batch, length, generator=generator)).requires_grad_(True)
    ref = old + 0.3 * torch.randn(batch, length, generator=generator)
    advantages = torch.randn(batch, generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    inputs = {
        "prompt_ids": torch.zeros(batch, prompt_len, dtype=torch.long),
        "prompt_mask": torch.ones(batch, prompt_len, dtype=torch.long),
        "completion_ids": torch.zeros(batch, length, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    if not old_is_current:
        inputs["old_per_token_logps"] = old
    return logprobs, old, ref, advantages, mask, inputs


@pytest.mark.parametrize("loss_type", sorted(MODES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_match_trl(loss_type, beta, eps_high, seed):
    logprobs, old, ref, advantages, mask, inputs = _random_case(seed)
    budget = mask.shape[1] + 3  # a completion budget longer than the longest completion
    theirs = _trl_loss(
        logprobs,
        inputs,
        loss_type=loss_type,
        beta=beta,
        eps_low=0.2,
        eps_high=eps_high,
        max_completion_length=budget,
    )
    (their_grad,) = torch.autograd.grad(theirs, logprobs)
    reduction = get_reduction(MODES[loss_type])
    ours = policy_gradient_loss(
        logprobs,
        old,
        advantages,
        mask,
        reduction=reduction,
        normalizer=reduction.count(mask).float(),
        clip_low=0.2,
        clip_high=eps_high,
        ref_logprobs=ref,
        kl_coef=beta,
        kl_estimator=k3,
        kl_log_ratio_clamp=None,
        token_budget=budget,
    ).loss
    (our_grad,) = torch.autograd.grad(ours, logprobs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_type", sorted(MODES))
def test_on_policy_single_update_matches_trl(loss_type):
    """One update per rollout: both use the detached current logprobs as the old ones."""
    logprobs, _, ref, advantages, mask, inputs = _random_case(5, old_is_current=True)
    theirs = _trl_loss(
        logprobs, inputs, loss_type=loss_type, beta=0.0, eps_low=0.2, eps_high=0.2, max_completion_length=9
    )
    reduction = get_reduction(MODES[loss_type])
    ours = policy_gradient_loss(
        logprobs,
        logprobs.detach(),
        advantages,
        mask,
        reduction=reduction,
        normalizer=reduction.count(mask).float(),
        token_budget=9,
    ).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
