"""Synthetic multi-digit addition, a verifiable task that needs no download.

Everything is written lowest digit first: operands are zero-padded and reversed, and the answer
(num_digits + 1 digits, zero-padded) is reversed too. 93 + 02 = 095 is written "39+20=" with answer
"590". Reversal lets a tiny transformer emit carries in the order it computes them, which is what
makes 2-digit addition learnable by a 0.26M-parameter model in about a minute on a CPU.

The split is fixed by `seed`: `eval_size` problems are held out, the rest are for training.
"""

from __future__ import annotations

import random

from datasets import Dataset, DatasetDict


def format_problem(a: int, b: int, num_digits: int, reverse: bool = True) -> tuple[str, str]:
    """(prompt, answer) for a + b."""
    left, right = f"{a:0{num_digits}d}", f"{b:0{num_digits}d}"
    total = f"{a + b:0{num_digits + 1}d}"
    if reverse:
        left, right, total = left[::-1], right[::-1], total[::-1]
    return f"{left}+{right}=", total


def make_addition_task(
    num_digits: int = 2, eval_size: int = 1000, seed: int = 0, reverse: bool = True
) -> DatasetDict:
    """All ordered pairs of num_digits-digit operands, split into `train` and `eval`.

    Columns: prompt, answer, a, b. For num_digits > 3 a random sample of 100,000 pairs is used.
    """
    if num_digits < 1:
        raise ValueError(f"data.num_digits must be >= 1, got {num_digits}")
    limit = 10**num_digits
    rng = random.Random(seed)
    if limit * limit <= 1_000_000:
        pairs = [(a, b) for a in range(limit) for b in range(limit)]
        rng.shuffle(pairs)
    else:
        pairs = list({(rng.randrange(limit), rng.randrange(limit)) for _ in range(100_000)})
        rng.shuffle(pairs)
    if not 0 < eval_size < len(pairs):
        raise ValueError(f"data.eval_size={eval_size} must be between 1 and {len(pairs) - 1}")

    def build(chunk: list[tuple[int, int]]) -> Dataset:
        rows = [format_problem(a, b, num_digits, reverse) for a, b in chunk]
        return Dataset.from_dict(
            {
                "prompt": [p for p, _ in rows],
                "answer": [s for _, s in rows],
                "a": [a for a, _ in chunk],
                "b": [b for _, b in chunk],
            }
        )

    return DatasetDict(eval=build(pairs[:eval_size]), train=build(pairs[eval_size:]))
