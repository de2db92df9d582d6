import torch

from rlhf.losses.reduce import get_reduction

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])


def test_token_mean():
    r = get_reduction("token_mean")
    assert r.count(MASK).item() == 5
    assert torch.isclose(r.reduce(PER_TOKEN, MASK, normalizer=5), torch.tensor((1 + 2 + 3 + 4 + 5) / 5))


def test_sequence_mean_token_mean():
    r = get_reduction("sequence_mean_token_mean")
    assert r.count(MASK).item() == 2
    expected = ((1 + 2 + 3) / 3 + (4 + 5) / 2) / 2
    assert torch.isclose(r.reduce(PER_TOKEN, MASK, normalizer=2), torch.tensor(expected))


def test_sequence_mean_token_sum_norm():
    r = get_reduction("sequence_mean_token_sum_norm")
    expected = (1 + 2 + 3 + 4 + 5) / 8 / 2
    assert torch.isclose(r.reduce(PER_TOKEN, MASK, normalizer=2, token_budget=8), torch.tensor(expected))


def test_fully_masked_rows_are_not_counted_as_sequences():
    mask = torch.tensor([[True, False], [False, False]])
    assert get_reduction("sequence_mean_token_mean").count(mask).item() == 1


def test_unknown_reduction_names_the_field():
    try:
        get_reduction("mean")
    except ValueError as error:
        assert "loss.aggregation" in str(error)
    else:
        raise AssertionError("expected an error")
