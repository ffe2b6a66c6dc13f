"""Run by tests/test_distributed.py under `torch.distributed.run` or `accelerate launch` (2 CPU processes, gloo): a
tiny BERT fine-pruned with a teacher (logits and hidden states), a target density and Fisher-initialized scores,
through the trainer or the callback. Every rank calls `save_model()` (compacted), then writes who it is (rank, world
size, process id, backend), the compacted models it wrote, its scores and masks, and the masked model's logits on
fixed inputs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_blockprune import BlockPruningCallback, BlockPruningConfig, BlockPruningTrainer  # noqa: E402
from hf_blockprune.compact import saving  # noqa: E402
from hf_blockprune.pruning.model import block_scores  # noqa: E402

from conftest import tiny_dataset, tiny_model, training_args  # noqa: E402
from helpers import TINY_PRESETS  # noqa: E402


def count_compactions() -> list[str]:
    """Record every compacted model this process writes (the directories), through `saving.save_compacted`."""
    written, save_compacted = [], saving.save_compacted

    def recording(model, save_directory, *args, **kwargs):
        written.append(str(save_directory))
        return save_compacted(model, save_directory, *args, **kwargs)

    saving.save_compacted = recording
    return written


def main(route: str, preset: str, out: str) -> None:
    """Train, save, dump this rank's state."""
    config = BlockPruningConfig.from_preset(preset, target_density=0.4, mask_init="fisher", calibration_examples=16,
                                            layer_distillation_weight=1.0,
                                            **TINY_PRESETS.get(preset.split("-")[0], {}))
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
    written = count_compactions()
    trainer.save_model()
    state = {
        "rank": trainer.args.process_index, "world_size": trainer.args.world_size, "pid": os.getpid(),
        "backend": trainer.accelerator.state.backend, "compacted_saves": written,
    }
    with torch.no_grad():
        state["scores"] = [s.scores.flatten().tolist() for s in block_scores(trainer.model)]
        state["masks"] = [s.mask().flatten().tolist() for s in block_scores(trainer.model)]
        ids = torch.tensor([row["input_ids"].tolist() for row in data[:4]])
        state["logits"] = trainer.model.eval()(input_ids=ids).logits.tolist()
    Path(out, f"rank{state['rank']}.json").write_text(json.dumps(state))


if __name__ == "__main__":
    main(*sys.argv[1:4])
