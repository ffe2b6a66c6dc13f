"""Training-step overhead of block pruning vs. a plain Trainer, interleaved in one process.

    python benchmarks/overhead.py            # MiniLM-sized BERT, batch 32, sequence 128
    python benchmarks/overhead.py --quick    # a small smoke run

Each round trains a fresh model for a few steps with a plain `Trainer` and with `BlockPruningTrainer` (hybrid
preset, regularization active from the first step), alternating which goes first; step times come from a callback
(`on_step_begin` -> `on_step_end`), the first steps of each run are dropped as warm-up, and the medians are compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from hf_blockprune import BlockPruningConfig, BlockPruningTrainer


class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def minilm_config(quick: bool) -> BertConfig:
    """MiniLM-L6-H384 shapes (or a small config with --quick)."""
    if quick:
        return BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    return BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)


def run(kind: str, config: BertConfig, data: list[dict], steps: int, batch: int) -> list[float]:
    """Train `steps` steps with the plain or the pruning trainer; return the step times."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=steps, report_to="none", disable_tqdm=True,
            use_cpu=True, save_strategy="no", logging_steps=10_000, dataloader_num_workers=0,
        )
        common = dict(model=model, args=args, train_dataset=data, callbacks=[timer])
        if kind == "plain":
            trainer = Trainer(**common)
        else:
            pruning = BlockPruningConfig.from_preset("hybrid", initial_warmup=0.0, final_warmup=0.0)
            trainer = BlockPruningTrainer(**common, pruning_config=pruning)
        trainer.train()
    return timer.times


def main() -> None:
    """Parse flags, run the interleaved rounds, print per-kind medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="steps per run; the first 2 are dropped")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.batch, args.seq = 2, 4, 8, 32
    config = minilm_config(args.quick)
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(1000, config.vocab_size, (args.seq,), generator=gen), "labels": i % 2}
        for i in range(args.batch * args.steps)
    ]
    times: dict[str, list[float]] = {"plain": [], "pruning": []}
    for round_index in range(args.rounds):
        order = ["plain", "pruning"] if round_index % 2 == 0 else ["pruning", "plain"]
        for kind in order:
            times[kind] += run(kind, config, data, args.steps, args.batch)[2:]
    plain, pruning = statistics.median(times["plain"]), statistics.median(times["pruning"])
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}, sequence {args.seq}, "
          f"{args.rounds} rounds x {args.steps - 2} timed steps")
    print(f"plain Trainer          median step: {plain * 1000:8.1f} ms")
    print(f"BlockPruningTrainer    median step: {pruning * 1000:8.1f} ms")
    print(f"overhead ratio (pruning / plain): {pruning / plain:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
