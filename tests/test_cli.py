"""The `hf-blockprune` command on a tiny BERT: prune, compact a checkpoint, report, bench, and bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import random
import subprocess
import sys

import pytest
import torch
from transformers import BertTokenizer

import hf_blockprune
from hf_blockprune.pruning.model import LAYOUT_ATTRIBUTE
from hf_blockprune.tasks.cli import main

from conftest import tiny_model

WORDS = ["good", "bad", "movie", "film", "plot", "actor", "scene", "great", "awful", "long", "short", "music"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PRUNE_FLAGS = ["--pruning_preset", "hybrid", "--attention_block_size", "8", "8", "--target_density", "0.5"]


def _write_csv(path, size: int, seed: int) -> None:
    """Sentences of random words; the label is whether `good` appears."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(size):
            words = rng.choices(WORDS, k=rng.randint(3, 8))
            writer.writerow([" ".join(words), int("good" in words)])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny BERT with its tokenizer, csv data, and one `prune` run with masked checkpoints (module-wide)."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(SPECIALS + WORDS)})
    tiny_model("bert").save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    _write_csv(root / "train.csv", 48, seed=0)
    _write_csv(root / "dev.csv", 16, seed=1)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([
            "prune", "--model", str(root / "base"), "--train_file", str(root / "train.csv"),
            "--validation_file", str(root / "dev.csv"), "--output_dir", str(root / "out"), "--max_steps", "4",
            "--save_steps", "2", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--max_seq_length",
            "16", "--use_cpu", *PRUNE_FLAGS,
        ])
    assert code == 0
    (root / "prune_stdout.txt").write_text(stdout.getvalue())
    return root


def test_prune_saves_a_compacted_model(workspace):
    printed = (workspace / "prune_stdout.txt").read_text()
    assert "validation accuracy:" in printed and "(16 examples)" in printed
    assert "bert.encoder.layer.1 " in printed and "\ntotal " in printed
    out = workspace / "out"
    config = json.loads((out / "config.json").read_text())
    assert LAYOUT_ATTRIBUTE in config
    assert config["blockprune_config"]["target_density"] == 0.5
    assert config["blockprune_config"]["attention_block_size"] == [8, 8]
    assert (out / "tokenizer.json").is_file()
    hf_blockprune.from_pretrained(out)
    assert (workspace / "out" / "checkpoint-2" / "model.safetensors").is_file()


def test_compact_then_report_then_bench(workspace, capsys, tmp_path):
    small = tmp_path / "small"
    assert main(["compact", str(workspace / "out" / "checkpoint-2"), str(small)]) == 0
    assert "compacted model saved" in capsys.readouterr().out
    model = hf_blockprune.from_pretrained(small)
    assert getattr(model.config, LAYOUT_ATTRIBUTE)["layers"].keys() == {"bert.encoder.layer.0", "bert.encoder.layer.1"}
    assert (small / "tokenizer.json").is_file()

    figure = tmp_path / "figures" / "layout.png"
    assert main(["report", str(small), "--figure", str(figure)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["layer", "heads", "kept"]
    assert any(line.startswith("bert.encoder.layer.0 ") for line in lines)
    assert any(line.startswith("bert.encoder.layer.1 ") for line in lines)
    total = next(line for line in lines if line.startswith("total "))
    assert "/8" in total and "/74" in total  # 2 layers x 4 heads, 2 x 37 FFN neurons
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["bench", str(small), "--rounds", "2", "--batch", "2", "--seq", "8", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert "measured speedup:" in out and "FLOPs-predicted speedup:" in out


def test_compact_of_the_last_checkpoint_matches_the_saved_model(workspace, tmp_path):
    """The last checkpoint holds the final masks, so compacting it gives what `trainer.save_model()` wrote."""
    assert main(["compact", str(workspace / "out" / "checkpoint-4"), str(tmp_path / "small")]) == 0
    ours, trainers = (hf_blockprune.from_pretrained(path) for path in (tmp_path / "small", workspace / "out"))
    assert ours.config.blockprune_layout["layers"] == trainers.config.blockprune_layout["layers"]
    ids = torch.randint(5, len(SPECIALS + WORDS), (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, trainers(input_ids=ids).logits)


def test_report_of_a_masked_checkpoint_writes_the_figure_into_it(workspace, capsys):
    checkpoint = workspace / "out" / "checkpoint-4"
    assert main(["report", str(checkpoint)]) == 0
    assert "total " in capsys.readouterr().out
    assert (checkpoint / "pruning_layout.png").is_file()


def test_compact_with_an_explicit_pruning_config_file(workspace, capsys, tmp_path):
    recorded = json.loads((workspace / "out" / "checkpoint-2" / "config.json").read_text())["blockprune_config"]
    config_file = tmp_path / "pruning.json"
    config_file.write_text(json.dumps(recorded))
    args = ["compact", str(workspace / "out" / "checkpoint-2"), str(tmp_path / "small"), "--pruning_config"]
    assert main([*args, str(config_file)]) == 0
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**recorded, "attention_block_size": [4, 4]}))
    assert main([*args, str(wrong)]) == 1
    assert "do not match the pruning config" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, message",
    [
        (["report", "{tmp}/missing"], "does not exist"),
        (["bench", "{tmp}/missing"], "does not exist"),
        (["compact", "{tmp}/missing", "{tmp}/out"], "is not a folder"),
        (["compact", "{workspace}/out", "{tmp}/out"], "compacted model already"),
        (["compact", "{workspace}/base", "{tmp}/out"], "holds no mask scores"),
        (["report", "{workspace}/base"], "nothing was pruned"),
        (["report", "{tmp}"], "has no config.json"),
        (["prune", "--output_dir", "{tmp}/o", "--train_file", "{tmp}/none.csv"], "does not exist"),
        (["prune", "--output_dir", "{tmp}/o", "--train_file", "{workspace}/train.csv", "--target_density", "2"],
         "`target_density`"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message(workspace, tmp_path, capsys, command, message):
    argv = [arg.format(tmp=tmp_path, workspace=workspace) for arg in command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_module_help_runs_in_a_subprocess():
    result = subprocess.run([sys.executable, "-m", "hf_blockprune.tasks.cli", "prune", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert "--pruning_preset" in result.stdout and "--target_density" in result.stdout
    assert "run_qa.py" in result.stdout and "squad" in result.stdout


def _write_squad(path, size: int, seed: int) -> None:
    """SQuAD-format json lines: the answer is the word after `music`."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for index in range(size):
            words = rng.choices(WORDS[:-1], k=rng.randint(4, 10))
            position = rng.randint(0, len(words) - 1)
            words[position:position] = ["music", rng.choice(WORDS[:-1])]
            context = " ".join(words)
            start = len(" ".join(words[:position + 1])) + 1
            answer = words[position + 1]
            handle.write(json.dumps({"id": f"{seed}-{index}", "title": "t", "context": context, "question": "music ?",
                                     "answers": {"text": [answer], "answer_start": [start]}}) + "\n")


def test_prune_extractive_qa_saves_a_compacted_model(workspace, tmp_path, capsys):
    _write_squad(tmp_path / "train.jsonl", 32, seed=0)
    _write_squad(tmp_path / "dev.jsonl", 8, seed=1)
    code = main([
        "prune", "--model", str(workspace / "base"), "--task", "squad", "--train_file", str(tmp_path / "train.jsonl"),
        "--validation_file", str(tmp_path / "dev.jsonl"), "--output_dir", str(tmp_path / "out"), "--max_steps", "4",
        "--per_device_train_batch_size", "8", "--max_seq_length", "16", "--doc_stride", "4", "--use_cpu",
        *PRUNE_FLAGS,
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "exact_match" in out and "f1" in out and "(8 examples)" in out
    model = hf_blockprune.from_pretrained(str(tmp_path / "out"))
    assert type(model).__name__.endswith("ForQuestionAnswering")
    assert getattr(model.config, LAYOUT_ATTRIBUTE)
