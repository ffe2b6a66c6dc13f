"""Save block-pruned sentence-transformers models: the transformer compacted, the other modules as they were.

A `SentenceTransformer` (or `CrossEncoder`, `SparseEncoder`) is a `torch.nn.Sequential` whose first module holds a
transformers model and whose `config` is that model's: `apply_block_pruning` and `BlockPruningCallback` (through
`SentenceTransformerTrainer`, a `Trainer` subclass) mask that model's layers where they lie in the container (found by
module path). `save_compacted` then comes here: the container is saved through its own `save` (modules.json, pooling,
normalization, tokenizer, ...) with the transformer replaced by its compacted copy, whose `config.json` carries the
`AutoModel` entry that sentence-transformers loads, so `SentenceTransformer(path, trust_remote_code=True)` gives the
masked model's embeddings. sentence-transformers is never imported here: a model that is one was built with it.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from torch import nn

from ..pruning.config import BlockPruningConfig
from ..pruning.model import PRUNING_CONFIG_KEY, rename_legacy_keys
from ..structure.wrappers import is_sentence_transformer, transformers_model
from .atomic import atomic_directory
from .card_metadata import CARD_DATA_ATTRIBUTE
from .model_card import write_model_card
from .saving import CONTAINER_SAVERS, compacted_copy, refuse_non_finite, restore_save

logger = logging.getLogger(__name__)

def _add_usage(readme: Path, container: nn.Module) -> None:
    """Append how to load the folder with sentence-transformers to the model card."""
    name = type(container).__name__
    lines = ["", "## Loading with sentence-transformers", "", "```python", f"from sentence_transformers import {name}",
             f"model = {name}(PATH, trust_remote_code=True)", "```", ""]
    readme.write_text(readme.read_text(encoding="utf-8") + "\n".join(lines), encoding="utf-8")


def save_compacted_sentence_transformer(
    model: nn.Module,
    save_directory: str | os.PathLike,
    pruning_config: BlockPruningConfig | None = None,
    processing_class=None,
    model_card: bool = True,
    *,
    card_data: dict | None = None,
) -> nn.Module:
    """Save a masked sentence-transformers `model` with its transformer compacted (a copy; `model` is left as it is).

    The folder is what `model.save` writes (`modules.json`, the pooling and normalization modules, the tokenizer,
    `config_sentence_transformers.json`, ...), except that the transformer is the compacted model (`config.json` with
    `blockprune_layout` and an `auto_map` naming `AutoModel`, `modeling_blockprune.py`, the smaller weights), and,
    with `model_card`, `README.md` is hf_blockprune's card with a sentence-transformers usage section. Load it with
    `SentenceTransformer(path, trust_remote_code=True)`. Written atomically, like `save_compacted`.

    Args:
        model (`nn.Module`): a `SentenceTransformer` (or another sentence-transformers model) whose transformer is
            masked (or was compacted before).
        save_directory (`str` or `os.PathLike`): where to save.
        pruning_config (`BlockPruningConfig`, *optional*): recorded in the transformer's config and the card.
        processing_class (*optional*): a tokenizer or processor to save as well (`model.save` saves its own).
        model_card (`bool`, *optional*, defaults to `True`): write `README.md` and the figure.
        card_data (`dict`, *optional*): the run's evaluation results, datasets, ... (see `write_model_card`); the
            card data a Trainer attached to `model` is used as well.

    Returns:
        `nn.Module`: the compacted copy of `model` that was saved.

    Raises:
        `ValueError`: the transformer is not masked, holds NaN or inf values, or `model` holds several transformers.
    """
    inner = transformers_model(model)
    compacted = compacted_copy(inner)
    if pruning_config is not None:
        setattr(compacted.config, PRUNING_CONFIG_KEY, pruning_config.to_dict())
    container = restore_save(copy.deepcopy(model, memo={id(inner): compacted}))  # the masked transformer not copied
    refuse_non_finite(container, save_directory)
    with atomic_directory(save_directory) as staging:
        container.save(str(staging), create_model_card=False)
        if processing_class is not None:
            processing_class.save_pretrained(staging)
        if model_card:
            card_data = {**getattr(model, CARD_DATA_ATTRIBUTE, {}), **(card_data or {})}
            _add_usage(write_model_card(staging, compacted, card_data=card_data), container)
    logger.info("Saved the compacted %s to %s", type(container).__name__, save_directory)
    return container


CONTAINER_SAVERS.append((is_sentence_transformer, save_compacted_sentence_transformer))


def _weights_in(folder: Path) -> dict | None:
    """The state dict saved in `folder` (one safetensors file, shards with their index, or `pytorch_model.bin`)."""
    import json

    import torch
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return None


def load_sentence_transformer_checkpoint(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Load a Trainer checkpoint of a masked sentence-transformers model into `model`, in place.

    sentence-transformers resumes (and loads the best model at the end) by building a new model from the checkpoint
    folder, which cannot read a masked checkpoint (its `config.json` is marked, see `checkpoint_on_save`). Here each
    module's weights are read from its folder (`modules.json`) into the module that is already masked, scores
    included; a weight that is missing or unexpected raises rather than resuming with fresh values.

    Args:
        model: the masked `SentenceTransformer` (or `CrossEncoder`, ...) being trained.
        checkpoint: a `checkpoint-N` folder written by its Trainer.
    """
    import json

    checkpoint = Path(checkpoint)
    inner = transformers_model(model)
    for entry in json.loads((checkpoint / "modules.json").read_text()):
        module = model._modules[entry["name"]]
        target = inner if any(sub is inner for sub in module.modules()) else module
        expected = target.state_dict()
        if not expected:
            continue  # pooling, normalization: nothing trained
        folder = checkpoint / entry["path"]
        state = _weights_in(folder)
        if state is None:
            raise FileNotFoundError(f"No weights for module {entry['name']} ({type(module).__name__}) in {folder}.")
        rename_legacy_keys(state)  # a checkpoint from before 0.1.0
        tied = set(getattr(target, "all_tied_weights_keys", None) or {})
        missing = sorted(set(expected) - set(state) - tied)
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"The checkpoint {folder} does not hold the weights of {type(target).__name__} as it is masked now "
                f"(missing: {missing[:5]}, unexpected: {unexpected[:5]}): resume with the same pruning config."
            )
        target.load_state_dict(state, strict=False)
