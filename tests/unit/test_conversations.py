"""Multi-turn and tool-call data as OpenAI-format and TRL datasets hold it: every assistant turn
learned under train.assistant_only_loss, `tools` and `system` columns rendered by the template,
assistant turns that call tools with null content, content as a list of text parts, and a warning
when the template drops tool calls."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from rlhf.config import ConfigError, DataConfig, SFTTrainConfig
from rlhf.data.chat import (
    COMPLETION_IDS,
    COMPLETION_MASK,
    PROMPT_IDS,
    PROMPT_TEXT,
    prepare_pairs,
    prepare_prompts,
    prepare_sft,
    rewritten_prompt_ids,
)
from rlhf.data.collate import collate_sft, sft_loss_mask
from rlhf.data.load import DataError
from tests.chat_model import CHATML_TEMPLATE, build_chatml_tokenizer

# ChatML that also writes tool schemas and tool calls (as Qwen2.5's template does, shortened)
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for tool in tools %} {{ tool['function']['name'] }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% for call in message.get('tool_calls', []) %}<call>{{ call['function']['name'] }}"
    "({{ call['function']['arguments'] | tojson }})</call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "18 C"},
    {"role": "assistant", "content": "It is 18 C."},
]


@pytest.fixture()
def tokenizer():
    tokenizer = build_chatml_tokenizer()
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def data(**overrides) -> DataConfig:
    return DataConfig(source="x", **overrides)


def _learned_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, m in zip(row[COMPLETION_IDS], row[COMPLETION_MASK]) if m])


def test_assistant_only_loss_learns_every_assistant_turn_and_not_the_tool_output(tokenizer):
    rows = prepare_sft(
        Dataset.from_list([{"messages": CONVERSATION}]), tokenizer, data(), "t", assistant_only=True
    )
    row = rows[0]
    call = '<call>get_weather({"city": "Paris"})</call><|im_end|>\n'
    assert _learned_text(tokenizer, row) == call + "It is 18 C.<|im_end|>\n"
    completion = tokenizer.decode(row[COMPLETION_IDS])
    assert "<|im_start|>tool\n18 C<|im_end|>" in completion  # attended to, not learned
    assert row[PROMPT_TEXT].endswith("<|im_start|>assistant\n") and "Weather in Paris?" in row[PROMPT_TEXT]
    # the loss mask: every completion token in attention, only the assistant turns in the loss
    _, _, _, target_mask = collate_sft(rows, tokenizer.pad_token_id, "cpu")
    loss_mask = sft_loss_mask(rows, target_mask)
    assert (
        int(target_mask.sum()) == len(row[COMPLETION_IDS]) > int(loss_mask.sum()) == sum(row[COMPLETION_MASK])
    )


def test_without_assistant_only_loss_only_the_last_turn_is_learned(tokenizer):
    rows = prepare_sft(Dataset.from_list([{"messages": CONVERSATION}]), tokenizer, data(), "t")
    assert COMPLETION_MASK not in rows.column_names
    assert tokenizer.decode(rows[0][COMPLETION_IDS]) == "It is 18 C.<|im_end|>\n"
    assert "<call>get_weather" in rows[0][PROMPT_TEXT]  # the earlier call is context


def test_tools_column_is_rendered_as_a_list_or_a_json_string(tokenizer):
    prompt = [{"role": "user", "content": "Weather?"}]
    for tools in ([WEATHER], json.dumps([WEATHER])):
        rows = prepare_prompts(
            Dataset.from_list([{"prompt": prompt, "tools": tools}]), tokenizer, data(), "t", response_budget=4
        )
        assert rows[0][PROMPT_TEXT].startswith("<|im_start|>system\nTools: get_weather<|im_end|>")


def test_content_as_text_parts_is_joined_and_other_parts_are_refused(tokenizer):
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "Add "}, {"type": "text", "text": "1 + 2"}]}
    ]
    rows = prepare_prompts(Dataset.from_list([{"prompt": parts}]), tokenizer, data(), "t", response_budget=4)
    assert "<|im_start|>user\nAdd 1 + 2<|im_end|>" in rows[0][PROMPT_TEXT]
    image = [{"role": "user", "content": [{"type": "image", "image": "cat.png"}]}]
    with pytest.raises(DataError, match=r"row 1 column 'prompt' has a content part .*only text parts"):
        prepare_prompts(
            Dataset.from_list([{"prompt": parts}, {"prompt": image}]),
            tokenizer,
            data(),
            "t",
            response_budget=4,
        )


def test_tool_calls_need_a_function_name(tokenizer):
    bad = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
    ]
    with pytest.raises(DataError, match=r"row 0 column 'messages' has a tool call .* without function.name"):
        prepare_sft(Dataset.from_list([{"messages": bad}]), tokenizer, data(), "t")


def test_a_template_that_drops_tool_calls_is_warned_about(tokenizer):
    tokenizer.chat_template = CHATML_TEMPLATE  # writes content only
    with pytest.warns(UserWarning, match=r"does not render the assistant turns' tool_calls: 1 rows"):
        prepare_sft(
            Dataset.from_list([{"messages": CONVERSATION}]), tokenizer, data(), "t", assistant_only=True
        )


def test_system_column_is_the_system_turn_of_a_templated_string_prompt(tokenizer, capsys):
    dataset = Dataset.from_list([{"prompt": "Add 1 + 2", "system": "Answer with a number."}])
    rows = prepare_prompts(dataset, tokenizer, data(apply_chat_template=True), "t", response_budget=4)
    assert rows[0][PROMPT_TEXT].startswith(
        "<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\nAdd 1 + 2"
    )
    prepare_prompts(dataset, tokenizer, data(), "t", response_budget=4)  # plain text: said, not silent
    assert "column(s) ['system'] unused: the prompts are plain text" in capsys.readouterr().out


def test_system_and_tools_columns_are_rendered_in_preference_pairs(tokenizer, capsys):
    pair = {"prompt": "Add 1 + 2", "chosen": "3", "rejected": "4", "system": "Answer with a number."}
    rows = prepare_pairs(Dataset.from_list([pair]), tokenizer, data(apply_chat_template=True), "t")
    system_turn = "<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>user\nAdd 1 + 2"
    assert rows[0][PROMPT_TEXT].startswith(system_turn)
    # the stored prompt carries the system turn, so T-REG's re-rendered prompt keeps it
    rewritten = rewritten_prompt_ids(tokenizer, rows[0]["prompt"], lambda text: text + "!", True)
    assert tokenizer.decode(rewritten).startswith(system_turn + "!")
    conversational = {**pair, "prompt": [{"role": "user", "content": "Add 1 + 2"}], "tools": [WEATHER]}
    rows = prepare_pairs(Dataset.from_list([conversational]), tokenizer, data(), "t")
    assert rows[0][PROMPT_TEXT].startswith("<|im_start|>system\nTools: get_weather<|im_end|>\n" + system_turn)
    prepare_pairs(Dataset.from_list([pair]), tokenizer, data(), "t")  # plain text: said, not silent
    assert "column(s) ['system'] unused: the prompts are plain text" in capsys.readouterr().out


def test_assistant_only_loss_needs_conversations_and_the_completion_loss():
    tokenizer = build_chatml_tokenizer()
    with pytest.raises(DataError, match="train.assistant_only_loss needs conversations"):
        prepare_sft(
            Dataset.from_list([{"prompt": "1+1=", "answer": "2"}]),
            tokenizer,
            data(),
            "t",
            assistant_only=True,
        )
    with pytest.raises(ConfigError, match="assistant_only_loss=true .* and train.completion_only_loss=false"):
        SFTTrainConfig(assistant_only_loss=True, completion_only_loss=False)


def test_truncation_cuts_the_mask_with_the_completion(tokenizer):
    rows = prepare_sft(
        Dataset.from_list([{"messages": CONVERSATION}]),
        tokenizer,
        data(max_length=40),
        "t",
        assistant_only=True,
    )
    assert len(rows[0][PROMPT_IDS]) + len(rows[0][COMPLETION_IDS]) == 40
    assert len(rows[0][COMPLETION_MASK]) == len(rows[0][COMPLETION_IDS])
    assert torch.tensor(rows[0][COMPLETION_MASK]).sum() > 0
