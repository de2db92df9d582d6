"""Task reward functions: `(prompts, completions, **columns) -> list[float | None]`.

Each is pure and sees the dataset's extra columns as keyword lists aligned with `completions`.
Return None for a completion that cannot be scored; it is left out of the group statistics.
Config names a function from `REWARD_FUNCTIONS`, or any importable "package.module:function".
"""

from rewards.answer import answer_format, digit_match, exact_match, grouped_digits, sum_to_target
from rewards.code import code_tests

REWARD_FUNCTIONS = {
    "exact_match": exact_match,
    "answer_format": answer_format,
    "digit_match": digit_match,
    "sum_to_target": sum_to_target,
    "grouped_digits": grouped_digits,
    "code_tests": code_tests,
}

__all__ = [
    "REWARD_FUNCTIONS",
    "answer_format",
    "code_tests",
    "digit_match",
    "exact_match",
    "grouped_digits",
    "sum_to_target",
]
