"""Fine-prune the offline MiniLM on SST-2 and print accuracy, kept structure and measured speedup.

    python examples/demo_sst2.py                       # ~6 min on 2 CPU cores
    python examples/demo_sst2.py --no-dense_reference  # the pruning run only: half the training
    python examples/demo_sst2.py --max_steps 40        # smoke run

The pruned model's accuracy is printed beside the dense MiniLM's, fine-tuned with the same data, steps and learning
rate: the difference is what pruning costs. (The dense MiniLM as loaded is printed too: its classifier head is new and
untrained, so it is about chance, a floor.)

Data: `$HF_BLOCKPRUNE_DATA/sst2` or `../shared/data/sst2` (GLUE tsv), else `glue/sst2` from the Hub. The pruned model
is saved compacted to `--output_dir` and reloaded from there before it is evaluated and timed.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import hf_blockprune
from hf_blockprune import BlockPruningConfig, BlockPruningTrainer
from hf_blockprune.tasks.data import load_sst2
from hf_blockprune.tasks.defaults import offline_minilm_path


def accuracy(prediction) -> dict[str, float]:
    """Accuracy of a Trainer prediction."""
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


@torch.inference_mode()
def speedup(dense, pruned, rounds: int = 5) -> float:
    """Dense / pruned median latency at batch 32, sequence 128 (interleaved)."""
    ids = torch.randint(1000, 30000, (32, 128), generator=torch.Generator().manual_seed(0))
    times = {"dense": [], "pruned": []}
    for _ in range(rounds + 1):
        for name, model in (("dense", dense), ("pruned", pruned)):
            start = time.perf_counter()
            model(input_ids=ids)
            times[name].append(time.perf_counter() - start)
    return statistics.median(times["dense"][1:]) / statistics.median(times["pruned"][1:])


def evaluate_accuracy(model, training_args, data, tokenizer) -> float:
    """SST-2 dev accuracy of `model`."""
    trainer = Trainer(model=model, args=training_args, eval_dataset=data["validation"], compute_metrics=accuracy,
                      data_collator=DataCollatorWithPadding(tokenizer))
    return trainer.evaluate()["eval_accuracy"]


def fine_tune_dense(model_path, training_args, data, tokenizer) -> float:
    """SST-2 dev accuracy of the dense model fine-tuned like the pruned one (same data, steps, learning rate)."""
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    trainer = Trainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    trainer.train()  # saves nothing (save_strategy "no"): the compacted model in output_dir stays
    return trainer.evaluate()["eval_accuracy"]


def main() -> None:
    """Train, save compacted, reload, evaluate, time, print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path or Hub id (default: the offline MiniLM)")
    parser.add_argument("--train_size", type=int, default=8000)
    parser.add_argument("--max_steps", type=int, default=250)
    parser.add_argument("--preset", default="hybrid", help="hybrid, hybrid-filled, struct or block")
    parser.add_argument("--target_density", type=float, default=0.3)
    parser.add_argument("--output_dir", default="outputs/demo_sst2")
    parser.add_argument("--eval_size", type=int, default=None, help="dev examples to evaluate (default: all 872)")
    parser.add_argument("--dense_reference", action=argparse.BooleanOptionalAction, default=True,
                        help="also fine-tune the dense model the same way and print its accuracy, the reference for "
                             "the pruned one (twice the training time; --no-dense_reference skips it)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model_path = args.model or offline_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = load_sst2(args.train_size)
    if args.eval_size is not None:
        data["validation"] = data["validation"].select(range(min(args.eval_size, len(data["validation"]))))
    data = data.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=64), batched=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=32, per_device_eval_batch_size=128,
        learning_rate=5e-5, max_steps=args.max_steps, warmup_steps=0.06, logging_steps=max(args.max_steps // 5, 1),
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    trainer = BlockPruningTrainer(
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer, compute_metrics=accuracy,
        pruning_config=BlockPruningConfig(pruning_preset=args.preset, target_density=args.target_density),
    )
    trainer.train()
    trainer.save_model()  # writes the compacted model, its loading code and its model card

    pruned = hf_blockprune.from_pretrained(args.output_dir).eval()
    pruned_accuracy = evaluate_accuracy(pruned, training_args, data, tokenizer)
    dense = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2).eval()
    loaded_accuracy = evaluate_accuracy(dense, training_args, data, tokenizer)
    # after the pruning run, so that its result does not depend on this flag
    tuned_accuracy = fine_tune_dense(model_path, training_args, data, tokenizer) if args.dense_reference else None
    print(f"\nSST-2 dev accuracy ({len(data['validation'])} examples):")
    print(f"  pruned ({args.preset}, target density {args.target_density}), {args.max_steps} training steps, saved "
          f"compacted and reloaded: {pruned_accuracy:.4f}")
    if tuned_accuracy is not None:
        print(f"  dense, fine-tuned the same way ({args.max_steps} steps): {tuned_accuracy:.4f}")
    else:
        print("  dense, fine-tuned the same way: not run (--no-dense_reference)")
    print(f"  dense as loaded, new classifier head not trained: {loaded_accuracy:.4f}")
    if tuned_accuracy is not None:
        print(f"cost of pruning: {100 * (tuned_accuracy - pruned_accuracy):.2f} accuracy points (dense fine-tuned "
              "minus pruned)")
    print(f"parameters: {sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M -> "
          f"{sum(p.numel() for p in pruned.parameters()) / 1e6:.1f}M")
    print("layer                      heads kept  FFN size")
    for path, entry in pruned.config.blockprune_layout["layers"].items():
        print(f"{path:<26} {len(entry['attention'][0]['heads']):>10}  {entry['ffn']['size']:>8}")
    print(f"measured CPU speedup vs dense (batch 32, sequence 128): {speedup(dense, pruned):.2f}x")
    print(f"saved to {args.output_dir} (README.md is its model card)")


if __name__ == "__main__":
    main()
