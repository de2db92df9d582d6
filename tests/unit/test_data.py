"""Synthetic task, dataset loading from files, row validation and the resumable sampler."""

import json

import pytest

from rlhf.config import DataConfig
from rlhf.data.arithmetic import format_problem, make_addition_task
from rlhf.data.load import DataError, load_task_data
from rlhf.data.sampler import EpochSampler


def test_reversed_format():
    assert format_problem(93, 2, 2) == ("39+20=", "590")
    assert format_problem(93, 2, 2, reverse=False) == ("93+02=", "095")


def test_fixed_split_is_disjoint_and_seeded():
    task = make_addition_task(num_digits=2, eval_size=1000, seed=0)
    assert len(task["eval"]) == 1000 and len(task["train"]) == 9000
    assert not set(task["eval"]["prompt"]) & set(task["train"]["prompt"])
    assert make_addition_task(seed=0)["eval"]["prompt"] == task["eval"]["prompt"]
    assert make_addition_task(seed=1)["eval"]["prompt"] != task["eval"]["prompt"]
    for row in task["eval"].select(range(20)):
        assert int(row["answer"][::-1]) == row["a"] + row["b"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_local_jsonl_loads(tmp_path):
    _write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": "4"}]
    )
    _write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "3+3=", "answer": "6"}])
    train, evaluation = load_task_data(DataConfig(source=str(tmp_path)), needs_completion=True)
    assert list(train["prompt"]) == ["1+1=", "2+2="] and len(evaluation) == 1
    train, evaluation = load_task_data(DataConfig(source=str(tmp_path / "train.jsonl")))
    assert len(train) == 2 and evaluation is None


def test_local_parquet_loads(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"prompt": ["1+1="], "answer": ["2"]}).to_parquet(str(tmp_path / "rows.parquet"))
    train, _ = load_task_data(DataConfig(source=str(tmp_path / "rows.parquet")), needs_completion=True)
    assert train[0]["answer"] == "2"


def test_missing_column_names_the_column_and_source(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", [{"question": "1+1=", "answer": "2"}])
    with pytest.raises(DataError) as error:
        load_task_data(DataConfig(source=str(tmp_path / "d.jsonl")))
    assert "'prompt'" in str(error.value) and "d.jsonl" in str(error.value) and "question" in str(error.value)


def test_empty_prompt_names_the_row(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "  ", "answer": "4"}])
    with pytest.raises(DataError, match="row 1 has an empty"):
        load_task_data(DataConfig(source=str(tmp_path / "d.jsonl")))


def test_missing_value_in_required_column_names_the_row(tmp_path):
    _write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2=", "answer": None}]
    )
    with pytest.raises(DataError, match="row 1 has no value in column 'answer'"):
        load_task_data(DataConfig(source=str(tmp_path / "d.jsonl")), needs_completion=True)


def test_unknown_file_type(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_task_data(DataConfig(source=str(tmp_path / "d.txt")))


def test_sampler_crosses_epochs_and_resumes_exactly():
    sampler = EpochSampler(5, seed=3)
    first = sampler.next_indices(3) + sampler.next_indices(3)
    assert sorted(first[:5]) == [0, 1, 2, 3, 4] and sampler.epoch == 1
    state = sampler.state_dict()
    expected = sampler.next_indices(7)
    resumed = EpochSampler(5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.next_indices(7) == expected


def test_sampler_rejects_a_changed_dataset():
    state = EpochSampler(5).state_dict()
    with pytest.raises(ValueError, match="5 rows"):
        EpochSampler(6).load_state_dict(state)


def test_label_pairs_keeps_the_better_completion_and_drops_ties():
    from rlhf.data.preferences import label_pairs

    pairs = label_pairs(
        ["p0", "p1", "p2"],
        ["a", "b", "c"],
        ["x", "y", "z"],
        [1.0, 0.5, None],
        [0.0, 0.5, 1.0],
        {"answer": ["1", "2", "3"]},
    )
    assert pairs["prompt"] == ["p0"] and pairs["chosen"] == ["a"] and pairs["rejected"] == ["x"]
    assert pairs["answer"] == ["1"] and pairs["gold_margin"] == [1.0]


def test_digit_match_partial_credit():
    from rewards import digit_match

    assert digit_match(["p"] * 4, ["590", "591", "59", "5901"], answer=["590"] * 4) == [
        1.0,
        2 / 3,
        2 / 3,
        3 / 4,
    ]


def test_an_empty_data_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=f"data file {path} is empty"):
        load_task_data(DataConfig(source=str(path), eval_split=None))
    path.write_text("\n\n")
    with pytest.raises(DataError, match="has no rows"):
        load_task_data(DataConfig(source=str(path), eval_split=None))


def test_a_malformed_jsonl_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n')
    with pytest.raises(DataError, match=f"{path} line 2 is not valid JSON"):
        load_task_data(DataConfig(source=str(path), eval_split=None))
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n["1+1=", "2"]\n')
    with pytest.raises(DataError, match="line 2 is a JSON list, not an object"):
        load_task_data(DataConfig(source=str(path), eval_split=None))


def test_pairs_whose_chosen_equals_rejected_are_dropped_and_counted(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "a", "chosen": "x", "rejected": "y"},
        {"prompt": "b", "chosen": "same", "rejected": "same"},
        {"prompt": "c", "chosen": "z", "rejected": "w"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, _ = load_task_data(DataConfig(source=str(path), eval_split=None), needs_pairs=True)
    assert train["prompt"] == ["a", "c"]
    assert "dropped 1 of 3 pairs whose 'chosen' equals 'rejected' (rows [1])" in capsys.readouterr().out
    path.write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match="every pair has 'chosen' equal to 'rejected'"):
        load_task_data(DataConfig(source=str(path), eval_split=None), needs_pairs=True)


def test_characters_the_tokenizer_cannot_see_are_a_warning_with_an_example():
    from datasets import Dataset

    from rlhf.data.load import warn_unknown_tokens
    from rlhf.models.tiny import build_char_tokenizer

    rows = Dataset.from_dict({"prompt": ["12+3=", "x+1=", "4+4=", "ÿ"]})
    with pytest.warns(UserWarning, match=r"2 texts in the first 4 rows .* row 1 column 'prompt': 'x\+1='"):
        assert warn_unknown_tokens(build_char_tokenizer(), rows, ["prompt"]) == 2


@pytest.mark.parametrize("name", ["test", "validation"])
def test_a_test_or_validation_split_evaluates_when_there_is_no_eval_split(tmp_path, capsys, name):
    """Hugging Face datasets call the held-out split `test` (or `validation`): it evaluates, and the
    run says which split does."""
    _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    _write_jsonl(
        tmp_path / f"{name}.jsonl", [{"prompt": "3+3=", "answer": "6"}, {"prompt": "4+4=", "answer": "8"}]
    )
    _, evaluation = load_task_data(DataConfig(source=str(tmp_path)))
    assert len(evaluation) == 2
    assert f"held-out evaluation on split {name!r}" in capsys.readouterr().out


def test_no_evaluation_split_is_said_and_a_named_missing_one_is_an_error(tmp_path, capsys):
    _write_jsonl(tmp_path / "train.jsonl", [{"prompt": "1+1=", "answer": "2"}])
    _, evaluation = load_task_data(DataConfig(source=str(tmp_path / "train.jsonl")))
    assert evaluation is None and "no held-out evaluation" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"data.eval_split='dev': .* has the splits \['train'\]"):
        load_task_data(DataConfig(source=str(tmp_path), eval_split="dev"))
