"""MA-RLHF macro actions: segmenters on mixed-length batches, per-segment reductions on hand-computed
values, macro GAE against token-level and sequence-level limits and a naive loop, the product
ratio, and the three bugs of the released code (each shown absent here)."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf.advantages import gae, macro_gae
from rlhf.config import MacroConfig
from rlhf.models.tiny import build_char_tokenizer
from rlhf.segments import (
    broadcast_to_tokens,
    fixed_ngram_segments,
    macro_ratio_logprobs,
    make_segmenter,
    num_segments,
    parse_segments,
    perplexity_segments,
    randomized_ngram_segments,
    segment_reduce,
    token_texts_of,
)


def mask_of(lengths, width=12) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def assert_well_formed(ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Ids 0..K-1 in order over the valid tokens, -1 on padding, no empty segment, last token alone."""
    assert torch.equal(ids < 0, ~mask)
    for row, length in enumerate(mask.sum(1).tolist()):
        if length == 0:
            continue
        valid = ids[row, :length]
        steps = valid[1:] - valid[:-1]
        assert ((steps == 0) | (steps == 1)).all() and valid[0] == 0
        counts = torch.bincount(valid)
        assert (counts > 0).all()  # no empty segment
        assert counts[-1] == 1 and valid[-1] == valid.max()  # the last action is its own segment


def test_fixed_ngram_by_hand():
    ids = fixed_ngram_segments(mask_of([7, 6, 1, 0], width=7), n=5)
    assert ids.tolist() == [
        [0, 0, 0, 0, 0, 1, 2],
        [0, 0, 0, 0, 0, 1, -1],
        [0, -1, -1, -1, -1, -1, -1],
        [-1, -1, -1, -1, -1, -1, -1],
    ]


def test_no_empty_segment_when_the_length_fits_the_grid():
    """Released-code bug: with (length - 1) a multiple of n the last boundary was appended twice,
    making an empty macro step with r = 0 and V = 0."""
    mask = mask_of([11, 6, 16], width=16)
    ids = fixed_ngram_segments(mask, n=5)
    assert_well_formed(ids, mask)
    assert num_segments(ids).tolist() == [3, 2, 4]


def test_perplexity_rule_cuts_inside_the_response():
    """Released-code bug: a list wrapper left the rule no interior boundaries (one giant segment
    plus the last token). Here a new segment starts at t when token t+1 is more surprising."""
    surprise = torch.tensor([[1.0, 2.0, 1.0, 3.0, 0.5, 0.0], [3.0, 2.0, 1.0, 0.5, 0.0, 0.0]])
    ids = perplexity_segments(-surprise, mask_of([5, 4], width=6))
    assert ids.tolist() == [[0, 0, 1, 1, 2, -1], [0, 0, 0, 1, -1, -1]]


def test_last_token_weighting_works_on_a_batch():
    """Released-code bug: the "unit" (last-token) weighting indexed a 1-D tensor as 2-D and crashed."""
    values = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7], [10, 20, 30, 0, 0, 0, 0]])
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, -1, -1, -1, -1]])
    assert segment_reduce(values, ids, "last").tolist() == [[3, 5, 7], [10, 30, 0]]


def test_aggregations_by_hand():
    values = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7]])
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    assert segment_reduce(values, ids, "mean").tolist() == [[2.0, 4.5, 6.5]]
    assert segment_reduce(values, ids, "sum").tolist() == [[6.0, 9.0, 13.0]]
    # position-decayed: weights 1, 1/2, 1/3 (normalised), the first token weighs most
    expected = [(1 + 2 / 2 + 3 / 3) / (1 + 1 / 2 + 1 / 3), (4 + 5 / 2) / 1.5, (6 + 7 / 2) / 1.5]
    torch.testing.assert_close(segment_reduce(values, ids, "position"), torch.tensor([expected]))
    with pytest.raises(ValueError, match="aggregation"):
        segment_reduce(values, ids, "median")


def test_one_token_segments_are_token_level_gae():
    generator = torch.Generator().manual_seed(0)
    mask = mask_of([9, 4, 12, 1])
    rewards, values = torch.randn(4, 12, generator=generator), torch.randn(4, 12, generator=generator)
    ids = fixed_ngram_segments(mask, n=1)
    for how in ("mean", "sum", "position", "last"):
        macro = macro_gae(rewards, values, ids, gamma=0.99, lam=0.9, aggregation=how)
        token = gae(rewards, values, mask, gamma=0.99, lam=0.9)
        torch.testing.assert_close(macro[0], token[0])
        torch.testing.assert_close(macro[1], token[1])


def test_one_segment_per_response_is_the_sequence_level_case():
    """All tokens one macro action: every token's advantage is the summed reward minus V(s_0)."""
    mask = mask_of([5, 3], width=5)
    rewards = torch.tensor([[0.1, -0.2, 0.0, 0.3, 1.0], [0.5, 0.0, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.4, 0.9, 0.9, 0.9, 0.9], [1.0, 3.0, 3.0, 0.0, 0.0]])
    ids = torch.where(mask, torch.zeros_like(mask, dtype=torch.long), torch.full(mask.shape, -1))
    advantages, returns = macro_gae(
        rewards, values, ids, gamma=1.0, lam=0.95, aggregation="mean", reward_aggregation="sum"
    )
    expected = torch.tensor([1.2 - 0.8, 2.5 - 7 / 3])  # summed reward minus the segment's mean value
    torch.testing.assert_close(advantages[mask], expected.repeat_interleave(mask.sum(1)))
    torch.testing.assert_close(returns[mask], torch.tensor([1.2, 2.5]).repeat_interleave(mask.sum(1)))


def naive_macro_gae(rewards, values, ids, gamma, lam, how):
    """Row by row, segment by segment, in Python: the reference for the vectorised version."""
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for row in range(rewards.shape[0]):
        segments = sorted({int(i) for i in ids[row] if i >= 0})
        members = [[t for t in range(rewards.shape[1]) if ids[row, t] == s] for s in segments]

        def reduce(x, tokens, row=row):
            total = sum(float(x[row, t]) for t in tokens)
            return total / len(tokens) if how == "mean" else total

        r = [reduce(rewards, m) for m in members]
        v = [reduce(values, m) for m in members]
        running = 0.0
        for k in reversed(range(len(members))):
            next_value = v[k + 1] if k + 1 < len(members) else 0.0
            running = r[k] + gamma * next_value - v[k] + gamma * lam * running
            for t in members[k]:
                advantages[row, t] = running
                returns[row, t] = running + v[k]
    return advantages, returns


@pytest.mark.parametrize("how", ["mean", "sum"])
def test_vectorised_macro_gae_matches_a_naive_loop(how):
    generator = torch.Generator().manual_seed(3)
    mask = mask_of([12, 7, 3, 10, 1, 0])
    rewards, values = torch.randn(6, 12, generator=generator), torch.randn(6, 12, generator=generator)
    ids = randomized_ngram_segments(mask, generator=random.Random(4))
    got = macro_gae(rewards, values, ids, gamma=0.97, lam=0.9, aggregation=how)
    expected = naive_macro_gae(rewards, values, ids, 0.97, 0.9, how)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


def test_every_segmenter_is_well_formed_on_mixed_lengths():
    generator = torch.Generator().manual_seed(5)
    lengths = [12, 1, 0, 7, 5, 11, 2]
    mask = mask_of(lengths)
    tokenizer = build_char_tokenizer()
    texts = token_texts_of(tokenizer)
    response_ids = torch.randint(4, len(tokenizer), mask.shape, generator=generator)
    segmentations = [
        fixed_ngram_segments(mask, 3),
        randomized_ngram_segments(mask, generator=random.Random(0)),
        perplexity_segments(-torch.rand(mask.shape, generator=generator) * 4, mask),
        parse_segments(response_ids, mask, texts, "prose", 4),
        parse_segments(response_ids, mask, texts, "code", 4),
    ]
    for ids in segmentations:
        assert_well_formed(ids, mask)


def test_randomized_lengths_come_from_the_list_then_one_tail():
    mask = mask_of([40], width=40)
    ids = randomized_ngram_segments(mask, lengths=(2, 3), repeat_times=2, generator=random.Random(1))
    sizes = torch.bincount(ids[0]).tolist()
    assert sorted(sizes[:4]) == [2, 2, 3, 3]  # the shuffled list, consumed in order
    assert sizes[4:] == [40 - 10 - 1, 1]  # then everything but the last token, then the last token


def test_parse_cuts_after_clause_and_sentence_ends():
    texts = ["a", "b", ",", " ", ".", "\n", ";", "{"]
    #              a  b  ,  ␠  a  .  b  ␠  a  (last)
    response = torch.tensor([[0, 1, 2, 3, 0, 4, 1, 3, 0, 1]])
    ids = parse_segments(response, torch.ones_like(response, dtype=torch.bool), texts, "prose", 10)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3]]
    code = torch.tensor([[0, 7, 5, 0, 6, 1, 1, 1, 1, 0]])  # a { \n a ; b b b b a
    ids = parse_segments(code, torch.ones_like(code, dtype=torch.bool), texts, "code", 3)
    assert ids.tolist() == [[0, 0, 1, 2, 2, 3, 3, 3, 4, 5]]


def test_macro_ratio_is_the_product_over_the_segment():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.2, 0.4]]))
    new = torch.log(torch.tensor([[0.6, 0.4, 0.3, 0.4]])).requires_grad_()
    ids = torch.tensor([[0, 0, 1, 2]])
    ratio = torch.exp(macro_ratio_logprobs(new, old, ids) - old)
    torch.testing.assert_close(ratio.detach(), torch.tensor([[0.96, 0.96, 1.5, 1.0]]))
    ratio[0, 0].backward()
    assert (new.grad[0, :2] != 0).all() and (new.grad[0, 2:] == 0).all()


def test_config_errors_name_the_field():
    tokenizer = build_char_tokenizer()
    assert make_segmenter(MacroConfig(), tokenizer) is None
    for field, value in [("segmenter", "words"), ("aggregation", "median"), ("ratio", "sequence"), ("n", 0)]:
        cfg = MacroConfig(segmenter="fixed")
        setattr(cfg, field, value)
        with pytest.raises(ValueError, match=field):
            make_segmenter(cfg, tokenizer)


def test_broadcast_puts_zero_on_padding():
    per_segment = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    ids = torch.tensor([[0, 1, 1], [0, -1, -1]])
    assert broadcast_to_tokens(per_segment, ids).tolist() == [[1, 2, 2], [3, 0, 0]]


def test_turn_segments_follow_the_model_s_turns_across_tool_tokens():
    from rlhf.segments import turn_segments

    # turn 1 (3 tokens), tool (2), turn 2 (3 tokens), padding: the last token is its own segment
    mask = torch.tensor([[True, True, True, False, False, True, True, True, False]])
    assert turn_segments(mask).tolist() == [[0, 0, 0, -1, -1, 1, 1, 2, -1]]
    single = torch.tensor([[True, True, True, False]])
    assert turn_segments(single).tolist() == [[0, 0, 1, -1]]
    # the fixed n-grams of an episode also end with its last trained token alone
    from rlhf.segments import fixed_ngram_segments

    assert fixed_ngram_segments(mask, 2).tolist() == [[0, 0, 1, -1, -1, 2, 3, 4, -1]]
