"""Chat data: TRL's formats rendered with the template, token ids, length policy and bad input."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from rewards import exact_match
from rlhf.config import ConfigError, DataConfig
from rlhf.data.chat import (
    CHOSEN_IDS,
    COMPLETION_IDS,
    CONVERSATIONAL,
    PROMPT_IDS,
    PROMPT_TEXT,
    prepare_pairs,
    prepare_prompts,
    prepare_sft,
    reward_columns,
)
from rlhf.data.collate import collate_sft
from rlhf.data.load import DataError, load_task_data
from rlhf.models.tiny import build_char_tokenizer
from rlhf.rollout.sampling import prompt_inputs
from tests.chat_model import build_chatml_tokenizer

SYSTEM = {"role": "system", "content": "Be concise."}
USER = {"role": "user", "content": "Add 12 + 30"}
ASSISTANT = {"role": "assistant", "content": "42"}
FOLLOW_UP = {"role": "user", "content": "And 1 + 2?"}
GENERATION_PROMPT = "<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chatml():
    return build_chatml_tokenizer()


def data(**overrides) -> DataConfig:
    return DataConfig(source="x", **overrides)


def test_conversational_prompts_keep_system_and_earlier_turns(chatml):
    conversation = [SYSTEM, USER, ASSISTANT, FOLLOW_UP]
    rows = prepare_prompts(
        Dataset.from_list([{"prompt": conversation, "answer": "3"}]), chatml, data(), "t", response_budget=16
    )
    expected = chatml.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    text = rows[0][PROMPT_TEXT]
    assert text == expected
    assert "Be concise." in text and "Add 12 + 30" in text and "And 1 + 2?" in text
    assert text.endswith(GENERATION_PROMPT) and text.count(GENERATION_PROMPT) == 2  # one per assistant turn
    assert rows[0][PROMPT_IDS] == chatml(expected, add_special_tokens=False)["input_ids"]
    assert rows[0][CONVERSATIONAL] is True
    inputs = prompt_inputs(rows, "prompt")
    assert inputs["prompts"][0][0]["content"] == "Be concise."  # rewards get the raw messages
    assert inputs["columns"] == {"answer": ["3"]}  # and no reserved column


def test_template_that_writes_bos_is_not_given_a_second_one():
    tokenizer = build_char_tokenizer()  # its template starts with {{ bos_token }}, its encoder adds <bos> too
    for rows in (
        Dataset.from_list([{"prompt": [{"role": "user", "content": "1+2="}]}]),
        Dataset.from_list([{"prompt": "1+2="}]),
    ):
        templated = isinstance(rows[0]["prompt"], list)
        prepared = prepare_prompts(
            rows, tokenizer, data(apply_chat_template=not templated), "t", response_budget=4
        )
        ids = prepared[0][PROMPT_IDS]
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_plain_prompts_use_the_tokenizers_special_tokens_and_stay_as_written():
    tokenizer = build_char_tokenizer()
    rows = prepare_prompts(Dataset.from_list([{"prompt": "1+2="}]), tokenizer, data(), "t", response_budget=4)
    assert rows[0][PROMPT_IDS] == tokenizer("1+2=")["input_ids"]
    assert rows[0][PROMPT_TEXT] == "1+2=" and rows[0][CONVERSATIONAL] is False


def test_sft_messages_learn_the_last_assistant_turn(chatml):
    conversation = [SYSTEM, USER, ASSISTANT, FOLLOW_UP, {"role": "assistant", "content": "3"}]
    rows = prepare_sft(Dataset.from_list([{"messages": conversation}]), chatml, data(), "t")
    assert rows[0][PROMPT_TEXT] == chatml.apply_chat_template(
        conversation[:-1], tokenize=False, add_generation_prompt=True
    )
    assert chatml.decode(rows[0][COMPLETION_IDS]) == "3<|im_end|>\n"
    whole = chatml.apply_chat_template(conversation, tokenize=False)
    assert chatml.decode(rows[0][PROMPT_IDS] + rows[0][COMPLETION_IDS]) == whole


def test_sft_prompt_completion_formats(chatml):
    conversational = prepare_sft(
        Dataset.from_list([{"prompt": [USER], "completion": [ASSISTANT]}]),
        chatml,
        data(completion_column="completion"),
        "t",
    )
    assert chatml.decode(conversational[0][COMPLETION_IDS]) == "42<|im_end|>\n"
    tokenizer = build_char_tokenizer()
    plain = prepare_sft(Dataset.from_list([{"prompt": "1+2=", "answer": 3}]), tokenizer, data(), "t")
    assert plain[0][COMPLETION_IDS] == tokenizer("3", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]


def test_sft_all_token_loss_moves_the_boundary_to_the_first_token():
    tokenizer = build_char_tokenizer()
    rows = prepare_sft(Dataset.from_list([{"prompt": "1+2=", "answer": "3"}]), tokenizer, data(), "t")
    prompt, _, target, target_mask = collate_sft(rows, tokenizer.pad_token_id, "cpu", completion_only=True)
    assert target[0][target_mask[0]].tolist() == rows[0][COMPLETION_IDS]
    prompt, _, target, target_mask = collate_sft(rows, tokenizer.pad_token_id, "cpu", completion_only=False)
    whole = rows[0][PROMPT_IDS] + rows[0][COMPLETION_IDS]
    assert prompt[0].tolist() == whole[:1] and target[0][target_mask[0]].tolist() == whole[1:]


def test_pairs_explicit_and_implicit_prompt_give_the_same_ids(chatml):
    explicit = prepare_pairs(
        Dataset.from_list(
            [
                {
                    "prompt": [SYSTEM, USER],
                    "chosen": [ASSISTANT],
                    "rejected": [{"role": "assistant", "content": "41"}],
                }
            ]
        ),
        chatml,
        data(),
        "t",
    )
    implicit = prepare_pairs(
        Dataset.from_list(
            [
                {
                    "chosen": [SYSTEM, USER, ASSISTANT],
                    "rejected": [SYSTEM, USER, {"role": "assistant", "content": "41"}],
                }
            ]
        ),
        chatml,
        data(),
        "t",
    )
    for column in (PROMPT_IDS, CHOSEN_IDS, "_rejected_ids", PROMPT_TEXT):
        assert explicit[0][column] == implicit[0][column]
    assert implicit[0]["prompt"] == [SYSTEM, USER]  # the extracted prompt, as rewards would see it
    assert chatml.decode(implicit[0][CHOSEN_IDS]) == "42<|im_end|>\n"


def test_reward_functions_receive_conversational_completions_like_trl():
    from rlhf.types import RolloutBatch

    batch = RolloutBatch(*(None,) * 6, completions=["42", "41"], conversational=True)
    completions = batch.reward_completions()
    assert completions == [[{"role": "assistant", "content": "42"}], [{"role": "assistant", "content": "41"}]]
    assert exact_match([], completions, answer=["42", "42"]) == [1.0, 0.0]
    assert reward_columns({"prompt": [1], "answer": [2], PROMPT_IDS: [3]}, "prompt") == {"answer": [2]}


def test_length_policy_truncates_prompts_from_the_left_or_drops(chatml, capsys):
    tokenizer = build_char_tokenizer()
    rows = Dataset.from_list([{"prompt": "12345678+1="}, {"prompt": "1+2="}])
    truncated = prepare_prompts(rows, tokenizer, data(max_prompt_length=5), "t", response_budget=4)
    assert truncated[0][PROMPT_IDS] == tokenizer("12345678+1=")["input_ids"][-5:]
    assert truncated[0][PROMPT_TEXT] == "78+1=" and len(truncated) == 2
    assert "1 prompts truncated from the left" in capsys.readouterr().out
    dropped = prepare_prompts(
        rows, tokenizer, data(max_prompt_length=5, overlong="drop"), "t", response_budget=4
    )
    assert list(dropped["prompt"]) == ["1+2="]
    sft = prepare_sft(
        Dataset.from_list([{"prompt": "1+2=", "answer": "1234567"}]), tokenizer, data(max_length=8), "t"
    )
    assert len(sft[0][PROMPT_IDS]) + len(sft[0][COMPLETION_IDS]) == 8
    with pytest.raises(DataError, match="every row is over the length limits"):
        prepare_prompts(rows, tokenizer, data(max_prompt_length=2, overlong="drop"), "t", response_budget=4)


def test_a_prompt_that_cannot_fit_the_context_is_an_error_naming_the_row():
    tokenizer = build_char_tokenizer()
    rows = Dataset.from_list([{"prompt": "1+2="}, {"prompt": "123456789+1="}])
    with pytest.raises(
        DataError, match=r"row 1's prompt is 13 tokens; with 8 new tokens it does not fit .* 16"
    ):
        prepare_prompts(rows, tokenizer, data(max_prompt_length=None), "t", response_budget=8, context=16)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ([{"content": "hi"}], r"row 1 column 'prompt' has a message without \['role'\]"),
        ([{"role": "user"}], r"row 1 column 'prompt' has a message without \['content'\]"),
        (
            [{"role": "robot", "content": "hi"}],
            r"row 1 column 'prompt' has a message with role 'robot'; use one of",
        ),
        ([], r"row 1 column 'prompt' is an empty message list"),
    ],
)
def test_bad_messages_name_the_row(chatml, prompt, message):
    rows = Dataset.from_dict({"prompt": [[USER], prompt]})
    with pytest.raises(DataError, match=message):
        prepare_prompts(rows, chatml, data(), "t", response_budget=4)


def test_a_column_mixing_messages_and_strings_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": [USER]}) + "\n" + json.dumps({"prompt": "text"}) + "\n")
    with pytest.raises(
        DataError, match=r"column 'prompt' mixes message lists \(line 1\) and strings \(line 2\)"
    ):
        load_task_data(DataConfig(source=str(path), eval_split=None))


def test_pairs_whose_prompts_differ_are_an_error(chatml):
    rows = Dataset.from_list(
        [{"chosen": [USER, ASSISTANT], "rejected": [FOLLOW_UP, {"role": "assistant", "content": "3"}]}]
    )
    with pytest.raises(
        DataError, match="row 0 has no 'prompt', and 'chosen' and 'rejected' do not start with the same"
    ):
        prepare_pairs(rows, chatml, data(), "t")


def test_a_template_that_fails_to_render_names_the_row(chatml):
    rows = Dataset.from_list([{"prompt": [USER]}])
    broken = "{{ raise_exception('no system turn') }}"
    with pytest.raises(DataError, match="the chat template failed to render row 0: .*no system turn"):
        prepare_prompts(rows, chatml, data(chat_template=broken), "t", response_budget=4)


def test_conversational_data_without_a_template_says_which_option_to_set():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="set data.chat_template"):
        prepare_prompts(Dataset.from_list([{"prompt": [USER]}]), tokenizer, data(), "t", response_budget=4)


def test_chat_template_from_a_file_replaces_the_tokenizers(tmp_path):
    tokenizer = build_char_tokenizer()
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}={% endfor %}")
    rows = prepare_prompts(
        Dataset.from_list([{"prompt": [{"role": "user", "content": "1+2"}]}]),
        tokenizer,
        data(chat_template=str(template)),
        "t",
        response_budget=4,
    )
    assert rows[0][PROMPT_TEXT] == "1+2="
    with pytest.raises(DataError, match="neither a file nor a Jinja template"):
        prepare_prompts(rows, tokenizer, data(chat_template="missing.jinja"), "t", response_budget=4)


def test_length_options_are_validated():
    with pytest.raises(ConfigError, match="data.overlong"):
        data(overlong="cut")
    with pytest.raises(ConfigError, match="data.max_prompt_length"):
        data(max_prompt_length=0)


def test_a_training_sequence_longer_than_the_context_is_an_error_naming_the_row():
    tokenizer = build_char_tokenizer()
    rows = Dataset.from_list([{"prompt": "1+2=", "answer": "3"}, {"prompt": "1+2=", "answer": "123456789"}])
    with pytest.raises(
        DataError,
        match=r"row 1 is 15 tokens \(prompt and completion\), longer than the model's context of 12",
    ):
        prepare_sft(rows, tokenizer, data(max_length=None), "t", context=12)
    pairs = Dataset.from_list([{"prompt": "1+2=", "chosen": "3", "rejected": "123456789"}])
    with pytest.raises(DataError, match="row 0 is 15 tokens"):
        prepare_pairs(pairs, tokenizer, data(max_length=None), "t", context=12)
