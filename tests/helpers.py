"""Shared helpers for the Trainer-level tests."""

from __future__ import annotations

import torch
from transformers import Trainer

from hf_blockprune import BlockPruningCallback, BlockPruningConfig, BlockPruningTrainer
from hf_blockprune.model import block_scores

from conftest import tiny_dataset, tiny_model, training_args

# Block sizes that divide the tiny models (hidden 32 = 4 heads x 8, FFN 37).
TINY_PRESETS = {
    "hybrid": dict(attention_block_size=[8, 8]),
    "struct": {},
    "block": dict(attention_block_size=[8, 8], ffn_block_size=[1, 1]),
}


def make_trainer(route, arch, config, output_dir, trainer_class=Trainer, model=None, **arg_overrides):
    """A trainer with block pruning through `route`: "trainer" (the subclass) or "callback"."""
    model = model if model is not None else tiny_model(arch)
    args = training_args(output_dir, **arg_overrides)
    data = tiny_dataset(arch)
    if route == "trainer":
        return BlockPruningTrainer(model=model, args=args, train_dataset=data, pruning_config=config)
    return trainer_class(model=model, args=args, train_dataset=data, callbacks=[BlockPruningCallback(config)])


def effective_scores(model) -> list[torch.Tensor]:
    """Every score tensor as the masks see them, detached."""
    return [s.effective_scores().detach().clone() for s in block_scores(model)]


def masks(model) -> list[torch.Tensor]:
    """Every binary mask of the model."""
    with torch.no_grad():
        return [s.mask().clone() for s in block_scores(model)]


def topk_density(model, fraction: float) -> float:
    """The exact density top-k gives at `fraction`: round(f * n) blocks kept in each score grid."""
    kept = total = 0.0
    for scores in block_scores(model):
        n = scores.scores.numel()
        kept += round(fraction * n) * scores.weights_per_block
        total += n * scores.weights_per_block
    return kept / total


def preset_config(preset, **overrides) -> BlockPruningConfig:
    """A preset sized for the tiny models."""
    return BlockPruningConfig.from_preset(preset, **{**TINY_PRESETS[preset], **overrides})
