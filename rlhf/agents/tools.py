"""The tools of an episode, as TRL's GRPOTrainer takes them: plain Python functions (sync or async)
whose JSON schema transformers' `get_json_schema` builds from their type hints and Google-style
docstring, plus the public methods of the episode's environment.

A call never stops the run: malformed arguments, an unknown tool, wrong arguments, an exception
or a call past `rollout.tool_timeout_s` become the tool's result, `{'error': ...}` as TRL writes
it, for the model to read in its next turn, and are counted as tool errors.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from transformers.utils import get_json_schema

from rlhf.calls import CallTimeout, call_with_timeout
from rlhf.config import ConfigError


def import_object(spec: str, setting: str) -> Any:
    """The object named by "package.module:name"; errors name the setting."""
    module_name, _, attribute = str(spec).partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{setting}={spec!r}: write it as 'package.module:name'")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{setting}={spec!r} could not be imported: {exc}") from exc


_SCHEMAS: dict[Any, dict[str, Any]] = {}  # by function: every episode renders its tools' schemas


def tool_schema(fn: Callable[..., Any], setting: str = "rollout.tools") -> dict[str, Any]:
    """The JSON schema the chat template renders for `fn` (from its type hints and docstring),
    built once per function (an environment's instances share their methods' schemas)."""
    key = getattr(fn, "__func__", fn)
    if key in _SCHEMAS:
        return _SCHEMAS[key]
    try:
        _SCHEMAS[key] = get_json_schema(fn)
        return _SCHEMAS[key]
    except Exception as exc:  # noqa: BLE001 - transformers raises several kinds here
        name = getattr(fn, "__name__", repr(fn))
        raise ConfigError(
            f"{setting}: tool {name!r} has no usable schema ({exc}); a tool needs type hints on every argument "
            "and a Google-style docstring with an Args: section"
        ) from exc


@dataclass
class ToolResult:
    name: str
    content: str
    error: bool


class Toolbox:
    """The callables one episode may call, by name."""

    def __init__(self, functions: list[Callable[..., Any]], timeout_s: float | None = None):
        self.functions = {fn.__name__: fn for fn in functions}
        self.timeout_s = timeout_s

    def __bool__(self) -> bool:
        return bool(self.functions)

    def schemas(self) -> list[dict[str, Any]]:
        return [tool_schema(fn) for fn in self.functions.values()]

    def call(self, tool_call: dict[str, Any]) -> ToolResult:
        """Run one parsed tool call ({"type": "function", "function": {"name", "arguments"}})."""
        function = tool_call.get("function", tool_call) if isinstance(tool_call, dict) else {}
        name = str(function.get("name", "unknown")) if isinstance(function, dict) else "unknown"
        try:
            arguments = _arguments(function)
            if name not in self.functions:
                raise LookupError(f"Tool {name} not found; the tools are {sorted(self.functions)}")
            value = call_with_timeout(self.functions[name], self.timeout_s, **arguments)
        except CallTimeout as exc:
            return ToolResult(name, str({"error": f"Tool {name} {exc}"}), error=True)
        except Exception as exc:  # noqa: BLE001 - the model reads the error, the run goes on
            return ToolResult(name, str({"error": str(exc)}), error=True)
        return ToolResult(name, value if isinstance(value, str) else str(value), error=False)


def _arguments(function: dict[str, Any]) -> dict[str, Any]:
    arguments = function.get("arguments") or {}
    if isinstance(arguments, str):  # some parsers leave the JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the arguments are not valid JSON: {exc}") from exc
    if not isinstance(arguments, dict):
        raise ValueError(f"the arguments must be an object of named values, got {arguments!r}")
    return arguments


def load_tools(specs: list[str]) -> list[Callable[..., Any]]:
    """`rollout.tools` entries ("module:function") as callables, their schemas checked now."""
    tools = []
    for spec in specs:
        fn = import_object(spec, "rollout.tools")
        if not callable(fn):
            raise ConfigError(f"rollout.tools: {spec!r} is not callable")
        tool_schema(fn)
        tools.append(fn)
    names = [fn.__name__ for fn in tools]
    if len(set(names)) != len(names):
        raise ConfigError(f"rollout.tools: two tools share a name: {names}")
    return tools
