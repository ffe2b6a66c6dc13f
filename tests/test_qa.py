"""Extractive QA helpers: window labels, answer extraction and SQuAD EM / F1, on real SQuAD v1.1 dev examples."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from hf_blockprune.tasks import qa
from hf_blockprune.tasks.data import load_squad
from hf_blockprune.tasks.defaults import offline_minilm_path, shared_data_dir

needs_data = pytest.mark.skipif(shared_data_dir() is None, reason="needs ../shared/data")


def test_squad_metrics_match_hand_computation():
    predictions = {"a": "the Denver Broncos", "b": "Santa Clara, California", "c": "1990s"}
    references = {"a": ["Denver Broncos", "Broncos"], "b": ["Levi's Stadium"], "c": ["the 1990s", "early 1990s"]}
    metrics = qa.squad_metrics(predictions, references)
    # a: exact after dropping the article; b: no overlap; c: exact against the first gold answer
    assert metrics["exact_match"] == pytest.approx(100 * 2 / 3)
    assert metrics["f1"] == pytest.approx(100 * 2 / 3)
    partial = qa.squad_metrics({"x": "big red dog"}, {"x": ["red dog house"]})
    assert partial["f1"] == pytest.approx(100 * 2 * (2 / 3) * (2 / 3) / (4 / 3))  # precision = recall = 2/3
    assert partial["exact_match"] == 0.0


def test_missing_prediction_is_an_error():
    with pytest.raises(ValueError, match="No prediction for 1 example"):
        qa.squad_metrics({}, {"q1": ["x"]})


@needs_data
def test_oracle_logits_recover_the_gold_answers():
    """Logits peaked on the training labels of each window give back the gold answers (up to sub-word ends)."""
    raw = load_squad()["validation"].select(range(60))
    tokenizer = AutoTokenizer.from_pretrained(offline_minilm_path())
    train = raw.map(lambda b: qa.prepare_train_features(b, tokenizer, 128, 48), batched=True,
                    remove_columns=raw.column_names)
    features = raw.map(lambda b: qa.prepare_validation_features(b, tokenizer, 128, 48), batched=True,
                       remove_columns=raw.column_names)
    assert len(train) == len(features) > len(raw)  # long contexts give several windows
    start = np.full((len(features), 128), -10.0)
    end = np.full((len(features), 128), -10.0)
    for i, row in enumerate(train):
        if row["start_positions"] > 0:
            start[i, row["start_positions"]] = end[i, row["end_positions"]] = 10.0
    answers = qa.postprocess_predictions(raw, features, start, end)
    metrics = qa.squad_metrics(answers, {e["id"]: e["answers"]["text"] for e in raw})
    assert metrics["exact_match"] > 90.0  # the rest are answers inside a word piece, e.g. "8" of "18"
    assert all(answers[e["id"]] == "" or answers[e["id"]] in e["context"] for e in raw)


def test_official_and_json_lines_files_load_alike(tmp_path):
    qas = [{"id": "q1", "question": "Who?", "answers": [{"text": "Ann", "answer_start": 0}]}]
    official = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "Ann ran.", "qas": qas}]}]}
    (tmp_path / "official.json").write_text(json.dumps(official))
    row = {"id": "q1", "title": "t", "context": "Ann ran.", "question": "Who?",
           "answers": {"text": ["Ann"], "answer_start": [0]}}
    (tmp_path / "lines.jsonl").write_text(json.dumps(row) + "\n")
    raw = load_squad(train_file=str(tmp_path / "official.json"), validation_file=str(tmp_path / "lines.jsonl"))
    assert raw["train"][0] == raw["validation"][0] == row
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_squad(train_file=str(tmp_path / "none.json"), validation_file=str(tmp_path / "lines.jsonl"))
    with pytest.raises(ValueError, match="both"):
        load_squad(train_file=str(tmp_path / "official.json"))
