"""Inference latency of dense vs. compacted MiniLM on CPU, against the speedup the FLOPs model predicts.

    python benchmarks/speed.py                               # real MiniLM-L6-H384, batch 32, sequence 128
    python benchmarks/speed.py --threads 1 --output table.md # pin the thread count, save the markdown table
    python benchmarks/speed.py --quick                       # tiny random BERT, a smoke run of a few seconds

For each kept fraction (0.75, 0.5, 0.25) the model is masked with the `struct` preset and top-k, given random scores
from a seeded generator and a threshold equal to the fraction, so every layer keeps that fraction of its heads and
of its FFN neurons; then it is compacted. The dense model and the compacted ones run round-robin in one process
(`eval()`, `torch.inference_mode()`, random token ids, full attention mask), the starting model rotating each round,
after one warm-up call each; the latency of a model is the median over the rounds. The measured speedup is compared
with `hf_blockprune.compact.flops.predicted_speedup` at the same sequence length; the target is measured /
predicted >= 0.9.
To reproduce, run on an idle machine with the same `--threads` (printed, with the torch version, above the table).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from hf_blockprune import BlockPruningConfig, apply_block_pruning, compact_model
from hf_blockprune.compact.flops import model_flops, predicted_speedup
from hf_blockprune.pruning.model import block_scores, set_threshold
from hf_blockprune.tasks.defaults import offline_minilm_path

KEPT_FRACTIONS = (0.75, 0.5, 0.25)
TARGET_RATIO = 0.9


def load_model(quick: bool) -> nn.Module:
    """The real MiniLM with a fresh 2-label head, or a tiny random BERT with `quick`."""
    if quick:
        torch.manual_seed(0)
        config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
        return BertForSequenceClassification(config).eval()
    return AutoModelForSequenceClassification.from_pretrained(offline_minilm_path(), num_labels=2).eval()


def pruned_copy(dense: nn.Module, kept: float, seq_len: int, seed: int) -> tuple[nn.Module, float]:
    """Compact a copy of `dense` keeping the fraction `kept` of heads and neurons in every layer.

    Returns:
        `(compacted model, FLOPs-predicted speedup)`; the prediction is made on the masked model, before compaction.
    """
    model = apply_block_pruning(copy.deepcopy(dense), BlockPruningConfig.from_preset("struct", pruning_method="topk"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=gen))
    set_threshold(model, kept)
    predicted = predicted_speedup(dense, model, seq_len)
    return compact_model(model).eval(), predicted


def timed_call(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Wall time of one forward pass, in seconds."""
    start = time.perf_counter()
    model(**inputs)
    return time.perf_counter() - start


def measure(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], rounds: int) -> dict[str, float]:
    """Median latency of each model, measured round-robin with a rotating start after one warm-up call each."""
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:
            timed_call(models[name], inputs)
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                times[name].append(timed_call(models[name], inputs))
    return {name: statistics.median(values) for name, values in times.items()}


def parameter_count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def table(rows: list[dict]) -> str:
    """The results as a markdown table."""
    lines = [
        "| kept fraction | parameters | GFLOPs / sequence | latency (ms) | measured speedup | predicted speedup "
        f"| measured / predicted | ratio >= {TARGET_RATIO} |",
        "|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for row in rows:
        ratio = row["measured"] / row["predicted"]
        check = "-" if row["kept"] == 1.0 else ("yes" if ratio >= TARGET_RATIO else "**no**")
        lines.append(
            f"| {row['kept']:.2f} | {row['parameters']:,} | {row['gflops']:.3f} | {row['latency'] * 1000:.1f} "
            f"| {row['measured']:.2f} | {row['predicted']:.2f} | {ratio:.3f} | {check} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """The command-line flags; `--quick` shrinks the model and the workload."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="timed calls per model (round-robin)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random scores and token ids")
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, small batch: a smoke run")
    parser.add_argument("--output", default=None, help="also write the markdown table to this path")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch, args.seq = 3, 4, 32
    return args


def main() -> None:
    """Build the models, time them interleaved, print (and optionally save) the table."""
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dense = load_model(args.quick)
    models, rows = {"1.00": dense}, [{"kept": 1.0, "predicted": 1.0}]
    for kept in KEPT_FRACTIONS:
        models[f"{kept:.2f}"], predicted = pruned_copy(dense, kept, args.seq, args.seed)
        rows.append({"kept": kept, "predicted": predicted})
    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(1000, dense.config.vocab_size, (args.batch, args.seq), generator=gen)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    latency = measure(models, inputs, args.rounds)
    for row, (name, model) in zip(rows, models.items(), strict=True):
        row.update(parameters=parameter_count(model), gflops=model_flops(model, args.seq).total / 1e9,
                   latency=latency[name], measured=latency["1.00"] / latency[name])
    name = "tiny random BERT (--quick: overhead-bound, ratios not meaningful)" if args.quick else "MiniLM-L6-H384"
    print(f"model: {name}")
    print(f"torch {torch.__version__}, threads: {torch.get_num_threads()}, batch {args.batch}, sequence {args.seq}, "
          f"{args.rounds} rounds, median latency per batch")
    text = table(rows)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
        print(f"table written to {args.output}")


if __name__ == "__main__":
    main()
