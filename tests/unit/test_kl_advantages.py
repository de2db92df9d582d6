"""KL estimators, KL-in-reward shaping and group-relative advantages on hand-computed values."""

import math

import torch

from rlhf import advantages as adv
from rlhf.losses.kl import k1, k2, k3, kl_penalty
from rlhf.shaping import kl_penalized_scores


def test_kl_estimators_hand_computed():
    logprobs, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    lr = 0.5
    assert math.isclose(k1(logprobs, ref).item(), lr, rel_tol=1e-6)
    assert math.isclose(k2(logprobs, ref).item(), lr**2 / 2, rel_tol=1e-6)
    assert math.isclose(k3(logprobs, ref).item(), math.exp(-lr) + lr - 1, rel_tol=1e-6)


def test_kl_is_zero_when_equal_and_k3_non_negative():
    x = torch.randn(50)
    assert k3(x, x).abs().max() == 0
    assert (k3(x, torch.randn(50)) >= 0).all()


def test_kl_clamp_reports_hit_rate():
    per_token, metrics = kl_penalty(
        torch.tensor([[0.0, 0.0]]),
        torch.tensor([[-30.0, -1.0]]),
        torch.ones(1, 2, dtype=torch.bool),
        estimator=k1,
        log_ratio_clamp=20.0,
    )
    assert per_token.tolist() == [[20.0, 1.0]]
    assert metrics["kl/clamp_fraction"].item() == 0.5


def test_kl_in_reward_subtracts_sequence_sum():
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    ref = torch.tensor([[-1.5, -0.5, 7.0], [-2.0, -2.0, -2.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    scores, _ = kl_penalized_scores(torch.tensor([1.0, 2.0]), old, ref, mask, kl_coef=0.1, estimator=k1)
    assert torch.allclose(scores, torch.tensor([1.0 - 0.1 * (0.5 - 0.5), 2.0]))


def test_group_relative_with_std():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0])
    out = adv.group_relative(scores, group_size=3, eps=0.0)
    std1 = math.sqrt(((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    std2 = math.sqrt(((0 - 2) ** 2 + 0 + (4 - 2) ** 2) / 2)
    expected = [(1 - 1 / 3) / std1, -1 / 3 / std1, -1 / 3 / std1, -2 / std2, 0.0, 2 / std2]
    assert torch.allclose(out, torch.tensor(expected), rtol=1e-5)


def test_dr_grpo_is_mean_centred_only():
    out = adv.group_relative(torch.tensor([1.0, 0.0, 3.0, 5.0]), group_size=2, scale_by_std=False)
    assert torch.allclose(out, torch.tensor([0.5, -0.5, -1.0, 1.0]))


def test_invalid_rows_are_excluded_from_group_statistics():
    scores = torch.tensor([1.0, 0.0, 123.0, 0.0])
    valid = torch.tensor([True, True, False, True])
    out = adv.group_relative(scores, valid, group_size=4, scale_by_std=False)
    mean = 1 / 3
    assert torch.allclose(out, torch.tensor([1 - mean, -mean, 0.0, -mean]))


def test_rloo_leave_one_out():
    out = adv.rloo(torch.tensor([1.0, 2.0, 6.0]), group_size=3)
    assert torch.allclose(out, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))


def test_zero_variance_groups():
    flat = adv.zero_variance_groups(
        torch.tensor([1.0, 1.0, 0.0, 1.0, 5.0, 9.0]),
        torch.tensor([True, True, True, True, True, False]),
        group_size=2,
    )
    assert flat.tolist() == [True, True, False, False, True, True]


def test_group_relative_matches_naive_loop():
    torch.manual_seed(0)
    scores = torch.randn(24)
    out = adv.group_relative(scores, group_size=4)
    for g in range(6):
        chunk = scores[4 * g : 4 * g + 4]
        assert torch.allclose(
            out[4 * g : 4 * g + 4], (chunk - chunk.mean()) / (chunk.std() + 1e-4), rtol=1e-5
        )
