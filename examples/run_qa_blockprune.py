"""Fine-prune an extractive QA model: the structure of transformers' `run_qa.py`, with `BlockPruningCallback` added.

    python examples/run_qa_blockprune.py --output_dir out/squad --do_train --do_eval \\
        --pruning_preset hybrid --target_density 0.5 --max_seq_length 256 --doc_stride 64 --max_steps 500

    # online, unchanged: any Hub model and dataset in SQuAD format, or your own files
    python examples/run_qa_blockprune.py --model_name_or_path bert-base-uncased --dataset_name rajpurkar/squad ...

The script keeps its own `Trainer` subclass, `QuestionAnsweringTrainer` (evaluation turns start/end logits into
answer texts and scores them with SQuAD exact match and F1), and gains block pruning by one added callback:
`callbacks=[BlockPruningCallback(pruning_args)]`. Arguments: the dataclasses below, every `TrainingArguments` and
every `BlockPruningConfig` flag, or one JSON file. Defaults: the offline MiniLM-L6-H384 and SQuAD v1.1 from
`../shared/data` (train: first 44 articles; dev: all), else `rajpurkar/squad` from the Hub.

After training, `trainer.save_model()` writes the compacted model; evaluation reloads it from `--output_dir` with
`hf_blockprune.from_pretrained`, so the reported EM / F1 are the saved model's.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import transformers
from transformers import (
    AutoModelForQuestionAnswering,
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import hf_blockprune
from hf_blockprune import BlockPruningCallback, BlockPruningConfig
from hf_blockprune.tasks.data import load_squad
from hf_blockprune.tasks.defaults import offline_minilm_path
from hf_blockprune.tasks.qa import (
    postprocess_predictions,
    prepare_train_features,
    prepare_validation_features,
    squad_metrics,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """Which model to fine-prune."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Path or Hub id of the model (default: the offline MiniLM-L6-H384)."}
    )


@dataclass
class DataTrainingArguments:
    """Which data, and how contexts are split into windows."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset in SQuAD format."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, if any."})
    train_file: str | None = field(default=None, metadata={"help": "SQuAD json (official or json lines)."})
    validation_file: str | None = field(default=None, metadata={"help": "Same format as --train_file."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per window, question included."})
    doc_stride: int = field(default=128, metadata={"help": "Tokens shared by consecutive windows of a context."})
    max_answer_length: int = field(default=30, metadata={"help": "Longest predicted answer, in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a shuffled subset (examples)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N examples."})


class QuestionAnsweringTrainer(Trainer):
    """A `Trainer` whose evaluation extracts answer texts from the windows' logits and reports SQuAD EM / F1.

    Args:
        eval_examples: the raw evaluation examples (`id`, `context`, `answers`).
        max_answer_length (`int`): longest answer, in tokens.
        *args, **kwargs: as for `Trainer`; `eval_dataset` holds the windows of `prepare_validation_features`.
    """

    def __init__(self, *args, eval_examples=None, max_answer_length: int = 30, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_examples = eval_examples
        self.max_answer_length = max_answer_length

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Predict the windows, post-process them into answers, log and return EM / F1."""
        features = self.eval_dataset if eval_dataset is None else eval_dataset
        inputs = features.remove_columns(["example_id", "offset_mapping"])
        output = self.evaluation_loop(self.get_eval_dataloader(inputs), description="Evaluation",
                                      prediction_loss_only=False, ignore_keys=ignore_keys,
                                      metric_key_prefix=metric_key_prefix)
        start_logits, end_logits = output.predictions[:2]
        answers = postprocess_predictions(self.eval_examples, features, start_logits, end_logits,
                                          max_answer_length=self.max_answer_length)
        references = {example["id"]: example["answers"]["text"] for example in self.eval_examples}
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in squad_metrics(answers, references).items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def parse_arguments():
    """Model, data, training and pruning arguments, from the command line or one JSON file."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, BlockPruningConfig))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=sys.argv[1])
    return parser.parse_args_into_dataclasses()


def load_data(data_args: DataTrainingArguments, seed: int):
    """Raw SQuAD-format splits, with the requested subsets."""
    raw = load_squad(data_args.dataset_name, data_args.dataset_config_name, data_args.train_file,
                     data_args.validation_file)
    if data_args.max_train_samples is not None:
        raw["train"] = raw["train"].shuffle(seed=seed).select(range(min(data_args.max_train_samples,
                                                                        len(raw["train"]))))
    if data_args.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(data_args.max_eval_samples, len(raw["validation"]))))
    return raw


def main() -> None:
    """Train with block pruning, save the compacted model, reload it and evaluate it."""
    model_args, data_args, training_args, pruning_args = parse_arguments()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    raw = load_data(data_args, training_args.seed)
    model_path = model_args.model_name_or_path or offline_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    length, stride = data_args.max_seq_length, data_args.doc_stride
    train = raw["train"].map(lambda b: prepare_train_features(b, tokenizer, length, stride), batched=True,
                             remove_columns=raw["train"].column_names)
    features = raw["validation"].map(lambda b: prepare_validation_features(b, tokenizer, length, stride),
                                     batched=True, remove_columns=raw["validation"].column_names)
    common = dict(args=training_args, eval_dataset=features, eval_examples=raw["validation"],
                  max_answer_length=data_args.max_answer_length, processing_class=tokenizer,
                  data_collator=default_data_collator)

    if training_args.do_train:
        model = AutoModelForQuestionAnswering.from_pretrained(model_path)
        trainer = QuestionAnsweringTrainer(
            model=model, train_dataset=train, **common,
            callbacks=[BlockPruningCallback(pruning_args)],  # the change to run_qa.py: one callback
        )
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()  # compacted: pruned heads and FFN neurons are gone
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()

    if training_args.do_eval:
        evaluator = QuestionAnsweringTrainer(model=hf_blockprune.from_pretrained(training_args.output_dir), **common)
        metrics = evaluator.evaluate()
        metrics["eval_samples"] = len(raw["validation"])
        metrics["eval_parameters"] = sum(p.numel() for p in evaluator.model.parameters())
        evaluator.log_metrics("eval", metrics)
        evaluator.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
