"""Masked training checkpoints: recognise them, and rebuild the masked model they hold.

A checkpoint written during training (by `BlockPruningTrainer`, the callback, or `save_model()` before training ends)
holds the mask scores next to the unmasked weights (`...base_layer.weight`, `...block_scores.scores`): plain
`from_pretrained` cannot read it, `load_masked_checkpoint` can, and `hf-blockprune compact` turns it into the compacted
model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..pruning.config import BlockPruningConfig
from ..pruning.model import LAYOUT_ATTRIBUTE, PRUNING_CONFIG_KEY, TARGETS_ATTRIBUTE, apply_block_pruning
from ..structure.modeling_blockprune import block_pruned_class
from .saving import SCORE_SUFFIX, architecture_class, read_model_config

logger = logging.getLogger(__name__)

def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a local checkpoint folder (`model.safetensors`, possibly sharded)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(path / shard).items()}
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"{path} has no model.safetensors.")
    return load_file(path / "model.safetensors")


def recorded_pruning_config(config, config_file: str | None, flags: BlockPruningConfig | None) -> BlockPruningConfig:
    """The config the checkpoint was masked with: `--pruning_config` file, else config.json's record, else flags."""
    if config_file is not None:
        try:
            return BlockPruningConfig.from_dict(json.loads(Path(config_file).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read --pruning_config {config_file}: {error}") from None
    recorded = getattr(config, PRUNING_CONFIG_KEY, None)
    if recorded is not None:
        return BlockPruningConfig.from_dict(recorded)
    if flags is None:
        raise ValueError("The checkpoint does not record its pruning config: pass --pruning_config or preset flags.")
    logger.warning("The checkpoint does not record its pruning config; using the command-line flags.")
    return flags


def load_masked_checkpoint(
    path: str | os.PathLike, pruning_config_file: str | None = None, flags: BlockPruningConfig | None = None
) -> nn.Module:
    """Rebuild the masked model of a checkpoint written by `BlockPruningTrainer` (or the callback) during training.

    Args:
        path (`str` or `os.PathLike`): the checkpoint folder (`config.json` and `model.safetensors` with
            `...base_layer.weight` and `...block_scores.scores` keys).
        pruning_config_file (`str`, *optional*): a JSON file with the `BlockPruningConfig` used in training; defaults
            to the `blockprune_config` recorded in `config.json`.
        flags (`BlockPruningConfig`, *optional*): the config to use when neither of the above exists.

    Returns:
        `nn.Module`: the masked model, in eval mode, with its scores and thresholds as saved.

    Example:
        >>> import os
        >>> import tempfile
        >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        >>> from hf_blockprune import BlockPruningConfig, BlockPruningTrainer, is_block_pruned, load_masked_checkpoint
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> data = [{"input_ids": [2, 3 + i, 5, 7], "labels": i % 2} for i in range(16)]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     args = TrainingArguments(output_dir=tmp, max_steps=2, use_cpu=True, report_to="none",
        ...                              disable_tqdm=True, logging_strategy="no", save_steps=1)
        ...     trainer = BlockPruningTrainer(model=model, args=args, train_dataset=data,
        ...                                   pruning_config=BlockPruningConfig.from_preset("struct"))
        ...     _ = trainer.train()  # doctest: +ELLIPSIS
        ...     masked = load_masked_checkpoint(os.path.join(tmp, "checkpoint-1"))  # written after step 1
        {'train_runtime': ...}
        >>> is_block_pruned(masked), masked.training
        (True, False)
    """
    path = Path(path)
    config = read_model_config(path)
    state = checkpoint_state(path)
    if not any(key.endswith(SCORE_SUFFIX) for key in state):
        if getattr(config, LAYOUT_ATTRIBUTE, None) is not None:
            raise ValueError(f"{path} holds a compacted model already (its config.json has `{LAYOUT_ATTRIBUTE}` and "
                             "there are no mask scores): load it with `hf_blockprune.from_pretrained`.")
        raise ValueError(f"{path} holds no mask scores (`*.{SCORE_SUFFIX}`): it is not a masked training checkpoint.")
    # The density controller's state (lambda) only matters for resuming training: the masks are the scores and cuts.
    state = {k: v for k, v in state.items() if not k.startswith(f"{TARGETS_ATTRIBUTE}.")}
    model_class = architecture_class(config)
    if getattr(config, LAYOUT_ATTRIBUTE, None) is not None:  # a compacted model pruned again
        model_class = block_pruned_class(model_class)
    model = model_class(config)
    apply_block_pruning(model, recorded_pruning_config(config, pruning_config_file, flags))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"The weights in {path} do not match the pruning config: {error}") from None
    return model.eval()
