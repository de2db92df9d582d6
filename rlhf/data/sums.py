"""Synthetic task with many correct answers, for output diversity (CD-RLHF): write positive
one-digit numbers that add up to the target. "17=" is answered by "8 + 9", "9 + 8", "5 + 6 + 6"...

Train rows pair each target with one random decomposition (2 to `max_parts` parts, each 1-9), so
SFT sees many different correct answers; the eval split holds each target once. Parts are separated
by " + ", so the diversity metrics' whitespace tokens are the numbers and the plus signs.
With `min_parts` (say 12, targets 30-80) every answer is long (45 tokens) and still one of
countless correct ones: the long-response setting for the diversity studies.
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict

MIN_TARGET = 4


def random_decomposition(target: int, max_parts: int, rng: random.Random, min_parts: int = 2) -> list[int]:
    """Uniform over the feasible part counts, then a random composition with parts in 1..9."""
    counts = [k for k in range(min_parts, max_parts + 1) if k <= target <= 9 * k]
    if not counts:
        raise ValueError(f"target {target} cannot be written with {min_parts}..{max_parts} parts of 1-9")
    count = rng.choice(counts)
    while True:
        parts = [rng.randint(1, 9) for _ in range(count - 1)]
        last = target - sum(parts)
        if 1 <= last <= 9:
            return [*parts, last]


def make_sum_task(
    max_target: int = 30,
    max_parts: int = 4,
    train_rows: int = 20000,
    seed: int = 0,
    min_parts: int = 2,
    min_target: int = MIN_TARGET,
) -> DatasetDict:
    """Columns: prompt ("17="), answer (one decomposition, the SFT target), target. Targets
    `min_target`..`max_target`, each written with `min_parts`..`max_parts` parts."""
    if not 2 <= min_parts <= max_parts:
        raise ValueError(f"data.sum_min_parts={min_parts} must be in 2..data.sum_max_parts={max_parts}")
    low = max(min_target, min_parts, MIN_TARGET)
    if not low <= max_target <= 9 * max_parts:
        raise ValueError(f"data.sum_max_target={max_target} must be in {low}..{9 * max_parts}")
    rng = random.Random(seed)
    targets = list(range(low, max_target + 1))

    def rows(chosen: list[int]) -> Dataset:
        answers = [" + ".join(map(str, random_decomposition(t, max_parts, rng, min_parts))) for t in chosen]
        return Dataset.from_dict({"prompt": [f"{t}=" for t in chosen], "answer": answers, "target": chosen})

    return DatasetDict(
        train=rows([rng.choice(targets) for _ in range(train_rows)]),
        eval=rows(targets),
    )
