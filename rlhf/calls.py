"""Calling user code (reward functions, tools): sync or async, with an optional wall-clock limit.

A call that overruns raises `CallTimeout`; it goes on in its daemon thread, which nobody waits for
(Python cannot stop a thread; code that must be killed runs in a process: rlhf/agents/sandbox.py).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable
from typing import Any


class CallTimeout(TimeoutError):
    """A call did not return within its limit."""


def call_maybe_async(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs); a coroutine function (or a call that returns an awaitable) is run to
    completion on an event loop of its own."""
    value = fn(*args, **kwargs)
    if inspect.isawaitable(value):
        return asyncio.run(_awaited(value))
    return value


async def _awaited(value: Any) -> Any:
    return await value


def call_with_timeout(fn: Callable[..., Any], timeout_s: float | None, *args: Any, **kwargs: Any) -> Any:
    """`call_maybe_async(fn, ...)`, or CallTimeout when it has not returned after `timeout_s` seconds
    (None: no limit)."""
    if timeout_s is None:
        return call_maybe_async(fn, *args, **kwargs)
    outcome: dict[str, Any] = {}

    def call() -> None:
        try:
            outcome["value"] = call_maybe_async(fn, *args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    worker = threading.Thread(target=call, daemon=True, name=f"call-{getattr(fn, '__name__', 'fn')}")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise CallTimeout(f"did not return within {timeout_s} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
