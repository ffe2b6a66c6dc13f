"""Task data for the CLI and the example scripts: local files first, the Hub otherwise.

Every loader returns a `datasets.DatasetDict` with `train` and `validation` splits. A name that is a Hub id is
loaded from the Hub; local files are read by extension (csv / tsv / json / jsonl, and the official SQuAD json). With
nothing given, the shared task-data folder (`defaults.shared_data_dir`) is used when it holds the task.
"""

from __future__ import annotations

import json
from pathlib import Path

from .defaults import shared_data_dir

# GLUE task -> (text columns, label column) in the local GLUE tsv files, then the text columns on the Hub.
GLUE_LOCAL = {"sst2": (["sentence"], "label"), "mrpc": (["#1 String", "#2 String"], "Quality")}
GLUE_HUB = {
    "sst2": ["sentence"], "cola": ["sentence"], "mrpc": ["sentence1", "sentence2"], "qqp": ["question1", "question2"],
    "qnli": ["question", "sentence"], "rte": ["sentence1", "sentence2"], "wnli": ["sentence1", "sentence2"],
    "mnli": ["premise", "hypothesis"],
}
GLUE_VALIDATION = {"mnli": "validation_matched"}
SQUAD_HUB, XSUM_HUB = "rajpurkar/squad", "EdinburghNLP/xsum"
LOCAL_SQUAD = ("squad/train-v1.1.first44articles.json", "squad/dev-v1.1.json")
LOCAL_XSUM = ("xsum/test_1000_a.jsonl", "xsum/test_1000_b.jsonl")
BUILDERS = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json"}


def _check_files(files: dict[str, str]) -> str:
    for name in files.values():
        if not Path(name).is_file():
            raise FileNotFoundError(f"Data file {name!r} does not exist.")
    extension = Path(next(iter(files.values()))).suffix.lstrip(".")
    if extension not in BUILDERS:
        raise ValueError(f"Data files must be .csv, .tsv, .json or .jsonl, got {next(iter(files.values()))!r}.")
    return extension


def _with_validation(raw, seed: int = 0):
    if "validation" not in raw:
        raw = raw["train"].train_test_split(test_size=0.1, seed=seed)
        raw["validation"] = raw.pop("test")
    return raw


def load_glue(task: str):
    """A GLUE task: the local tsv files when the shared data folder has them, else `nyu-mll/glue` from the Hub.

    Returns:
        `(DatasetDict, text_columns, label_column)`.
    """
    from datasets import load_dataset

    data_dir = shared_data_dir()
    if task in GLUE_LOCAL and data_dir is not None and (data_dir / task / "train.tsv").is_file():
        files = {split: str(data_dir / task / f"{split}.tsv") for split in ("train", "dev")}
        raw = load_dataset("csv", data_files=files, delimiter="\t", quoting=3, encoding="utf-8-sig")
        raw["validation"] = raw.pop("dev")
        return raw, *GLUE_LOCAL[task]
    if task not in GLUE_HUB:
        raise ValueError(f"Unknown GLUE task {task!r}: use one of {sorted(GLUE_HUB)}, or local files.")
    raw = load_dataset("nyu-mll/glue", task)
    raw["validation"] = raw[GLUE_VALIDATION.get(task, "validation")]
    return raw, GLUE_HUB[task], "label"


def load_classification_files(train_file: str, validation_file: str | None = None,
                              text_columns: list[str] | None = None, label_column: str = "label"):
    """Local csv / tsv / json(l) files with a label column; 10% of train is held out when there is no validation.

    Returns:
        `(DatasetDict, text_columns, label_column)`; `text_columns` defaults to the first two non-label columns.
    """
    from datasets import load_dataset

    files = {"train": train_file, **({"validation": validation_file} if validation_file else {})}
    extension = _check_files(files)
    raw = _with_validation(load_dataset(BUILDERS[extension], data_files=files,
                                        **({"delimiter": "\t"} if extension == "tsv" else {})))
    columns = raw["train"].column_names
    if label_column not in columns:
        raise ValueError(f"{train_file} has no {label_column!r} column (columns: {columns}).")
    text_columns = text_columns or [c for c in columns if c not in (label_column, "idx")][:2]
    missing = [c for c in text_columns if c not in columns]
    if missing or not text_columns:
        raise ValueError(f"Text columns {missing or text_columns} not found in {train_file} (columns: {columns}).")
    return raw, text_columns, label_column


def tokenize_classification(raw, tokenizer, text_columns: list[str], label_column: str, max_length: int) -> dict:
    """Tokenize one or two text columns, truncated to `max_length`, with integer `labels`; other columns dropped."""

    def encode(batch):
        texts = [[str(t) for t in batch[c]] for c in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        encoded["labels"] = [int(label) for label in batch[label_column]]
        return encoded

    return {split: raw[split].map(encode, batched=True, remove_columns=raw[split].column_names)
            for split in ("train", "validation")}


def _official_squad(articles: list[dict]) -> list[dict]:
    """The examples of official SQuAD `data` (articles / paragraphs / qas), flattened."""
    return [
        {"id": qa["id"], "title": article.get("title", ""), "context": paragraph["context"],
         "question": qa["question"], "answers": {"text": [a["text"] for a in qa["answers"]],
                                                 "answer_start": [a["answer_start"] for a in qa["answers"]]}}
        for article in articles for paragraph in article["paragraphs"] for qa in paragraph["qas"]
    ]


def _squad_file(path: str):
    from datasets import Dataset, load_dataset

    _check_files({"file": path})
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except json.JSONDecodeError:  # json lines
        content = None
    if isinstance(content, dict) and "data" in content:
        return Dataset.from_list(_official_squad(content["data"]))
    return load_dataset("json", data_files=path)["train"]


def load_squad(dataset_name: str | None = None, dataset_config_name: str | None = None,
               train_file: str | None = None, validation_file: str | None = None):
    """SQuAD-format QA data: `id`, `question`, `context`, `answers` (`text`, `answer_start`).

    Local files may be official SQuAD json (`{"data": [...], "version": ...}`) or json lines with those fields.
    With neither files nor `dataset_name`: the shared folder's SQuAD v1.1 (train: first 44 articles, dev: all),
    else `rajpurkar/squad` from the Hub.
    """
    from datasets import DatasetDict, load_dataset

    if train_file or validation_file:
        if not (train_file and validation_file):
            raise ValueError("Give both `train_file` and `validation_file` for local QA data.")
        raw = DatasetDict({"train": _squad_file(train_file), "validation": _squad_file(validation_file)})
    elif dataset_name is None and shared_data_dir() is not None and (shared_data_dir() / LOCAL_SQUAD[1]).is_file():
        base = shared_data_dir()
        raw = DatasetDict({"train": _squad_file(str(base / LOCAL_SQUAD[0])),
                           "validation": _squad_file(str(base / LOCAL_SQUAD[1]))})
    else:
        raw = load_dataset(dataset_name or SQUAD_HUB, dataset_config_name)
    missing = [c for c in ("id", "question", "context", "answers") if c not in raw["train"].column_names]
    if missing:
        raise ValueError(f"QA data lacks the SQuAD columns {missing} (columns: {raw['train'].column_names}).")
    return raw


def load_summarization(dataset_name: str | None = None, dataset_config_name: str | None = None,
                       train_file: str | None = None, validation_file: str | None = None,
                       text_column: str = "document", summary_column: str = "summary"):
    """Summarization pairs: local csv / json(l) files, a Hub dataset, or by default the shared XSum files
    (`test_1000_a.jsonl` as train, `test_1000_b.jsonl` as validation), else `EdinburghNLP/xsum` from the Hub."""
    from datasets import load_dataset

    if train_file:
        files = {"train": train_file, **({"validation": validation_file} if validation_file else {})}
        raw = _with_validation(load_dataset(BUILDERS[_check_files(files)], data_files=files))
    elif dataset_name is None and shared_data_dir() is not None and (shared_data_dir() / LOCAL_XSUM[0]).is_file():
        base = shared_data_dir()
        raw = load_dataset("json", data_files={"train": str(base / LOCAL_XSUM[0]),
                                               "validation": str(base / LOCAL_XSUM[1])})
    else:
        raw = load_dataset(dataset_name or XSUM_HUB, dataset_config_name)
    missing = [c for c in (text_column, summary_column) if c not in raw["train"].column_names]
    if missing:
        raise ValueError(f"Summarization data lacks the columns {missing} (columns: {raw['train'].column_names}); "
                         "set `text_column` / `summary_column`.")
    return raw


def load_sst2(train_size: int | None = None, seed: int = 0):
    """GLUE SST-2 as a `DatasetDict` with `train` (shuffled, first `train_size`) and `validation` (all 872).

    Reads `<shared data>/sst2/{train,dev}.tsv` when present (see `shared_data_dir`), else `nyu-mll/glue` from the Hub.
    """
    raw, _, _ = load_glue("sst2")
    if train_size is not None:
        raw["train"] = raw["train"].shuffle(seed=seed).select(range(min(train_size, len(raw["train"]))))
    return raw
