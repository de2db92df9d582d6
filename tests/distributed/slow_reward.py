"""A reward that takes a moment, so a test can kill a run between two checkpoints."""

import time

from rewards import exact_match


def slow_exact_match(prompts, completions, **columns):
    time.sleep(0.4)
    return exact_match(prompts, completions, **columns)
