"""DPO-family losses and token-level weights: hand-computed values and the identities of the spec
(TGDPO alpha=0, cDPO all-ones weights and T-REG alpha=0 each equal DPO)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.losses.preference import (
    cdpo_token_weights,
    contrastive_prompt_token_rewards,
    contrastive_token_scores,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    preference_loss,
    robust_dpo_loss,
    sequence_logratios,
    simpo_loss,
    tgdpo_token_weights,
    token_reward_regularizer,
    treg_loss,
)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


CHOSEN = torch.tensor([1.0, -0.5])
REJECTED = torch.tensor([-1.0, 0.5])


def test_dpo_sigmoid_hand_computed():
    out = dpo_sigmoid_loss(CHOSEN, REJECTED, beta=0.5, normalizer=2)
    expected = (-logsig(0.5 * 2.0) - logsig(0.5 * -1.0)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["rewards/chosen"].item() == pytest.approx((0.5 - 0.25) / 2)
    assert out.metrics["rewards/margin"].item() == pytest.approx((1.0 - 0.5) / 2)
    assert out.metrics["rewards/accuracy"].item() == 0.5


def test_conservative_dpo_hand_computed():
    out = dpo_sigmoid_loss(CHOSEN, REJECTED, beta=0.5, normalizer=2, label_smoothing=0.1)
    per_pair = [-0.9 * logsig(z) - 0.1 * logsig(-z) for z in (1.0, -0.5)]
    assert out.loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-6)


def test_robust_hand_computed_and_range_check():
    out = robust_dpo_loss(CHOSEN, REJECTED, beta=0.5, normalizer=2, label_smoothing=0.2)
    per_pair = [(-0.8 * logsig(z) + 0.2 * logsig(-z)) / 0.6 for z in (1.0, -0.5)]
    assert out.loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        robust_dpo_loss(CHOSEN, REJECTED, beta=0.5, normalizer=2, label_smoothing=0.5)


def test_hinge_hand_computed():
    out = hinge_loss(CHOSEN, REJECTED, beta=0.5, normalizer=2)
    assert out.loss.item() == pytest.approx((max(0, 1 - 1.0) + max(0, 1 + 0.5)) / 2)


def test_ipo_averages_over_tokens():
    out = ipo_loss(
        CHOSEN,
        REJECTED,
        chosen_lengths=torch.tensor([2, 1]),
        rejected_lengths=torch.tensor([4, 5]),
        beta=0.5,
        normalizer=2,
    )
    per_pair = [(1.0 / 2 - (-1.0) / 4 - 1.0) ** 2, (-0.5 / 1 - 0.5 / 5 - 1.0) ** 2]
    assert out.loss.item() == pytest.approx(sum(per_pair) / 2, rel=1e-6)


def test_simpo_hand_computed():
    out = simpo_loss(
        torch.tensor([-2.0]),
        torch.tensor([-6.0]),
        chosen_lengths=torch.tensor([2]),
        rejected_lengths=torch.tensor([3]),
        beta=2.0,
        gamma=0.5,
        normalizer=1,
    )
    assert out.loss.item() == pytest.approx(-logsig(2.0 * (-1.0 + 2.0) - 0.5), rel=1e-6)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-2.0)


def test_preference_loss_binds_and_rejects_unknown_names():
    loss, needs_reference = preference_loss("simpo", beta=2.0, simpo_gamma=0.5)
    assert not needs_reference
    lengths = {"chosen_lengths": torch.tensor([2]), "rejected_lengths": torch.tensor([3])}
    out = loss(torch.tensor([-2.0]), torch.tensor([-6.0]), normalizer=1, **lengths)
    assert out.loss.item() == pytest.approx(-logsig(1.5), rel=1e-6)
    assert preference_loss("ipo", beta=0.1)[1]
    with pytest.raises(ValueError, match="loss.type='kto'"):
        preference_loss("kto", beta=0.1)


def test_sequence_logratios_ignores_garbage_at_masked_positions():
    logprobs = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("-inf"), 7.0]])
    ref = torch.tensor([[-1.5, -1.0, 3.0], [-1.0, 0.0, float("inf")]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    weights = torch.tensor([[2.0, 1.0, 5.0], [1.0, 1.0, 1.0]])
    out = sequence_logratios(logprobs, ref, mask, weights)
    assert out.tolist() == pytest.approx([2 * 0.5 + 1 * -1.0, 0.5])
    assert sequence_logratios(logprobs, None, mask).tolist() == pytest.approx([-3.0, -0.5])


def _random_pair_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (4, 6)
    logprobs = -torch.rand(shape, generator=g) * 3
    ref = -torch.rand(shape, generator=g) * 3
    mask = torch.arange(6).expand(4, 6) < torch.tensor([[6], [3], [1], [5]])
    return logprobs, ref, mask


def test_tgdpo_alpha_zero_is_dpo_and_weights_follow_the_guide():
    (lp_c, ref_c, m_c), (lp_r, ref_r, m_r) = _random_pair_batch(0), _random_pair_batch(1)
    guide_c, guide_r = torch.randn(4, 6), torch.randn(4, 6)
    w_c, w_r, _ = tgdpo_token_weights(guide_c, guide_r, m_c, m_r, alpha=0.0, beta=0.1)
    weighted = dpo_sigmoid_loss(
        sequence_logratios(lp_c, ref_c, m_c, w_c),
        sequence_logratios(lp_r, ref_r, m_r, w_r),
        beta=0.1,
        normalizer=4,
    )
    plain = dpo_sigmoid_loss(
        sequence_logratios(lp_c, ref_c, m_c), sequence_logratios(lp_r, ref_r, m_r), beta=0.1, normalizer=4
    )
    assert weighted.loss.item() == pytest.approx(plain.loss.item(), rel=1e-7)

    one = torch.ones(1, 2, dtype=torch.bool)
    w_c, w_r, metrics = tgdpo_token_weights(
        torch.tensor([[2.0, -30.0]]), torch.tensor([[2.0, -1.0]]), one, one, alpha=0.5, beta=0.1, floor=0.05
    )
    assert w_c[0].tolist() == pytest.approx([1 + 0.05 * 2.0, 0.05])  # 1 - 1.5 floored
    assert w_r[0].tolist() == pytest.approx([1 - 0.05 * 2.0, 1 + 0.05 * 1.0])
    assert metrics["tgdpo/floor_rate"].item() == pytest.approx(1 / 4)


def test_cdpo_all_one_weights_is_dpo():
    (lp_c, ref_c, m_c), (lp_r, ref_r, m_r) = _random_pair_batch(2), _random_pair_batch(3)
    ones = torch.ones(4, 6)
    weighted = dpo_sigmoid_loss(
        sequence_logratios(lp_c, ref_c, m_c, ones),
        sequence_logratios(lp_r, ref_r, m_r, ones),
        beta=0.1,
        normalizer=4,
    )
    plain = dpo_sigmoid_loss(
        sequence_logratios(lp_c, ref_c, m_c), sequence_logratios(lp_r, ref_r, m_r), beta=0.1, normalizer=4
    )
    assert weighted.loss.item() == pytest.approx(plain.loss.item(), rel=1e-7)
    # scores of 0 (every token critical) give all-ones weights too
    assert torch.equal(cdpo_token_weights(torch.zeros(4, 6), m_r), m_r.float())


def test_cdpo_weights_and_contrastive_scores_hand_computed():
    positive = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    negative = torch.log(torch.tensor([[[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]]))
    scores = contrastive_token_scores(positive, negative, torch.tensor([[0, 1]]), beta=1.0)
    # position 0: logits 2 log p - log q = log(p^2/q) -> (1, 1/8, 1/4) normalised
    assert scores[0, 0].item() == pytest.approx(1 / (1 + 1 / 8 + 1 / 4), rel=1e-6)
    assert scores[0, 1].item() == pytest.approx(0.8, rel=1e-6)  # identical models: plain softmax
    mask = torch.tensor([[True, True, True, False]])
    weights = cdpo_token_weights(torch.tensor([[0.9, 0.2, 0.7, 0.3]]), mask)
    assert weights[0].tolist() == pytest.approx([0.1, 0.8, 1.0, 0.0])  # last valid token (EOS) -> 1


def test_treg_alpha_zero_is_dpo_and_regulariser_hand_computed():
    (lp_c, ref_c, m_c), (lp_r, ref_r, m_r) = _random_pair_batch(4), _random_pair_batch(5)
    h_c, h_r = sequence_logratios(lp_c, ref_c, m_c), sequence_logratios(lp_r, ref_r, m_r)
    base = dpo_sigmoid_loss(h_c, h_r, beta=0.1, normalizer=4)
    rewards = contrastive_prompt_token_rewards(torch.randn(4, 6), torch.randn(4, 6))
    reg_c = token_reward_regularizer(lp_c, rewards, m_c, beta=0.1)
    reg_r = token_reward_regularizer(lp_r, rewards, m_r, beta=0.1)
    out = treg_loss(base, h_c, h_r, reg_c, reg_r, alpha=0.0, beta=0.1, normalizer=4)
    assert out.loss.item() == base.loss.item()

    one = torch.tensor([[True, True]])
    reg = token_reward_regularizer(torch.tensor([[-1.0, -2.0]]), torch.tensor([[0.5, -0.25]]), one, beta=0.2)
    assert reg.item() == pytest.approx(-(0.2 * 0.5 * -1.0 + 0.2 * -0.25 * -2.0))
    rewards = contrastive_prompt_token_rewards(torch.tensor([0.0, -1.0]), torch.tensor([0.0, 1.0]))
    assert rewards.tolist() == pytest.approx([0.0, 1 / (1 + math.exp(2)) - 0.5])
    base = dpo_sigmoid_loss(torch.tensor([1.0]), torch.tensor([3.0]), beta=0.5, normalizer=1)
    out = treg_loss(
        base,
        torch.tensor([1.0]),
        torch.tensor([3.0]),
        torch.tensor([0.4]),
        torch.tensor([0.2]),
        alpha=0.25,
        beta=0.5,
        normalizer=1,
    )
    weight = 1 / (1 + math.exp(-0.5 * (3.0 - 1.0)))
    assert out.loss.item() == pytest.approx(base.loss.item() + 0.25 * weight * 0.6, rel=1e-6)


def test_every_listed_preference_loss_resolves_and_others_are_refused():
    from rlhf.losses.preference import PREFERENCE_LOSSES, preference_loss

    for name in PREFERENCE_LOSSES:
        preference_loss(name, beta=0.1)
    with pytest.raises(ValueError, match="simpo"):
        preference_loss("dpo", beta=0.1)
