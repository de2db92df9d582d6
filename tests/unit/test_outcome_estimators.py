"""REINFORCE++ estimators, GTPO's conflict weights, DAPO's overlong penalty, the estimator registry
and RolloutBatch.concat: hand-computed values and naive references."""

from __future__ import annotations

import pytest
import torch

from rlhf import advantages as adv
from rlhf.shaping import overlong_penalty
from rlhf.types import RolloutBatch


def _whiten(values: torch.Tensor) -> torch.Tensor:
    """The hand formula: (x - mean) / sqrt(population var + 1e-8)."""
    return (values - values.mean()) / torch.sqrt(values.var(unbiased=False) + 1e-8)


def test_reinforce_pp_returns_to_go_with_token_kl_then_global_whitening():
    scores = torch.tensor([1.0, 0.0])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    penalty = torch.tensor([[0.1, 0.2, 0.3], [0.05, 0.1, 99.0]])  # 99 is masked
    got = adv.reinforce_pp(scores, None, mask, token_penalty=penalty)
    # returns: row 0: 1 - (0.6, 0.5, 0.3) = (0.4, 0.5, 0.7); row 1: 0 - (0.15, 0.1) = (-0.15, -0.1)
    returns = torch.tensor([0.4, 0.5, 0.7, -0.15, -0.1])
    torch.testing.assert_close(got[mask], _whiten(returns))
    assert got[1, 2] == 0


def test_reinforce_pp_without_kl_and_invalid_rows():
    scores = torch.tensor([2.0, 0.0, 5.0])
    valid = torch.tensor([True, True, False])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    got = adv.reinforce_pp(scores, valid, mask)
    torch.testing.assert_close(got[:2][mask[:2]], _whiten(torch.tensor([2.0, 2.0, 0.0])))
    assert (got[2] == 0).all()


def test_reinforce_pp_baseline_centres_by_group_then_whitens_tokens():
    scores = torch.tensor([1.0, 0.0, 3.0, 3.0])
    mask = torch.tensor([[True, True], [True, False], [True, True], [True, True]])
    got = adv.reinforce_pp_baseline(scores, None, mask, group_size=2)
    centred = torch.tensor([0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0])  # per valid token
    torch.testing.assert_close(got[mask], _whiten(centred))


def test_global_whitening_is_split_invariant():
    """With a sum over ranks, each half of the batch gets the whole batch's whitening."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(8, generator=generator)
    mask = torch.arange(5).unsqueeze(0) < torch.randint(1, 6, (8, 1), generator=generator)
    whole = adv.reinforce_pp_baseline(scores, None, mask, group_size=4)
    halves = [slice(0, 4), slice(4, 8)]

    def all_reduce_sum(tensor):  # what the other rank would add
        parts = []
        for half in halves:
            kept = torch.where(mask[half], whole_inputs[half], 0.0).double()
            parts.append(torch.stack([kept.sum(), (kept**2).sum(), mask[half].sum().double()]))
        return sum(parts)

    centred = adv.group_relative(scores, None, group_size=4, scale_by_std=False)
    whole_inputs = torch.where(mask, centred.unsqueeze(-1), 0.0)
    for half in halves:
        part = adv.reinforce_pp_baseline(
            scores[half], None, mask[half], group_size=4, all_reduce_sum=all_reduce_sum
        )
        torch.testing.assert_close(part, whole[half])


def _conflict_at(ids, mask, advantages, group, row, t, from_end):
    """Whether row's token t (counted from the end with `from_end`) also sits at that place in a
    completion of the group with an advantage of the opposite sign."""
    n = int(mask[row].sum())
    position = n - 1 - t if from_end else t
    for other in group:
        m = int(mask[other].sum())
        other_position = m - 1 - t if from_end else position
        opposite = torch.sign(advantages[other]).item() * torch.sign(advantages[row]).item() < 0
        if opposite and 0 <= other_position < m and ids[other, other_position] == ids[row, position]:
            return True
    return False


def _naive_conflicts(ids, mask, advantages, group_size, runs):
    """Loop reference of the conflict weights (the semantics of the authors' gtpo_training.py)."""
    rows, length = ids.shape
    weights = torch.zeros(rows, length)
    for row in range(rows):
        start = row // group_size * group_size
        group = range(start, start + group_size)
        sign = torch.sign(advantages[row]).item()
        n = int(mask[row].sum())
        hits = [0] * n
        if runs == "all":
            hits = [int(_conflict_at(ids, mask, advantages, group, row, t, False)) for t in range(n)]
        else:
            for from_end in (False, True):
                for t in range(n):
                    if not _conflict_at(ids, mask, advantages, group, row, t, from_end):
                        break
                    hits[n - 1 - t if from_end else t] += 1
        count = max(sum(h > 0 for h in hits), 1)
        for t in range(n):
            w = 1.0
            if hits[t] and sign > 0:
                w = 2.0 ** hits[t]
            elif hits[t] and sign < 0:
                w = 0.0
            weights[row, t] = w / count
    return weights


def test_gtpo_conflict_weights_hand_built_group():
    """Group of 3: rows 0 (A > 0) and 1 (A < 0) share their first two tokens and their last token
    (end-aligned); the middle token 7 matches too but is not in a leading or trailing run."""
    ids = torch.tensor([[5, 6, 1, 7, 9], [5, 6, 2, 7, 9], [5, 8, 8, 8, 8]])
    mask = torch.ones(3, 5, dtype=torch.bool)
    advantages = torch.tensor([1.0, -1.0, 0.0])
    weights = adv.gtpo_conflict_weights(ids, mask, advantages, group_size=3)
    # row 0: leading run (5, 6), trailing run (7, 9): 4 conflicts -> (2, 2, 1, 2, 2) / 4
    torch.testing.assert_close(weights[0], torch.tensor([2.0, 2.0, 1.0, 2.0, 2.0]) / 4)
    torch.testing.assert_close(weights[1], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]) / 4)
    torch.testing.assert_close(weights[2], torch.ones(5))  # advantage 0: no conflicts
    paper = adv.gtpo_conflict_weights(
        ids, mask, advantages, group_size=3, runs="all", divide_by_conflicts=False
    )
    torch.testing.assert_close(paper[0], torch.tensor([2.0, 2.0, 1.0, 2.0, 2.0]))


def test_gtpo_trailing_run_uses_end_aligned_rows_and_double_counts():
    ids = torch.tensor([[4, 4, 0], [3, 4, 4]])  # row 0 has 2 tokens, row 1 has 3
    mask = torch.tensor([[True, True, False], [True, True, True]])
    weights = adv.gtpo_conflict_weights(ids, mask, torch.tensor([1.0, -1.0]), group_size=2)
    # leading: row 0 t0=4 vs row 1 t0=3: no run. End-aligned: (4, 4) vs (4, 4): both in the trailing run
    torch.testing.assert_close(weights[0], torch.tensor([2.0, 2.0, 0.0]) / 2)
    ids = torch.tensor([[4, 4], [4, 4]])  # one token in both runs: amplify ** 2
    weights = adv.gtpo_conflict_weights(
        ids, torch.ones(2, 2, dtype=torch.bool), torch.tensor([1.0, -1.0]), group_size=2
    )
    torch.testing.assert_close(weights[0], torch.tensor([4.0, 4.0]) / 2)


@pytest.mark.parametrize("runs", ["edges", "all"])
@pytest.mark.parametrize("seed", range(4))
def test_gtpo_conflict_weights_match_the_loop(runs, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 3, (8, 6), generator=generator)
    mask = torch.arange(6).unsqueeze(0) < torch.randint(1, 7, (8, 1), generator=generator)
    advantages = torch.randint(-1, 2, (8,), generator=generator).float()
    got = adv.gtpo_conflict_weights(ids, mask, advantages, group_size=4, runs=runs)
    torch.testing.assert_close(got, _naive_conflicts(ids, mask, advantages, 4, runs))


def test_overlong_penalty():
    lengths = torch.tensor([10, 12, 14, 16])
    got = overlong_penalty(lengths, max_new_tokens=16, buffer=4, penalty=0.5)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, -0.25, -0.5]))
    assert (overlong_penalty(lengths, max_new_tokens=16, buffer=0) == 0).all()


def test_estimator_registry_errors():
    with pytest.raises(ValueError, match="not one of.*reinforce_pp"):
        adv.get_advantage_estimator("reinforce++", "groups")
    with pytest.raises(ValueError, match="needs a critic"):
        adv.get_advantage_estimator("gae", "groups")
    with pytest.raises(ValueError, match="needs groups"):
        adv.get_advantage_estimator("rloo", "critic")


def _batch(prompt_len, length, rows, group_offset=0):
    return RolloutBatch(
        prompt_ids=torch.full((rows, prompt_len), 7),
        prompt_mask=torch.ones(rows, prompt_len, dtype=torch.bool),
        response_ids=torch.full((rows, length), 3),
        response_mask=torch.ones(rows, length, dtype=torch.bool),
        group_ids=torch.zeros(rows, dtype=torch.long),
        truncated=torch.zeros(rows, dtype=torch.bool),
        completions=["x"] * rows,
        columns={"answer": ["a"] * rows},
    )


def test_concat_repads_prompts_left_and_tokens_right():
    joined = RolloutBatch.concat([_batch(2, 3, 2), _batch(4, 1, 2)], pad_token_id=0)
    assert joined.prompt_ids.tolist()[0] == [0, 0, 7, 7] and joined.prompt_mask.tolist()[0] == [
        False,
        False,
        True,
        True,
    ]
    assert joined.response_ids.tolist()[3] == [3, 0, 0] and joined.response_mask.tolist()[3] == [
        True,
        False,
        False,
    ]
    assert joined.group_ids.tolist() == [0, 0, 1, 1]
    assert joined.completions == ["x"] * 4 and joined.columns == {"answer": ["a"] * 4}


def test_nthr_scores_match_the_double_sum():
    """s_jk = sum over positive rows i, tokens k' of (g_jk . g_ik')(h_jk . h_ik')."""
    generator = torch.Generator().manual_seed(0)
    g = torch.randn(3, 4, 5, generator=generator)
    h = torch.randn(3, 4, 2, generator=generator)
    mask = torch.arange(4).unsqueeze(0) < torch.tensor([[4], [2], [3]])
    positive = torch.tensor([True, False, True])
    got = adv.nthr_scores(g, h, mask, positive)
    expected = torch.zeros(3, 4)
    for j in range(3):
        for k in range(int(mask[j].sum())):
            for i in (0, 2):
                for q in range(int(mask[i].sum())):
                    expected[j, k] += (g[j, k] @ g[i, q]) * (h[j, k] @ h[i, q])
    torch.testing.assert_close(got, expected)


def test_nthr_scale_damps_negative_tokens_above_the_threshold():
    scores = torch.tensor([[2.0, 4.0], [5.0, 1.0], [3.0, 0.5], [9.0, 9.0]])
    mask = torch.tensor([[True, True], [True, True], [True, True], [True, False]])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0])
    scale = adv.nthr_advantage_scale(scores, mask, advantages)
    # tau = min(mean(2, 4), mean(5, 1)) = 3; p = 2/4 -> eta = 0: negative tokens above 3 lose their push
    torch.testing.assert_close(scale, torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]]))
    scale = adv.nthr_advantage_scale(scores, mask, torch.tensor([1.0, -1.0, -1.0, -1.0]), beta=0.5)
    # tau = 0.5 * mean(2, 4) = 1.5; p = 1/4 -> eta = 0.5
    torch.testing.assert_close(scale, torch.tensor([[1.0, 1.0], [0.5, 1.0], [0.5, 1.0], [0.5, 1.0]]))
    flat = adv.nthr_advantage_scale(scores, mask, torch.ones(4))
    assert (flat == 1).all()


def test_nthr_token_scale_on_a_model_damps_a_negative_copy_of_a_positive_response():
    """A group of a positive response and an identical negative one: the negative row's tokens score
    exactly like the positive row's, so those above the positive row's mean get eta = 0 (p = 1/2);
    the positive row is untouched. A group of two negatives is left alone."""
    from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm
    from rlhf.models.token_scorers import nthr_token_scale

    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(
        TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64), tokenizer
    )
    generator = torch.Generator().manual_seed(0)
    response = torch.randint(3, len(tokenizer), (1, 6), generator=generator)
    batch = _batch(3, 6, 4)
    batch.prompt_ids = torch.randint(3, len(tokenizer), (1, 3), generator=generator).repeat(4, 1)
    batch.response_ids = torch.cat(
        [response, response, torch.randint(3, len(tokenizer), (2, 6), generator=generator)]
    )
    scale, metrics = nthr_token_scale(
        model, batch, torch.tensor([1.0, -1.0, -1.0, -1.0]), group_size=2, chunk_tokens=4
    )
    assert (scale[0] == 1).all() and (scale[2:] == 1).all()
    assert 0 < int((scale[1] == 0).sum()) < 6 and ((scale[1] == 0) | (scale[1] == 1)).all()
    assert metrics["nthr/damped_token_fraction"] == float((scale[1] == 0).sum()) / 24


def test_gdpo_normalises_each_reward_in_its_group_then_the_sum_over_the_batch():
    nan = float("nan")
    per_reward = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, nan], [1.0, 4.0]])
    weights = torch.tensor([1.0, 0.5])
    got = adv.gdpo(per_reward, None, group_size=2, weights=weights)
    # group 1: reward 0 (1, 0): +-0.5 / (std 0.7071 + eps); reward 1 (0, 2): -+1 / (std 1.4142 + eps)
    # group 2: reward 0 (1, 1): 0; reward 1 (None, 4): one value, 0 (None counts 0 in the sum)
    a, b = 0.5 / (2**-0.5 + 1e-4), 1.0 / (2**0.5 + 1e-4)
    r = torch.tensor([a - 0.5 * b, -a + 0.5 * b, 0.0, 0.0])
    expected = (r - r.mean()) / (r.std() + 1e-4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    rows_invalid = adv.gdpo(
        per_reward, torch.tensor([True, True, False, True]), group_size=2, weights=weights
    )
    assert rows_invalid[2] == 0


def test_adaptive_entropy_coefficient_follows_the_target():
    from rlhf.shaping import EntropyCoefficient

    fixed = EntropyCoefficient(0.01)
    fixed.update(5.0)
    assert fixed.applied == 0.01
    adaptive = EntropyCoefficient(0.01, target=0.5, delta=0.005, maximum=0.02)
    assert adaptive.applied == 0.0  # no step measured yet
    adaptive.update(0.4)  # below target: raise, and apply
    assert adaptive.value == pytest.approx(0.015) and adaptive.applied == pytest.approx(0.015)
    adaptive.update(0.3)
    assert adaptive.value == pytest.approx(0.02)  # capped at the maximum
    adaptive.update(0.9)  # above target: lower, and do not apply
    assert adaptive.value == pytest.approx(0.015) and adaptive.applied == 0.0
    restored = EntropyCoefficient(0.01, target=0.5)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value and restored.last_entropy == 0.9
