"""Verifiable-answer rewards: exact match against a reference column, answer format, and the
verifiers of tasks with many correct answers (sums to a target, grouped digits)."""

from __future__ import annotations

import re
from typing import Any

_DIGITS = re.compile(r"\d+")

Completion = str | list[dict[str, Any]]


def completion_text(completion: Completion) -> str:
    """The text of a completion as TRL passes it: a string, or (conversational prompts) a list of
    messages whose assistant contents are joined (an episode's tool results are not the model's
    answer, so they are left out)."""
    if isinstance(completion, str):
        return completion
    return "".join(
        str(m.get("content") or "") for m in completion if m.get("role", "assistant") == "assistant"
    )


def exact_match(
    prompts: list[str], completions: list[Completion], answer: list[Any], **_: Any
) -> list[float | None]:
    """1.0 when the completion (surrounding white space ignored) equals the `answer` column, else 0.0.

    A row without a reference answer cannot be scored and gets None.
    """
    return [
        None if ref is None else float(text.strip() == str(ref).strip())
        for text, ref in zip(map(completion_text, completions), answer)
    ]


def answer_format(
    prompts: list[str], completions: list[Completion], answer: list[Any] | None = None, **_: Any
) -> list[float | None]:
    """1.0 when the completion is a plain number (digits only), and as long as the reference when given."""
    scores: list[float | None] = []
    for index, text in enumerate(map(completion_text, completions)):
        text = text.strip()
        ok = bool(_DIGITS.fullmatch(text))
        if ok and answer is not None and answer[index] is not None:
            ok = len(text) == len(str(answer[index]).strip())
        scores.append(float(ok))
    return scores


def digit_match(
    prompts: list[str], completions: list[Completion], answer: list[Any], **_: Any
) -> list[float | None]:
    """Fraction of the reference answer's characters matched position by position (extra or missing
    characters count as wrong): partial credit, used as the hidden gold score of the synthetic
    RLHF pipeline."""
    scores: list[float | None] = []
    for text, ref in zip(map(completion_text, completions), answer):
        if ref is None:
            scores.append(None)
            continue
        text, ref = text.strip(), str(ref).strip()
        hits = sum(1 for a, b in zip(text, ref) if a == b)
        scores.append(hits / max(len(ref), len(text), 1))
    return scores


_SUM = re.compile(r"\d+(?: *\+ *\d+)+")


def sum_to_target(
    prompts: list[str], completions: list[Completion], target: list[Any], **_: Any
) -> list[float | None]:
    """1.0 when the completion is two or more positive numbers joined by "+" adding up to `target`."""
    scores: list[float | None] = []
    for text, goal in zip(map(completion_text, completions), target):
        text = text.strip()
        if goal is None:
            scores.append(None)
            continue
        parts = [int(p) for p in text.split("+")] if _SUM.fullmatch(text) else []
        scores.append(float(bool(parts) and min(parts) >= 1 and sum(parts) == int(goal)))
    return scores


_DIGIT_LIST = re.compile(r"\d(,\d)*")


def grouped_digits(prompts: list[Completion], completions: list[Completion], **_: Any) -> list[float | None]:
    """1.0 when the completion lists the prompt's digits (the "d,d,...=" before its "=") with each
    value's copies next to each other, the values in any order (the `group` task's verifier)."""
    scores: list[float | None] = []
    for prompt, text in zip(map(completion_text, prompts), map(completion_text, completions)):
        given = prompt.strip().rsplit("=", 1)[0].rsplit("\n", 1)[-1].strip()
        text = text.strip()
        if not _DIGIT_LIST.fullmatch(given):
            scores.append(None)  # not a grouping prompt: nothing to verify against
            continue
        if not _DIGIT_LIST.fullmatch(text):
            scores.append(0.0)
            continue
        digits = text.split(",")
        runs = 1 + sum(a != b for a, b in zip(digits, digits[1:]))
        scores.append(float(sorted(digits) == sorted(given.split(",")) and runs == len(set(digits))))
    return scores
