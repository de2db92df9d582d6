"""Masked positions holding -inf, -1e4 or +1e4 never reach a loss or its gradient, for the losses
outside the policy-objective registry (those are covered in test_policy_family.py): SFT, the
clipped value loss, every DPO-family loss on masked log-ratios, the T-REG regulariser and
TGDPO's weights, and the rollout-correction weights."""

from __future__ import annotations

import pytest
import torch

from rlhf.losses.preference import (
    preference_loss,
    sequence_logratios,
    tgdpo_token_weights,
    token_reward_regularizer,
)
from rlhf.losses.reduce import get_reduction
from rlhf.losses.rollout_correction import rollout_importance_weights
from rlhf.losses.sft import nll_loss
from rlhf.losses.value import clipped_value_loss

MASK = torch.tensor([[True, True, False], [True, False, False]])
GARBAGE = [float("-inf"), -1e4, 1e4]


def _with_garbage(values, garbage):
    return torch.where(MASK, torch.tensor(values), garbage)


def _check(loss, leaf):
    (grad,) = torch.autograd.grad(loss, leaf)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[~MASK] == 0).all()


@pytest.mark.parametrize("garbage", GARBAGE)
def test_sft_and_value_losses(garbage):
    logprobs = _with_garbage([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], garbage).requires_grad_(True)
    _check(nll_loss(logprobs, MASK, reduction=get_reduction("token_mean"), normalizer=3).loss, logprobs)
    values = _with_garbage([[0.1, 0.2, 0.0], [0.3, 0.0, 0.0]], garbage).requires_grad_(True)
    old = _with_garbage([[0.0, 0.1, 0.0], [0.2, 0.0, 0.0]], -garbage)
    returns = _with_garbage([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]], garbage)
    out = clipped_value_loss(values, old, returns, MASK, reduction=get_reduction("token_mean"), normalizer=3)
    _check(out.loss, values)


@pytest.mark.parametrize("name", ["sigmoid", "robust", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("garbage", GARBAGE)
def test_preference_losses_with_token_weights_and_treg(name, garbage):
    logprobs = _with_garbage([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], garbage).requires_grad_(True)
    ref = _with_garbage([[-1.2, -1.5, 0.0], [-0.7, 0.0, 0.0]], -garbage)
    guide = _with_garbage([[0.3, -0.2, 0.0], [0.1, 0.0, 0.0]], garbage)
    chosen_weights, rejected_weights, _ = tgdpo_token_weights(guide, guide, MASK, MASK, alpha=0.5, beta=0.1)
    loss_fn, needs_reference = preference_loss(name, beta=0.1)
    reference = ref if needs_reference else None
    chosen = sequence_logratios(logprobs, reference, MASK, chosen_weights)
    flipped_reference = None if reference is None else reference.flip(0)
    rejected = sequence_logratios(logprobs.flip(0), flipped_reference, MASK.flip(0), rejected_weights.flip(0))
    lengths = MASK.sum(-1)
    out = loss_fn(chosen, rejected, chosen_lengths=lengths, rejected_lengths=lengths, normalizer=2)
    regularizer = token_reward_regularizer(logprobs, guide, MASK, beta=0.1).sum()
    (grad,) = torch.autograd.grad(out.loss + regularizer, logprobs)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert (grad[~MASK & ~MASK.flip(0)] == 0).all()  # masked in both the chosen and the flipped rows


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("garbage", GARBAGE)
def test_rollout_correction_weights(mode, garbage):
    old = _with_garbage([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], garbage)
    rollout = _with_garbage([[-1.1, -1.9, 0.0], [-0.4, 0.0, 0.0]], -garbage)
    weights, metrics = rollout_importance_weights(old, rollout, MASK, mode=mode, clip_min=None, clip_max=3.0)
    assert torch.isfinite(weights).all() and all(torch.isfinite(v).all() for v in metrics.values())
