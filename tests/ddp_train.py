"""Run by tests/test_distributed.py under `torch.distributed.run` (2 CPU processes, gloo): a tiny BERT fine-pruned
with a teacher and a target density, through the trainer or the callback. Each rank writes its scores and masks;
rank 0 also writes the masked model's logits on fixed inputs, then everyone calls `save_model()` (compacted)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_blockprune import BlockPruningCallback, BlockPruningConfig, BlockPruningTrainer  # noqa: E402
from hf_blockprune.pruning.model import block_scores  # noqa: E402

from conftest import tiny_dataset, tiny_model, training_args  # noqa: E402
from helpers import TINY_PRESETS  # noqa: E402


def main(route: str, preset: str, out: str) -> None:
    """Train, dump this rank's state, save."""
    config = BlockPruningConfig.from_preset(preset, target_density=0.4, **TINY_PRESETS.get(preset.split("-")[0], {}))
    model, teacher = tiny_model("bert"), tiny_model("bert", seed=1)
    args = training_args(out, max_steps=30, logging_steps=10)
    data = tiny_dataset("bert")
    if route == "trainer":
        trainer = BlockPruningTrainer(model=model, args=args, train_dataset=data, pruning_config=config,
                                      teacher_model=teacher)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[BlockPruningCallback(config, teacher_model=teacher)])
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    state = {"world_size": trainer.args.world_size}
    with torch.no_grad():
        state["scores"] = [s.scores.flatten().tolist() for s in block_scores(trainer.model)]
        state["masks"] = [s.mask().flatten().tolist() for s in block_scores(trainer.model)]
        ids = torch.tensor([row["input_ids"].tolist() for row in data[:4]])
        state["logits"] = trainer.model.eval()(input_ids=ids).logits.tolist()
    Path(out, f"rank{rank}.json").write_text(json.dumps(state))
    trainer.save_model()


if __name__ == "__main__":
    main(*sys.argv[1:4])
