"""Parity of the GRPO-family objectives with TRL 1.16's `GRPOTrainer._compute_loss` (through the
stand-in of test_trl_grpo_loss.py, so TRL's own code does the arithmetic).

Map (TRL loss_type, importance_sampling_level -> our loss.policy_loss, loss.aggregation):
grpo + sequence -> gspo, sequence_mean_token_mean; luspo + sequence -> luspo, sequence_mean_token_sum;
cispo -> cispo (max_weight = TRL's epsilon_high), token_mean; sapo -> sapo, sequence_mean_token_mean;
vespo -> vespo, token_mean (TRL's vLLM importance ratios -> our rollout_weights).

Tolerances (rtol 1e-5, atol 1e-7, as in test_trl_grpo_loss.py): float32, the same arithmetic in
another order (reductions over masked rows and tokens); measured over every case here: losses
within 3.4e-7 relative, gradients within 3.8e-9 absolute.
"""

from __future__ import annotations

import pytest
import torch

from rlhf.losses.kl import k3
from rlhf.losses.policy import policy_gradient_loss
from rlhf.losses.reduce import get_reduction
from tests.parity.test_trl_grpo_loss import _random_case, _trl_loss

CASES = {
    # name: (TRL loss_type, TRL level, our policy loss, our aggregation, TRL args, our args)
    "gspo": ("grpo", "sequence", "gspo", "sequence_mean_token_mean", {}, {}),
    "luspo": ("luspo", "sequence", "luspo", "sequence_mean_token_sum", {}, {}),
    "cispo": ("cispo", "token", "cispo", "token_mean", {}, {}),
    "sapo": (
        "sapo",
        "token",
        "sapo",
        "sequence_mean_token_mean",
        {"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05},
        {"tau_pos": 1.0, "tau_neg": 1.05},
    ),
    "sapo_sharp": (
        "sapo",
        "token",
        "sapo",
        "sequence_mean_token_mean",
        {"sapo_temperature_pos": 4.0, "sapo_temperature_neg": 8.0},
        {"tau_pos": 4.0, "tau_neg": 8.0},
    ),
    "vespo": (
        "vespo",
        "token",
        "vespo",
        "token_mean",
        {"vespo_k_pos": 2.0, "vespo_lambda_pos": 3.0, "vespo_k_neg": 3.0, "vespo_lambda_neg": 2.0},
        {},
    ),
}

# float32, the same arithmetic in another order: measured losses within 3.4e-7 relative, gradients
# within 3.8e-9 absolute over every case here (see the module docstring)
TOLERANCE = {"rtol": 1e-5, "atol": 1e-7}


def _ours(
    logprobs, old, advantages, mask, ref, *, loss, aggregation, args, beta, eps_low, eps_high, weights=None
):
    reduction = get_reduction(aggregation)
    if loss == "cispo":
        args = {**args, "max_weight": eps_high}
    return policy_gradient_loss(
        logprobs,
        old,
        advantages,
        mask,
        reduction=reduction,
        normalizer=reduction.count(mask).float(),
        policy_loss=loss,
        policy_loss_args=args,
        clip_low=eps_low,
        clip_high=eps_high,
        ref_logprobs=ref,
        kl_coef=beta,
        kl_estimator=k3,
        kl_log_ratio_clamp=None,
        rollout_weights=weights,
    ).loss


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_family_loss_and_gradient_match_trl(case, beta, seed):
    trl_type, level, loss, aggregation, trl_args, our_args = CASES[case]
    eps_low, eps_high = (3e-4, 4e-4) if level == "sequence" else (0.2, 0.28)
    if loss == "cispo":
        eps_high = 1.5  # ratios of the random case reach 3: some weights are clipped
    logprobs, old, ref, advantages, mask, inputs = _random_case(seed)
    theirs = _trl_loss(
        logprobs,
        inputs,
        loss_type=trl_type,
        beta=beta,
        eps_low=eps_low,
        eps_high=eps_high,
        max_completion_length=mask.shape[1],
        importance_sampling_level=level,
        **trl_args,
    )
    (their_grad,) = torch.autograd.grad(theirs, logprobs)
    ours = _ours(
        logprobs,
        old,
        advantages,
        mask,
        ref,
        loss=loss,
        aggregation=aggregation,
        args=our_args,
        beta=beta,
        eps_low=eps_low,
        eps_high=eps_high,
    )
    (our_grad,) = torch.autograd.grad(ours, logprobs)
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    torch.testing.assert_close(our_grad, their_grad, **TOLERANCE)


@pytest.mark.parametrize("seed", [0, 1])
def test_vespo_folds_rollout_weights_like_trl(seed):
    """With vLLM's token importance ratios, TRL folds them into VESPO's sequence weight."""
    logprobs, old, ref, advantages, mask, inputs = _random_case(seed)
    generator = torch.Generator().manual_seed(100 + seed)
    # TRL's ratios are exp((old - sampling) * mask): 1 at masked positions
    weights = torch.where(mask, torch.exp(0.1 * torch.randn(mask.shape, generator=generator)), 1.0)
    inputs["importance_sampling_ratio"] = weights
    theirs = _trl_loss(
        logprobs,
        inputs,
        loss_type="vespo",
        beta=0.0,
        eps_low=0.2,
        eps_high=0.2,
        max_completion_length=9,
        vllm_correction=True,
        vespo_k_pos=2.0,
        vespo_lambda_pos=3.0,
        vespo_k_neg=3.0,
        vespo_lambda_neg=2.0,
    )
    ours = _ours(
        logprobs,
        old,
        advantages,
        mask,
        ref,
        loss="vespo",
        aggregation="token_mean",
        args={},
        beta=0.0,
        eps_low=0.2,
        eps_high=0.2,
        weights=weights,
    )
    torch.testing.assert_close(ours, theirs, **TOLERANCE)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_sided_clip_entropy_quantile_and_off_policy_mask_match_trl(seed):
    """TRL's delta (INTELLECT-2), top_entropy_quantile and off_policy_mask_threshold against
    loss.delta, high_entropy_mask and off_policy_sequence_mask on the GRPO objective."""
    from rlhf.losses.policy import high_entropy_mask, off_policy_sequence_mask

    logprobs, old, ref, advantages, mask, inputs = _random_case(seed)
    entropies = torch.rand(mask.shape, generator=torch.Generator().manual_seed(50 + seed)) * 3
    theirs = _trl_loss(
        logprobs,
        inputs,
        loss_type="grpo",
        beta=0.04,
        eps_low=0.2,
        eps_high=0.28,
        max_completion_length=9,
        top_entropy_quantile=0.4,
        off_policy_mask_threshold=0.05,
        entropies=entropies,
        delta=1.5,
    )
    (their_grad,) = torch.autograd.grad(theirs, logprobs)
    weights = high_entropy_mask(entropies, mask, quantile=0.4)
    weights = weights * off_policy_sequence_mask(advantages, logprobs, old, mask, threshold=0.05)
    reduction = get_reduction("sequence_mean_token_mean")
    ours = policy_gradient_loss(
        logprobs,
        old,
        advantages,
        mask,
        reduction=reduction,
        normalizer=reduction.count(mask).float(),
        clip_low=0.2,
        clip_high=0.28,
        delta=1.5,
        loss_weights=weights,
        ref_logprobs=ref,
        kl_coef=0.04,
        kl_estimator=k3,
        kl_log_ratio_clamp=None,
    ).loss
    (our_grad,) = torch.autograd.grad(ours, logprobs)
    assert 0 < float(weights.sum()) < float(mask.sum())  # both masks remove something
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    torch.testing.assert_close(our_grad, their_grad, **TOLERANCE)


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_ratio_correction_matches_trl_bias_correction(seed):
    logprobs, old, ref, advantages, mask, inputs = _random_case(seed)
    theirs = _trl_loss(
        logprobs,
        inputs,
        loss_type="dapo",
        beta=0.04,
        eps_low=0.2,
        eps_high=0.2,
        max_completion_length=9,
        use_bias_correction_kl=True,
    )
    reduction = get_reduction("token_mean")
    ours = policy_gradient_loss(
        logprobs,
        old,
        advantages,
        mask,
        reduction=reduction,
        normalizer=reduction.count(mask).float(),
        ref_logprobs=ref,
        kl_coef=0.04,
        kl_estimator=k3,
        kl_log_ratio_clamp=None,
        kl_ratio_correction=True,
    ).loss
    torch.testing.assert_close(ours, theirs, **TOLERANCE)
    (their_grad,) = torch.autograd.grad(theirs, logprobs)
    (our_grad,) = torch.autograd.grad(ours, logprobs)
    torch.testing.assert_close(our_grad, their_grad, **TOLERANCE)
