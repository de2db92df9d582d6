"""Synthetic preference pairs that need no download: a correct and a corrupted answer.

For each addition problem of `make_addition_task`, `chosen` is the correct (reversed) answer and
`rejected` the same answer with one digit changed, so a reward model can learn to tell them apart.
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

from rlhf.data.arithmetic import make_addition_task


def corrupt(answer: str, rng: random.Random) -> str:
    position = rng.randrange(len(answer))
    wrong = rng.choice([d for d in "0123456789" if d != answer[position]])
    return answer[:position] + wrong + answer[position + 1 :]


def make_addition_preferences(num_digits: int = 2, eval_size: int = 1000, seed: int = 0) -> DatasetDict:
    task = make_addition_task(num_digits, eval_size, seed)
    rng = random.Random(seed + 1)

    def add_pair(row):
        return {"chosen": row["answer"], "rejected": corrupt(row["answer"], rng)}

    return DatasetDict({name: split.map(add_pair) for name, split in task.items()})


def label_pairs(
    prompts: list[str],
    first: list[str],
    second: list[str],
    gold_first: list[float | None],
    gold_second: list[float | None],
    columns: dict[str, list] | None = None,
) -> Dataset:
    """Preference rows from two completions per prompt and a gold score for each: the higher one is
    chosen; ties and unscorable pairs are dropped. Extra columns are kept."""
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], "gold_margin": []}
    extra = {k: [] for k in (columns or {})}
    for index, (a, b, ga, gb) in enumerate(zip(first, second, gold_first, gold_second)):
        if ga is None or gb is None or ga == gb:
            continue
        chosen, rejected = (a, b) if ga > gb else (b, a)
        rows["prompt"].append(prompts[index])
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
        rows["gold_margin"].append(abs(ga - gb))
        for key in extra:
            extra[key].append(columns[key][index])
    return Dataset.from_dict({**rows, **extra})
