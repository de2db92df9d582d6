"""One loader for every prompt/SFT dataset: synthetic tasks, local files, or hub datasets.

`data.source` is "arithmetic" or "arithmetic_preferences" (synthetic), a local file or directory (.jsonl, .json, .parquet,
.csv), or a hub dataset name. Rows are validated before any model loads: a missing column or an
empty prompt is an error naming the column, the row and the source.
"""

from __future__ import annotations

import json
import os
import warnings

from datasets import Dataset, DatasetDict, load_dataset

from rlhf.config import DataConfig
from rlhf.data.arithmetic import make_addition_task
from rlhf.data.preferences import make_addition_preferences
from rlhf.data.sorting import make_sort_task
from rlhf.data.sums import make_sum_task

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A dataset that cannot be used; the message names the source, the column and the row."""


def _check_file(path: str) -> None:
    """An empty file, or a jsonl line that is not a JSON object, is an error naming the file and the
    line (the datasets library would report neither)."""
    if os.path.getsize(path) == 0:
        raise DataError(f"data file {path} is empty")
    if not path.endswith(".jsonl"):
        return
    rows = 0
    kinds: dict[str, dict[str, int]] = {}
    with open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{path} line {number} is not valid JSON: {exc.args[0]}") from exc
            if not isinstance(row, dict):
                raise DataError(
                    f"{path} line {number} is a JSON {type(row).__name__}, not an object of columns"
                )
            for column, value in row.items():  # arrow cannot hold both; its own error names neither
                kind = (
                    "message lists"
                    if isinstance(value, list)
                    else "strings"
                    if isinstance(value, str)
                    else None
                )
                if kind:
                    kinds.setdefault(column, {}).setdefault(kind, number)
                    if len(kinds[column]) > 1:
                        lines = kinds[column]
                        raise DataError(
                            f"{path}: column {column!r} mixes message lists (line {lines['message lists']}) and "
                            f"strings (line {lines['strings']}); use one format per column"
                        )
            rows += 1
    if rows == 0:
        raise DataError(f"data file {path} has no rows")


def _load_local(path: str) -> DatasetDict:
    if os.path.isdir(path):
        files = sorted(os.listdir(path))
        by_split: dict[str, str] = {}
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext in FILE_FORMATS:
                by_split[stem] = os.path.join(path, name)
        if not by_split:
            raise DataError(f"data.source={path!r}: no {sorted(FILE_FORMATS)} files in this directory")
        for file in by_split.values():
            _check_file(file)
        formats = {FILE_FORMATS[os.path.splitext(f)[1]] for f in by_split.values()}
        if len(formats) > 1:
            raise DataError(f"data.source={path!r}: mixed file formats {sorted(formats)}; use one")
        return load_dataset(formats.pop(), data_files=by_split)
    ext = os.path.splitext(path)[1]
    if ext not in FILE_FORMATS:
        raise DataError(f"data.source={path!r}: unknown file type {ext!r}; use one of {sorted(FILE_FORMATS)}")
    _check_file(path)
    return load_dataset(FILE_FORMATS[ext], data_files={"train": path})


def load_splits(cfg: DataConfig) -> DatasetDict:
    """The dataset's splits as a DatasetDict (not yet validated)."""
    if cfg.source == "arithmetic":
        return make_addition_task(cfg.num_digits, cfg.eval_size, cfg.task_seed, cfg.reverse_digits)
    if cfg.source == "sums":
        return make_sum_task(
            cfg.sum_max_target,
            cfg.sum_max_parts,
            seed=cfg.task_seed,
            min_parts=cfg.sum_min_parts,
            min_target=cfg.sum_min_target,
        )
    if cfg.source in ("sort", "group"):
        return make_sort_task(
            cfg.sort_length,
            cfg.eval_size,
            seed=cfg.task_seed,
            grouped=cfg.source == "group",
            validation_size=cfg.validation_size,
        )
    if cfg.source == "arithmetic_preferences":
        return make_addition_preferences(cfg.num_digits, cfg.eval_size, cfg.task_seed)
    if os.path.exists(cfg.source):
        return _load_local(cfg.source)
    return load_dataset(cfg.source)


def validate_rows(dataset: Dataset, columns: list[str], prompt_column: str | None, where: str) -> None:
    """Every named column exists; every prompt is a non-empty string or message list (the messages
    themselves are checked by rlhf.data.chat). Errors name the row."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing}; the dataset has {dataset.column_names} "
            f"(set data.prompt_column / data.completion_column / data.messages_column / data.required_columns)"
        )
    for index, prompt in enumerate(dataset[prompt_column] if prompt_column else []):
        if (
            not isinstance(prompt, (str, list))
            or not prompt
            or (isinstance(prompt, str) and not prompt.strip())
        ):
            raise DataError(f"{where}: row {index} has an empty or non-text {prompt_column!r}: {prompt!r}")
    for column in columns:
        for index, value in enumerate(dataset[column]):
            if value is None:
                raise DataError(f"{where}: row {index} has no value in column {column!r}")


def load_task_data(
    cfg: DataConfig, needs_completion: bool = False, needs_pairs: bool = False
) -> tuple[Dataset, Dataset | None]:
    """(train, eval) datasets, validated. `needs_completion`: SFT needs `completion_column` too;
    `needs_pairs`: reward models and DPO need the chosen and rejected columns (and the margin's)."""
    splits = load_splits(cfg)
    if cfg.train_split not in splits:
        raise DataError(f"data.source={cfg.source!r} has no split {cfg.train_split!r}; it has {list(splits)}")
    train = splits[cfg.train_split]
    if len(train) == 0:
        raise DataError(f"data.source={cfg.source!r} split {cfg.train_split!r} has no rows")
    prompt_column: str | None = cfg.prompt_column
    columns = list(cfg.required_columns)
    if (
        needs_completion
        and cfg.messages_column in train.column_names
        and cfg.prompt_column not in train.column_names
    ):
        columns.append(cfg.messages_column)  # a whole conversation per row (TRL's language-modeling format)
        prompt_column = None
    elif needs_completion:
        if not cfg.completion_column:
            raise DataError("SFT needs data.completion_column (the target text column) or a messages column")
        columns += [cfg.prompt_column, cfg.completion_column]
    elif needs_pairs:
        columns += [cfg.chosen_column, cfg.rejected_column] + (
            [cfg.margin_column] if cfg.margin_column else []
        )
        if cfg.prompt_column not in train.column_names:
            prompt_column = None  # the implicit prompt: shared by chosen and rejected (rlhf.data.chat)
        else:
            columns.append(cfg.prompt_column)
    else:
        columns.append(cfg.prompt_column)
    columns = list(dict.fromkeys(columns))
    validate_rows(train, columns, prompt_column, f"data.source={cfg.source!r} split {cfg.train_split!r}")
    if needs_pairs:
        train = drop_tied_pairs(train, cfg, f"data.source={cfg.source!r} split {cfg.train_split!r}")
    evaluation = None
    split = evaluation_split(cfg, list(splits))
    if split is not None:
        evaluation = splits[split]
        where = f"data.source={cfg.source!r} split {split!r}"
        validate_rows(evaluation, columns, prompt_column, where)
        if needs_pairs:
            evaluation = drop_tied_pairs(evaluation, cfg, where)
    return train, evaluation


# what Hugging Face datasets call the held-out split, tried when the default `eval` is missing
EVAL_SPLIT_NAMES = ("test", "validation")


def evaluation_split(cfg: DataConfig, names: list[str]) -> str | None:
    """The split held-out evaluation uses, said once: `data.eval_split` (default `eval`); when the
    default is missing, `test` or else `validation`; none when the data has none of them (or
    `data.eval_split=null`). A split named explicitly that the data lacks is an error."""
    chosen = None
    if cfg.eval_split in names:
        chosen = cfg.eval_split
    elif cfg.eval_split == "eval":
        chosen = next((name for name in EVAL_SPLIT_NAMES if name in names), None)
    elif cfg.eval_split is not None:
        raise DataError(
            f"data.eval_split={cfg.eval_split!r}: data.source={cfg.source!r} has the splits {names}"
        )
    if int(os.environ.get("RANK", "0")) == 0:
        if chosen is not None:
            print(f"[data] held-out evaluation on split {chosen!r} of data.source={cfg.source!r}", flush=True)
        else:
            print(
                f"[data] no held-out evaluation: data.source={cfg.source!r} has the splits {names} and none is "
                f"data.eval_split={cfg.eval_split!r}, 'test' or 'validation'",
                flush=True,
            )
    return chosen


def drop_tied_pairs(dataset: Dataset, cfg: DataConfig, where: str) -> Dataset:
    """Preference pairs whose chosen equals rejected teach nothing (and make a DPO margin of 0 look
    like data): dropped with a printed count; an error when no pair is left."""
    chosen, rejected = dataset[cfg.chosen_column], dataset[cfg.rejected_column]
    tied = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if c == r]
    if not tied:
        return dataset
    if len(tied) == len(dataset):
        raise DataError(f"{where}: every pair has {cfg.chosen_column!r} equal to {cfg.rejected_column!r}")
    print(
        f"[data] {where}: dropped {len(tied)} of {len(dataset)} pairs whose {cfg.chosen_column!r} equals "
        f"{cfg.rejected_column!r} (rows {tied[:5]}{' ...' if len(tied) > 5 else ''})",
        flush=True,
    )
    tied_rows = set(tied)
    return dataset.select([i for i in range(len(dataset)) if i not in tied_rows])


def warn_unknown_tokens(tokenizer, dataset: Dataset, columns: list[str | None], sample: int = 1000) -> int:
    """Warn when the tokenizer maps text of the first `sample` rows to its unknown token (characters
    the model cannot see), with a count and an example; returns the number of such rows."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return 0
    rows = dataset.select(range(min(sample, len(dataset))))
    hits, example = 0, None
    for column in (c for c in columns if c and c in rows.column_names):
        for index, text in enumerate(rows[column]):
            if isinstance(text, str) and unk in tokenizer(text, add_special_tokens=False)["input_ids"]:
                hits += 1
                example = example or (column, index, text)
    if hits:
        column, index, text = example
        warnings.warn(
            f"{hits} texts in the first {len(rows)} rows contain characters the tokenizer maps to "
            f"{tokenizer.unk_token!r}; e.g. row {index} column {column!r}: {text[:80]!r}",
            stacklevel=2,
        )
    return hits
