"""Clipped surrogate and GRPO objective: hand-computed values, regimes, masking, split invariance."""

import math

import pytest
import torch

from rlhf.losses.kl import k3
from rlhf.losses.policy import clipped_surrogate, policy_gradient_loss
from rlhf.losses.reduce import get_reduction


def test_on_policy_ratio_is_one_and_loss_is_minus_advantage():
    logprobs = torch.tensor([[-1.0, -2.0]])
    per_token, metrics = clipped_surrogate(
        logprobs, logprobs, torch.tensor([0.5]), torch.ones(1, 2, dtype=torch.bool)
    )
    assert torch.allclose(per_token, torch.tensor([[-0.5, -0.5]]))
    assert metrics["clip/fraction"].item() == 0.0


@pytest.mark.parametrize(
    "log_ratio, advantage, expected, clipped",
    [
        # inside the band: -r * A
        (math.log(1.1), 1.0, -1.1, False),
        # above 1 + clip_high with A > 0: clipped at 1.2
        (math.log(1.5), 1.0, -1.2, True),
        # above the band with A < 0: the unclipped term is the larger loss: -1.5 * -1 = 1.5
        (math.log(1.5), -1.0, 1.5, False),
        # below 1 - clip_low with A < 0: clipped at 0.8 -> 0.8
        (math.log(0.5), -1.0, 0.8, True),
        # below the band with A > 0: unclipped -0.5
        (math.log(0.5), 1.0, -0.5, False),
    ],
)
def test_clip_regimes(log_ratio, advantage, expected, clipped):
    old = torch.tensor([[-1.0]])
    new = old + log_ratio
    per_token, metrics = clipped_surrogate(
        new, old, torch.tensor([advantage]), torch.ones(1, 1, dtype=torch.bool), clip_low=0.2, clip_high=0.2
    )
    assert math.isclose(per_token.item(), expected, rel_tol=1e-5)
    assert metrics["clip/fraction"].item() == float(clipped)


def test_asymmetric_clip_high():
    old = torch.tensor([[-1.0]])
    new = old + math.log(1.25)
    per_token, _ = clipped_surrogate(
        new, old, torch.tensor([2.0]), torch.ones(1, 1, dtype=torch.bool), clip_low=0.2, clip_high=0.28
    )
    assert math.isclose(per_token.item(), -1.25 * 2.0, rel_tol=1e-5)  # 1.25 < 1.28: not clipped
    per_token, _ = clipped_surrogate(
        new, old, torch.tensor([2.0]), torch.ones(1, 1, dtype=torch.bool), clip_low=0.2, clip_high=0.2
    )
    assert math.isclose(per_token.item(), -1.2 * 2.0, rel_tol=1e-5)


def test_dual_clip_caps_negative_advantage_loss():
    old = torch.tensor([[-3.0]])
    new = old + math.log(5.0)  # ratio 5, A = -1: unclipped loss 5, dual clip caps it at 3
    per_token, metrics = clipped_surrogate(
        new, old, torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool), dual_clip=3.0
    )
    assert math.isclose(per_token.item(), 3.0, rel_tol=1e-5)
    assert metrics["clip/dual_fraction"].item() == 1.0


def test_masked_garbage_stays_out_of_loss_and_gradient():
    logprobs = torch.tensor([[-1.0, 50.0], [-2.0, -1.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -100.0], [-2.0, float("nan")]])
    mask = torch.tensor([[True, False], [True, False]])
    out = policy_gradient_loss(
        logprobs, old, torch.tensor([1.0, -1.0]), mask, reduction=get_reduction("token_mean"), normalizer=2
    )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[:, 1].abs().sum() == 0
    # on-policy: loss = mean(-A) over the two kept tokens = (-1 + 1) / 2
    assert math.isclose(out.loss.item(), 0.0, abs_tol=1e-7)


def test_grpo_loss_with_kl_hand_computed():
    old = torch.tensor([[-1.0, -1.0, -1.0]])
    logprobs = old + torch.tensor([[0.0, math.log(1.1), 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    mask = torch.tensor([[True, True, False]])
    out = policy_gradient_loss(
        logprobs,
        old,
        torch.tensor([2.0]),
        mask,
        reduction=get_reduction("sequence_mean_token_mean"),
        normalizer=1,
        ref_logprobs=ref,
        kl_coef=0.1,
        kl_estimator=k3,
    )
    # token 0: -1.0*2 + 0.1*(exp(-0.5) + 0.5 - 1); token 1: -1.1*2 + 0.1*(exp(-1-(-1+log1.1)) - (-log 1.1) - 1)
    t0 = -2.0 + 0.1 * (math.exp(-0.5) + 0.5 - 1)
    lr1 = -math.log(1.1)
    t1 = -2.2 + 0.1 * (math.exp(lr1) - lr1 - 1)
    assert math.isclose(out.loss.item(), (t0 + t1) / 2, rel_tol=1e-5)


def _random_inputs(seed: int, batch: int = 6, length: int = 7):
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=generator) * 3
    logprobs = (old + 0.3 * torch.randn(batch, length, generator=generator)).requires_grad_(True)
    ref = old + 0.2 * torch.randn(batch, length, generator=generator)
    advantages = torch.randn(batch, generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    return logprobs, old, ref, advantages, mask


@pytest.mark.parametrize(
    "aggregation", ["token_mean", "sequence_mean_token_mean", "sequence_mean_token_sum_norm"]
)
def test_micro_batch_split_invariance(aggregation):
    """Summing micro-batch losses with the step-wide normalizer equals the whole-batch loss and grads."""
    logprobs, old, ref, advantages, mask = _random_inputs(0)
    reduction = get_reduction(aggregation)
    normalizer = reduction.count(mask).float()
    kwargs = dict(
        reduction=reduction,
        normalizer=normalizer,
        ref_logprobs=ref,
        kl_coef=0.05,
        kl_estimator=k3,
        token_budget=7,
    )
    whole = policy_gradient_loss(logprobs, old, advantages, mask, **{**kwargs, "ref_logprobs": ref}).loss
    (whole_grad,) = torch.autograd.grad(whole, logprobs)
    total = torch.zeros(())
    for rows in torch.arange(6).split(2):
        total = (
            total
            + policy_gradient_loss(
                logprobs[rows],
                old[rows],
                advantages[rows],
                mask[rows],
                **{**kwargs, "ref_logprobs": ref[rows]},
            ).loss
        )
    (split_grad,) = torch.autograd.grad(total, logprobs)
    assert torch.allclose(whole, total, rtol=1e-6, atol=1e-7)
    assert torch.allclose(whole_grad, split_grad, rtol=1e-6, atol=1e-8)


def test_vectorised_loss_matches_naive_loop():
    logprobs, old, ref, advantages, mask = _random_inputs(1)
    out = policy_gradient_loss(
        logprobs,
        old,
        advantages,
        mask,
        reduction=get_reduction("sequence_mean_token_mean"),
        normalizer=6,
        clip_low=0.2,
        clip_high=0.28,
    )
    total = 0.0
    for b in range(6):
        terms = []
        for t in range(7):
            if not mask[b, t]:
                continue
            ratio = math.exp(logprobs[b, t].item() - old[b, t].item())
            a = advantages[b].item()
            terms.append(-min(ratio * a, min(max(ratio, 0.8), 1.28) * a))
        total += sum(terms) / len(terms)
    assert math.isclose(out.loss.item(), total / 6, rel_tol=1e-5)


def test_kl_needs_reference():
    logprobs, old, _, advantages, mask = _random_inputs(2)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_gradient_loss(
            logprobs, old, advantages, mask, reduction=get_reduction("token_mean"), normalizer=1, kl_coef=0.1
        )


def test_per_token_advantages_with_masked_garbage():
    logprobs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    advantages = torch.tensor([[0.5, float("nan")]])
    mask = torch.tensor([[True, False]])
    out = policy_gradient_loss(
        logprobs, logprobs.detach(), advantages, mask, reduction=get_reduction("token_mean"), normalizer=1
    )
    out.loss.backward()
    assert math.isclose(out.loss.item(), -0.5, rel_tol=1e-6)
    assert torch.isfinite(logprobs.grad).all()
