"""Rewards for the fault tests: ones that take a moment, so a test can kill a run between two
checkpoints, and one that never returns on rank 1 after its first call (a hung rank)."""

import os
import time

from rewards import exact_match

_calls = {"n": 0}


def slow_exact_match(prompts, completions, **columns):
    time.sleep(0.4)
    return exact_match(prompts, completions, **columns)


def slow_digit_sum(prompts, completions, **columns):
    """The digits of the completion summed: spread on a random policy's samples, so every step has
    non-zero advantages and gradients (exact match scores such a policy 0 everywhere)."""
    time.sleep(0.4)
    return [float(sum(int(c) for c in text if c.isdigit())) for text in completions]


def hangs_on_rank_1(prompts, completions, **columns):
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] > 1:
        time.sleep(3600)
    return exact_match(prompts, completions, **columns)
