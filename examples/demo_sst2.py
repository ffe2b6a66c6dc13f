"""Fine-prune the offline MiniLM on SST-2 with the hybrid preset and print accuracy and kept structure.

    python examples/demo_sst2.py                 # ~5 min on 2 CPU cores
    python examples/demo_sst2.py --max_steps 40  # smoke run

Data: `$HF_BLOCKPRUNE_DATA/sst2` or `../shared/data/sst2` (GLUE tsv), else `glue/sst2` from the Hub.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import numpy as np
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

from hf_blockprune import BlockPruningConfig, BlockPruningTrainer, sparsity_report
from hf_blockprune.defaults import offline_minilm_path, shared_data_dir


def load_sst2(train_size: int):
    """SST-2 train subset and full dev split, from the local tsv files or the Hub."""
    data_dir = shared_data_dir()
    if data_dir is not None and (data_dir / "sst2").is_dir():
        files = {split: str(data_dir / "sst2" / f"{split}.tsv") for split in ("train", "dev")}
        raw = load_dataset("csv", data_files=files, delimiter="\t", quoting=3)
        raw["validation"] = raw.pop("dev")
    else:
        raw = load_dataset("glue", "sst2")
    raw["train"] = raw["train"].shuffle(seed=0).select(range(min(train_size, len(raw["train"]))))
    return raw


def main() -> None:
    """Train, evaluate, print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path or Hub id (default: the offline MiniLM)")
    parser.add_argument("--train_size", type=int, default=8000)
    parser.add_argument("--max_steps", type=int, default=250)
    parser.add_argument("--final_lambda", type=float, default=50.0)
    parser.add_argument("--mask_lr", type=float, default=5e-2, help="mask_scores_learning_rate")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model_path = args.model or offline_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    raw = load_sst2(args.train_size)
    data = raw.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=64), batched=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    config = BlockPruningConfig.from_preset(
        "hybrid", final_lambda=args.final_lambda, mask_scores_learning_rate=args.mask_lr
    )
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=5e-5,
            max_steps=args.max_steps, warmup_steps=0.1, logging_steps=max(args.max_steps // 5, 1), report_to="none",
            save_strategy="no", use_cpu=True, disable_tqdm=True,
        )
        trainer = BlockPruningTrainer(
            model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, pruning_config=config,
            compute_metrics=lambda p: {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())},
        )
        trainer.train()
        metrics = trainer.evaluate()
    print(f"\nSST-2 dev accuracy: {metrics['eval_accuracy']:.4f} ({len(data['validation'])} examples)")
    print("layer                      heads pruned      attention density  FFN neurons kept")
    for row in sparsity_report(trainer.model):
        print(f"{row['layer']:<26} {str(row['heads_pruned'][0]):<17} {row['attention_density']:>17.2f}  "
              f"{row['ffn_neurons_kept']}/{row['ffn_neurons_total']}")


if __name__ == "__main__":
    main()
