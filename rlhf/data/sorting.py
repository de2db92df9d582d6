"""Synthetic task with long responses and one verifiable answer: sort a list of digits.

"7,3,9,1=" is answered by "1,3,7,9". With `length` digits the response is 2 * length - 1 tokens of
the character tokenizer (31 at the default 16), and the only reward is at its end (exact match), so
credit has to travel over the whole response: the setting macro actions (MA-RLHF) and token-level
rewards are meant for. Writing the sorted list means counting each digit, which a tiny transformer
learns gradually, so an SFT warm start can stop part way (the presets stop at a check accuracy).

Train rows are drawn at random (seeded); the held-out split is `eval_size` further draws, none of
them a training prompt.
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict


def format_sort_problem(digits: list[int], separator: str = ",") -> tuple[str, str]:
    """(prompt, answer) for one list."""
    return separator.join(map(str, digits)) + "=", separator.join(map(str, sorted(digits)))


def make_sort_task(
    length: int = 16, eval_size: int = 1000, train_rows: int = 50_000, seed: int = 0, separator: str = ","
) -> DatasetDict:
    """Columns: prompt, answer. Lists of `length` digits 0-9."""
    if length < 2:
        raise ValueError(f"data.sort_length must be >= 2, got {length}")
    rng = random.Random(seed)
    held_out: dict[str, str] = {}
    while len(held_out) < eval_size:
        prompt, answer = format_sort_problem([rng.randrange(10) for _ in range(length)], separator)
        held_out[prompt] = answer
    train: dict[str, str] = {}
    while len(train) < train_rows:
        prompt, answer = format_sort_problem([rng.randrange(10) for _ in range(length)], separator)
        if prompt not in held_out:
            train[prompt] = answer

    def rows(problems: dict[str, str]) -> Dataset:
        return Dataset.from_dict({"prompt": list(problems), "answer": list(problems.values())})

    return DatasetDict(train=rows(train), eval=rows(held_out))
