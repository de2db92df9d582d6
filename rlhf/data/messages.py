"""Conversations beyond plain text turns, as OpenAI-format and TRL datasets hold them: content
given as a list of text parts, assistant turns that call tools (`tool_calls`, with `content` null),
a `tools` column of function schemas, and the token mask of every assistant turn of a multi-turn
conversation (SFT's `train.assistant_only_loss`).

Arrow stores nested dicts as structs whose keys are the union over all rows, filling absent keys
with None; `without_nulls` drops those before anything reaches a chat template.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from transformers import PreTrainedTokenizerBase

from rlhf.data.load import DataError


def without_nulls(value: Any) -> Any:
    """`value` with every None-valued dict key removed, at any depth (Arrow's struct filling)."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def message_text(content: Any, column: str, row: int, where: str) -> str:
    """A message's content as text: a string, or OpenAI's list of parts with the text parts joined.
    Other parts (images, audio) need a multimodal model and are refused naming the row."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in map(without_nulls, content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise DataError(
                    f"{where}: row {row} column {column!r} has a content part {part!r}; only text parts "
                    "({'type': 'text', 'text': ...}) can be fed to a text model"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"{where}: row {row} column {column!r} has non-text content {content!r}")


def clean_tool_calls(message: dict[str, Any], column: str, row: int, where: str) -> list[dict[str, Any]]:
    """An assistant turn's `tool_calls`, checked: a list of {"type": "function", "function":
    {"name", "arguments"}} (arguments a dict or a JSON string), as chat templates read them."""
    calls = without_nulls(message["tool_calls"])
    if message.get("role") != "assistant" or not isinstance(calls, list):
        raise DataError(
            f"{where}: row {row} column {column!r} has tool_calls {calls!r} on a {message.get('role')!r} turn; "
            "tool_calls is a list on assistant turns"
        )
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise DataError(
                f"{where}: row {row} column {column!r} has a tool call {call!r} without function.name; "
                "the format is {'type': 'function', 'function': {'name': ..., 'arguments': {...}}}"
            )
    return calls


def parse_tools(value: Any, column: str, row: int, where: str) -> list[dict[str, Any]] | None:
    """A row's `tools` (function schemas for the chat template): a list of dicts, or that list as
    a JSON string; None or empty for no tools."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: row {row} column {column!r} is not JSON: {exc}") from exc
    value = without_nulls(value)
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise DataError(f"{where}: row {row} column {column!r} is {value!r}, not a list of tool schemas")
    return value


def _tool_name(tool: dict[str, Any]) -> str | None:
    return (tool.get("function") or tool).get("name")


class ToolRenderingCheck:
    """Rows whose tool calls or tool schemas the chat template left out of the rendered text (a
    template without tool support drops them silently); warned about once per dataset."""

    def __init__(self, where: str):
        self.where = where
        self.dropped_calls: list[int] = []
        self.dropped_tools: list[int] = []

    def check(
        self, row: int, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, text: str
    ) -> None:
        names = [c["function"]["name"] for m in messages for c in m.get("tool_calls", [])]
        if any(name not in text for name in names):
            self.dropped_calls.append(row)
        if tools and any((name := _tool_name(tool)) and name not in text for tool in tools):
            self.dropped_tools.append(row)

    def warn(self) -> None:
        for rows, what in (
            (self.dropped_calls, "the assistant turns' tool_calls"),
            (self.dropped_tools, "the tools"),
        ):
            if rows:
                warnings.warn(
                    f"{self.where}: the chat template does not render {what}: {len(rows)} rows (e.g. {rows[:5]}) "
                    "are fed without them. Use a template that writes them (data.chat_template).",
                    stacklevel=3,
                )


def assistant_token_mask(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    row: int,
    where: str,
) -> tuple[list[int], list[int], str]:
    """(token ids, 1 on every assistant turn's tokens else 0, rendered text) of a conversation.
    Each assistant turn spans from the end of the conversation before it with the generation
    prompt to the end of the conversation through it (its end-of-turn marker included), which
    needs a template that renders a conversation's first turns as a prefix of the whole."""

    def render(turns: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(
            turns, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
        )

    text = render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index == 0:
            continue
        before, through = render(messages[:index], True), render(messages[: index + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(
                f"{where}: row {row}: the chat template renders the conversation up to turn {index} differently "
                "from the start of the whole (it rewrites earlier turns, e.g. drops reasoning); "
                "train.assistant_only_loss needs a template that renders each turn in place"
            )
        spans.append((len(before), len(through)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        int(any(start <= offset[0] < end for start, end in spans)) for offset in encoded["offset_mapping"]
    ]
    return list(encoded["input_ids"]), mask, text
