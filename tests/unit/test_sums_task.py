"""The "sums" task (many correct answers) and its reward."""

from rewards import sum_to_target
from rlhf.data.sums import make_sum_task


def test_every_training_answer_is_correct_and_varied():
    data = make_sum_task(max_target=20, train_rows=500, seed=1)
    train = data["train"]
    assert sum_to_target(list(train["prompt"]), list(train["answer"]), list(train["target"])) == [1.0] * 500
    assert len(data["eval"]) == 17  # targets 4..20 once each
    answers_for_12 = {a for a, t in zip(train["answer"], train["target"]) if t == 12}
    assert len(answers_for_12) > 3


def test_reward_by_hand():
    scores = sum_to_target(["9="] * 6, ["4 + 5", "4+5", "9", "3 + 3", "0 + 9", "4 + 5 +"], [9] * 6)
    assert scores == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
