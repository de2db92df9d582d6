"""GAE, the clipped value loss, token-reward composition, KL controllers and the BT loss."""

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf.advantages import gae
from rlhf.losses.preference import bradley_terry_loss
from rlhf.losses.reduce import get_reduction
from rlhf.losses.value import clipped_value_loss
from rlhf.shaping import AdaptiveKLController, RunningMoments, compose_token_rewards, last_valid_index


def _naive_gae(rewards, values, length, gamma, lam):
    advantages = [0.0] * length
    running = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages, [a + v for a, v in zip(advantages, values)]


def test_gae_matches_naive_loop_on_mixed_lengths():
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 7), torch.randn(5, 7)
    lengths = [7, 1, 4, 0, 6]
    mask = torch.arange(7).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    rewards_with_garbage = torch.where(mask, rewards, torch.full_like(rewards, float("nan")))
    advantages, returns = gae(rewards_with_garbage, values, mask, gamma=0.9, lam=0.8)
    # float32 recursion against a float64 python loop: rounding only
    for b, n in enumerate(lengths):
        expected_adv, expected_ret = _naive_gae(rewards[b, :n].tolist(), values[b, :n].tolist(), n, 0.9, 0.8)
        torch.testing.assert_close(advantages[b, :n], torch.tensor(expected_adv), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(returns[b, :n], torch.tensor(expected_ret), rtol=1e-5, atol=1e-6)
        assert (advantages[b, n:] == 0).all() and (returns[b, n:] == 0).all()


def test_gae_hand_computed():
    # one row, rewards (0, 1), values (0.5, 0.25), gamma 1, lambda 0.5
    advantages, returns = gae(
        torch.tensor([[0.0, 1.0]]),
        torch.tensor([[0.5, 0.25]]),
        torch.ones(1, 2, dtype=torch.bool),
        gamma=1.0,
        lam=0.5,
    )
    delta1 = 1.0 + 0.0 - 0.25
    delta0 = 0.0 + 0.25 - 0.5
    assert torch.allclose(advantages, torch.tensor([[delta0 + 0.5 * delta1, delta1]]))
    assert torch.allclose(returns, torch.tensor([[delta0 + 0.5 * delta1 + 0.5, delta1 + 0.25]]))


@pytest.mark.parametrize(
    "value, old, ret, expected",
    [
        (1.0, 1.0, 2.0, 0.5 * 1.0),  # inside the band: plain squared error
        (
            1.5,
            1.0,
            2.0,
            0.5 * max(0.25, (1.2 - 2.0) ** 2),
        ),  # moved past +0.2 toward the target: the clipped error is larger
        (0.5, 1.0, 2.0, 0.5 * max(2.25, (0.8 - 2.0) ** 2)),  # moved away from the target: unclipped larger
    ],
)
def test_clipped_value_loss_cases(value, old, ret, expected):
    out = clipped_value_loss(
        torch.tensor([[value]]),
        torch.tensor([[old]]),
        torch.tensor([[ret]]),
        torch.ones(1, 1, dtype=torch.bool),
        reduction=get_reduction("token_mean"),
        normalizer=1,
        clip_range=0.2,
    )
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-5)


def test_value_loss_masks_garbage():
    values = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    out = clipped_value_loss(
        values,
        torch.tensor([[1.0, 5.0]]),
        torch.tensor([[3.0, float("inf")]]),
        torch.tensor([[True, False]]),
        reduction=get_reduction("token_mean"),
        normalizer=1,
    )
    out.loss.backward()
    assert math.isclose(out.loss.item(), 0.5 * max(4.0, (1.0 - 3.0) ** 2), rel_tol=1e-6)
    assert torch.isfinite(values.grad).all()


def test_score_lands_on_last_valid_token_of_right_padded_rows():
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [True, True, True, True]])
    assert last_valid_index(mask).tolist() == [2, 0, 3]
    kl = torch.full((3, 4), 0.5)
    dense = {"bonus": torch.full((3, 4), 0.25)}
    rewards, metrics = compose_token_rewards(
        torch.tensor([1.0, -3.0, 2.0]), mask, kl=kl, kl_coef=0.1, dense=dense, score_clip=2.5
    )
    base = -0.1 * 0.5 + 0.25
    expected = torch.tensor(
        [[base, base, base + 1.0, 0.0], [base - 2.5, 0.0, 0.0, 0.0], [base, base, base, base + 2.0]]
    )
    assert torch.allclose(rewards, expected)
    assert math.isclose(metrics["reward/score_clip_fraction"].item(), 1 / 3, rel_tol=1e-6)


def test_adaptive_kl_controller():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, num_steps=256)  # error clipped to +0.2
    assert math.isclose(controller.value, 0.1 * (1 + 0.2 * 256 / 10000))
    controller.update(current_kl=3.0, num_steps=100)  # error -0.5 clipped to -0.2
    assert math.isclose(controller.value, 0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.2 * 100 / 10000))


def test_running_moments_match_batch_statistics():
    moments = RunningMoments()
    data = torch.randn(100, dtype=torch.float64) * 3 + 2
    for chunk in data.split(17):
        moments.update(chunk)
    assert math.isclose(moments.mean, float(data.mean()), rel_tol=1e-9)
    assert math.isclose(moments.std, float(data.std(unbiased=False)), rel_tol=1e-9)


def test_bradley_terry_hand_computed():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5])
    out = bradley_terry_loss(chosen, rejected, normalizer=2)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-6)
    assert out.metrics["rm/accuracy"].item() == 0.5
    with_margin = bradley_terry_loss(chosen, rejected, normalizer=2, margin=torch.tensor([1.0, 0.0]))
    assert math.isclose(
        with_margin.loss.item(), (math.log(2.0) + math.log1p(math.exp(0.5))) / 2, rel_tol=1e-6
    )
    centred = bradley_terry_loss(chosen, rejected, normalizer=2, center_coef=0.01)
    assert math.isclose(centred.loss.item(), expected + 0.01 * (9.0 + 0.25) / 2, rel_tol=1e-6)


def test_rto_token_reward_scales_then_clips_and_masks():
    from rlhf.shaping import DPOTokenReward, dpo_token_reward

    dpo = torch.tensor([[-1.0, -0.5, float("nan")], [-3.0, -0.1, -0.2]])
    ref = torch.tensor([[-2.0, -0.6, 0.0], [-1.0, -0.1, -4.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    reward, metrics = dpo_token_reward(dpo, ref, mask, scale=0.05, clip=0.04)
    # raw = 0.05 * (dpo - ref): 0.05, 0.005, -; -0.1, 0, 0.19 -> clipped at +-0.04
    expected = torch.tensor([[0.04, 0.005, 0.0], [-0.04, 0.0, 0.04]])
    torch.testing.assert_close(reward, expected, rtol=0, atol=1e-7)
    assert metrics["rto/clip_fraction"].item() == pytest.approx(3 / 5)
    unclipped, _ = dpo_token_reward(dpo, ref, mask, scale=0.05, clip=None)
    assert unclipped[1, 2].item() == pytest.approx(0.19)

    # As a dense source: the PPO reference pass by default, or the DPO model's own reference.
    batch = SimpleNamespace(ref_logprobs=ref, response_mask=mask)
    source = DPOTokenReward(lambda b: dpo, None, scale=0.05, clip=0.04)
    torch.testing.assert_close(source(batch)[0], expected, rtol=0, atol=1e-7)
    own_reference = DPOTokenReward(lambda b: dpo, lambda b: dpo, scale=0.05, clip=0.04)
    assert own_reference(batch)[0].abs().sum().item() == 0.0
    rewards, metrics = compose_token_rewards(torch.zeros(2), mask, dense={"rto": source(batch)[0]})
    torch.testing.assert_close(rewards, expected, rtol=0, atol=1e-7)
    assert "reward/rto_sum" in metrics


def test_gae_over_an_episode_skips_the_tool_tokens_between_turns():
    # trained, trained, tool, tool, trained: the final reward reaches the first turn (gamma = lam = 1)
    mask = torch.tensor([[True, True, False, False, True]])
    rewards = torch.tensor([[0.0, 0.0, 5.0, 5.0, 1.0]])
    values = torch.tensor([[0.5, 0.2, 9.0, 9.0, 0.4]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(advantages, torch.tensor([[0.5, 0.8, 0.0, 0.0, 0.6]]))
    assert torch.allclose(returns, torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]]))
