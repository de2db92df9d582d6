"""What the chat template and the tokenizer's response parser do for an episode.

Tool calls are parsed from the generated token ids with the tokenizer's own response parser
(`tokenizer.parse_response`, through trl's `parse_response`, which falls back to plain text on
a malformed call); a tokenizer that ships none gets trl's parser for its template family
(`add_response_schema`: Qwen, Llama 3.1/3.2, GLM-4-MoE, GPT-OSS, Gemma 4, ...). Tool results are
appended as the token ids the template writes for tool messages after an assistant turn: the
difference between two renderings of a small conversation, which is exact only when the template
renders earlier messages the same whatever follows them (prefix-preserving), so that is checked
before training and again on every suffix.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PreTrainedTokenizerBase
from trl.chat_template_utils import (
    add_response_schema,
    is_chat_template_prefix_preserving,
    parse_response,
    supports_tool_calling,
)

from rlhf.config import ConfigError

TRL_TEMPLATES_HINT = (
    "trl ships prefix-preserving training templates for the common families (trl/chat_templates/*_training.jinja); "
    "set data.chat_template to one of them"
)


class TemplateError(RuntimeError):
    """The chat template renders earlier turns differently once later ones follow."""


def prepare_tool_calling(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse, before training, a template that cannot carry tool calls or changes earlier turns,
    and give the tokenizer a response parser when it has none."""
    if not supports_tool_calling(tokenizer):
        raise ConfigError(
            "rollout.tools / rollout.environment: the chat template does not render a tool-calling conversation "
            f"(user, assistant with tool_calls, tool); {TRL_TEMPLATES_HINT}"
        )
    if not is_chat_template_prefix_preserving(tokenizer):
        raise ConfigError(
            "rollout.tools / rollout.environment: the chat template renders earlier turns differently once a "
            "tool message follows, so tool results cannot be appended to the generated tokens without "
            f"re-tokenizing them; {TRL_TEMPLATES_HINT}"
        )
    if getattr(tokenizer, "response_template", None) or getattr(tokenizer, "response_schema", None):
        return
    try:
        add_response_schema(tokenizer)
    except ValueError as exc:
        raise ConfigError(
            "rollout.tools / rollout.environment: the tokenizer has no response parser and trl knows none for its "
            "chat template; save a `response_template` with the tokenizer (transformers' response parsing) or "
            f"{TRL_TEMPLATES_HINT}"
        ) from exc


def tool_call_opener(tokenizer: PreTrainedTokenizerBase) -> re.Pattern[str] | None:
    """The pattern that opens a tool call in this tokenizer's responses (None when unknown): text
    that has it but parsed to no call is a malformed call."""
    template = getattr(tokenizer, "response_template", None) or {}
    field = (template.get("fields") or {}).get("tool_calls") or {}
    if field.get("open_pattern"):
        return re.compile(field["open_pattern"])
    if field.get("open"):
        return re.compile(re.escape(field["open"]))
    return None


def parse_turn(
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    context: list[int],
    schemas: list[dict[str, Any]] | None,
    opener: re.Pattern[str] | None = None,
) -> tuple[dict[str, Any], bool]:
    """(the assistant message of generated `ids` after `context`, whether it holds a tool call the
    parser could not read)."""
    message = parse_response(tokenizer, ids, prefix=context, tools=schemas or None)
    malformed = bool(
        not message.get("tool_calls") and opener is not None and opener.search(message.get("content") or "")
    )
    return message, malformed


def _render_ids(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], generation: bool
) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tool_suffix_ids(tokenizer: PreTrainedTokenizerBase, tool_messages: list[dict[str, Any]]) -> list[int]:
    """The ids the template writes after an assistant turn's end for `tool_messages`, up to and
    including the next assistant header. The assistant turn ends with the end-of-turn token the
    model generated (EOS); anything the template writes after it belongs to the suffix."""
    call = {"type": "function", "function": {"name": tool_messages[0].get("name", "tool"), "arguments": {}}}
    history = [
        {"role": "user", "content": "dummy"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    before = _render_ids(tokenizer, history, generation=False)
    after = _render_ids(tokenizer, history + tool_messages, generation=True)
    ends = [i for i, token in enumerate(before) if token == tokenizer.eos_token_id]
    if ends:
        before = before[: ends[-1] + 1]
    if after[: len(before)] != before:
        raise TemplateError(
            "the chat template rendered the assistant's turn differently once tool results followed it; "
            f"the tool results cannot be appended to the generated tokens. {TRL_TEMPLATES_HINT}"
        )
    return after[len(before) :]
