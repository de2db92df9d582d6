"""A code-execution reward: the completion's program runs with the row's tests in the sandbox of
rlhf/agents/sandbox.py (its own process, time, memory, file and process limits, no network where
the machine allows it); 1.0 when it exits cleanly, 0.0 otherwise (a crash, a failed assert, a
time-out, anything the sandbox stopped)."""

from __future__ import annotations

from typing import Any

from rlhf.agents.sandbox import code_block, run_python


def code_tests(prompts: list[Any], completions: list[Any], tests: list[str], **columns: Any) -> list[float]:
    """1.0 where the completion's last ```python block (or its whole text), followed by the row's
    `tests` column (asserts), runs to exit code 0."""
    return [float(run_python(f"{code_block(c)}\n\n{t}\n").ok) for c, t in zip(completions, tests)]
