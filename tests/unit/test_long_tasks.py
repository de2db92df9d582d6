"""Long-response synthetic tasks: sorting digit lists (one exact answer of 2n - 1 tokens), grouping
them (each value's copies together, the values in any order: k! answers), and the sums task with many
parts (countless correct answers of 45 tokens); their verifiers, splits and presets."""

from __future__ import annotations

import pytest

from rewards import exact_match, grouped_digits, sum_to_target
from rlhf.data.load import load_task_data
from rlhf.data.sorting import format_sort_problem, make_sort_task
from rlhf.data.sums import make_sum_task
from tests.recipes.conftest import compose_recipe_config


def test_sort_problem_by_hand():
    assert format_sort_problem([7, 3, 9, 1, 3]) == ("7,3,9,1,3=", "1,3,3,7,9")


def test_sort_task_splits_are_disjoint_and_answers_verify():
    data = make_sort_task(length=16, eval_size=200, train_rows=2000, seed=3)
    train, held_out = data["train"], data["eval"]
    assert len(train) == 2000 and len(held_out) == 200
    assert not set(train["prompt"]) & set(held_out["prompt"])
    assert all(len(a) == 31 for a in train["answer"])  # 16 digits and 15 commas
    assert exact_match(list(train["prompt"]), list(train["answer"]), list(train["answer"])) == [1.0] * 2000
    # the last two digits out of order, or one digit too many, is not the answer
    swapped = [a[:-3] + a[-1] + a[-2] + a[-3] if a[-1] != a[-3] else a + ",0" for a in train["answer"][:50]]
    assert exact_match([""] * 50, swapped, list(train["answer"][:50])) == [0.0] * 50
    with pytest.raises(ValueError, match="sort_length"):
        make_sort_task(length=1)


def test_validation_lists_are_carved_from_training_and_leave_held_out_alone():
    plain = make_sort_task(length=8, eval_size=100, train_rows=1000, seed=3)
    carved = make_sort_task(length=8, eval_size=100, train_rows=1000, seed=3, validation_size=150)
    assert list(carved["eval"]["prompt"]) == list(plain["eval"]["prompt"])
    assert len(carved["validation"]) == 150 and len(carved["train"]) == 850
    assert set(carved["validation"]["prompt"]) | set(carved["train"]["prompt"]) == set(
        plain["train"]["prompt"]
    )
    assert not set(carved["validation"]["prompt"]) & set(carved["train"]["prompt"])
    cfg = compose_recipe_config(
        "ppo", ["+experiment=ppo_long_sort", "data.validation_size=300", "data.eval_split=validation"]
    )
    train, held_out = load_task_data(cfg.data)
    assert len(held_out) == 300 and not set(held_out["prompt"]) & set(train["prompt"])
    with pytest.raises(ValueError, match="validation_size"):
        make_sort_task(length=8, train_rows=100, validation_size=100)


@pytest.mark.parametrize(
    "completion, score",
    [
        ("3,3,1,7", 1.0),  # 3s together, then the rest
        ("7,1,3,3", 1.0),  # any order of the values
        ("1,3,3,7", 1.0),  # sorted is one grouping among 3! = 6
        ("3,1,3,7", 0.0),  # the 3s apart
        ("3,3,1", 0.0),  # a digit missing
        ("3,3,1,7,7", 0.0),  # a digit too many
        ("3,3,1,8", 0.0),  # a digit changed
        ("3,3,1,7,", 0.0),  # not a digit list
        ("", 0.0),
    ],
)
def test_grouping_verifier_by_hand(completion, score):
    assert grouped_digits(["7,3,1,3="], [completion]) == [score]


def test_grouping_task_answers_verify_in_many_orders():
    data = make_sort_task(length=16, eval_size=200, train_rows=2000, seed=3, grouped=True)
    train, held_out = data["train"], data["eval"]
    assert not set(train["prompt"]) & set(held_out["prompt"])
    assert all(len(a) == 31 for a in train["answer"])
    assert grouped_digits(list(train["prompt"]), list(train["answer"])) == [1.0] * 2000
    sorted_answers = [format_sort_problem([int(d) for d in p[:-1].split(",")])[1] for p in train["prompt"]]
    assert grouped_digits(list(train["prompt"]), sorted_answers) == [1.0] * 2000
    assert sum(a != s for a, s in zip(train["answer"], sorted_answers)) > 1900  # random value orders
    assert grouped_digits(["not a list"], ["1"]) == [None]


def test_long_sums_have_exactly_the_parts_asked_for_and_many_answers():
    data = make_sum_task(max_target=80, max_parts=12, min_parts=12, min_target=30, train_rows=3000, seed=2)
    train = data["train"]
    assert set(data["eval"]["target"]) == set(range(30, 81))
    assert all(len(a.split(" + ")) == 12 for a in train["answer"])
    assert sum_to_target(list(train["prompt"]), list(train["answer"]), list(train["target"])) == [1.0] * 3000
    answers_for_50 = {a for a, t in zip(train["answer"], train["target"]) if t == 50}
    assert len(answers_for_50) == sum(1 for t in train["target"] if t == 50) > 20  # all distinct
    with pytest.raises(ValueError, match="sum_max_target"):
        make_sum_task(max_target=120, max_parts=12, min_parts=12)  # 12 parts of 1-9 reach 108


@pytest.mark.parametrize("task, reward", [("sort", "exact_match"), ("group", "grouped_digits")])
def test_sft_presets_compose(task, reward):
    cfg = compose_recipe_config("sft", [f"+experiment=sft_{task}"])
    assert cfg.data.source == task and cfg.data.response_budget == 34 and cfg.accuracy_reward == reward
    assert cfg.eval.max_new_tokens == 34 and cfg.train.stop_at_accuracy == 0.25
    train, held_out = load_task_data(cfg.data)
    assert (
        len(held_out) == 1000 and grouped_digits(train["prompt"][:100], train["answer"][:100]) == [1.0] * 100
    )
