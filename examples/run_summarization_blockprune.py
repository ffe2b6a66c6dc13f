"""Fine-prune a summarizer: the structure of transformers' `run_summarization.py`, `Seq2SeqTrainer` plus one callback.

    python examples/run_summarization_blockprune.py --model_name_or_path facebook/bart-base \\
        --dataset_name EdinburghNLP/xsum --output_dir out/xsum --do_train --do_eval --predict_with_generate \\
        --pruning_preset hybrid --target_density 0.5 --max_steps 2000

    # offline: a local seq2seq model and the XSum files of ../shared/data (the default data)
    python examples/run_summarization_blockprune.py --model_name_or_path path/to/bart --output_dir out/xsum ...

`Seq2SeqTrainer` is kept; block pruning comes from `callbacks=[BlockPruningCallback(pruning_args)]`. Arguments:
the dataclasses below, every `Seq2SeqTrainingArguments` and every `BlockPruningConfig` flag, or one JSON file.
Without `--dataset_name` / `--train_file` the shared XSum files are used (`test_1000_a.jsonl` to train,
`test_1000_b.jsonl` to evaluate), else `EdinburghNLP/xsum` from the Hub.

ROUGE-1 / 2 / L are computed here (F-measure, lower-cased alphanumeric tokens, no stemming), so no metric download
and no `nltk` data are needed; the numbers are close to, not identical with, the `rouge_score` package's. After
training, `trainer.save_model()` writes the compacted model; evaluation reloads it from `--output_dir` with
`hf_blockprune.from_pretrained` and generates with it.
"""

from __future__ import annotations

import collections
import logging
import re
import sys
from dataclasses import dataclass, field

import numpy as np
import transformers
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)

import hf_blockprune
from hf_blockprune import BlockPruningCallback, BlockPruningConfig
from hf_blockprune.tasks.data import load_summarization

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to fine-prune."""

    model_name_or_path: str = field(metadata={"help": "Path or Hub id of a seq2seq model (BART, ...)."})


@dataclass
class DataTrainingArguments:
    """Which data, and how long inputs and summaries may be."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. EdinburghNLP/xsum."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, if any."})
    train_file: str | None = field(default=None, metadata={"help": "csv/json(l) with the text and summary columns."})
    validation_file: str | None = field(default=None, metadata={"help": "Same format as --train_file."})
    text_column: str = field(default="document", metadata={"help": "Column of the documents."})
    summary_column: str = field(default="summary", metadata={"help": "Column of the reference summaries."})
    max_source_length: int = field(default=512, metadata={"help": "Documents are truncated to this many tokens."})
    max_target_length: int = field(default=64, metadata={"help": "Summaries are truncated to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a shuffled subset."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N examples."})


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measures (in %) over pairs of texts."""
    totals = collections.Counter()
    for prediction, reference in zip(predictions, references, strict=True):
        pred, ref = re.findall(r"[a-z0-9]+", prediction.lower()), re.findall(r"[a-z0-9]+", reference.lower())
        for n in (1, 2):
            pred_ngrams = collections.Counter(zip(*[pred[i:] for i in range(n)]))
            ref_ngrams = collections.Counter(zip(*[ref[i:] for i in range(n)]))
            totals[f"rouge{n}"] += _f_measure(sum((pred_ngrams & ref_ngrams).values()), sum(pred_ngrams.values()),
                                              sum(ref_ngrams.values()))
        totals["rougeL"] += _f_measure(_lcs_length(pred, ref), len(pred), len(ref))
    return {name: 100.0 * value / max(len(predictions), 1) for name, value in totals.items()}


def _f_measure(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def parse_arguments():
    """Model, data, training and pruning arguments, from the command line or one JSON file."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments, BlockPruningConfig))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=sys.argv[1])
    return parser.parse_args_into_dataclasses()


def tokenized_data(data_args: DataTrainingArguments, tokenizer, seed: int):
    """Raw splits with the requested subsets, and their tokenized versions."""
    raw = load_summarization(data_args.dataset_name, data_args.dataset_config_name, data_args.train_file,
                             data_args.validation_file, data_args.text_column, data_args.summary_column)
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].shuffle(seed=seed).select(range(min(data_args.max_train_samples,
                                                                        len(raw["train"]))))
    if data_args.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(data_args.max_eval_samples, len(raw["validation"]))))

    def encode(batch):
        encoded = tokenizer([str(t) for t in batch[data_args.text_column]], max_length=data_args.max_source_length,
                            truncation=True)
        targets = tokenizer(text_target=[str(t) for t in batch[data_args.summary_column]],
                            max_length=data_args.max_target_length, truncation=True)
        encoded["labels"] = targets["input_ids"]
        return encoded

    return {split: raw[split].map(encode, batched=True, remove_columns=raw[split].column_names)
            for split in ("train", "validation")}


def metrics_function(tokenizer):
    """`compute_metrics` for generated token ids: decode predictions and labels, return ROUGE and mean length."""

    def compute_metrics(prediction) -> dict[str, float]:
        predictions = np.where(prediction.predictions != -100, prediction.predictions, tokenizer.pad_token_id)
        labels = np.where(prediction.label_ids != -100, prediction.label_ids, tokenizer.pad_token_id)
        decoded = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        metrics = rouge_scores(decoded, references)
        metrics["gen_len"] = float(np.mean([np.count_nonzero(p != tokenizer.pad_token_id) for p in predictions]))
        return metrics

    return compute_metrics


def main() -> None:
    """Train with block pruning, save the compacted model, reload it and evaluate it with generation."""
    model_args, data_args, training_args, pruning_args = parse_arguments()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    data = tokenized_data(data_args, tokenizer, training_args.seed)
    if training_args.generation_max_length is None:
        training_args.generation_max_length = data_args.max_target_length
    common = dict(args=training_args, eval_dataset=data["validation"], processing_class=tokenizer,
                  compute_metrics=metrics_function(tokenizer) if training_args.predict_with_generate else None)

    if training_args.do_train:
        model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)
        trainer = Seq2SeqTrainer(
            model=model, train_dataset=data["train"], data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
            callbacks=[BlockPruningCallback(pruning_args)],  # the change to run_summarization.py: one callback
            **common,
        )
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # compacted: pruned heads and FFN neurons are gone
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        model = hf_blockprune.from_pretrained(training_args.output_dir)
        evaluator = Seq2SeqTrainer(model=model, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), **common)
        metrics = evaluator.evaluate(metric_key_prefix="eval")
        metrics["eval_samples"] = len(data["validation"])
        metrics["eval_parameters"] = sum(p.numel() for p in model.parameters())
        evaluator.log_metrics("eval", metrics)
        evaluator.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
