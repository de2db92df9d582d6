"""Token-budget micro-batches (train.max_tokens_per_micro_batch): the split, and the equal count
that every rank needs."""

from __future__ import annotations

import pytest
import torch

from rlhf.data.collate import token_budget_micro_batches


def _split(tokens, **kwargs):
    parts = token_budget_micro_batches(torch.arange(len(tokens)), torch.tensor(tokens), **kwargs)
    return [p.tolist() for p in parts]


def test_rows_fill_micro_batches_up_to_the_budget_in_order():
    assert _split([5, 4, 3, 9, 1, 1], budget=10, max_rows=8) == [[0, 1], [2], [3, 4], [5]]
    assert _split([20, 3], budget=10, max_rows=8) == [[0], [1]]  # a long row goes alone
    assert _split([1, 1, 1, 1, 1], budget=100, max_rows=2) == [[0, 1], [2, 3], [4]]


def test_equal_count_halves_the_largest_micro_batches():
    parts = _split([1, 1, 1, 1, 1], budget=100, max_rows=8, count=3)
    assert len(parts) == 3 and sorted(r for p in parts for r in p) == [0, 1, 2, 3, 4]
    assert all(p == sorted(p) for p in parts) and [r for p in parts for r in p] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot make 6 micro-batches of 5 rows"):
        _split([1, 1, 1, 1, 1], budget=100, max_rows=8, count=6)
