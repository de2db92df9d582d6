"""The registered policy objectives (rlhf/losses/policy.py): hand-computed values and gradients,
masked garbage for every objective and KL estimator, split invariance, and the registry's errors."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses.kl import KL_ESTIMATORS, kl_penalty
from rlhf.losses.policy import POLICY_LOSSES, check_policy_loss_args, get_policy_loss, policy_gradient_loss
from rlhf.losses.reduce import get_reduction

ONE_ROW = torch.ones(1, 2, dtype=torch.bool)


def _grad(loss_name, logprobs, old, advantages, mask, aggregation="sequence_mean_token_mean", **kwargs):
    logprobs = logprobs.clone().requires_grad_(True)
    reduction = get_reduction(get_policy_loss(loss_name).aggregation or aggregation)
    out = policy_gradient_loss(
        logprobs,
        old,
        advantages,
        mask,
        reduction=reduction,
        normalizer=reduction.count(mask).float(),
        policy_loss=loss_name,
        **kwargs,
    )
    (grad,) = torch.autograd.grad(out.loss, logprobs)
    return out, grad


def test_gspo_clips_the_sequence_ratio():
    old = torch.tensor([[-1.0, -2.0]])
    new = old + torch.tensor([[math.log(1.5), 0.0]])  # s = exp(log(1.5) / 2) = 1.2247
    out, grad = _grad("gspo", new, old, torch.tensor([1.0]), ONE_ROW, clip_low=0.2, clip_high=0.3)
    s = math.sqrt(1.5)
    assert out.loss.item() == pytest.approx(-s, rel=1e-6)  # inside the band: -s * A, the row's token mean
    # d(-s)/d logprob_t = -s / |y| for each token
    torch.testing.assert_close(grad, torch.full((1, 2), -s / 2))
    out, grad = _grad("gspo", new, old, torch.tensor([1.0]), ONE_ROW, clip_low=0.2, clip_high=0.2)
    assert out.loss.item() == pytest.approx(-1.2, rel=1e-6)  # clipped at 1 + 0.2: no gradient
    assert grad.abs().sum() == 0 and out.metrics["clip/fraction"].item() == 1.0


def test_gspo_token_equals_gspo_with_sequence_advantages_and_weights_tokens_otherwise():
    generator = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 4, generator=generator)
    new = old + 0.01 * torch.randn(3, 4, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    advantages = torch.tensor([1.0, -0.5, 2.0])
    a, grad_a = _grad("gspo", new, old, advantages, mask, clip_low=0.2, clip_high=0.2)
    b, grad_b = _grad("gspo_token", new, old, advantages, mask, clip_low=0.2, clip_high=0.2)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(grad_a, grad_b)
    per_token = advantages.unsqueeze(-1).expand(3, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0])
    _, grad_token = _grad("gspo_token", new, old, per_token, mask, clip_low=0.2, clip_high=0.2)
    # GSPO-token: d/d logprob_t = -s_i * A_it / |y_i| / 3 (the row's token mean, averaged over 3 rows)
    lengths = mask.sum(-1, keepdim=True).float()
    s = torch.exp(((new - old) * mask).sum(-1, keepdim=True) / lengths)
    torch.testing.assert_close(grad_token, torch.where(mask, -s * per_token / lengths / 3, 0.0))


def test_cispo_keeps_clipped_tokens_with_a_capped_weight():
    old = torch.tensor([[-1.0, -1.0]])
    new = old + torch.tensor([[math.log(3.0), math.log(0.5)]])
    out, grad = _grad(
        "cispo", new, old, torch.tensor([2.0]), ONE_ROW, "token_mean", policy_loss_args={"max_weight": 2.0}
    )
    # weights sg[min(r, 2)] = (2, 0.5); loss = -(2 * 2 * new_0 + 0.5 * 2 * new_1) / 2 tokens
    expected = -(2.0 * 2.0 * new[0, 0] + 0.5 * 2.0 * new[0, 1]) / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-2.0, -0.5]]))  # the clipped token still learns
    assert out.metrics["clip/high_fraction"].item() == 0.5
    out, _ = _grad(
        "cispo",
        new,
        old,
        torch.tensor([-2.0]),
        ONE_ROW,
        "token_mean",
        policy_loss_args={"max_weight": 5.0, "min_weight": 0.8},
    )
    expected = (3.0 * 2.0 * new[0, 0] + 0.8 * 2.0 * new[0, 1]) / 2  # the lower bound lifts 0.5 to 0.8
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sapo_gate_values_and_on_policy_gradient():
    old = torch.tensor([[-1.0, -1.0]])
    new = old + torch.tensor([[math.log(1.5), 0.0]])
    out, grad = _grad("sapo", new, old, torch.tensor([1.0]), ONE_ROW, policy_loss_args={"tau_pos": 2.0})
    # token 0: -(4 / 2) sigmoid(2 * 0.5); token 1: -(4 / 2) sigmoid(0) = -1
    gate0 = 2.0 / (1 + math.exp(-1.0))
    assert out.loss.item() == pytest.approx((-gate0 - 1.0) / 2, rel=1e-6)
    # d/d logprob = -(4/tau) * tau * sig * (1 - sig) * r, per token mean over 2
    sig = 1 / (1 + math.exp(-1.0))
    torch.testing.assert_close(grad, torch.tensor([[-4 * sig * (1 - sig) * 1.5 / 2, -1.0 / 2]]))
    # negative advantages use tau_neg
    out, _ = _grad(
        "sapo", new, old, torch.tensor([-1.0]), ONE_ROW, policy_loss_args={"tau_pos": 2.0, "tau_neg": 3.0}
    )
    gate = (4 / 3.0) / (1 + math.exp(-1.5)) + (4 / 3.0) * 0.5
    assert out.loss.item() == pytest.approx(gate / 2, rel=1e-6)


def test_vespo_gamma_weight():
    old = torch.tensor([[-1.0, -2.0]])
    on_policy, grad = _grad("vespo", old, old, torch.tensor([1.0]), ONE_ROW, "token_mean")
    # w = 1: phi = exp(lambda + k * 0 - lambda) = 1; loss = -A * mean log pi
    assert on_policy.loss.item() == pytest.approx(1.5, rel=1e-6)
    torch.testing.assert_close(grad, torch.full((1, 2), -0.5))
    new = old + torch.tensor([[0.3, 0.2]])  # log w = 0.5, A < 0: k = 3, lambda = 2
    out, grad = _grad("vespo", new, old, torch.tensor([-1.0]), ONE_ROW, "token_mean")
    phi = math.exp(2.0 + 3.0 * 0.5 - 2.0 * math.exp(0.5))
    assert out.loss.item() == pytest.approx(phi * (new.sum().item()) / 2, rel=1e-6)
    torch.testing.assert_close(grad, torch.full((1, 2), phi / 2))


def test_gtpo_hand_computed():
    """Rows: A = (1, -1); row 1 is entropy-filtered out when its mean entropy exceeds 0.7."""
    old = torch.tensor([[-1.0, -2.0], [-1.0, -3.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    weights = torch.tensor([[2.0, 1.0], [0.0, 1.0]])
    entropy = torch.tensor([[0.2, 0.4], [1.0, 0.6]])  # means 0.3 and 0.8
    out, grad = _grad(
        "gtpo", old, old, torch.tensor([1.0, -1.0]), mask, token_weights=weights, entropy=entropy
    )
    # row 0: A - 0.1 * 0.3 = 0.97, loss tokens -(2, 1) * 0.97; row 1 filtered (0): mean of row means / 2
    assert out.loss.item() == pytest.approx(-(2 + 1) * 0.97 / 2 / 2, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[-2 * 0.97 / 4, -0.97 / 4], [0.0, 0.0]]))
    assert out.metrics["gtpo/entropy_filtered_fraction"].item() == 0.5
    with pytest.raises(ValueError, match="needs token_weights"):
        _grad("gtpo", old, old, torch.tensor([1.0, -1.0]), mask, entropy=entropy)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("garbage", [float("-inf"), -1e4, 1e4])
def test_masked_garbage_never_reaches_loss_or_gradient(name, garbage):
    """-inf, -1e4 and +1e4 at masked positions of logprobs, old and reference logprobs, with a k3
    KL term (the exp that used to overflow) and, for gtpo, its entropy."""
    mask = torch.tensor([[True, True, False], [True, False, False]])
    logprobs = torch.tensor([[-1.0, -2.0, garbage], [-1.5, garbage, garbage]])
    old = torch.tensor([[-1.1, -2.1, -garbage], [-1.4, garbage, -garbage]])
    ref = torch.tensor([[-1.2, -1.9, -garbage], [-1.3, -garbage, garbage]])
    extra = {}
    if name == "gtpo":
        extra = {"token_weights": torch.ones(2, 3), "entropy": torch.where(mask, 0.1, garbage)}
    kl = {} if name == "gtpo" else {"ref_logprobs": ref, "kl_coef": 0.1, "kl_estimator": KL_ESTIMATORS["k3"]}
    out, grad = _grad(name, logprobs, old, torch.tensor([1.0, -1.0]), mask, **kl, **extra)
    assert torch.isfinite(out.loss)
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()
    assert all(torch.isfinite(v).all() for v in out.metrics.values())


@pytest.mark.parametrize("name", sorted(KL_ESTIMATORS))
def test_kl_masks_before_exp(name):
    """A masked logprob 89 below the reference overflowed k3's exp: a NaN gradient, finite loss."""
    logprobs = torch.tensor([[-1.0, -100.0]], requires_grad=True)
    ref = torch.tensor([[-1.2, -5.0]])
    mask = torch.tensor([[True, False]])
    per_token, _ = kl_penalty(logprobs, ref, mask, estimator=KL_ESTIMATORS[name])
    per_token.sum().backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[0, 1] == 0


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_micro_batch_split_invariance(name):
    """The loss summed over two micro-batches, each with the step's normalizer, equals the whole."""
    generator = torch.Generator().manual_seed(3)
    old = -torch.rand(4, 5, generator=generator) * 2
    new = old + 0.2 * torch.randn(4, 5, generator=generator)
    mask = torch.arange(5).unsqueeze(0) < torch.tensor([[5], [2], [4], [3]])
    advantages = torch.tensor([1.0, -1.0, 0.5, -2.0])
    extra = {}
    if name == "gtpo":
        extra = {
            "token_weights": torch.rand(4, 5, generator=generator),
            "entropy": torch.rand(4, 5, generator=generator),
        }
    reduction = get_reduction(get_policy_loss(name).aggregation or "token_mean")
    normalizer = reduction.count(mask).float()

    def loss(rows):
        picked = {k: v[rows] for k, v in extra.items()}
        return policy_gradient_loss(
            new[rows],
            old[rows],
            advantages[rows],
            mask[rows],
            reduction=reduction,
            normalizer=normalizer,
            policy_loss=name,
            clip_low=0.2,
            clip_high=0.2,
            **picked,
        ).loss

    whole = loss(torch.arange(4))
    torch.testing.assert_close(loss(torch.tensor([0, 1])) + loss(torch.tensor([2, 3])), whole)


def test_registry_errors_name_the_known_choices():
    with pytest.raises(ValueError, match="'clipped'.*'cispo'|cispo.*clipped"):
        get_policy_loss("gspoo")
    with pytest.raises(ValueError, match=r"\['tau' ?\].*tau_pos, tau_neg"):
        check_policy_loss_args("sapo", {"tau": 1.0})
    check_policy_loss_args("cispo", {"max_weight": 4.0})
    with pytest.raises(ValueError, match="options: none"):
        check_policy_loss_args("clipped", {"clip_low": 0.1})  # the clip band has its own fields
