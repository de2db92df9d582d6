"""Dataset rows to the token ids a model is fed: TRL's formats, chat templates, length limits.

Every recipe calls one of `prepare_prompts` (GRPO, PPO, evaluation), `prepare_sft` or
`prepare_pairs` (DPO, reward models) once, after the tokenizer loads and before training starts.
They accept TRL's dataset formats, plain strings or message lists in the same columns:

- prompt-only: `prompt` (GRPO, PPO);
- prompt/completion, or `messages` (a whole conversation, split before its last assistant turn) for SFT;
- `prompt`/`chosen`/`rejected`, or only `chosen`/`rejected` holding whole conversations that share
  a prefix (the implicit prompt, extracted with trl's `maybe_extract_prompt`) for DPO and reward models.

Conversational rows are rendered with trl's `apply_chat_template` (the same generation-prompt and
prefix logic TRL's trainers use), with the tokenizer's template or `data.chat_template`. Rendered
text is tokenized without added special tokens (the template writes BOS itself, so none is doubled);
plain text gets the tokenizer's own special tokens and an EOS after each completion.

The prepared dataset keeps the raw columns (rewards receive them as TRL passes them) and adds
reserved columns, each starting with an underscore: the prompt's token ids and the text the model
is fed (`_prompt_text`, what rollouts.jsonl and `rlhf.inspect` show), and the completions' ids.
Rows over `data.max_prompt_length` / `data.max_length` are truncated (prompts from the left,
completions from the right) or dropped (`data.overlong`), with counts printed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase
from trl.data_utils import apply_chat_template, maybe_extract_prompt

from rlhf.config import DataConfig
from rlhf.data.load import DataError
from rlhf.data.messages import (
    ToolRenderingCheck,
    assistant_token_mask,
    clean_tool_calls,
    message_text,
    parse_tools,
)

ROLES = ("system", "user", "assistant", "tool")
PROMPT_IDS, PROMPT_TEXT = "_prompt_ids", "_prompt_text"
COMPLETION_IDS, CHOSEN_IDS, REJECTED_IDS = "_completion_ids", "_chosen_ids", "_rejected_ids"
CONVERSATIONAL = "_conversational"
COMPLETION_MASK = "_completion_mask"  # SFT with train.assistant_only_loss: 1 on assistant turns' tokens
SYSTEM_COLUMN, TOOLS_COLUMN = "system", "tools"  # TRL's optional columns, rendered by the template

Messages = list[dict[str, Any]]


def is_templated(rows: Dataset, cfg: DataConfig) -> bool:
    """Whether prepared `rows` were rendered with the chat template (conversational data, or plain
    strings under data.apply_chat_template)."""
    return cfg.apply_chat_template or bool(len(rows) and rows[0][CONVERSATIONAL])


def is_reserved(column: str) -> bool:
    """Columns this module adds; never handed to reward functions."""
    return column.startswith("_")


def reward_columns(rows: dict[str, list[Any]] | Dataset, prompt_column: str) -> dict[str, list[Any]]:
    """The columns a reward function receives as keyword arguments: every data column but the prompt
    (TRL's GRPOTrainer passes them the same way)."""
    names = rows.column_names if isinstance(rows, Dataset) else list(rows)
    return {k: list(rows[k]) for k in names if k != prompt_column and not is_reserved(k)}


# -- validation ------------------------------------------------------------------------------------


def _clean_message(message: Any, column: str, row: int, where: str) -> dict[str, Any]:
    """A message as the template expects it; an error naming the row when it is not one. Arrow
    stores a column of messages as structs, so keys absent from a message come back as None: they
    are dropped here rather than handed to the template."""
    if not isinstance(message, dict):
        raise DataError(f"{where}: row {row} column {column!r} holds {message!r}, not a message dict")
    message = {k: v for k, v in message.items() if v is not None}
    role = message.get("role")
    if "tool_calls" in message:  # an assistant turn calling tools: content may be null (OpenAI's format)
        message["tool_calls"] = clean_tool_calls(message, column, row, where)
        message.setdefault("content", "")
    if role is None or "content" not in message:
        missing = [k for k in ("role", "content") if k not in message]
        raise DataError(f"{where}: row {row} column {column!r} has a message without {missing}: {message!r}")
    if role not in ROLES:
        raise DataError(
            f"{where}: row {row} column {column!r} has a message with role {role!r}; use one of {list(ROLES)}"
        )
    message["content"] = message_text(message["content"], column, row, where)
    return message


def column_kind(values: list[Any], column: str, where: str) -> str:
    """'text' or 'messages' for a whole column; a column mixing the two, or holding anything else,
    is an error naming a row of each."""
    kinds: dict[str, int] = {}
    for row, value in enumerate(values):
        if isinstance(value, str):
            kind = "text"
        elif isinstance(value, list):
            kind = "messages"
        else:
            raise DataError(
                f"{where}: row {row} column {column!r} is {type(value).__name__}, not text or messages"
            )
        kinds.setdefault(kind, row)
    if len(kinds) > 1:
        raise DataError(
            f"{where}: column {column!r} mixes message lists (row {kinds['messages']}) and strings "
            f"(row {kinds['text']}); use one format per column"
        )
    return next(iter(kinds), "text")


def clean_messages(value: Any, column: str, row: int, where: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: row {row} column {column!r} is an empty message list")
    return [_clean_message(m, column, row, where) for m in value]


# -- chat template ---------------------------------------------------------------------------------


def use_chat_template(tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> None:
    """Install `data.chat_template` (a file or the template itself) on the tokenizer, so checkpoints
    and exports carry it; keep the tokenizer's own otherwise."""
    if cfg.chat_template:
        template = cfg.chat_template
        if os.path.isfile(template):
            with open(template) as handle:
                template = handle.read()
        elif "{" not in template:
            raise DataError(f"data.chat_template={template!r} is neither a file nor a Jinja template")
        tokenizer.chat_template = template


def _render(
    example: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    row: int,
    where: str,
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: the data is conversational (or data.apply_chat_template=true) but the tokenizer has "
            "no chat template; set data.chat_template to a template file or string"
        )
    try:
        return apply_chat_template(example, tokenizer, tools=tools)
    except Exception as exc:  # noqa: BLE001 - a user's template can raise anything
        raise DataError(f"{where}: the chat template failed to render row {row}: {exc!r}") from exc


def as_conversation(value: Any, role: str, system: Any = None) -> Messages:
    """A message list as it is, or a string as one turn of `role`; a `system` column's text goes
    first unless the conversation opens with its own system turn."""
    messages = value if isinstance(value, list) else [{"role": role, "content": value}]
    if system and not (messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def row_extras(dataset: Dataset, templated: bool, where: str) -> tuple[list[Any], list[Any]]:
    """Each row's `system` text and `tools` (parsed), from TRL's optional columns of those names
    (None where absent). Unrendered (plain-text) data cannot use them: said once."""
    names = dataset.column_names
    unused = [c for c in (SYSTEM_COLUMN, TOOLS_COLUMN) if c in names and not templated]
    if unused:
        print(
            f"[data] {where}: column(s) {unused} unused: the prompts are plain text "
            "(data.apply_chat_template=true renders them with the chat template)",
            flush=True,
        )
    count = len(dataset)
    system = list(dataset[SYSTEM_COLUMN]) if SYSTEM_COLUMN in names and templated else [None] * count
    tools = [None] * count
    if TOOLS_COLUMN in names and templated:
        tools = [parse_tools(v, TOOLS_COLUMN, row, where) for row, v in enumerate(dataset[TOOLS_COLUMN])]
    return system, tools


# -- tokenization and lengths ----------------------------------------------------------------------


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _completion_ids(tokenizer: PreTrainedTokenizerBase, text: str, templated: bool) -> list[int]:
    """A plain completion ends with EOS; a rendered one ends with the template's end of turn, and
    gets EOS too only when the template never writes it (so generation can stop)."""
    ids = _ids(tokenizer, text, special=False)
    if not templated or tokenizer.eos_token_id not in ids:
        ids = ids + [tokenizer.eos_token_id]
    return ids


class LengthPolicy:
    """`data.max_prompt_length` / `data.max_length` applied row by row, with counts for the log."""

    def __init__(self, cfg: DataConfig, where: str):
        self.cfg, self.where = cfg, where
        self.truncated_prompts = self.truncated_completions = 0
        self.dropped: list[int] = []

    def prompt(self, ids: list[int], row: int) -> list[int] | None:
        limit = self.cfg.max_prompt_length
        if limit is None or len(ids) <= limit:
            return ids
        if self.cfg.overlong == "drop":
            self.dropped.append(row)
            return None
        self.truncated_prompts += 1
        return ids[-limit:]  # the end of a prompt (the question, the generation prompt) matters most

    def completion(self, prompt: list[int], ids: list[int], row: int) -> list[int] | None:
        limit = self.cfg.max_length
        if limit is None or len(prompt) + len(ids) <= limit:
            return ids
        room = limit - len(prompt)
        if self.cfg.overlong == "drop" or room < 1:
            if row not in self.dropped:
                self.dropped.append(row)
            return None
        self.truncated_completions += 1
        return ids[:room]

    def report(self, total: int) -> None:
        parts = []
        if self.truncated_prompts:
            parts.append(
                f"{self.truncated_prompts} prompts truncated from the left to data.max_prompt_length="
                f"{self.cfg.max_prompt_length}"
            )
        if self.truncated_completions:
            parts.append(
                f"{self.truncated_completions} completions truncated to data.max_length={self.cfg.max_length}"
            )
        if self.dropped:
            parts.append(
                f"{len(self.dropped)} rows over the limits dropped (rows {self.dropped[:5]}"
                f"{' ...' if len(self.dropped) > 5 else ''})"
            )
        if parts:
            print(f"[data] {self.where}: {'; '.join(parts)} of {total}", flush=True)
        if len(self.dropped) == total:
            raise DataError(
                f"{self.where}: every row is over the length limits (data.max_prompt_length="
                f"{self.cfg.max_prompt_length}, data.max_length={self.cfg.max_length})"
            )


def _finish(dataset: Dataset, columns: dict[str, list[Any]], policy: LengthPolicy) -> Dataset:
    for name, values in columns.items():
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, values)
    policy.report(len(dataset))
    if policy.dropped:
        dropped = set(policy.dropped)
        dataset = dataset.select([i for i in range(len(dataset)) if i not in dropped])
    return dataset


def _prompt_text(tokenizer, rendered: str, ids: list[int], full: list[int]) -> str:
    """What the model is fed: the rendered text, or the decoded tokens when truncation cut it."""
    return rendered if ids is full else tokenizer.decode(ids)


# -- the three dataset kinds -----------------------------------------------------------------------


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Any,
    templated: bool,
    row: int = 0,
    where: str = "prompt",
    column: str = "prompt",
    *,
    system: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    check: ToolRenderingCheck | None = None,
) -> tuple[list[int], str]:
    """(token ids, text fed) of one prompt: a message list (or, with `templated`, a string as one
    user turn) rendered with the chat template and its generation prompt, with the row's `system`
    turn and `tools` schemas; or plain text."""
    if templated or isinstance(prompt, list):
        messages = clean_messages(as_conversation(prompt, "user", system), column, row, where)
        text = _render({"prompt": messages}, tokenizer, row, where, tools)["prompt"]
        if check is not None:
            check.check(row, messages, tools, text)
        return _ids(tokenizer, text, special=False), text
    return _ids(tokenizer, prompt, special=True), prompt


def render_completion(tokenizer: PreTrainedTokenizerBase, prompt: Any, completion: Any) -> str:
    """The text of assistant `completion` messages (a list, or one message) as the chat template
    writes them after `prompt` (messages, or a string as one user turn)."""
    where = "completion"
    turns = completion if isinstance(completion, list) else [completion]
    example = {
        "prompt": clean_messages(as_conversation(prompt, "user"), "prompt", 0, where),
        "completion": clean_messages(turns, "completion", 0, where),
    }
    return _render(example, tokenizer, 0, where)["completion"]


def prepare_prompts(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    where: str,
    *,
    response_budget: int,
    context: int | None = None,
) -> Dataset:
    """Prompt-only rows (GRPO, PPO, sampling): `_prompt_ids`, `_prompt_text`, `_conversational`.
    A prompt that cannot fit `context` (the model's) with `response_budget` new tokens is an error
    naming the row and the lengths."""
    use_chat_template(tokenizer, cfg)
    raw = list(dataset[cfg.prompt_column])
    conversational = column_kind(raw, cfg.prompt_column, where) == "messages"
    templated = conversational or cfg.apply_chat_template
    policy = LengthPolicy(cfg, where)
    systems, tools = row_extras(dataset, templated, where)
    check = ToolRenderingCheck(where)
    ids_column, texts = [], []
    for row, value in enumerate(raw):
        full, text = encode_prompt(
            tokenizer,
            value,
            templated,
            row,
            where,
            cfg.prompt_column,
            system=systems[row],
            tools=tools[row],
            check=check,
        )
        ids = policy.prompt(full, row)
        if ids is not None and context is not None and len(ids) + response_budget > context:
            raise DataError(
                f"{where}: row {row}'s prompt is {len(ids)} tokens; with {response_budget} new tokens it does "
                f"not fit the model's context of {context} (set data.max_prompt_length or rollout.max_new_tokens)"
            )
        ids_column.append(ids or [])
        texts.append("" if ids is None else _prompt_text(tokenizer, text, ids, full))
    check.warn()
    return _finish(
        dataset,
        {PROMPT_IDS: ids_column, PROMPT_TEXT: texts, CONVERSATIONAL: [conversational] * len(raw)},
        policy,
    )


def _sft_example(row: dict[str, Any], cfg: DataConfig, index: int, where: str) -> tuple[Any, Any]:
    """(prompt, completion) of an SFT row: prompt/completion columns, or a `messages` conversation
    split before its last assistant turn (earlier turns are context)."""
    if cfg.messages_column in row and cfg.prompt_column not in row:
        messages = clean_messages(row[cfg.messages_column], cfg.messages_column, index, where)
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise DataError(
                f"{where}: row {index} column {cfg.messages_column!r} needs an assistant turn after at least "
                "one other turn (the completion to learn)"
            )
        return messages[:last], messages[last : last + 1]
    return row[cfg.prompt_column], row[cfg.completion_column]


def _check_context(row: int, lengths: list[int], context: int | None, where: str) -> None:
    """A training sequence longer than the model's context is an error naming the row."""
    if context is not None and max(lengths, default=0) > context:
        raise DataError(
            f"{where}: row {row} is {max(lengths)} tokens (prompt and completion), longer than the model's "
            f"context of {context} (set data.max_length)"
        )


def _sft_format(dataset: Dataset, cfg: DataConfig, where: str) -> bool:
    """Whether SFT rows are conversational: a messages column, or message lists in both the prompt
    and completion columns (strings in both: plain text; a mix is an error)."""
    if cfg.messages_column in dataset.column_names and cfg.prompt_column not in dataset.column_names:
        column_kind(list(dataset[cfg.messages_column]), cfg.messages_column, where)
        return True
    prompt_kind = column_kind(list(dataset[cfg.prompt_column]), cfg.prompt_column, where)
    completion_kind = column_kind(
        [v if isinstance(v, list) else str(v) for v in dataset[cfg.completion_column]],
        cfg.completion_column,
        where,
    )
    if prompt_kind != completion_kind:
        raise DataError(
            f"{where}: {cfg.prompt_column!r} holds {prompt_kind} and {cfg.completion_column!r} holds "
            f"{completion_kind}; use message lists in both or strings in both"
        )
    return prompt_kind == "messages"


@dataclass
class _SFTSetup:
    """What `prepare_sft` fixes once for every row."""

    tokenizer: PreTrainedTokenizerBase
    cfg: DataConfig
    where: str
    templated: bool
    assistant_only: bool
    system: list[Any]  # each row's `system` column (None where absent)
    tools: list[Any]  # each row's parsed `tools` column
    check: ToolRenderingCheck


def _sft_tokens(row: dict[str, Any], index: int, setup: _SFTSetup) -> tuple[list[int], str, list[int], Any]:
    """(prompt ids, prompt text, completion ids, assistant mask or None) of one SFT row."""
    tokenizer, cfg, where = setup.tokenizer, setup.cfg, setup.where
    system, tools = setup.system[index], setup.tools[index]
    if setup.assistant_only:  # the whole conversation; every assistant turn is learned
        if cfg.messages_column in row and cfg.prompt_column not in row:
            turns = row[cfg.messages_column]
        else:
            turns = list(row[cfg.prompt_column]) + list(row[cfg.completion_column])
        messages = clean_messages(as_conversation(turns, "user", system), cfg.messages_column, index, where)
        ids, mask, text = assistant_token_mask(tokenizer, messages, tools, index, where)
        setup.check.check(index, messages, tools, text)
        if 1 not in mask:
            raise DataError(
                f"{where}: row {index} has no assistant turn after another turn (nothing to learn)"
            )
        first = mask.index(1)
        return ids[:first], tokenizer.decode(ids[:first]), ids[first:], mask[first:]
    prompt, completion = _sft_example(row, cfg, index, where)
    if not setup.templated:
        return (
            _ids(tokenizer, prompt, special=True),
            prompt,
            _completion_ids(tokenizer, str(completion), False),
            None,
        )
    completion = completion if isinstance(completion, list) else str(completion)
    example = {
        "prompt": clean_messages(as_conversation(prompt, "user", system), cfg.prompt_column, index, where),
        "completion": clean_messages(
            as_conversation(completion, "assistant"),
            cfg.completion_column or cfg.messages_column,
            index,
            where,
        ),
    }
    rendered = _render(example, tokenizer, index, where, tools)
    setup.check.check(
        index, example["prompt"] + example["completion"], tools, rendered["prompt"] + rendered["completion"]
    )
    prompt_ids = _ids(tokenizer, rendered["prompt"], special=False)
    return prompt_ids, rendered["prompt"], _completion_ids(tokenizer, rendered["completion"], True), None


def prepare_sft(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    where: str,
    context: int | None = None,
    assistant_only: bool = False,
) -> Dataset:
    """SFT rows: `_prompt_ids`, `_prompt_text`, `_completion_ids`; with `assistant_only` (TRL's
    assistant_only_loss) the completion is the rest of the conversation from its first assistant
    turn, and `_completion_mask` marks the tokens of every assistant turn (the others are context)."""
    use_chat_template(tokenizer, cfg)
    conversational = _sft_format(dataset, cfg, where)
    if assistant_only and not conversational:
        raise DataError(
            f"{where}: train.assistant_only_loss needs conversations (a {cfg.messages_column!r} column, or "
            f"message lists in {cfg.prompt_column!r} and {cfg.completion_column!r})"
        )
    templated = conversational or cfg.apply_chat_template
    system, tools = row_extras(dataset, templated, where)
    setup = _SFTSetup(
        tokenizer, cfg, where, templated, assistant_only, system, tools, ToolRenderingCheck(where)
    )
    policy = LengthPolicy(cfg, where)
    columns: dict[str, list[Any]] = {PROMPT_IDS: [], PROMPT_TEXT: [], COMPLETION_IDS: [], COMPLETION_MASK: []}
    for index, row in enumerate(dataset):
        full, prompt_text, completion, mask = _sft_tokens(row, index, setup)
        prompt_ids = policy.prompt(full, index)
        kept = None if prompt_ids is None else policy.completion(prompt_ids, completion, index)
        if kept is not None:
            _check_context(index, [len(prompt_ids) + len(kept)], context, where)
        columns[PROMPT_IDS].append(prompt_ids or [])
        columns[PROMPT_TEXT].append(
            "" if prompt_ids is None else _prompt_text(tokenizer, prompt_text, prompt_ids, full)
        )
        columns[COMPLETION_IDS].append(kept or [])
        columns[COMPLETION_MASK].append(mask[: len(kept)] if mask is not None and kept else [])
    setup.check.warn()
    if not assistant_only:
        del columns[COMPLETION_MASK]
    return _finish(dataset, {**columns, CONVERSATIONAL: [conversational] * len(dataset)}, policy)


def _pair_example(row: dict[str, Any], cfg: DataConfig, index: int, where: str) -> dict[str, Any]:
    """TRL's preference example of a row, the implicit prompt extracted; prompts that differ between
    chosen and rejected are an error."""
    example = {"chosen": row[cfg.chosen_column], "rejected": row[cfg.rejected_column]}
    if cfg.prompt_column in row and row[cfg.prompt_column] is not None:
        example["prompt"] = row[cfg.prompt_column]
    if isinstance(example.get("prompt"), list) and not isinstance(example["chosen"], list):
        # a conversational prompt with plain-text answers: the answers are the assistant's turn
        example["chosen"] = as_conversation(example["chosen"], "assistant")
        example["rejected"] = as_conversation(example["rejected"], "assistant")
    conversational = isinstance(example["chosen"], list)
    if conversational:
        for name in ("chosen", "rejected"):
            example[name] = clean_messages(example[name], getattr(cfg, f"{name}_column"), index, where)
    example = maybe_extract_prompt(example)
    if not example["prompt"]:
        raise DataError(
            f"{where}: row {index} has no {cfg.prompt_column!r}, and {cfg.chosen_column!r} and "
            f"{cfg.rejected_column!r} do not start with the same prompt (the implicit prompt is their shared start)"
        )
    if conversational:
        example["prompt"] = clean_messages(
            as_conversation(example["prompt"], "user"), cfg.prompt_column, index, where
        )
        for name in ("chosen", "rejected"):
            if not example[name] or example[name][0]["role"] != "assistant":
                raise DataError(
                    f"{where}: row {index}: after the shared prompt, {name!r} must continue with an assistant "
                    f"turn; it has {example[name][:1]!r}"
                )
    return example


def prepare_pairs(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    where: str,
    context: int | None = None,
) -> Dataset:
    """Preference rows: `_prompt_ids`, `_prompt_text`, `_chosen_ids`, `_rejected_ids`, and the raw
    prompt column (extracted for the implicit-prompt format, with a `system` column's turn). Rendered
    rows take the `system` and `tools` columns as prompts do."""
    use_chat_template(tokenizer, cfg)
    kinds = {
        column: column_kind(list(dataset[column]), column, where)
        for column in (cfg.chosen_column, cfg.rejected_column)
    }
    if len(set(kinds.values())) > 1:
        raise DataError(f"{where}: {kinds} ; chosen and rejected must both be message lists or both strings")
    conversational = kinds[cfg.chosen_column] == "messages"
    if not conversational and cfg.prompt_column in dataset.column_names:
        conversational = column_kind(list(dataset[cfg.prompt_column]), cfg.prompt_column, where) == "messages"
    templated = conversational or cfg.apply_chat_template
    policy = LengthPolicy(cfg, where)
    systems, tools = row_extras(dataset, templated, where)
    raw_prompts, prompts, texts, chosen, rejected = [], [], [], [], []
    for index, row in enumerate(dataset):
        example = _pair_example(row, cfg, index, where)
        if templated:
            # the prompt as rendered, the row's system turn included, so a re-render (T-REG) keeps it
            example["prompt"] = as_conversation(example["prompt"], "user", systems[index])
            rendered = _render(
                {
                    "prompt": example["prompt"],
                    "chosen": as_conversation(example["chosen"], "assistant"),
                    "rejected": as_conversation(example["rejected"], "assistant"),
                },
                tokenizer,
                index,
                where,
                tools[index],
            )
        else:
            rendered = {k: str(v) for k, v in example.items()}
        raw_prompts.append(example["prompt"])
        full = _ids(tokenizer, rendered["prompt"], special=not templated)
        prompt_ids = policy.prompt(full, index)
        pair = [None, None]
        if prompt_ids is not None:
            pair = [
                policy.completion(prompt_ids, _completion_ids(tokenizer, rendered[name], templated), index)
                for name in ("chosen", "rejected")
            ]
        if prompt_ids is not None and None in pair and index not in policy.dropped:
            policy.dropped.append(index)
        prompts.append(prompt_ids or [])
        texts.append(
            "" if prompt_ids is None else _prompt_text(tokenizer, rendered["prompt"], prompt_ids, full)
        )
        if None not in pair:
            _check_context(index, [len(prompt_ids) + len(p) for p in pair], context, where)
        chosen.append(pair[0] or [])
        rejected.append(pair[1] or [])
    columns = {
        PROMPT_IDS: prompts,
        PROMPT_TEXT: texts,
        CHOSEN_IDS: chosen,
        REJECTED_IDS: rejected,
        CONVERSATIONAL: [conversational] * len(dataset),
    }
    if conversational or any(systems):  # the extracted prompt (with its system turn), as rendered
        columns[cfg.prompt_column] = raw_prompts
    return _finish(dataset, columns, policy)


# -- re-rendering a prompt under a rewrite (T-REG's better/worse prompts) ---------------------------


def rewritten_prompt_ids(
    tokenizer: PreTrainedTokenizerBase,
    raw_prompt: Any,
    rewrite: Callable[[str], str],
    templated: bool,
) -> list[int]:
    """The ids of `raw_prompt` with `rewrite` applied to its text: to the string, or to the content
    of the last user turn of a conversation, rendered again with the chat template."""
    if not templated:
        return _ids(tokenizer, rewrite(raw_prompt), special=True)
    messages = [dict(m) for m in as_conversation(raw_prompt, "user")]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = rewrite(messages[last_user]["content"])
    text = apply_chat_template({"prompt": messages}, tokenizer)["prompt"]
    return _ids(tokenizer, text, special=False)


def prepare_splits(
    kind: str,
    train: Dataset,
    evaluation: Dataset | None,
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    **options: Any,
) -> tuple[Dataset, Dataset | None]:
    """`prepare_prompts` ("prompts"), `prepare_sft` ("sft") or `prepare_pairs` ("pairs") on the
    train and eval splits, each error naming its split."""
    prepare = {"prompts": prepare_prompts, "sft": prepare_sft, "pairs": prepare_pairs}[kind]

    def where(split: str | None) -> str:
        return f"data.source={cfg.source!r} split {split!r}"

    train = prepare(train, tokenizer, cfg, where(cfg.train_split), **options)
    if evaluation is not None:
        split = str(evaluation.split) if evaluation.split else cfg.eval_split  # `test` when it stood in
        evaluation = prepare(evaluation, tokenizer, cfg, where(split), **options)
    return train, evaluation


def swap_chosen_rejected(rows: Dataset | None) -> Dataset | None:
    """Prepared pairs with chosen and rejected token ids exchanged (reverse DPO)."""
    if rows is None:
        return None
    swap = "_swap_ids"
    return (
        rows.rename_column(CHOSEN_IDS, swap)
        .rename_column(REJECTED_IDS, CHOSEN_IDS)
        .rename_column(swap, REJECTED_IDS)
    )
