"""The rollout-mismatch correction: hand-computed weights for each of TRL's four modes, masked
garbage that cannot reach the weights, and TRL's own GRPO loss with those weights equal to ours."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from rlhf.losses.kl import k3
from rlhf.losses.policy import policy_gradient_loss
from rlhf.losses.reduce import get_reduction
from rlhf.losses.rollout_correction import MODES, rollout_importance_weights, rollout_mismatch_metrics
from tests.parity.test_trl_grpo_loss import _random_case, _trl_loss

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, -3.0]])
ROLLOUT = torch.tensor([[-1.5, -1.0, -0.5], [-1.5, -3.0, 50.0]])  # row 1, token 2 is masked garbage
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_token_modes_by_hand():
    # diffs old - rollout: row 0: 0.5, -1.0, 0.0; row 1: 0.0, 2.0, (masked)
    weights, metrics = rollout_importance_weights(
        OLD, ROLLOUT, MASK, mode="token_truncate", clip_min=0.5, clip_max=3.0
    )
    expected = torch.tensor([[math.exp(0.5), 0.5, 1.0], [1.0, 3.0, 1.0]])  # e^-1 < 0.5 and e^2 > 3 clipped
    torch.testing.assert_close(weights, expected)
    assert metrics["rollout_correction/clipped_fraction"] == pytest.approx(2 / 5)
    weights, _ = rollout_importance_weights(OLD, ROLLOUT, MASK, mode="token_mask", clip_min=0.5, clip_max=3.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(0.5), 0.0, 1.0], [1.0, 0.0, 1.0]]))


def test_sequence_modes_by_hand():
    # sequence sums: row 0: -0.5, row 1: 2.0
    weights, _ = rollout_importance_weights(OLD, ROLLOUT, MASK, mode="sequence_truncate", clip_max=3.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(-0.5)], [3.0]]))
    weights, _ = rollout_importance_weights(OLD, ROLLOUT, MASK, mode="sequence_mask", clip_max=3.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(-0.5)], [0.0]]))
    weights, _ = rollout_importance_weights(
        OLD, ROLLOUT, MASK, mode="sequence_mask", clip_min=0.7, clip_max=None
    )
    torch.testing.assert_close(weights, torch.tensor([[0.0], [math.exp(2.0)]]))


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), -float("inf"), 1e4, -1e4])
def test_masked_positions_never_reach_the_weights(garbage):
    rollout = ROLLOUT.clone()
    rollout[1, 2] = garbage
    for mode in MODES:
        weights, _ = rollout_importance_weights(OLD, rollout, MASK, mode=mode)
        clean, _ = rollout_importance_weights(OLD, ROLLOUT, MASK, mode=mode)
        torch.testing.assert_close(weights, clean)
    metrics = rollout_mismatch_metrics(OLD, rollout, MASK)
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(2.0)
    assert metrics["rollout/logprob_diff_mean"] == pytest.approx(3.5 / 5)


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="is not one of"):
        rollout_importance_weights(OLD, ROLLOUT, MASK, mode="token")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_with_the_correction_matches_trl(mode, seed):
    """TRL multiplies its per-token GRPO loss by `importance_sampling_ratio` before the KL term; the
    same weights in our loss give TRL's loss and gradient."""
    logprobs, old, ref, advantages, mask, inputs = _random_case(seed)
    rollout = old + 0.5 * torch.randn(old.shape, generator=torch.Generator().manual_seed(seed + 10))
    weights, _ = rollout_importance_weights(old, rollout, mask, mode=mode, clip_min=0.5, clip_max=2.0)
    inputs["importance_sampling_ratio"] = weights
    theirs = _trl_loss(
        logprobs,
        inputs,
        loss_type="grpo",
        beta=0.04,
        eps_low=0.2,
        eps_high=0.28,
        max_completion_length=mask.shape[1],
        vllm_correction=True,
    )
    (their_grad,) = torch.autograd.grad(theirs, logprobs)
    reduction = get_reduction("sequence_mean_token_mean")
    loss = functools.partial(
        policy_gradient_loss,
        logprobs,
        old,
        advantages,
        mask,
        reduction=reduction,
        normalizer=reduction.count(mask).float(),
        clip_low=0.2,
        clip_high=0.28,
        ref_logprobs=ref,
        kl_coef=0.04,
        kl_estimator=k3,
    )
    ours = loss(rollout_weights=weights).loss
    (our_grad,) = torch.autograd.grad(ours, logprobs)
    # the same tolerances as the GRPO parity test: TRL reduces per sequence and then averages, ours
    # goes through the shared reduction, so float32 sums run in another order
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-5, atol=1e-7)
    without = loss().loss
    assert not torch.allclose(without, theirs)  # the weights matter: the comparison can fail
