"""Synthetic task with many correct answers, for output diversity (CD-RLHF): write positive
one-digit numbers that add up to the target. "17=" is answered by "8 + 9", "9 + 8", "5 + 6 + 6"...

Train rows pair each target with one random decomposition (2 to `max_parts` parts, each 1-9), so
SFT sees many different correct answers; the eval split holds each target once. Parts are separated
by " + ", so the diversity metrics' whitespace tokens are the numbers and the plus signs.
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

MIN_TARGET = 4


def random_decomposition(target: int, max_parts: int, rng: random.Random) -> list[int]:
    """Uniform over the feasible part counts, then a random composition with parts in 1..9."""
    counts = [k for k in range(2, max_parts + 1) if k <= target <= 9 * k]
    if not counts:
        raise ValueError(f"target {target} cannot be written with 2..{max_parts} parts of 1-9")
    count = rng.choice(counts)
    while True:
        parts = [rng.randint(1, 9) for _ in range(count - 1)]
        last = target - sum(parts)
        if 1 <= last <= 9:
            return [*parts, last]


def make_sum_task(
    max_target: int = 30, max_parts: int = 4, train_rows: int = 20000, seed: int = 0
) -> DatasetDict:
    """Columns: prompt ("17="), answer (one decomposition, the SFT target), target."""
    if not MIN_TARGET <= max_target <= 9 * max_parts:
        raise ValueError(f"data.sum_max_target={max_target} must be in {MIN_TARGET}..{9 * max_parts}")
    rng = random.Random(seed)
    targets = list(range(MIN_TARGET, max_target + 1))

    def rows(chosen: list[int]) -> Dataset:
        answers = [" + ".join(map(str, random_decomposition(t, max_parts, rng))) for t in chosen]
        return Dataset.from_dict({"prompt": [f"{t}=" for t in chosen], "answer": answers, "target": chosen})

    return DatasetDict(
        train=rows([rng.choice(targets) for _ in range(train_rows)]),
        eval=rows(targets),
    )
