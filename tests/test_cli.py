"""The `hf-blockprune` command on a tiny BERT: prune (and resume), compact, report, bench, flags and bad input."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import random
import subprocess
import sys

import pytest
import torch
from transformers import BertTokenizer, TrainingArguments

import hf_blockprune
from hf_blockprune.compact.flops import predicted_speedup
from hf_blockprune.pruning.config import BlockPruningConfig
from hf_blockprune.structure.model_structure import LAYOUT_ATTRIBUTE
from hf_blockprune.tasks.cli import PruneArguments, build_parser, main, measure, training_arguments
from hf_blockprune.training import trainer as trainer_module

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
            "16", "--use_cpu", "--gradient_accumulation_steps", "2", "--report_to", "none", *PRUNE_FLAGS,
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


def test_compact_reads_the_checkpoints_tokenizer_without_a_model_type_warning(workspace, tmp_path):
    """AutoTokenizer reads the model config first: a masked checkpoint's made it warn of a model of type
    `blockprune_masked_checkpoint` instantiating one of type `` (run as a command: the warning goes to stderr)."""
    command = [sys.executable, "-m", "hf_blockprune.tasks.cli", "compact", str(workspace / "out" / "checkpoint-2"),
               str(tmp_path / "small")]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True)
    assert "compacted model saved" in result.stdout and (tmp_path / "small" / "tokenizer.json").is_file()
    assert "You are using a model of type" not in result.stderr


_TOKENIZER_LOADS = {
    "load_tokenizer": "from hf_blockprune.tasks.cli import load_tokenizer\ntokenizer = load_tokenizer(PATH)",
    "plain transformers, as the card says": "import sys\nsys.modules['hf_blockprune'] = None\n"
                                            "from transformers import AutoTokenizer\n"
                                            "tokenizer = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
}


@pytest.mark.parametrize("case", _TOKENIZER_LOADS)
def test_the_tokenizer_of_a_compacted_folder_loads_without_a_prompt(case, workspace, tmp_path):
    """A compacted folder's `auto_map` names its config class in the saved loader: a bare
    `AutoTokenizer.from_pretrained(folder)` asks `[y/N]` (stdin is closed here) and warns of a model of type
    `blockpruned_bert`."""
    script = _TOKENIZER_LOADS[case].replace("PATH", repr(str(workspace / "out")))
    script += "\nprint(type(tokenizer).__name__, tokenizer('good movie')['input_ids'])"
    result = subprocess.run([sys.executable, "-c", script], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            cwd=tmp_path, check=True)
    output = result.stdout + result.stderr
    assert "[y/N]" not in output and "custom code" not in output and "You are using a model of type" not in output
    ids = [SPECIALS.index("[CLS]"), len(SPECIALS) + WORDS.index("good"), len(SPECIALS) + WORDS.index("movie"),
           SPECIALS.index("[SEP]")]
    assert result.stdout.strip() == f"BertTokenizer {ids}"


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
    out, err = capsys.readouterr()
    assert "exact_match" in out and "f1" in out and "(8 examples)" in out
    assert "answers" in err  # the answer-extraction progress bar
    model = hf_blockprune.from_pretrained(str(tmp_path / "out"))
    assert type(model).__name__.endswith("ForQuestionAnswering")
    assert getattr(model.config, LAYOUT_ATTRIBUTE)


# ------------------------------------------------------------------------------------ flags: TrainingArguments, help


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


TRAINING_FLAGS = ["--push_to_hub", "--resume_from_checkpoint", "--gradient_accumulation_steps", "--report_to",
                  "--bf16", "--learning_rate", "--output_dir", "--disable_tqdm"]
# BlockPruningConfig flags that only matter while training: `compact` does not take them.
TRAINING_ONLY_PRUNING_FLAGS = ["--initial_warmup", "--final_lambda", "--mask_scores_learning_rate", "--target_density",
                               "--teacher_model", "--distillation_alpha", "--fill_after"]


def test_prune_help_lists_training_arguments_flags(capsys):
    printed = _help("prune", capsys)
    for flag in TRAINING_FLAGS + TRAINING_ONLY_PRUNING_FLAGS + ["--task", "--doc_stride", "--pruning_preset"]:
        assert f"  {flag} " in printed, flag
    for title in ("task and data:", "pruning (BlockPruningConfig):", "training (transformers.TrainingArguments):"):
        assert title in printed


@pytest.mark.parametrize("command, own_flags", [
    ("compact", ["--pruning_config", "--pruning_preset", "--attention_block_size", "--layers_pattern"]),
    ("report", ["--figure", "--pruning_config"]),
    ("bench", ["--baseline", "--rounds", "--seed", "--disable_tqdm"]),
])
def test_other_commands_list_only_their_own_flags(capsys, command, own_flags):
    printed = _help(command, capsys)
    for flag in own_flags:
        assert f"  {flag} " in printed, flag
    for flag in [f for f in TRAINING_FLAGS + TRAINING_ONLY_PRUNING_FLAGS if f not in own_flags]:
        assert flag not in printed, flag


@pytest.mark.parametrize("command, flag", [
    (["prune", "--output_dir", "o", "--no_such_flag", "1"], "--no_such_flag"),
    (["prune", "--output_dir", "o", "--warmup_ratio", "0.1"], "--warmup_ratio"),  # not a transformers 5 flag
    (["compact", "in", "out", "--learning_rate", "1e-3"], "--learning_rate"),
    (["compact", "in", "out", "--target_density", "0.5"], "--target_density"),
    (["bench", "model", "--report_to", "none"], "--report_to"),
])
def test_unknown_flags_are_named(capsys, command, flag):
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and flag in err


def test_prune_flag_dataclasses_share_no_field():
    """`HfArgumentParser` refuses a flag declared twice: the task flags leave training to `TrainingArguments`."""
    classes = (PruneArguments, BlockPruningConfig, TrainingArguments)
    names = [{f.name for f in dataclasses.fields(cls)} for cls in classes]
    assert not names[0] & names[1] and not names[0] & names[2] and not names[1] & names[2]


def _training_arguments(*flags: str) -> TrainingArguments:
    return training_arguments(build_parser().parse_args(["prune", "--output_dir", "o", *flags]))


@pytest.mark.parametrize("flags, expected", [
    ([], {"learning_rate": 3e-5, "per_device_train_batch_size": 32, "per_device_eval_batch_size": 64,
          "logging_steps": 50, "save_strategy": "no", "max_steps": -1, "seed": 42, "report_to": []}),
    (["--save_steps", "3"], {"save_strategy": "steps", "save_steps": 3}),
    (["--save_strategy", "steps"], {"save_strategy": "steps", "save_steps": 500}),
    (["--save_strategy", "epoch", "--learning_rate", "1e-4"], {"save_strategy": "epoch", "learning_rate": 1e-4}),
    (["--gradient_accumulation_steps", "4", "--warmup_steps", "0.1", "--resume_from_checkpoint", "o/checkpoint-2"],
     {"gradient_accumulation_steps": 4, "warmup_steps": 0.1, "resume_from_checkpoint": "o/checkpoint-2"}),
    (["--push_to_hub", "--hub_model_id", "me/pruned"], {"push_to_hub": True, "hub_model_id": "me/pruned"}),
    (["--bf16", "--use_cpu", "--disable_tqdm", "true"], {"bf16": True, "use_cpu": True, "disable_tqdm": True}),
])
def test_prune_flags_build_training_arguments_with_the_cli_defaults(flags, expected):
    args = _training_arguments(*flags)
    assert {name: getattr(args, name) for name in expected} == expected
    assert args.output_dir == "o"


def test_push_to_hub_reaches_the_trainer(workspace, tmp_path, monkeypatch):
    """The Trainer gets `push_to_hub` (it pushes on `save_model()`); a stand-in trainer stops before any Hub call."""
    received = {}

    class Recorder:
        def __init__(self, **kwargs):
            received.update(kwargs)
            raise ValueError("stand-in trainer: stop here")

    monkeypatch.setattr(trainer_module, "BlockPruningTrainer", Recorder)
    code = main(["prune", "--model", str(workspace / "base"), "--train_file", str(workspace / "train.csv"),
                 "--validation_file", str(workspace / "dev.csv"), "--output_dir", str(tmp_path / "out"),
                 "--max_seq_length", "16", "--use_cpu", "--push_to_hub", "--hub_model_id", "me/pruned", *PRUNE_FLAGS])
    assert code == 1
    assert received["args"].push_to_hub and received["args"].hub_model_id == "me/pruned"
    assert received["pruning_config"].target_density == 0.5


def test_prune_without_output_dir_is_refused(capsys):
    assert main(["prune", "--train_file", "train.csv"]) == 1
    assert "--output_dir" in capsys.readouterr().err


# ------------------------------------------------------------------------- gradient accumulation, resuming, tqdm


def _trainer_state(checkpoint) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def test_prune_run_used_gradient_accumulation(workspace):
    args = torch.load(workspace / "out" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.gradient_accumulation_steps == 2 and args.report_to == []
    assert _trainer_state(workspace / "out" / "checkpoint-2")["global_step"] == 2


def test_prune_resumes_from_a_checkpoint(workspace, tmp_path, monkeypatch, capsys):
    """A second run with --resume_from_checkpoint starts at the checkpoint's step (it writes no checkpoint-2) and ends
    where the uninterrupted run (the workspace's, same flags) ended."""
    resumed_from = []
    train = trainer_module.BlockPruningTrainer.train

    def spy(self, *args, **kwargs):
        resumed_from.append(kwargs.get("resume_from_checkpoint"))
        return train(self, *args, **kwargs)

    monkeypatch.setattr(trainer_module.BlockPruningTrainer, "train", spy)
    checkpoint, out = workspace / "out" / "checkpoint-2", tmp_path / "resumed"
    code = main([
        "prune", "--model", str(workspace / "base"), "--train_file", str(workspace / "train.csv"),
        "--validation_file", str(workspace / "dev.csv"), "--output_dir", str(out), "--max_steps", "4",
        "--save_steps", "2", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--max_seq_length",
        "16", "--use_cpu", "--gradient_accumulation_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
        "--resume_from_checkpoint", str(checkpoint), *PRUNE_FLAGS,
    ])
    assert code == 0
    assert resumed_from == [str(checkpoint)]
    assert not (out / "checkpoint-2").exists()
    assert _trainer_state(out / "checkpoint-4")["global_step"] == 4 > _trainer_state(checkpoint)["global_step"]
    assert "%|" not in capsys.readouterr().err  # --disable_tqdm: no progress bar
    resumed, uninterrupted = (hf_blockprune.from_pretrained(path) for path in (out, workspace / "out"))
    ids = torch.randint(5, len(SPECIALS + WORDS), (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(resumed(input_ids=ids).logits, uninterrupted(input_ids=ids).logits)


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_measure_shows_progress_unless_disabled(capsys, disable_tqdm):
    models = {"a": torch.nn.Linear(3, 2), "b": torch.nn.Linear(3, 1)}
    latency = measure(models, {"input": torch.ones(1, 3)}, rounds=3, warmup=1, disable_tqdm=disable_tqdm)
    assert latency.keys() == {"a", "b"} and all(value > 0 for value in latency.values())
    assert ("timing" in capsys.readouterr().err) != disable_tqdm


def test_prune_one_shot_cuts_a_fine_tuned_model_to_the_target_without_training(workspace, tmp_path, capsys):
    code = main([
        "prune", "--one_shot", "--model", str(workspace / "base"), "--train_file", str(workspace / "train.csv"),
        "--validation_file", str(workspace / "dev.csv"), "--output_dir", str(tmp_path / "out"), "--max_seq_length",
        "16", "--use_cpu", "--pruning_preset", "struct", "--target_speedup", "2", "--speedup_sequence_length", "16",
        "--calibration_examples", "24", "--per_device_train_batch_size", "8",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "validation accuracy" in out and "compacted model saved" in out
    assert not (tmp_path / "out" / "trainer_state.json").exists()  # nothing was trained
    dense = tiny_model("bert")
    pruned = hf_blockprune.from_pretrained(str(tmp_path / "out"))
    assert predicted_speedup(dense, pruned, 16) >= 2.0


def test_prune_one_shot_needs_a_target_speedup(workspace, tmp_path, capsys):
    code = main(["prune", "--one_shot", "--model", str(workspace / "base"), "--train_file",
                 str(workspace / "train.csv"), "--output_dir", str(tmp_path / "out"), "--pruning_preset", "struct",
                 "--target_density", "0.5", "--use_cpu"])
    assert code != 0
    assert "--target_speedup" in capsys.readouterr().err


def test_report_counts_the_layers_compaction_dropped(tmp_path, capsys):
    from test_depth import deep_model, empty_layers

    hf_blockprune.save_compacted(empty_layers(deep_model("llama"), [0, 2]), tmp_path / "small", model_card=False)
    assert main(["report", str(tmp_path / "small"), "--figure", str(tmp_path / "layout.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["model.layers.0", "model.layers.1"]  # original layers 1, 3
    assert [line.split()[2] for line in lines if line.startswith("dropped:")] == ["model.layers.0", "model.layers.2"]
    total = next(line for line in lines if line.startswith("total "))
    assert "8/16" in total and "74/148" in total and "(50.0%)" in total  # 4 layers counted, 2 of them kept whole
