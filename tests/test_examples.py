"""The example scripts end to end, each in a subprocess on a small real subset: train with pruning, save compacted,
reload, evaluate. Classification and QA use the real MiniLM; summarization a tiny random BART with its tokenizer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
)

import hf_blockprune
from hf_blockprune.structure.model_structure import LAYOUT_ATTRIBUTE, PRUNING_CONFIG_KEY
from hf_blockprune.tasks.defaults import offline_minilm_path, shared_data_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
COMMON = ["--do_train", "--do_eval", "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0",
          "--save_strategy", "no", "--logging_steps", "10"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shared_data_dir() is None, reason="needs ../shared/data"),
]


def dense_parameters(auto_class, **kwargs) -> int:
    """Parameters of the dense MiniLM with a fresh task head."""
    return sum(p.numel() for p in auto_class.from_pretrained(offline_minilm_path(), **kwargs).parameters())


def run_example(script: str, args: list[str], output_dir: Path) -> dict:
    """Run an example script; return its eval metrics (`eval_results.json`)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), "--output_dir", str(output_dir), *COMMON, *args],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((output_dir / "eval_results.json").read_text())


def assert_compacted(output_dir: Path, dense_size: int) -> torch.nn.Module:
    """The saved folder holds a compacted model (layout, pruning config, loader) smaller than the dense one."""
    config = json.loads((output_dir / "config.json").read_text())
    assert LAYOUT_ATTRIBUTE in config and PRUNING_CONFIG_KEY in config
    assert (output_dir / "modeling_blockprune.py").is_file() and (output_dir / "README.md").is_file()
    model = hf_blockprune.from_pretrained(str(output_dir))
    assert sum(p.numel() for p in model.parameters()) < dense_size
    return model


def test_demo_prints_the_pruned_accuracy_beside_the_dense_ones(tmp_path):
    """examples/demo_sst2.py in a smoke run, with the dense model fine-tuned the same way as a reference."""
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo_sst2.py"), "--max_steps", "6", "--train_size", "192",
         "--eval_size", "64", "--output_dir", str(out)], capture_output=True, text=True, env=env, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    accuracies = dict(re.findall(r"^  (pruned|dense, fine-tuned|dense as loaded)[^:]*: ([01]\.\d{4})$", result.stdout,
                                 re.MULTILINE))
    assert accuracies.keys() == {"pruned", "dense, fine-tuned", "dense as loaded"}, result.stdout
    assert "dense, fine-tuned the same way (6 steps)" in result.stdout
    assert "SST-2 dev accuracy (64 examples)" in result.stdout and "cost of pruning: " in result.stdout
    assert all(0.0 <= float(value) <= 1.0 for value in accuracies.values())
    assert "measured CPU speedup vs dense" in result.stdout
    assert_compacted(out, dense_parameters(AutoModelForSequenceClassification, num_labels=2))


def test_text_classification_with_the_trainer_swap(tmp_path):
    out = tmp_path / "sst2"
    metrics = run_example("run_glue_blockprune.py", [
        "--task_name", "sst2", "--max_train_samples", "480", "--max_eval_samples", "200", "--max_steps", "30",
        "--per_device_train_batch_size", "16", "--learning_rate", "5e-5", "--max_seq_length", "64",
        "--pruning_preset", "hybrid", "--target_density", "0.4",
    ], out)
    assert metrics["eval_samples"] == 200
    assert 0.5 < metrics["eval_accuracy"] <= 1.0  # above chance after 30 steps on real SST-2
    model = assert_compacted(out, dense_parameters(AutoModelForSequenceClassification, num_labels=2))
    assert metrics["eval_parameters"] == sum(p.numel() for p in model.parameters())


def test_a_json_file_of_arguments_carries_the_pruning_fields(tmp_path):
    """`python run_glue_blockprune.py args.json`: the script's JSON branch parses the pruning config too."""
    out = tmp_path / "json"
    arguments = {"task_name": "sst2", "output_dir": str(out), "do_train": True, "do_eval": True, "use_cpu": True,
                 "report_to": "none", "disable_tqdm": True, "save_strategy": "no", "max_train_samples": 96,
                 "max_eval_samples": 32, "max_steps": 6, "per_device_train_batch_size": 16, "max_seq_length": 48,
                 "pruning_preset": "struct", "target_density": 0.5, "initial_warmup": 0, "final_warmup": 0.2}
    (tmp_path / "args.json").write_text(json.dumps(arguments))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / "run_glue_blockprune.py"), str(tmp_path / "args.json")],
                            capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    config = json.loads((out / "config.json").read_text())
    assert config[PRUNING_CONFIG_KEY]["pruning_preset"] == "struct"
    assert config[PRUNING_CONFIG_KEY]["target_density"] == 0.5
    assert_compacted(out, dense_parameters(AutoModelForSequenceClassification, num_labels=2))


def _kept_heads(folder: Path) -> dict[str, list[int]]:
    layout = json.loads((folder / "config.json").read_text())[LAYOUT_ATTRIBUTE]
    return {name: entry["attention"][0]["heads"] for name, entry in layout["layers"].items()}


def test_a_compacted_model_is_fine_tuned_then_pruned_again(tmp_path):
    """The paper's second stage through the script: no pruning flag fine-tunes the compacted model as it is; a preset
    prunes it again, and the new layout names the heads by their original index."""
    data = ["--task_name", "sst2", "--max_train_samples", "160", "--max_eval_samples", "64", "--max_steps", "10",
            "--per_device_train_batch_size", "16", "--max_seq_length", "48"]
    first = tmp_path / "first"
    run_example("run_glue_blockprune.py", [*data, "--pruning_preset", "struct", "--target_density", "0.5"], first)
    tuned = tmp_path / "tuned"
    metrics = run_example("run_glue_blockprune.py", [*data, "--model_name_or_path", str(first)], tuned)
    assert _kept_heads(tuned) == _kept_heads(first)
    assert metrics["eval_parameters"] == sum(p.numel() for p in hf_blockprune.from_pretrained(str(first)).parameters())
    again = tmp_path / "again"
    run_example("run_glue_blockprune.py", [*data, "--model_name_or_path", str(first), "--pruning_preset", "struct",
                                           "--target_density", "0.5", "--initial_warmup", "0", "--final_warmup",
                                           "0.2"], again)
    before, after = _kept_heads(first), _kept_heads(again)
    assert all(set(after[name]) <= set(before[name]) for name in before)
    assert sum(map(len, after.values())) < sum(map(len, before.values()))


def test_extractive_qa_with_its_own_trainer_and_the_callback(tmp_path):
    out = tmp_path / "squad"
    metrics = run_example("run_qa_blockprune.py", [
        "--max_train_samples", "320", "--max_eval_samples", "100", "--max_steps", "30",
        "--per_device_train_batch_size", "16", "--learning_rate", "1e-4", "--max_seq_length", "128",
        "--doc_stride", "48", "--pruning_preset", "struct", "--target_density", "0.6",
    ], out)
    assert metrics["eval_samples"] == 100
    assert 0.0 <= metrics["eval_exact_match"] <= metrics["eval_f1"] <= 100.0
    assert metrics["eval_f1"] > 1.0  # 30 steps from an untrained QA head: weak, but no longer random
    model = assert_compacted(out, dense_parameters(AutoModelForQuestionAnswering))
    assert type(model).__name__.endswith("ForQuestionAnswering")
    heads = [len(entry["attention"][0]["heads"]) for entry in model.config.blockprune_layout["layers"].values()]
    assert sum(heads) < 72  # struct removes whole heads


@pytest.fixture
def tiny_bart(tmp_path) -> tuple[Path, int]:
    """A tiny random BART using the MiniLM (BERT) tokenizer, saved with it; returns its folder and size."""
    tokenizer = AutoTokenizer.from_pretrained(offline_minilm_path())
    config = BartConfig(
        vocab_size=tokenizer.vocab_size, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.sep_token_id, forced_eos_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(0)
    model = BartForConditionalGeneration(config)
    model.save_pretrained(tmp_path / "tiny_bart")
    tokenizer.save_pretrained(tmp_path / "tiny_bart")
    return tmp_path / "tiny_bart", sum(p.numel() for p in model.parameters())


def test_summarization_with_seq2seq_trainer_and_the_callback(tiny_bart, tmp_path):
    path, bart_parameters = tiny_bart
    out = tmp_path / "xsum"
    metrics = run_example("run_summarization_blockprune.py", [
        "--model_name_or_path", str(path), "--max_train_samples", "200", "--max_eval_samples", "16",
        "--max_steps", "30", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
        "--max_source_length", "128", "--max_target_length", "24", "--predict_with_generate", "true",
        "--generation_num_beams", "2", "--pruning_preset", "hybrid", "--attention_block_size", "16", "16",
        "--target_density", "0.5",
    ], out)
    assert metrics["eval_samples"] == 16
    for name in ("eval_rouge1", "eval_rouge2", "eval_rougeL"):
        assert 0.0 <= metrics[name] <= 100.0
    assert 0 < metrics["eval_gen_len"] <= 24
    assert_compacted(out, bart_parameters)


def test_rouge_matches_hand_computation():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from run_summarization_blockprune import rouge_scores
    finally:
        sys.path.remove(str(EXAMPLES))
    scores = rouge_scores(["the cat sat on the mat", "x"], ["the cat lay on the mat", "y"])
    # pair 1: unigrams 5 of 6 both ways (F 5/6); bigrams the-cat, on-the, the-mat: 3 of 5 (F 3/5); LCS 5 (F 5/6)
    assert scores["rouge1"] == pytest.approx(100 * (5 / 6) / 2)
    assert scores["rouge2"] == pytest.approx(100 * (3 / 5) / 2)
    assert scores["rougeL"] == pytest.approx(100 * (5 / 6) / 2)
