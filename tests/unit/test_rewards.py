"""Reward functions and their weighted combination, None handling and failure reporting."""

import math

import pytest
import torch

from rewards import answer_format, exact_match
from rlhf.scoring import RewardError, WeightedReward, resolve_reward, score_completions


def test_exact_match_and_format():
    assert exact_match(["p"] * 3, ["590", " 590 ", "59"], answer=["590", "590", "590"]) == [1.0, 1.0, 0.0]
    assert exact_match(["p"], ["1"], answer=[None]) == [None]
    assert answer_format(["p"] * 3, ["590", "5a0", "59"], answer=["123"] * 3) == [1.0, 0.0, 0.0]


def test_weighted_sum_with_per_reward_values():
    rewards = [
        WeightedReward("exact_match", exact_match, 1.0),
        WeightedReward("answer_format", answer_format, 0.5),
    ]
    scores, valid, per_reward, metrics = score_completions(
        rewards, ["p", "p"], ["12", "x"], {"answer": ["12", "13"]}
    )
    assert scores.tolist() == [1.0 + 0.5, 0.0]
    assert valid.all()
    assert per_reward["exact_match"].tolist() == [1.0, 0.0]
    assert metrics["reward/answer_format/mean"] == 0.5


def test_none_rows_are_invalid_only_when_no_reward_scored_them():
    def half(prompts, completions, **_):
        return [None, 1.0]

    scores, valid, per_reward, metrics = score_completions(
        [WeightedReward("half", half, 2.0)], ["a", "b"], ["x", "y"], {}
    )
    assert valid.tolist() == [False, True] and scores.tolist() == [0.0, 2.0]
    assert math.isnan(per_reward["half"][0])
    assert metrics["reward/half/none_fraction"] == 0.5


def _raises_on_b(prompts, completions, **_):
    return [1.0 if c != "b" else 1 / 0 for c in completions]


def test_raising_reward_names_function_and_row():
    with pytest.raises(RewardError) as error:
        score_completions(
            [WeightedReward("fragile", _raises_on_b, 1.0)], ["p0", "p1", "p2"], ["a", "b", "c"], {}
        )
    message = str(error.value)
    assert (
        "'fragile'" in message and "row 1" in message and "p1" in message and "ZeroDivisionError" in message
    )


def test_a_raising_row_is_skipped_alone():
    """reward.on_error=skip: the batch call raises on row 1; rows 0 and 2 keep their scores."""
    scores, valid, _, metrics = score_completions(
        [WeightedReward("fragile", _raises_on_b, 1.0)], ["p"] * 3, ["a", "b", "c"], {}, on_error="skip"
    )
    assert valid.tolist() == [True, False, True] and scores[[0, 2]].tolist() == [1.0, 1.0]
    assert metrics["reward/fragile/errors"] == 1


def _hangs_on_b(prompts, completions, **_):
    import time

    if "b" in completions:
        time.sleep(30)  # a reward that never comes back in time
    return [1.0] * len(completions)


def test_a_hanging_reward_times_out_and_names_the_row():
    """reward.timeout_s: the hanging row is a failure, the run is not held."""
    import time

    started = time.monotonic()
    reward = [WeightedReward("slow", _hangs_on_b, 1.0)]
    scores, valid, _, metrics = score_completions(
        reward, ["p"] * 3, ["a", "b", "c"], {}, on_error="skip", timeout_s=0.5
    )
    assert valid.tolist() == [True, False, True] and metrics["reward/slow/errors"] == 1
    with pytest.raises(
        RewardError, match=r"'slow' failed on row 1 .*did not return within reward.timeout_s=0.5"
    ):
        score_completions(reward, ["p0", "p1", "p2"], ["a", "b", "c"], {}, timeout_s=0.5)
    assert time.monotonic() - started < 10


def test_nan_reward_names_function_and_row():
    def nan_reward(prompts, completions, **_):
        return [0.0, float("nan")]

    with pytest.raises(RewardError, match=r"'nan_reward' returned nan for row 1"):
        score_completions([WeightedReward("nan_reward", nan_reward, 1.0)], ["a", "b"], ["x", "y"], {})
    scores, valid, _, metrics = score_completions(
        [WeightedReward("nan_reward", nan_reward, 1.0)], ["a", "b"], ["x", "y"], {}, on_error="skip"
    )
    assert valid.tolist() == [True, False] and metrics["reward/nan_reward/errors"] == 1


def test_wrong_length_is_an_error():
    with pytest.raises(RewardError, match="returned 1 values for 2"):
        score_completions([WeightedReward("short", lambda p, c, **_: [1.0], 1.0)], ["a", "b"], ["x", "y"], {})


def test_resolve_by_import_path():
    assert resolve_reward("rewards.answer:exact_match", {}) is exact_match
    with pytest.raises(RewardError, match="not one of"):
        resolve_reward("nope", {"exact_match": exact_match})


def test_scores_are_float_tensors():
    scores, valid, _, _ = score_completions(
        [WeightedReward("exact_match", exact_match, 1.0)], ["p"], ["1"], {"answer": ["1"]}
    )
    assert scores.dtype == torch.float32 and valid.dtype == torch.bool


@pytest.mark.parametrize("value", ["1.0", [1.0], object()])
def test_a_reward_that_returns_a_non_number_is_an_error_naming_it(value):
    def sloppy(prompts, completions, **_):
        return [1.0, value]

    with pytest.raises(
        RewardError, match=r"reward function 'sloppy' returned .* for row 1; a reward must be a number"
    ):
        score_completions([WeightedReward("sloppy", sloppy, 1.0)], ["p", "q"], ["a", "b"], {})


def test_numpy_and_tensor_scalars_are_numbers():
    import numpy as np

    def typed(prompts, completions, **_):
        return [np.float32(0.5), torch.tensor(2.0)]

    scores, valid, _, _ = score_completions([WeightedReward("typed", typed, 1.0)], ["p", "q"], ["a", "b"], {})
    assert scores.tolist() == [0.5, 2.0] and valid.all()


def test_an_episode_is_scored_on_the_model_s_turns_not_the_tool_results():
    episode = [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "f"}}]},
        {"role": "tool", "name": "f", "content": "42"},
        {"role": "assistant", "content": "I do not know."},
    ]
    assert exact_match(["p"], [episode], answer=["42"]) == [0.0]
    episode[-1]["content"] = "42"
    assert exact_match(["p"], [episode], answer=["42"]) == [1.0]
