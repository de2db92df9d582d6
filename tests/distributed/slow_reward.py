"""Rewards for the fault tests: one that takes a moment, so a test can kill a run between two
checkpoints, and one that never returns on rank 1 after its first call (a hung rank)."""

import os
import time

from rewards import exact_match

_calls = {"n": 0}


def slow_exact_match(prompts, completions, **columns):
    time.sleep(0.4)
    return exact_match(prompts, completions, **columns)


def hangs_on_rank_1(prompts, completions, **columns):
    _calls["n"] += 1
    if os.environ.get("RANK") == "1" and _calls["n"] > 1:
        time.sleep(3600)
    return exact_match(prompts, completions, **columns)
