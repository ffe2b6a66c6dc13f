"""The `hf-blockprune` command: fine-prune a classifier or QA model, compact a checkpoint, report a layout, time it.

    hf-blockprune prune --task sst2 --output_dir out --pruning_preset hybrid --target_density 0.3 --save_steps 500
    hf-blockprune prune --task squad --output_dir out-qa --pruning_preset struct --target_density 0.5
    hf-blockprune prune <the same flags as before> --resume_from_checkpoint out/checkpoint-500
    hf-blockprune compact out/checkpoint-500 out-small
    hf-blockprune report out
    hf-blockprune bench out --rounds 20

`prune` takes every `transformers.TrainingArguments` flag (and every `BlockPruningConfig` one); the other commands take
only their own. `python -m hf_blockprune.tasks.cli ...` does the same.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
import typing
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

import datasets
import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers.hf_argparser import string_to_bool
from transformers.utils import logging as hf_logging

from ..compact.card_figure import layer_rows, original_sizes, write_figure
from ..compact.checkpoints import load_masked_checkpoint
from ..compact.compaction import compact_model
from ..compact.flops import predicted_speedup
from ..compact.latency import median_latencies, timing_inputs
from ..compact.saving import (
    architecture_class,
    compact_on_save,
    dense_config,
    from_pretrained,
    is_masked_checkpoint,
    plain_class,
    read_model_config,
    save_compacted,
)
from ..pruning.config import BlockPruningConfig
from ..structure.model_structure import LAYOUT_ATTRIBUTE
from ..structure.projections import is_projection
from . import data, qa
from .defaults import offline_minilm_path

logger = logging.getLogger(__name__)

class CliError(Exception):
    """A user-facing error: printed without a traceback, exit code 1."""


# --------------------------------------------------------------------------------------------------- loading models


def load_any(path: str | os.PathLike, pruning_config_file: str | None = None) -> nn.Module:
    """A compacted folder via `from_pretrained`, a masked checkpoint compacted in memory, or a plain model."""
    config = read_model_config(path)
    if Path(path).is_dir() and is_masked_checkpoint(path):
        return compact_model(load_masked_checkpoint(path, pruning_config_file))
    if getattr(config, LAYOUT_ATTRIBUTE, None) is not None:
        return from_pretrained(path).eval()
    try:
        model_class = architecture_class(config)
    except ValueError:
        model_class = transformers.AutoModel
    return model_class.from_pretrained(path).eval()


def load_tokenizer(path: str | os.PathLike):
    """`AutoTokenizer.from_pretrained(path)` given the model config `read_model_config` reads.

    transformers 5's AutoTokenizer reads the model config through `AutoConfig` before `tokenizer_config.json`: on a
    compacted folder (its `auto_map` names the saved loader's config class) it asks whether to run that code, and on
    a masked checkpoint it warns that a `blockprune_masked_checkpoint` model instantiates one of type ``. With the
    config given, it reads neither.
    """
    return transformers.AutoTokenizer.from_pretrained(path, config=read_model_config(path))


def dense_twin(model: nn.Module, device: str | torch.device | None = None) -> nn.Module:
    """A randomly initialised dense model of `model`'s architecture and original sizes (its layout removed)."""
    with torch.device(device or "cpu"):
        return plain_class(type(model))(dense_config(model.config)).eval()


# ------------------------------------------------------------------------------------------------------ the table


def _linear_parameters(module: nn.Module) -> int:
    return sum(p.numel() for m in module.modules() if is_projection(m) for p in m.parameters(recurse=False))


def layer_table(model: nn.Module) -> tuple[list[dict], str]:
    """Per layer of a compacted `model`: kept heads, FFN size, and Linear parameters kept vs. dense.

    Returns:
        `tuple[list[dict], str]`: the rows (as `card_figure.layer_rows`, plus `params` and `dense_params`) and a
        printable table with a totals line.
    """
    rows = layer_rows(model)
    dense = dense_twin(model, device="meta")
    num_heads, ffn_total = original_sizes(model)
    lines = [f"{'layer':<32} {'heads kept':>12} {'FFN size':>12} {'Linear params (kept / dense)':>36}"]
    totals = [0] * 6
    for row in rows:
        row["params"] = _linear_parameters(model.get_submodule(row["layer"]))
        row["dense_params"] = _linear_parameters(dense.get_submodule(row["layer"]))
        has_ffn = row["ffn_size"] is not None
        values = (
            sum(len(h) for h in row["heads"]), (num_heads or 0) * len(row["heads"]),  # heads kept / all
            row["ffn_size"] if has_ffn else 0, (ffn_total or 0) if has_ffn else 0,  # neurons kept / all
            row["params"], row["dense_params"],
        )
        totals = [total + value for total, value in zip(totals, values)]
        lines.append(_table_line(row["layer"], *values))
    for name, values in _dropped_lines(model, rows, num_heads, ffn_total):  # dropped layers kept nothing
        totals = [total + value for total, value in zip(totals, values)]
        lines.append(_table_line(name, *values))
    lines.append(_table_line("total", *totals))
    return rows, "\n".join(lines)


def _dropped_lines(model: nn.Module, rows: list[dict], num_heads: int | None, ffn_total: int | None):
    """`(name, values)` of the table line of each layer compaction dropped (`"dropped_layers"`, original indices):
    nothing kept, and the dense parameters of a layer of its stack."""
    dropped = (getattr(model.config, LAYOUT_ATTRIBUTE, None) or {}).get("dropped_layers", {})
    for stack, indices in dropped.items():
        row = next((row for row in rows if row["layer"].rpartition(".")[0] == stack), None)
        if row is None:
            continue
        all_heads = (num_heads or 0) * len(row["heads"])
        all_ffn = (ffn_total or 0) if row["ffn_size"] is not None else 0
        for index in indices:  # named by its original index: the layers left are numbered anew
            yield f"dropped: original {stack}.{index}", (0, all_heads, 0, all_ffn, 0, row["dense_params"])


def _table_line(name: str, heads: int, all_heads: int, ffn: int, all_ffn: int, params: int, dense: int) -> str:
    share = f"{params / dense:.1%}" if dense else "-"
    return (f"{name:<32} {f'{heads}/{all_heads}':>12} {f'{ffn}/{all_ffn}':>12} "
            f"{f'{params:,} / {dense:,} ({share})':>36}")


def _figure_path(model_path: str, requested: str | None) -> Path:
    if requested is not None:
        return Path(requested)
    folder = Path(model_path)
    if folder.is_dir() and os.access(folder, os.W_OK):
        return folder / "pruning_layout.png"
    return Path.cwd() / "pruning_layout.png"


# ------------------------------------------------------------------------------------------------------- commands


def run_report(args: argparse.Namespace) -> int:
    """`report MODEL`: the per-layer table of a compacted folder or a masked checkpoint, and its figure."""
    model = load_any(args.model, args.pruning_config)
    if getattr(model.config, LAYOUT_ATTRIBUTE, None) is None:
        raise CliError(f"{args.model} is neither a compacted model nor a masked checkpoint: nothing was pruned.")
    rows, text = layer_table(model)
    print(text)
    print(f"total parameters: {sum(p.numel() for p in model.parameters()):,}")
    figure = _figure_path(args.model, args.figure)
    figure.parent.mkdir(parents=True, exist_ok=True)
    num_heads, ffn_total = original_sizes(model)
    write_figure(figure, rows, num_heads or 1, ffn_total)
    print(f"figure written to {figure}")
    return 0


def run_compact(args: argparse.Namespace) -> int:
    """`compact CHECKPOINT OUT`: rebuild a masked Trainer checkpoint and save it compacted."""
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise CliError(f"{checkpoint} is not a folder.")
    flags = _from_namespace(BlockPruningConfig, args)
    model = load_masked_checkpoint(checkpoint, args.pruning_config, flags)
    tokenizer = None
    if (checkpoint / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(checkpoint)
    compacted = save_compacted(model, args.output, processing_class=tokenizer)
    print(layer_table(compacted)[1])
    print(f"compacted model saved to {args.output}")
    return 0


def _bench_inputs(config, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    try:
        return timing_inputs(config, batch, seq, seed)
    except ValueError as error:
        raise CliError(str(error)) from None


@contextlib.contextmanager
def _library_progress_bars(enabled: bool):
    """Switch the progress bars of `datasets` (the tokenization `map`s) and transformers (weight loading) off inside
    the block unless `enabled`, as `--disable_tqdm` does for the Trainer's own bars."""
    switches = [
        (datasets.is_progress_bar_enabled, datasets.disable_progress_bars, datasets.enable_progress_bars),
        (hf_logging.is_progress_bar_enabled, hf_logging.disable_progress_bar, hf_logging.enable_progress_bar),
    ]
    switched = [(off, on) for is_on, off, on in switches if not enabled and is_on()]
    for off, _ in switched:
        off()
    try:
        yield
    finally:
        for _, on in switched:
            on()


def measure(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], rounds: int, warmup: int,
            disable_tqdm: bool = False) -> dict:
    """Median latency (seconds) of each model, timed round-robin with a rotating start after `warmup` calls each
    (`hf_blockprune.compact.latency.median_latencies`, with progress bars unless `disable_tqdm`)."""
    return median_latencies(models, inputs, rounds, warmup, functools.partial(tqdm, disable=disable_tqdm))


def run_bench(args: argparse.Namespace) -> int:
    """`bench MODEL`: CPU latency of MODEL vs. a baseline (default: its dense twin), and the predicted speedup."""
    if args.rounds < 1 or args.batch < 1 or args.seq < 1:
        raise CliError("--rounds, --batch and --seq must be >= 1.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with _library_progress_bars(not args.disable_tqdm):
        model = load_any(args.model)
        baseline = load_any(args.baseline) if args.baseline else dense_twin(model)
    inputs = _bench_inputs(model.config, args.batch, args.seq, args.seed)
    latency = measure({"baseline": baseline, "model": model}, inputs, args.rounds, args.warmup, args.disable_tqdm)
    predicted = predicted_speedup(baseline, model, args.seq)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, sequence {args.seq}, "
          f"{args.rounds} rounds, median latency per batch")
    print(f"baseline ({args.baseline or 'dense, random init'}): {latency['baseline'] * 1000:.2f} ms")
    print(f"model ({args.model}): {latency['model'] * 1000:.2f} ms")
    print(f"measured speedup: {latency['baseline'] / latency['model']:.2f}x")
    print(f"FLOPs-predicted speedup: {predicted:.2f}x")
    return 0


# ---------------------------------------------------------------------------------------------------------- prune


@dataclass
class PruneArguments:
    """The task and data flags of `hf-blockprune prune`.

    `prune` parses them together with `BlockPruningConfig` (the pruning flags) and `transformers.TrainingArguments`
    (every Trainer flag). `HfArgumentParser` refuses a flag declared twice, so the three share no field name: the
    flags `prune` declared itself before it took `TrainingArguments` and that duplicate one of its fields
    (`--output_dir`, `--max_steps`, `--num_train_epochs`, `--learning_rate`, `--per_device_train_batch_size`,
    `--per_device_eval_batch_size`, `--logging_steps`, `--save_steps`, `--seed`, `--use_cpu`) are now that field, with
    `prune`'s former default kept (`PRUNE_TRAINING_DEFAULTS`).

    Args:
        model (`str`, *optional*):
            Path or Hub id of the model to fine-prune; defaults to the offline MiniLM-L6-H384.
        task (`str`, *optional*):
            A GLUE task (`sst2`, `mrpc`, ...), read from the shared data folder when present, else the Hub; or `squad`
            for extractive QA.
        train_file (`str`, *optional*):
            Classification: csv/tsv/json(l) with a `label` column; with `task="squad"`: SQuAD json (official or lines).
        validation_file (`str`, *optional*):
            As `train_file` (classification defaults to 10% of it).
        text_columns (`list[str]`, *optional*):
            One or two text columns of the classification files.
        max_seq_length (`int`, *optional*, defaults to 128):
            Longer inputs are truncated (QA: split into windows).
        doc_stride (`int`, *optional*, defaults to 128):
            QA: tokens shared by consecutive windows of a context.
        max_train_samples (`int`, *optional*):
            Train on a shuffled subset of this size.
        max_eval_samples (`int`, *optional*):
            Evaluate on a shuffled subset of this size.
        one_shot (`bool`, *optional*, defaults to `False`):
            Prune without training (`hf_blockprune.compact.one_shot.prune_one_shot`): `--model` must be fine-tuned on
            the task; its heads and neurons are ranked on `--calibration_examples` training examples, cut to
            `--target_speedup` (`--speedup_cost_model`), rescaled by least squares and compacted. No training flag
            applies but the batch sizes, `--seed`, `--use_cpu` and `--push_to_hub`.
    """

    _argument_group_name = "task and data"

    model: str | None = field(
        default=None, metadata={"help": "Path or Hub id of the model; None: the offline MiniLM-L6-H384."}
    )
    task: str | None = field(
        default=None,
        metadata={"help": "GLUE task (sst2, mrpc, ...) or squad: local files in the shared data folder when present, "
                          "else the Hub."},
    )
    train_file: str | None = field(
        default=None,
        metadata={"help": "Classification: csv/tsv/json(l) with a `label` column; with --task squad: SQuAD json "
                          "(official or json lines)."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "As --train_file (classification default: 10%% of it)."}
    )
    text_columns: list[str] | None = field(
        default=None, metadata={"help": "One or two text columns of the classification files."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated (QA: windowed)."})
    doc_stride: int = field(default=128, metadata={"help": "QA: tokens shared by consecutive windows."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a shuffled subset."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on a shuffled subset."})
    one_shot: bool = field(
        default=False,
        metadata={"help": "Prune a fine-tuned --model without training: calibrate on --calibration_examples "
                          "training examples, cut to --target_speedup, rescale and compact (minutes on a CPU)."},
    )


# `prune` saves masked checkpoints only when asked (`TrainingArguments` alone saves every 500 steps): this default
# `save_strategy` becomes "steps" when `--save_steps` is given, else "no" (see `training_arguments`).
SAVE_IF_STEPS_GIVEN = "no (steps with --save_steps)"

# `prune`'s defaults where they differ from `TrainingArguments`' (they predate `prune` taking TrainingArguments).
PRUNE_TRAINING_DEFAULTS = {
    "learning_rate": 3e-5,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "logging_steps": 50,
    "report_to": "none",
    "save_strategy": SAVE_IF_STEPS_GIVEN,
    "save_steps": None,
}


def _from_namespace(dataclass_type, args: argparse.Namespace):
    """An instance of `dataclass_type` from the parsed flags that are its fields (the others keep their defaults)."""
    values = vars(args)
    return dataclass_type(**{f.name: values[f.name] for f in fields(dataclass_type) if f.init and f.name in values})


def training_arguments(args: argparse.Namespace) -> transformers.TrainingArguments:
    """The `TrainingArguments` of a parsed `prune` command line.

    `prune` saves masked checkpoints only when asked: without `--save_strategy`, it saves every `--save_steps` steps
    when that is given and never otherwise (`TrainingArguments` alone would save every 500 steps); `--save_strategy
    steps` alone saves every 500 steps.

    Args:
        args (`argparse.Namespace`): the parsed `prune` flags.

    Returns:
        `transformers.TrainingArguments`: built from the flags that are its fields.
    """
    values = {f.name: getattr(args, f.name) for f in fields(transformers.TrainingArguments) if f.init}
    if values["save_strategy"] == SAVE_IF_STEPS_GIVEN:
        values["save_strategy"] = "no" if values["save_steps"] is None else "steps"
    if values["save_steps"] is None:
        del values["save_steps"]
    return transformers.TrainingArguments(**values)


def _accuracy(eval_prediction) -> dict[str, float]:
    logits = eval_prediction.predictions[0] if isinstance(eval_prediction.predictions, tuple) \
        else eval_prediction.predictions
    return {"accuracy": float((logits.argmax(-1) == eval_prediction.label_ids).mean())}


def _prune_data(task: PruneArguments, seed: int):
    if task.task is None and task.train_file is None:
        raise CliError("Give --task (a GLUE task, or squad) or --train_file (with --validation_file).")
    if task.task is not None and task.task != "squad" and task.train_file is not None:
        raise CliError("Give either --task (a GLUE task) or --train_file, not both (--train_file goes with "
                       "--task squad for local SQuAD-format files).")
    if task.task is not None and task.task != "squad":
        raw, text_columns, label_column = data.load_glue(task.task)
    else:
        raw, text_columns, label_column = data.load_classification_files(task.train_file, task.validation_file,
                                                                         task.text_columns)
    return _subsets(raw, task, seed), text_columns, label_column


def _subsets(raw, task: PruneArguments, seed: int):
    for split, size in (("train", task.max_train_samples), ("validation", task.max_eval_samples)):
        if size is not None:
            raw[split] = raw[split].shuffle(seed=seed).select(range(min(size, len(raw[split]))))
    return raw


def run_prune(args: argparse.Namespace) -> int:
    """`prune`: fine-prune a classifier or an extractive QA model, evaluate it and save it compacted."""
    if args.output_dir is None:
        raise CliError("Give --output_dir (where checkpoints and the compacted model are saved).")
    task, pruning_config = _from_namespace(PruneArguments, args), _from_namespace(BlockPruningConfig, args)
    training_args = training_arguments(args)
    with _library_progress_bars(not training_args.disable_tqdm):
        model_path = task.model or offline_minilm_path()
        tokenizer = load_tokenizer(model_path)
        prune = _prune_qa if task.task == "squad" else _prune_classifier
        metrics, size = prune(task, training_args, model_path, tokenizer, pruning_config)
        print("validation " + ", ".join(f"{k}: {v:.4f}" for k, v in metrics.items()) + f" ({size} examples)")
        print(layer_table(from_pretrained(training_args.output_dir))[1])
    print(f"compacted model saved to {training_args.output_dir}")
    return 0


def _prune_classifier(task, training_args, model_path, tokenizer, pruning_config):
    raw, text_columns, label_column = _prune_data(task, training_args.seed)
    num_labels = max(int(label) for label in raw["train"][label_column]) + 1
    tokenized = data.tokenize_classification(raw, tokenizer, text_columns, label_column, task.max_seq_length)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    if task.one_shot:
        trainer = _one_shot_trainer(training_args, model, tokenizer, tokenized, pruning_config, _accuracy)
    else:
        trainer = _trainer(training_args, model, tokenizer, tokenized, pruning_config, compute_metrics=_accuracy)
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = {"accuracy": trainer.evaluate()["eval_accuracy"]}
    trainer.save_model()  # writes the compacted model, and pushes it with --push_to_hub
    return metrics, len(tokenized["validation"])


def _prune_qa(task, training_args, model_path, tokenizer, pruning_config):
    raw = _subsets(data.load_squad(train_file=task.train_file, validation_file=task.validation_file), task,
                   training_args.seed)
    length, stride = task.max_seq_length, task.doc_stride
    train = raw["train"].map(lambda b: qa.prepare_train_features(b, tokenizer, length, stride), batched=True,
                             remove_columns=raw["train"].column_names)
    features = raw["validation"].map(lambda b: qa.prepare_validation_features(b, tokenizer, length, stride),
                                     batched=True, remove_columns=raw["validation"].column_names)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_path)
    splits = {"train": train, "validation": None}
    if task.one_shot:
        trainer = _one_shot_trainer(training_args, model, tokenizer, splits, pruning_config)
    else:
        trainer = _trainer(training_args, model, tokenizer, splits, pruning_config)
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    start, end = trainer.predict(features.remove_columns(["example_id", "offset_mapping"])).predictions[:2]
    examples = tqdm(raw["validation"], desc="answers", unit="example", disable=training_args.disable_tqdm)
    answers = qa.postprocess_predictions(examples, features, start, end)
    references = {example["id"]: example["answers"]["text"] for example in raw["validation"]}
    trainer.save_model()  # writes the compacted model, and pushes it with --push_to_hub
    return qa.squad_metrics(answers, references), len(raw["validation"])


def _one_shot_trainer(training_args, model, tokenizer, splits, pruning_config, compute_metrics=None):
    """Prune `model` to `--target_speedup` without training (`prune_one_shot`) and return a Trainer over the compacted
    model (for evaluation and `save_model`, which writes the compacted folder)."""
    from ..compact.latency import LatencyTable
    from ..compact.one_shot import prune_one_shot
    from ..pruning.importance import calibration_batches

    if pruning_config.target_speedup is None:
        raise CliError("--one_shot cuts to a speed: give --target_speedup (e.g. 1.5).")
    trainer = _trainer(training_args, model, tokenizer, splits, BlockPruningConfig(pruning_preset="none"),
                       compute_metrics)
    batches = calibration_batches(trainer.get_train_dataloader(), pruning_config.calibration_examples,
                                  training_args.seed)
    table = LatencyTable.load(pruning_config.latency_table) if pruning_config.latency_table else None
    prune_one_shot(
        trainer.model, batches, pruning_config.target_speedup, seq_len=pruning_config.speedup_sequence_length,
        cost_model=pruning_config.speedup_cost_model, batch_size=pruning_config.speedup_batch_size,
        latency_table=table, config=pruning_config if pruning_config.layers_pattern else None,
    )
    compact_on_save(trainer.model)
    return trainer


def _trainer(training_args, model, tokenizer, splits, pruning_config, compute_metrics=None):
    from ..training.trainer import BlockPruningTrainer

    return BlockPruningTrainer(
        model=model, args=training_args, train_dataset=splits["train"], eval_dataset=splits["validation"],
        processing_class=tokenizer, compute_metrics=compute_metrics, pruning_config=pruning_config,
    )


# --------------------------------------------------------------------------------------------------------- parser

# The `BlockPruningConfig` fields that decide which weights a checkpoint's scores mask (`compact`'s flags, used when
# the checkpoint does not record its config); the others only matter while training.
LAYOUT_FIELDS = (
    "pruning_preset", "pruning_method", "attention_granularity", "attention_block_size", "ffn_granularity",
    "ffn_block_size", "ffn_round_to", "layers_pattern", "attention_modules", "ffn_modules", "num_heads_attribute",
    "num_kv_heads_attribute",
)


def _titled(dataclass_type, title: str):
    """`dataclass_type` whose flags `HfArgumentParser` lists under `title` in `--help` (its fields, unchanged)."""
    return type(dataclass_type.__name__, (dataclass_type,), {"_argument_group_name": title})


def _layout_flags():
    """A dataclass of the `LAYOUT_FIELDS` of `BlockPruningConfig`, with their types, defaults and help."""
    hints = typing.get_type_hints(BlockPruningConfig)
    specs = [(f.name, hints[f.name], field(default=f.default, metadata=f.metadata))
             for f in fields(BlockPruningConfig) if f.name in LAYOUT_FIELDS]
    title = "pruning layout (used when the checkpoint records no pruning config)"
    return make_dataclass("LayoutFlags", specs, namespace={"_argument_group_name": title})


def _add_prune(subparsers) -> None:
    flags = transformers.HfArgumentParser((
        PruneArguments,
        _titled(BlockPruningConfig, "pruning (BlockPruningConfig)"),
        _titled(transformers.TrainingArguments, "training (transformers.TrainingArguments)"),
    ), add_help=False)
    parser = subparsers.add_parser(
        "prune", parents=[flags], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        usage="%(prog)s --output_dir DIR (--task TASK | --train_file FILE) [task/data, pruning, training flags]",
        help="fine-prune a text classifier or an extractive QA model",
        description="Fine-prune a model with BlockPruningTrainer, evaluate it and save it compacted: text "
        "classification (a GLUE task, or local csv/tsv/json files with a `label` column) or SQuAD-format extractive "
        "QA (--task squad, with optional local files). Every TrainingArguments flag works (--output_dir is required; "
        "--resume_from_checkpoint PATH continues a run from a checkpoint; --push_to_hub pushes the compacted model); "
        "prune's own defaults: --learning_rate 3e-5, --per_device_train_batch_size 32, --per_device_eval_batch_size "
        "64, --logging_steps 50, --report_to none, and masked checkpoints only with --save_steps N (or "
        "--save_strategy). For summarization or your own scripts, use transformers' run_glue.py / run_qa.py / "
        "run_summarization.py with BlockPruningCallback (see the README).",
    )
    parser.set_defaults(handler=run_prune, **PRUNE_TRAINING_DEFAULTS)


def _add_compact(subparsers) -> None:
    parser = subparsers.add_parser(
        "compact", parents=[transformers.HfArgumentParser(_layout_flags(), add_help=False)],
        help="compact a masked training checkpoint",
        description="Rebuild a masked checkpoint saved during training and save it compacted. The pruning config is "
        "--pruning_config if given, else the one recorded in the checkpoint's config.json, else the layout flags "
        "below (the pruning flags that decide which weights the scores mask).",
    )
    parser.add_argument("checkpoint", help="a checkpoint-N folder written by BlockPruningTrainer")
    parser.add_argument("output", help="where to save the compacted model")
    parser.add_argument("--pruning_config", default=None, help="JSON file of the BlockPruningConfig used")
    parser.set_defaults(handler=run_compact)


def _add_report(subparsers) -> None:
    parser = subparsers.add_parser("report", help="per-layer table and figure of a pruned model")
    parser.add_argument("model", help="a compacted folder or a masked checkpoint")
    parser.add_argument("--figure", default=None, help="PNG path (default: MODEL/pruning_layout.png, else cwd)")
    parser.add_argument("--pruning_config", default=None, help="for a checkpoint that does not record it")
    parser.set_defaults(handler=run_report)


def _add_bench(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="CPU latency vs. a dense baseline")
    parser.add_argument("model", help="a compacted folder, a masked checkpoint or a plain model")
    parser.add_argument("--baseline", default=None, help="default: the dense model of the same config, random init")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20, help="timed calls per model, interleaved")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per model first")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--disable_tqdm", type=string_to_bool, nargs="?", const=True, default=False,
                        help="hide the progress bars")
    parser.set_defaults(handler=run_bench)


def build_parser() -> argparse.ArgumentParser:
    """The `hf-blockprune` argument parser, with the `prune`, `compact`, `report` and `bench` subcommands."""
    parser = argparse.ArgumentParser(prog="hf-blockprune", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_prune, _add_compact, _add_report, _add_bench):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `hf-blockprune` with `argv` (default: `sys.argv[1:]`).

    Args:
        argv (`list[str]`, *optional*): the command-line arguments.

    Returns:
        `int`: the exit code, 0 on success and 1 on a user error (printed on stderr, without a traceback).
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.handler(args)
    except (CliError, ValueError, ImportError, OSError) as error:
        print(f"hf-blockprune {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
