"""Synthetic tasks with long responses and a verifier: sort a list of digits (one correct answer), or
group it (equal digits side by side, the groups in any order: thousands of correct answers).

"7,3,9,1=" is answered by "1,3,7,9". With `length` digits the response is 2 * length - 1 tokens of
the character tokenizer (31 at the default 16), and the only reward is at its end (exact match), so
credit has to travel over the whole response: the setting macro actions (MA-RLHF) and token-level
rewards are meant for. Writing the sorted list means counting each digit, which a tiny transformer
learns gradually, so an SFT warm start can stop part way (the presets stop at a check accuracy).

"data.source=group" asks for the same digits with every value's copies next to each other, the
values in any order: "7,3,9,3=" is answered by "3,3,7,9", "9,7,3,3", ... (k! answers for k distinct
values, about 40,000 for 16 digits). The verifier is `rewards.grouped_digits`; the `answer` column
holds one correct grouping (the values in a random order) for SFT, so the warm start has seen many
orders. This is the diversity study's task: reward and diversity can grow together.

Train rows are drawn at random (seeded); the held-out split is `eval_size` further draws, none of
them a training prompt.
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict


def format_sort_problem(digits: list[int], separator: str = ",") -> tuple[str, str]:
    """(prompt, answer) for one list."""
    return separator.join(map(str, digits)) + "=", separator.join(map(str, sorted(digits)))


def format_group_problem(digits: list[int], rng: random.Random, separator: str = ",") -> tuple[str, str]:
    """(prompt, one correct answer): each value's copies together, the values in a random order."""
    values = sorted(set(digits))
    rng.shuffle(values)
    grouped = [value for value in values for _ in range(digits.count(value))]
    return separator.join(map(str, digits)) + "=", separator.join(map(str, grouped))


def make_sort_task(
    length: int = 16,
    eval_size: int = 1000,
    train_rows: int = 50_000,
    seed: int = 0,
    separator: str = ",",
    grouped: bool = False,
    validation_size: int = 0,
) -> DatasetDict:
    """Columns: prompt, answer. Lists of `length` digits 0-9; `grouped`: the grouping task.
    `validation_size` > 0 moves the first that many training lists to a "validation" split (for
    tuning on lists that are neither trained on nor held out); 0 leaves the splits as they were."""
    if length < 2:
        raise ValueError(f"data.sort_length must be >= 2, got {length}")
    rng = random.Random(seed)

    def problem() -> tuple[str, str]:
        digits = [rng.randrange(10) for _ in range(length)]
        return (
            format_group_problem(digits, rng, separator)
            if grouped
            else format_sort_problem(digits, separator)
        )

    held_out: dict[str, str] = {}
    while len(held_out) < eval_size:
        prompt, answer = problem()
        held_out[prompt] = answer
    train: dict[str, str] = {}
    while len(train) < train_rows:
        prompt, answer = problem()
        if prompt not in held_out:
            train[prompt] = answer

    def rows(problems: dict[str, str]) -> Dataset:
        return Dataset.from_dict({"prompt": list(problems), "answer": list(problems.values())})

    if not 0 <= validation_size < train_rows:
        raise ValueError(f"data.validation_size must be in [0, {train_rows}), got {validation_size}")
    if not validation_size:
        return DatasetDict(train=rows(train), eval=rows(held_out))
    carved = list(train)[:validation_size]
    validation = {prompt: train.pop(prompt) for prompt in carved}
    return DatasetDict(train=rows(train), validation=rows(validation), eval=rows(held_out))
