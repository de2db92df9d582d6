import math

import pytest
import torch

from rlhf.ops import (
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    warp_logits,
)


def test_masked_reductions_hand_computed():
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert masked_sum(values, mask).item() == 1.0 + 2.0 + 4.0 + 6.0
    assert torch.allclose(masked_mean(values, mask, dim=1), torch.tensor([(1.0 + 2.0) / 2, (4.0 + 6.0) / 2]))
    mean = (1 + 2 + 4 + 6) / 4
    unbiased = ((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2 + (6 - mean) ** 2) / 3
    assert math.isclose(masked_var(values, mask).item(), unbiased, rel_tol=1e-6)


def test_masked_mean_of_nothing_is_zero():
    assert masked_mean(torch.tensor([float("nan")]), torch.tensor([False])).item() == 0.0


def test_masked_garbage_does_not_reach_gradient():
    values = torch.tensor([1.0, 2.0, float("inf")], requires_grad=True)
    masked_mean(values, torch.tensor([True, True, False])).backward()
    assert torch.isfinite(values.grad).all()
    assert torch.allclose(values.grad, torch.tensor([0.5, 0.5, 0.0]))


def test_whiten_hand_computed():
    values = torch.tensor([1.0, 3.0, 100.0])
    mask = torch.tensor([True, True, False])
    out = masked_whiten(values, mask, eps=0.0)
    # mean 2, population variance 1 -> (-1, 1), masked position 0
    assert torch.allclose(out, torch.tensor([-1.0, 1.0, 0.0]))


def test_logprobs_and_entropy_hand_computed():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    assert torch.allclose(logprobs_from_logits(logits, torch.tensor([1])), torch.tensor([math.log(0.75)]))
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert math.isclose(entropy_from_logits(logits).item(), expected, rel_tol=1e-6)


def test_entropy_ignores_removed_tokens():
    logits = torch.tensor([[0.0, 0.0, float("-inf")]])
    assert math.isclose(entropy_from_logits(logits).item(), math.log(2.0), rel_tol=1e-6)


def test_warp_logits_matches_transformers_processors():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(5, 40)
    ours = warp_logits(logits, temperature=0.7, top_k=10, top_p=0.8)
    theirs = TopPLogitsWarper(0.8)(
        None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, logits.clone()))
    )
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    kept = torch.isfinite(ours)
    assert torch.allclose(ours[kept], theirs[kept])


def test_min_p_matches_transformers_after_the_other_warps():
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(1)
    logits = torch.randn(6, 50) * 3
    ours = warp_logits(logits, temperature=1.3, top_p=0.95, min_p=0.1)
    theirs = MinPLogitsWarper(0.1)(
        None, TopPLogitsWarper(0.95)(None, TemperatureLogitsWarper(1.3)(None, logits.clone()))
    )
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs)) and torch.isinf(ours).any()
    kept = torch.isfinite(ours)
    assert torch.allclose(ours[kept], theirs[kept])


def test_warp_logits_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0]])
    out = warp_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True]]


def test_entropy_gradient_is_finite_where_a_warp_removed_tokens():
    """0 * -inf in the product would put NaN into the backward (it did, with the entropy bonus and top-k)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]], requires_grad=True)
    warped = warp_logits(logits, top_k=2)
    entropy = entropy_from_logits(warped)
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()
    p = torch.softmax(torch.tensor([2.0, 1.0]), -1)
    assert entropy.item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)
