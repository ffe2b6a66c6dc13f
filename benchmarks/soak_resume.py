"""Kill-and-resume soak: a pruning run killed at random points and resumed ends as the uninterrupted run.

The real MiniLM-L6-H384 fine-prunes SST-2 (soft movement pruning to a target density, gradient accumulation 2,
checkpoints every `--save_steps`). The driver runs it once without interruption, then again in a subprocess that it
kills (SIGKILL, so nothing is flushed or cleaned up) at `--kills` random moments and restarts each time with
`resume_from_checkpoint` on the last checkpoint, until the run completes. It then compares the two final checkpoints
(scores, score cuts, masks, multipliers, weights) and the dev accuracy of the two compacted models.

    python benchmarks/soak_resume.py                      # ~2000 optimizer steps, 6 kills (tens of minutes on CPU)
    python benchmarks/soak_resume.py --quick              # a smoke run of a few minutes
    python benchmarks/soak_resume.py --route callback     # the same through BlockPruningCallback

Every stage is cached in `--work_dir`: an interrupted driver resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "soak_resume.md"


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options of the driver and of its worker."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="runs/soak_resume")
    parser.add_argument("--route", choices=["trainer", "callback"], default="trainer")
    parser.add_argument("--max_steps", type=int, default=2000)
    parser.add_argument("--save_steps", type=int, default=100)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the kill times.")
    parser.add_argument("--quick", action="store_true", help="200 steps, 5 kills: a smoke run.")
    parser.add_argument("--output", default=None, help="Markdown result file (default: benchmarks/results/...).")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one training process
    args = parser.parse_args(argv)
    if args.quick:
        args.max_steps, args.save_steps, args.kills = 200, 20, 5
    return args


# ------------------------------------------------------------------------------------------------ the training worker


def train(args: argparse.Namespace, output_dir: Path) -> None:
    """One training process: resume from the last checkpoint in `output_dir` if there is one, else start."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from hf_blockprune import BlockPruningCallback, BlockPruningConfig, BlockPruningTrainer
    from hf_blockprune.tasks.data import load_glue, tokenize_classification
    from hf_blockprune.tasks.defaults import offline_minilm_path

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(offline_minilm_path())
    raw, text_columns, label_column = load_glue("sst2")
    raw["train"] = raw["train"].shuffle(seed=0).select(range(6000))
    data = tokenize_classification(raw, tokenizer, text_columns, label_column, 48)
    set_seed(0)  # the fresh classifier head: every process of both runs starts from the same one
    model = AutoModelForSequenceClassification.from_pretrained(offline_minilm_path(), num_labels=2)
    training = TrainingArguments(
        output_dir=str(output_dir), max_steps=args.max_steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=2, learning_rate=5e-5, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=2, logging_steps=50, report_to="none", disable_tqdm=True, use_cpu=True, seed=0,
        dataloader_num_workers=0,
    )
    config = BlockPruningConfig.from_preset("hybrid", target_density=0.3)
    common = dict(model=model, args=training, train_dataset=data["train"], processing_class=tokenizer)
    if args.route == "trainer":
        trainer = BlockPruningTrainer(**common, pruning_config=config)
    else:
        trainer = Trainer(**common, callbacks=[BlockPruningCallback(config)])
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(output_dir / "final"))
    (output_dir / "DONE").write_text("done")


# ------------------------------------------------------------------------------------------------------- the driver


def _worker_command(args: argparse.Namespace, output_dir: Path) -> list[str]:
    return [sys.executable, __file__, "--worker", str(output_dir), "--route", args.route,
            "--max_steps", str(args.max_steps), "--save_steps", str(args.save_steps)]


def run_uninterrupted(args: argparse.Namespace, output_dir: Path) -> float | None:
    """The reference run, in one process (cached); its wall time in seconds, if it was timed."""
    if (output_dir / "DONE").is_file():
        wall = output_dir / "wall.json"
        return json.loads(wall.read_text())["seconds"] if wall.is_file() else None
    start = time.time()
    subprocess.run(_worker_command(args, output_dir), check=True)
    seconds = time.time() - start
    (output_dir / "wall.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def run_with_kills(args: argparse.Namespace, output_dir: Path) -> list[dict]:
    """Kill the run `args.kills` times, resuming after each, then let it finish (cached).

    Each process is killed only after it wrote `k` new checkpoints (k random, 1 to about twice a fair share of the
    run's checkpoints), at a random moment within one checkpoint interval after the last: so every kill loses real
    progress, lands in training or in a save, and the resumed process starts from a checkpoint of its own making,
    however slow the machine is.
    """
    log_file = output_dir.parent / f"{output_dir.name}-kills.json"
    kills = json.loads(log_file.read_text()) if log_file.is_file() else []
    rng = random.Random(args.seed)
    total = args.max_steps // args.save_steps
    most = max(1, 2 * (total // (args.kills + 1)) - 1)
    for _ in kills:  # the same draws after a driver restart
        rng.randint(1, most), rng.uniform(0, 1)
    while not (output_dir / "DONE").is_file():
        before = set(_checkpoints(output_dir))
        started = time.time()
        process = subprocess.Popen(_worker_command(args, output_dir))
        if len(kills) < args.kills:
            wanted, fraction = rng.randint(1, most), rng.uniform(0, 1)
            kill = _kill_after_checkpoints(process, output_dir, before, wanted, fraction, started)
            if kill is not None:
                kills.append(kill)
                log_file.write_text(json.dumps(kills, indent=1))
                continue
        if process.wait() != 0 and not (output_dir / "DONE").is_file():
            raise SystemExit(f"The resumed worker failed (exit {process.returncode}).")
    return kills


def _kill_after_checkpoints(process, output_dir: Path, before: set, wanted: int, fraction: float, started: float):
    """SIGKILL `process` a `fraction` of an interval after its `wanted`-th new checkpoint (`None`: it ended first)."""
    appeared: set[str] = set()  # `save_total_limit` deletes old checkpoints: count every one that appeared
    last_time = started
    while process.poll() is None:
        new = set(_checkpoints(output_dir)) - before - appeared
        if new:
            now = time.time()
            interval, last_time = now - last_time, now
            appeared |= new
            seen = len(appeared)
            if seen >= wanted:
                time.sleep(fraction * interval)
                if process.poll() is not None:
                    return None
                process.send_signal(signal.SIGKILL)
                process.wait()
                return {"after_seconds": round(time.time() - started, 1), "new_checkpoints": seen,
                        "seconds_after_the_last": round(fraction * interval, 1),
                        "checkpoints": _checkpoints(output_dir)}
        time.sleep(0.5)
    return None


def _checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob("checkpoint-*")) if output_dir.is_dir() else []


def compare(reference: Path, resumed: Path, max_steps: int) -> dict:
    """Largest differences between the two final checkpoints, by kind of tensor, and the equality of the masks."""
    import torch
    from safetensors.torch import load_file

    a = load_file(reference / f"checkpoint-{max_steps}" / "model.safetensors")
    b = load_file(resumed / f"checkpoint-{max_steps}" / "model.safetensors")
    assert a.keys() == b.keys()
    diffs = {"scores": 0.0, "score_cuts": 0.0, "multipliers": 0.0, "weights": 0.0}
    masks_equal = True
    for key in list(a):
        x, y = a[key].double(), b[key].double()
        kind = ("scores" if key.endswith("block_scores.scores") else "score_cuts" if key.endswith("score_cut")
                else "multipliers" if "blockprune_targets" in key else "weights")
        diffs[kind] = max(diffs[kind], (x - y).abs().max().item() if x.numel() else 0.0)
        if key.endswith("block_scores.scores"):  # the mask: effective score (raw x scale) above the cut
            prefix = key[: -len("scores")]
            for state, scores in ((a, x), (b, y)):
                state[prefix + "mask"] = scores * state[prefix + "score_scale"].double() > state[prefix + "score_cut"]
            masks_equal &= torch.equal(a[prefix + "mask"], b[prefix + "mask"])
    return {**diffs, "masks_equal": bool(masks_equal)}


def dev_accuracy(folder: Path) -> float:
    """Accuracy of the compacted model in `folder` on the whole SST-2 dev set."""
    import torch
    from transformers import AutoTokenizer

    import hf_blockprune
    from hf_blockprune.tasks.data import load_glue
    from hf_blockprune.tasks.defaults import offline_minilm_path

    tokenizer = AutoTokenizer.from_pretrained(offline_minilm_path())
    model = hf_blockprune.from_pretrained(str(folder)).eval()
    dev = load_glue("sst2")[0]["validation"]
    correct = 0
    for start in range(0, len(dev), 64):
        rows = dev[start:start + 64]
        batch = tokenizer(rows["sentence"], padding=True, truncation=True, max_length=48, return_tensors="pt")
        with torch.no_grad():
            correct += (model(**batch).logits.argmax(-1) == torch.tensor(rows["label"])).sum().item()
    return correct / len(dev)


def report(args, kills, diffs, accuracies, seconds) -> str:
    """The markdown result."""
    lines = [
        f"# Kill-and-resume soak ({args.route}, {args.max_steps} optimizer steps)", "",
        "MiniLM-L6-H384 on 6,000 SST-2 sentences, `hybrid` to target density 0.3, batch 8 x gradient accumulation 2, "
        f"checkpoints every {args.save_steps} steps; reference run "
        f"{f'{seconds:.0f} s' if seconds is not None else 'not timed'}.", "",
        f"Kills (SIGKILL) and the checkpoints on disk at each: {len(kills)}", "",
        "| # | process age (s) | its new checkpoints | s after the last | checkpoints on disk |",
        "|---|---|---|---|---|",
    ]
    for index, kill in enumerate(kills):
        lines.append(f"| {index + 1} | {kill['after_seconds']} | {kill.get('new_checkpoints', '-')} | "
                     f"{kill.get('seconds_after_the_last', '-')} | {', '.join(kill['checkpoints']) or '-'} |")
    lines += ["", "| compared at the final checkpoint | max abs difference |", "|---|---|"]
    lines += [f"| {kind} | {value:.3g} |" for kind, value in diffs.items() if kind != "masks_equal"]
    lines += ["", f"Masks equal: **{diffs['masks_equal']}**. Dev accuracy of the compacted models: uninterrupted "
              f"{accuracies[0]:.4f}, killed and resumed {accuracies[1]:.4f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the driver (or, with the internal `--worker`, one training process)."""
    args = parse_args(argv)
    if args.worker is not None:
        train(args, Path(args.worker))
        return 0
    work = Path(args.work_dir) / f"{args.route}-{args.max_steps}"
    work.mkdir(parents=True, exist_ok=True)
    reference, resumed = work / "uninterrupted", work / "killed"
    seconds = run_uninterrupted(args, reference)
    kills = run_with_kills(args, resumed)
    diffs = compare(reference, resumed, args.max_steps)
    accuracies = (dev_accuracy(reference / "final"), dev_accuracy(resumed / "final"))
    text = report(args, kills, diffs, accuracies, seconds)
    print(text)
    output = Path(args.output) if args.output else (RESULT if not args.quick else work / "soak_resume.md")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return 0 if diffs["masks_equal"] and len(kills) >= min(args.kills, 5) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
