"""The `hf-blockprune` command: fine-prune a classifier or QA model, compact a checkpoint, report a layout, time it.

    hf-blockprune prune --task sst2 --output_dir out --pruning_preset hybrid --target_density 0.3
    hf-blockprune prune --task squad --output_dir out-qa --pruning_preset struct --target_density 0.5
    hf-blockprune compact out/checkpoint-500 out-small
    hf-blockprune report out
    hf-blockprune bench out --rounds 20

`python -m hf_blockprune.tasks.cli ...` does the same.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm

from ..compact.checkpoints import load_masked_checkpoint
from ..compact.compaction import compact_model
from ..compact.flops import predicted_speedup
from ..compact.model_card import layer_rows, original_sizes, write_figure
from ..compact.saving import (
    architecture_class,
    dense_config,
    from_pretrained,
    is_masked_checkpoint,
    plain_class,
    read_model_config,
    save_compacted,
)
from ..pruning.config import BlockPruningConfig
from ..pruning.model import LAYOUT_ATTRIBUTE
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
        `tuple[list[dict], str]`: the rows (as `model_card.layer_rows`, plus `params` and `dense_params`) and a
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
    lines.append(_table_line("total", *totals))
    return rows, "\n".join(lines)


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
    model = load_masked_checkpoint(checkpoint, args.pruning_config, _config_from_args(args))
    tokenizer = None
    if (checkpoint / "tokenizer_config.json").is_file():
        tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    compacted = save_compacted(model, args.output, processing_class=tokenizer)
    print(layer_table(compacted)[1])
    print(f"compacted model saved to {args.output}")
    return 0


def _bench_inputs(config, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq > limit:
        raise CliError(f"--seq {seq} exceeds the model's max_position_embeddings ({limit}).")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, config.vocab_size - 1), config.vocab_size, (batch, seq), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def measure(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], rounds: int, warmup: int) -> dict:
    """Median latency (seconds) of each model, timed round-robin with a rotating start after `warmup` calls each."""
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            for _ in range(warmup):
                models[name](**inputs)
        for index in tqdm(range(rounds), desc="timing", unit="round"):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                models[name](**inputs)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def run_bench(args: argparse.Namespace) -> int:
    """`bench MODEL`: CPU latency of MODEL vs. a baseline (default: its dense twin), and the predicted speedup."""
    if args.rounds < 1 or args.batch < 1 or args.seq < 1:
        raise CliError("--rounds, --batch and --seq must be >= 1.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = load_any(args.model)
    baseline = load_any(args.baseline) if args.baseline else dense_twin(model)
    inputs = _bench_inputs(model.config, args.batch, args.seq, args.seed)
    latency = measure({"baseline": baseline, "model": model}, inputs, args.rounds, args.warmup)
    predicted = predicted_speedup(baseline, model, args.seq)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, sequence {args.seq}, "
          f"{args.rounds} rounds, median latency per batch")
    print(f"baseline ({args.baseline or 'dense, random init'}): {latency['baseline'] * 1000:.2f} ms")
    print(f"model ({args.model}): {latency['model'] * 1000:.2f} ms")
    print(f"measured speedup: {latency['baseline'] / latency['model']:.2f}x")
    print(f"FLOPs-predicted speedup: {predicted:.2f}x")
    return 0


# ---------------------------------------------------------------------------------------------------------- prune


def _accuracy(eval_prediction) -> dict[str, float]:
    logits = eval_prediction.predictions[0] if isinstance(eval_prediction.predictions, tuple) \
        else eval_prediction.predictions
    return {"accuracy": float((logits.argmax(-1) == eval_prediction.label_ids).mean())}


def _training_args(args: argparse.Namespace) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, num_train_epochs=args.num_train_epochs,
        learning_rate=args.learning_rate, per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size, seed=args.seed, logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500, report_to="none",
        use_cpu=args.use_cpu, dataloader_num_workers=0,
    )


def _prune_data(args: argparse.Namespace):
    if args.task is None and args.train_file is None:
        raise CliError("Give --task (a GLUE task, or squad) or --train_file (with --validation_file).")
    if args.task is not None and args.task != "squad" and args.train_file is not None:
        raise CliError("Give either --task (a GLUE task) or --train_file, not both (--train_file goes with "
                       "--task squad for local SQuAD-format files).")
    if args.task is not None and args.task != "squad":
        raw, text_columns, label_column = data.load_glue(args.task)
    else:
        raw, text_columns, label_column = data.load_classification_files(args.train_file, args.validation_file,
                                                                         args.text_columns)
    return _subsets(raw, args), text_columns, label_column


def _subsets(raw, args: argparse.Namespace):
    for split, size in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        if size is not None:
            raw[split] = raw[split].shuffle(seed=args.seed).select(range(min(size, len(raw[split]))))
    return raw


def run_prune(args: argparse.Namespace) -> int:
    """`prune`: fine-prune a classifier or an extractive QA model, evaluate it and save it compacted."""
    pruning_config = _config_from_args(args)
    model_path = args.model or offline_minilm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path)
    if args.task == "squad":
        model, metrics, size = _prune_qa(args, model_path, tokenizer, pruning_config)
    else:
        model, metrics, size = _prune_classifier(args, model_path, tokenizer, pruning_config)
    print("validation " + ", ".join(f"{k}: {v:.4f}" for k, v in metrics.items()) + f" ({size} examples)")
    print(layer_table(from_pretrained(args.output_dir))[1])
    print(f"compacted model saved to {args.output_dir}")
    return 0


def _prune_classifier(args, model_path, tokenizer, pruning_config):
    raw, text_columns, label_column = _prune_data(args)
    num_labels = max(int(label) for label in raw["train"][label_column]) + 1
    tokenized = data.tokenize_classification(raw, tokenizer, text_columns, label_column, args.max_seq_length)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
    trainer = _trainer(args, model, tokenizer, tokenized, pruning_config, compute_metrics=_accuracy)
    trainer.train()
    metrics = {"accuracy": trainer.evaluate()["eval_accuracy"]}
    trainer.save_model()
    return trainer.model, metrics, len(tokenized["validation"])


def _prune_qa(args, model_path, tokenizer, pruning_config):
    raw = _subsets(data.load_squad(train_file=args.train_file, validation_file=args.validation_file), args)
    length, stride = args.max_seq_length, args.doc_stride
    train = raw["train"].map(lambda b: qa.prepare_train_features(b, tokenizer, length, stride), batched=True,
                             remove_columns=raw["train"].column_names)
    features = raw["validation"].map(lambda b: qa.prepare_validation_features(b, tokenizer, length, stride),
                                     batched=True, remove_columns=raw["validation"].column_names)
    model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_path)
    trainer = _trainer(args, model, tokenizer, {"train": train, "validation": None}, pruning_config)
    trainer.train()
    start, end = trainer.predict(features.remove_columns(["example_id", "offset_mapping"])).predictions[:2]
    answers = qa.postprocess_predictions(raw["validation"], features, start, end)
    references = {example["id"]: example["answers"]["text"] for example in raw["validation"]}
    trainer.save_model()
    return trainer.model, qa.squad_metrics(answers, references), len(raw["validation"])


def _trainer(args, model, tokenizer, datasets, pruning_config, compute_metrics=None):
    from ..training.trainer import BlockPruningTrainer

    return BlockPruningTrainer(
        model=model, args=_training_args(args), train_dataset=datasets["train"], eval_dataset=datasets["validation"],
        processing_class=tokenizer, compute_metrics=compute_metrics, pruning_config=pruning_config,
    )


# --------------------------------------------------------------------------------------------------------- parser


def _config_from_args(args: argparse.Namespace) -> BlockPruningConfig:
    return BlockPruningConfig(**{f.name: getattr(args, f.name) for f in fields(BlockPruningConfig)})


def _pruning_flags() -> argparse.ArgumentParser:
    return transformers.HfArgumentParser(BlockPruningConfig, add_help=False)


def _add_prune(subparsers) -> None:
    parser = subparsers.add_parser(
        "prune", parents=[_pruning_flags()], help="fine-prune a text classifier or an extractive QA model",
        description="Fine-prune a model with BlockPruningTrainer, evaluate it and save it compacted: text "
        "classification (a GLUE task, or local csv/tsv/json files with a `label` column) or SQuAD-format extractive "
        "QA (--task squad, with optional local files). For summarization or your own scripts, use transformers' "
        "run_glue.py / run_qa.py / run_summarization.py with BlockPruningCallback (see the README).",
    )
    parser.add_argument("--model", default=None, help="path or Hub id (default: the offline MiniLM-L6-H384)")
    parser.add_argument("--task", default=None, help="GLUE task (sst2, mrpc, ...) or squad: local files in the "
                        "shared data folder when present, else the Hub")
    parser.add_argument("--train_file", default=None, help="classification: csv/tsv/json(l) with a `label` column; "
                        "with --task squad: SQuAD json (official or json lines)")
    parser.add_argument("--validation_file", default=None, help="as --train_file (classification default: 10%% of "
                        "it)")
    parser.add_argument("--text_columns", nargs="+", default=None, help="one or two text columns of the files")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--num_train_epochs", type=float, default=3.0)
    parser.add_argument("--learning_rate", type=float, default=3e-5)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=64)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--doc_stride", type=int, default=128, help="QA: tokens shared by consecutive windows")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--logging_steps", type=int, default=50)
    parser.add_argument("--save_steps", type=int, default=None, help="save masked checkpoints every N steps")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--use_cpu", action="store_true", help="train on CPU even if an accelerator is present")
    parser.set_defaults(handler=run_prune)


def _add_compact(subparsers) -> None:
    parser = subparsers.add_parser(
        "compact", parents=[_pruning_flags()], help="compact a masked training checkpoint",
        description="Rebuild a masked checkpoint saved during training and save it compacted. The pruning config is "
        "--pruning_config if given, else the one recorded in the checkpoint's config.json, else the preset flags.",
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
