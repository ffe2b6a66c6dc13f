"""Target densities and target speedup on real SST-2 with the real MiniLM (issue: ask for a size or a speed).

    python benchmarks/targets_sst2.py                     # ~25 min on 2 CPU cores
    python benchmarks/targets_sst2.py --quick             # a smoke run of a few minutes

For each target (densities 0.50 / 0.30 / 0.15 with the hybrid preset, and `--target_speedup 2.5` with the struct
preset, whose unit of pruning is what the speed model counts), fine-prunes the offline MiniLM-L6-H384 on a subset of
SST-2 train, measures the realized density on the binary masks, the dev accuracy (all 872 examples), compacts the
model and measures its CPU inference speedup against the dense model (batch 32, sequence 128, interleaved rounds,
median). A dense fine-tune with the same budget gives the reference accuracy. Prints a markdown table and writes it
with the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

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
from hf_blockprune.pruning.losses import mask_density
from hf_blockprune.tasks.data import load_sst2
from hf_blockprune.tasks.defaults import offline_minilm_path

RUNS = [
    ("dense", None),
    ("density 0.50", dict(pruning_preset="hybrid", target_density=0.50)),
    ("density 0.30", dict(pruning_preset="hybrid", target_density=0.30)),
    ("density 0.15", dict(pruning_preset="hybrid", target_density=0.15)),
    ("speedup 2.5", dict(pruning_preset="struct", target_speedup=2.5)),
]


def tokenized_sst2(tokenizer, train_size: int, max_length: int):
    """Tokenized SST-2: a shuffled train subset and the full dev split."""
    raw = load_sst2(train_size)
    return raw.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=max_length), batched=True)


def accuracy(prediction) -> dict[str, float]:
    """Dev accuracy from a Trainer prediction."""
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def fine_tune(name, overrides, data, tokenizer, args, out_dir):
    """Train one model; return (model to time, record)."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(offline_minilm_path(), num_labels=2)
    training_args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=32, per_device_eval_batch_size=128,
        learning_rate=5e-5, num_train_epochs=args.epochs, warmup_steps=0.06, logging_steps=50, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )
    common = dict(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
                  data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    start = time.perf_counter()
    if overrides is None:
        trainer = Trainer(**common)
    else:
        trainer = BlockPruningTrainer(**common, pruning_config=BlockPruningConfig(**overrides))
    trainer.train()
    record = {"name": name, "train_minutes": (time.perf_counter() - start) / 60}
    record["dev_accuracy"] = trainer.evaluate()["eval_accuracy"]
    if overrides is None:
        return trainer.model.eval(), record
    config = trainer.pruning_config
    record["target"] = config.target_density if config.target_speedup is None else None
    record["target_speedup"] = config.target_speedup
    record["targets_used"] = dict(trainer.model.blockprune_targets.targets)
    record["realized_density"] = mask_density(trainer.model).item()
    record["realized_density_attention"] = mask_density(trainer.model, "attention").item()
    record["realized_density_ffn"] = mask_density(trainer.model, "ffn").item()
    compacted = hf_blockprune.compact_model(trainer.model).eval()
    record["dev_accuracy_compacted"] = Trainer(
        model=compacted, args=training_args, eval_dataset=data["validation"],
        data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=accuracy,
    ).evaluate()["eval_accuracy"]
    return compacted, record


@torch.inference_mode()
def latencies(models: dict, batch: int, seq: int, rounds: int) -> dict[str, float]:
    """Median latency per model, interleaved round-robin with a warm-up call each."""
    ids = torch.randint(1000, 30000, (batch, seq), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    times = {name: [] for name in models}
    for model in models.values():
        model(**inputs)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(**inputs)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    """Run every target, time the models, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_size", type=int, default=6000)
    parser.add_argument("--epochs", type=float, default=1.5)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default="benchmarks/results/targets_sst2.json")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.train_size, args.epochs, args.rounds = 640, 1.0, 2
    tokenizer = AutoTokenizer.from_pretrained(offline_minilm_path())
    data = tokenized_sst2(tokenizer, args.train_size, args.max_length)
    models, records = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in RUNS:
            model, record = fine_tune(name, overrides, data, tokenizer, args, Path(tmp) / name.replace(" ", "_"))
            models[name], records = model, records + [record]
            print(json.dumps(record), flush=True)
    times = latencies(models, batch=32, seq=128, rounds=args.rounds)
    for record in records:
        record["latency_ms"] = times[record["name"]] * 1000
        record["measured_speedup"] = times["dense"] / times[record["name"]]
        record["parameters"] = sum(p.numel() for p in models[record["name"]].parameters())
    table = render(records, args)
    print(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"settings": vars(args), "runs": records}, indent=2))
    output.with_suffix(".md").write_text(table)


def render(records: list[dict], args) -> str:
    """The markdown table of the results."""
    lines = [
        f"SST-2, MiniLM-L6-H384, {args.train_size} training examples x {args.epochs} epochs, dev = 872 examples; "
        "speed: batch 32, sequence 128, CPU, median of interleaved rounds.",
        "",
        "| run | target | realized density (attn / FFN) | dev acc. (masked / compacted) | params | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        used = ", ".join(f"{group} {value:.2f}" for group, value in r.get("targets_used", {}).items())
        target = "-" if "targets_used" not in r else (
            f"{r['target']:.2f}" if r.get("target") else f"{r['target_speedup']}x (densities: {used})")
        density = "-" if "realized_density" not in r else (
            f"{r['realized_density']:.3f} ({r['realized_density_attention']:.2f} / {r['realized_density_ffn']:.2f})")
        acc = f"{r['dev_accuracy']:.4f}" + (f" / {r['dev_accuracy_compacted']:.4f}" if "dev_accuracy_compacted" in r
                                            else "")
        lines.append(f"| {r['name']} | {target} | {density} | {acc} | {r['parameters'] / 1e6:.1f}M | "
                     f"{r['measured_speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
