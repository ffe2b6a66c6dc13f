"""Perplexity and measured CPU decoding speed of a pruned decoder-only LM (Llama-style: grouped-query attention,
gated MLP), trained from scratch on real text.

    python benchmarks/decoder_pruning.py            # the full run, ~100 min on 2 busy CPU cores (time printed)
    python benchmarks/decoder_pruning.py --quick    # a smoke run of about half a minute (numbers not meaningful)

No pretrained causal LM can be installed offline, so the script trains its own on real text, XSum articles from
`--data_dir` (`../shared/data` next to this checkout): the documents of `xsum/test_1000_a.jsonl` are the training
text, those of `xsum/test_1000_b.jsonl` (a disjoint set) the held-out text. Empty documents are skipped; every
document ends with the end-of-text token and the token stream is cut into blocks of `--block_size` (128) tokens.

1. **tokenizer**: a byte-level BPE of `--vocab_size` (4096) tokens trained with `tokenizers` on the training
   documents (a small vocabulary keeps the LM head, which pruning does not shrink, from dominating the cost).
2. **dense**: a `LlamaForCausalLM` trained from scratch with the plain `Trainer`: hidden 256, FFN 688 (gated), 4
   layers, 8 query heads over 2 key/value heads, tied input and output embeddings, for `--dense_steps` (1500) steps of
   16 blocks, learning rate 1e-3 (5% warmup, linear decay).
3. **struct s**: for each `s` in `--speedups` (1.5 and 2), a fresh copy of the dense model fine-pruned with
   `BlockPruningTrainer`, preset `struct` (whole heads and FFN neurons), `target_speedup=s` on the FLOPs cost model
   at the block length, distilling from the dense model (alpha `--distillation_alpha` 0.5, T 2), for
   `--prune_steps` (1000) steps of 16 blocks at learning rate `--prune_lr` (5e-4; mask scores 1e-2). The saved model
   is the compacted one, reloaded with `hf_blockprune.from_pretrained`.
4. **dense-continued**: the fair perplexity reference for the pruned models, which get `--prune_steps` more training
   than the dense one: a copy of the dense model trained on with the plain `Trainer` for the same `--prune_steps`
   steps, with the same batch, learning rate `--prune_lr`, schedule (5% warmup, linear decay) and seed as the pruning
   runs, but plain cross-entropy (no distillation, no pruning). The table gives each model's perplexity change
   relative to it; the speedups stay relative to **dense** (dense-continued has the same architecture, so its
   measured speedups, about 1x, show the timing noise).

For every model: perplexity on the first `--eval_blocks` (200) held-out blocks, parameters, FLOPs of one block
(`hf_blockprune.compact.flops.model_flops`) and two CPU latencies, measured with every model in one process,
round-robin with a rotating start after one warm-up call each, `--threads` (1) torch threads, median over
`--rounds` (5): per generated token (greedy `generate()` with the KV cache, batch 1, a 32-token prompt, exactly
`--new_tokens` (64) new tokens: the call's time divided by them, so the prompt's prefill is included) and prefill (one
forward pass of 8 blocks). The speedups are dense time / model time; nothing is asserted on time.

Outputs: `<output>.json` (settings, every record, elapsed minutes) and `<output>.md` (the table, also printed).
Every stage is kept in `--work_dir` (`dense/`, `struct-<s>/`, `dense-continued/`), so an interrupted run resumes where
it stopped, a work dir from before dense-continued existed only trains that stage, and a second run only measures
(delete the folder to start over; a folder trained with other settings is refused).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from datasets import Dataset
from results_io import write_results
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_utils import get_last_checkpoint

import hf_blockprune
from hf_blockprune import BlockPruningConfig, BlockPruningTrainer
from hf_blockprune.compact.flops import model_flops

REPO = Path(__file__).resolve().parents[1]
EOS, PAD = "<|endoftext|>", "<|pad|>"
BATCH, PROMPT_TOKENS, PREFILL_BATCH = 16, 32, 8
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2)
QUICK_MODEL = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)
# what the trained models in `work_dir` depend on: a folder trained with other values is refused
TRAINING_SETTINGS = ("quick", "vocab_size", "block_size", "dense_steps", "dense_lr", "prune_steps", "prune_lr",
                     "distillation_alpha", "seed")


def read_documents(path: Path) -> list[str]:
    """The non-empty `document` fields of an XSum jsonl file."""
    with path.open(encoding="utf-8") as lines:
        documents = [json.loads(line)["document"] for line in lines if line.strip()]
    return [document for document in documents if document.strip()]


def train_tokenizer(documents: list[str], vocab_size: int, folder: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `documents`, saved in `folder` (reloaded from it when present)."""
    if (folder / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    wrapped.save_pretrained(str(folder))
    return wrapped


def token_blocks(tokenizer: PreTrainedTokenizerFast, documents: list[str], block_size: int) -> list[list[int]]:
    """The documents as one token stream (each ended by EOS), cut into full blocks of `block_size` tokens."""
    stream = []
    for ids in tokenizer(documents)["input_ids"]:
        stream.extend(ids + [tokenizer.eos_token_id])
    return [stream[start:start + block_size] for start in range(0, len(stream) - block_size + 1, block_size)]


def lm_dataset(blocks: list[list[int]]) -> Dataset:
    """Causal-LM examples: the labels are the inputs (the model shifts them)."""
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def dense_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """The Llama-style architecture of the dense model (`QUICK_MODEL` sizes with `--quick`)."""
    sizes = QUICK_MODEL if args.quick else MODEL
    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2 * args.block_size,
                       tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)


def training_args(out_dir: Path, steps: int, learning_rate: float, seed: int) -> TrainingArguments:
    """The settings shared by the dense and the pruning runs (batch 16, 5% warmup, linear decay, CPU), with a
    checkpoint every 100 steps (the last one kept), so that a stopped stage resumes instead of starting over."""
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=learning_rate,
        warmup_steps=0.05, weight_decay=0.01, max_grad_norm=1.0, logging_steps=max(steps // 10, 1),
        report_to="none", save_strategy="steps", save_steps=100, save_total_limit=1, use_cpu=True,
        disable_tqdm=True, seed=seed,
    )


def train_or_resume(trainer: Trainer) -> None:
    """`trainer.train()`, resumed from the last checkpoint in its output folder if a stopped run left one."""
    folder = Path(trainer.args.output_dir)
    checkpoint = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if checkpoint is not None:
        print(f"resuming from {checkpoint}", flush=True)
    trainer.train(resume_from_checkpoint=checkpoint)


def kept_structure(model: nn.Module) -> dict[str, list[int]]:
    """Query heads, key/value heads and FFN neurons per layer, from a compacted model's layout (else the config)."""
    config = model.config
    layers = [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
    full = {"heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "ffn": config.intermediate_size}
    layout = (getattr(config, "blockprune_layout", None) or {}).get("layers", {})
    kept = {key: [] for key in full}
    for name in layers:
        entry = layout.get(name, {})
        attention = entry["attention"][0] if entry.get("attention") else None
        kept["heads"].append(full["heads"] if attention is None else len(attention["heads"]))
        kept["kv_heads"].append(full["kv_heads"] if attention is None or "kv_heads" not in attention
                                else sum(head is not None for head in attention["kv_heads"]))
        kept["ffn"].append(entry["ffn"]["size"] if "ffn" in entry else full["ffn"])
    return kept


@torch.inference_mode()
def perplexity(model: nn.Module, blocks: list[list[int]], batch_size: int = 8) -> float:
    """`exp` of the mean next-token loss over `blocks` (all of one length, so the mean of block means)."""
    model.eval()
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(blocks[start:start + batch_size])
        total += model(input_ids=ids, labels=ids).loss.item() * len(ids)
    return math.exp(total / len(blocks))


class Benchmark:
    """Trains (or reloads from `work_dir`) the tokenizer, the dense model and the pruned ones, then measures them."""

    def __init__(self, args: argparse.Namespace):
        self.started = time.perf_counter()
        self.args = args
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        check_settings(self.work / "settings.json", args)
        data = Path(args.data_dir) / "xsum"
        train_documents = read_documents(data / "test_1000_a.jsonl")
        self.tokenizer = train_tokenizer(train_documents, args.vocab_size, self.work / "tokenizer")
        self.train_blocks = token_blocks(self.tokenizer, train_documents, args.block_size)
        self.eval_blocks = token_blocks(self.tokenizer, read_documents(data / "test_1000_b.jsonl"),
                                        args.block_size)[:args.eval_blocks]
        print(f"{len(self.train_blocks)} training blocks, {len(self.eval_blocks)} evaluation blocks of "
              f"{args.block_size} tokens", flush=True)

    def _cached(self, name: str) -> dict | None:
        """The record of a stage already trained in `work_dir`, or `None`."""
        record_file = self.work / name / "record.json"
        if not record_file.is_file():
            return None
        print(f"[{name}] reloaded from {record_file.parent}", flush=True)
        return json.loads(record_file.read_text())

    def _finish(self, name: str, trainer: Trainer, record: dict, started: float) -> dict:
        """Save the trained model and its record (the last logged training loss: with pruning, the distillation mix
        plus the regularization, so not comparable with the dense one)."""
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        record.update(name=name, train_minutes=round((time.perf_counter() - started) / 60, 2),
                      final_train_loss=losses[-1] if losses else None)
        trainer.save_model(str(self.work / name))  # a pruning trainer writes the compacted model
        (self.work / name / "record.json").write_text(json.dumps(record, indent=2))
        print(json.dumps(record), flush=True)
        return record

    def dense(self) -> dict:
        """Stage 1: the dense LM trained from scratch, which is the teacher and the speed reference."""
        record = self._cached("dense")
        if record is not None:
            return record
        torch.manual_seed(self.args.seed)
        model = LlamaForCausalLM(dense_config(self.args, self.tokenizer))
        started = time.perf_counter()
        trainer = Trainer(model=model, train_dataset=lm_dataset(self.train_blocks),
                          args=training_args(self.work / "trainer" / "dense", self.args.dense_steps,
                                             self.args.dense_lr, self.args.seed))
        train_or_resume(trainer)
        return self._finish("dense", trainer, {"kind": "dense", "target_speedup": None}, started)

    def pruned(self, speedup: float) -> dict:
        """Stage 2: a copy of the dense LM fine-pruned to `speedup` on the cost model, distilling from it."""
        name = f"struct-{speedup:g}"
        record = self._cached(name)
        if record is not None:
            return record
        torch.manual_seed(self.args.seed)
        config = BlockPruningConfig(pruning_preset="struct", target_speedup=speedup,
                                    speedup_sequence_length=self.args.block_size,
                                    teacher_model=str(self.work / "dense"),
                                    distillation_alpha=self.args.distillation_alpha)
        started = time.perf_counter()
        trainer = BlockPruningTrainer(
            model=AutoModelForCausalLM.from_pretrained(str(self.work / "dense")), pruning_config=config,
            train_dataset=lm_dataset(self.train_blocks),
            args=training_args(self.work / "trainer" / name, self.args.prune_steps, self.args.prune_lr,
                               self.args.seed))
        train_or_resume(trainer)
        return self._finish(name, trainer, {"kind": "struct", "target_speedup": speedup}, started)

    def dense_continued(self) -> dict:
        """Stage 3: the dense LM trained on with the plain `Trainer` (cross-entropy only) for the pruning runs' steps,
        learning rate, schedule, batch and seed: the reference that isolates the effect of their extra training."""
        name = "dense-continued"
        record = self._cached(name)
        if record is not None:
            return record
        torch.manual_seed(self.args.seed)
        started = time.perf_counter()
        trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(str(self.work / "dense")),
                          train_dataset=lm_dataset(self.train_blocks),
                          args=training_args(self.work / "trainer" / name, self.args.prune_steps,
                                             self.args.prune_lr, self.args.seed))
        train_or_resume(trainer)
        return self._finish(name, trainer, {"kind": name, "target_speedup": None}, started)

    def load(self, record: dict) -> nn.Module:
        """The saved model of a record: a dense one with transformers, a compacted one with hf_blockprune."""
        folder = str(self.work / record["name"])
        model = hf_blockprune.from_pretrained(folder) if record["kind"] == "struct" else \
            AutoModelForCausalLM.from_pretrained(folder)
        return model.eval()

    def run(self) -> dict:
        """Every stage, then the evaluation and the timing; returns the results."""
        dense = self.dense()
        pruned = [self.pruned(speedup) for speedup in self.args.speedups]
        records = [dense, self.dense_continued(), *pruned]
        models = {record["name"]: self.load(record) for record in records}
        for record in records:
            record["perplexity"] = perplexity(models[record["name"]], self.eval_blocks)
        reference = records[1]["perplexity"]
        for record in records:  # relative change, e.g. 0.05 = 5% higher perplexity than dense-continued
            record["perplexity_vs_continued"] = record["perplexity"] / reference - 1
        latency = measure(models, self.eval_blocks[0][:PROMPT_TOKENS], self.prefill_inputs(), self.args)
        describe(records, models, latency, self.args.block_size)
        return {"settings": vars(self.args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "transformers": transformers.__version__,
                "elapsed_minutes": round((time.perf_counter() - self.started) / 60, 2),
                "train_minutes": round(sum(r["train_minutes"] for r in records), 2), "records": records}

    def prefill_inputs(self) -> torch.Tensor:
        """`PREFILL_BATCH` held-out blocks (cycled when there are fewer), `(B, T)`."""
        return torch.tensor([self.eval_blocks[i % len(self.eval_blocks)] for i in range(PREFILL_BATCH)])


def check_settings(path: Path, args: argparse.Namespace) -> None:
    """Record the training settings in a new work dir; refuse one whose models were trained with other values."""
    wanted = {name: getattr(args, name) for name in TRAINING_SETTINGS}
    if not path.is_file():
        path.write_text(json.dumps(wanted, indent=2))
        return
    stored = json.loads(path.read_text())
    if stored != wanted:
        changed = ", ".join(f"{k}: {stored.get(k)} -> {v}" for k, v in wanted.items() if stored.get(k) != v)
        raise SystemExit(f"{path.parent} holds models trained with other settings ({changed}): delete it or pass "
                         "another --work_dir.")


def round_robin(tasks: dict[str, dict[str, Callable[[], object]]], rounds: int) -> dict[str, dict[str, float]]:
    """Median seconds of every `tasks[model][kind]()`, after one warm-up call each; each round visits the models
    in turn from a rotating start, running all kinds of one model before the next."""
    names = list(tasks)
    times = {name: {kind: [] for kind in tasks[name]} for name in names}
    for name in names:
        for task in tasks[name].values():
            task()
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            for kind, task in tasks[name].items():
                start = time.perf_counter()
                task()
                times[name][kind].append(time.perf_counter() - start)
    return {name: {kind: statistics.median(values) for kind, values in kinds.items()}
            for name, kinds in times.items()}


def measure(models: dict[str, nn.Module], prompt: list[int], prefill: torch.Tensor,
            args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Per model: seconds per generated token (greedy, KV cache, batch 1) and per prefill forward of `prefill`."""
    ids = torch.tensor([prompt])  # (1, PROMPT_TOKENS)
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                    pad_token_id=models["dense"].config.pad_token_id)

    def tasks(model: nn.Module) -> dict[str, Callable[[], object]]:
        """The two timed calls of one model."""
        return {"decode": lambda: model.generate(ids, **settings), "prefill": lambda: model(input_ids=prefill)}

    with torch.inference_mode():
        for name, model in models.items():
            generated = model.generate(ids, **settings).shape[1] - ids.shape[1]
            if generated != args.new_tokens:
                raise RuntimeError(f"{name} generated {generated} tokens instead of {args.new_tokens}.")
        latency = round_robin({name: tasks(model) for name, model in models.items()}, args.rounds)
    for times in latency.values():
        times["decode"] /= args.new_tokens
    return latency


def describe(records: list[dict], models: dict[str, nn.Module], latency: dict, block_size: int) -> None:
    """Add size, FLOPs, kept structure and measured speedups (dense / model) to every record."""
    dense_flops = model_flops(models["dense"], block_size).total
    dense = latency["dense"]
    for record in records:
        model, times = models[record["name"]], latency[record["name"]]
        flops = model_flops(model, block_size).total
        record.update(
            parameters=sum(p.numel() for p in model.parameters()), gflops=flops / 1e9,
            flops_speedup=dense_flops / flops, ms_per_token=times["decode"] * 1000,
            prefill_ms=times["prefill"] * 1000, measured_token_speedup=dense["decode"] / times["decode"],
            measured_prefill_speedup=dense["prefill"] / times["prefill"], **kept_structure(model),
        )


def render(results: dict) -> str:
    """The settings paragraph and the markdown table of the results."""
    s = results["settings"]
    sizes = QUICK_MODEL if s["quick"] else MODEL
    lines = [
        f"Llama-style causal LM trained from scratch on XSum articles (`xsum/test_1000_a.jsonl`): hidden "
        f"{sizes['hidden_size']}, FFN {sizes['intermediate_size']}, {sizes['num_hidden_layers']} layers, "
        f"{sizes['num_attention_heads']} query / {sizes['num_key_value_heads']} key-value heads, tied embeddings, "
        f"byte-level BPE of {s['vocab_size']} tokens, {s['dense_steps']} steps of {BATCH} blocks of "
        f"{s['block_size']} tokens. Pruned: preset `struct`, `target_speedup` on the FLOPs model at "
        f"{s['block_size']} tokens, {s['prune_steps']} steps with distillation (alpha {s['distillation_alpha']}, "
        f"T 2) from the dense model. Dense-continued: the dense model trained on with the plain `Trainer` for the "
        f"same {s['prune_steps']} steps (same batch, learning rate {s['prune_lr']:g}, schedule and seed as the "
        f"pruning runs) with plain cross-entropy, no distillation: the fair perplexity reference, since the pruned "
        f"models get those extra steps too (last column); speedups are relative to dense. Perplexity: "
        f"{s['eval_blocks']} held-out blocks of `xsum/test_1000_b.jsonl`. "
        f"Speed: CPU, {results['threads']} torch thread(s), torch {results['torch']}, median of {s['rounds']} "
        f"interleaved rounds; per token: greedy generation with the KV cache, batch 1, {PROMPT_TOKENS}-token prompt, "
        f"{s['new_tokens']} new tokens (prompt prefill included); prefill: one forward of {PREFILL_BATCH} x "
        f"{s['block_size']} tokens. Training time, all runs: {results['train_minutes']} min; this invocation: "
        f"{results['elapsed_minutes']} min." + (" **Quick smoke run: numbers not meaningful.**" if s["quick"] else ""),
        "",
        "| model | params | FLOPs speedup | measured prefill speedup | measured per-token speedup | ms/token "
        "| perplexity | perplexity vs dense-continued |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["records"]:
        change = "reference" if r["name"] == "dense-continued" else f"{100 * r['perplexity_vs_continued']:+.1f}%"
        lines.append(f"| {r['name']} | {r['parameters'] / 1e6:.2f}M | {r['flops_speedup']:.2f}x "
                     f"| {r['measured_prefill_speedup']:.2f}x | {r['measured_token_speedup']:.2f}x "
                     f"| {r['ms_per_token']:.2f} | {r['perplexity']:.2f} | {change} |")
    lines += ["", "Kept per layer (query heads / key-value heads / FFN neurons):"]
    lines += [f"- {r['name']}: {'/'.join(map(str, r['heads']))} / {'/'.join(map(str, r['kv_heads']))} / "
              f"{'/'.join(map(str, r['ffn']))}" for r in results["records"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    """The command-line flags; `--quick` shrinks everything to a smoke run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=str(REPO.parent / "shared" / "data"), help="holds xsum/*.jsonl")
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0], help="target speedups (struct)")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--block_size", type=int, default=128, help="tokens per training / evaluation block")
    parser.add_argument("--dense_steps", type=int, default=1500)
    parser.add_argument("--dense_lr", type=float, default=1e-3)
    parser.add_argument("--prune_steps", type=int, default=1000)
    parser.add_argument("--prune_lr", type=float, default=5e-4, help="weights' learning rate of the pruning runs")
    parser.add_argument("--distillation_alpha", type=float, default=0.5)
    parser.add_argument("--eval_blocks", type=int, default=200, help="held-out blocks for the perplexity")
    parser.add_argument("--new_tokens", type=int, default=64, help="tokens generated per timed call")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, for training and timing (1: steadier timings on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", default=None, help="default: runs/decoder_pruning (+ _quick)")
    parser.add_argument("--output", default="benchmarks/results/decoder_pruning")
    parser.add_argument("--quick", action="store_true", help="tiny model and budgets: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.vocab_size, args.dense_steps, args.prune_steps, args.eval_blocks = 512, 30, 20, 10
        args.rounds, args.new_tokens = 1, 8
    if args.work_dir is None:
        args.work_dir = str(REPO / "runs" / ("decoder_pruning_quick" if args.quick else "decoder_pruning"))
    return args


def main(argv=None) -> dict:
    """Run the benchmark, print the table and write JSON and markdown."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = Benchmark(args).run()
    write_results(args.output, results, render(results))
    return results


if __name__ == "__main__":
    main()
