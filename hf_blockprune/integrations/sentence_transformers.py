"""sentence-transformers with block pruning: recognize its models, save them compacted, load their checkpoints.

A `SentenceTransformer` (or `CrossEncoder`, `SparseEncoder`) is a `torch.nn.Sequential` whose first module holds a
transformers model and whose `config` is that model's: `apply_block_pruning` and `BlockPruningCallback` (through
`SentenceTransformerTrainer`, a `Trainer` subclass) mask that model's layers where they lie in the container (found by
module path). `save_compacted` then comes here: the container is saved through its own `save` (modules.json, pooling,
normalization, tokenizer, ...) with the transformer replaced by its compacted copy, whose `config.json` carries the
`AutoModel` entry that sentence-transformers loads, so `SentenceTransformer(path, trust_remote_code=True)` gives the
masked model's embeddings. Such a model returns embeddings, not a loss: the callback and distillation refuse what
needs a loss (`SentenceTransformersWrapper.returns_loss`).

sentence-transformers is never imported here: a model that is one was built with it, and is recognized by the
package of its class. `hf_blockprune.integrations` registers `SentenceTransformersWrapper` (`MODEL_WRAPPERS`).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from torch import nn

from ..compact.atomic import atomic_directory
from ..compact.card_metadata import CARD_DATA_ATTRIBUTE, make_record_public
from ..compact.model_card import write_model_card
from ..compact.saving import compacted_copy, refuse_non_finite, restore_save
from ..pruning.config import BlockPruningConfig
from ..pruning.model import rename_legacy_keys
from ..structure.model_structure import PRUNING_CONFIG_KEY
from ..structure.wrappers import MODEL_WRAPPERS, ModelWrapper, transformers_model

logger = logging.getLogger(__name__)
_PACKAGE = "sentence_transformers"


def is_sentence_transformer(model: nn.Module) -> bool:
    """Whether `model` is a sentence-transformers model (a class of that package, or a subclass of one).

    Example:
        >>> from torch import nn
        >>> is_sentence_transformer(nn.Sequential())
        False
    """
    return any(cls.__module__.split(".")[0] == _PACKAGE for cls in type(model).__mro__)


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
        if model_card:
            card_data = {**getattr(model, CARD_DATA_ATTRIBUTE, {}), **(card_data or {})}
            _add_usage(write_model_card(staging, compacted, card_data=card_data), container)
        make_record_public(compacted.config)  # no local path (the teacher's) in config.json
        container.save(str(staging), create_model_card=False)
        if processing_class is not None:
            processing_class.save_pretrained(staging)
    logger.info("Saved the compacted %s to %s", type(container).__name__, save_directory)
    return container


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


class SentenceTransformersWrapper(ModelWrapper):
    """A sentence-transformers model in a pruning run (see the module docstring)."""

    name = "sentence-transformers"
    returns_loss = False
    trainer_class = "SentenceTransformerTrainer"
    distillation_hint = "distil with a sentence-transformers loss such as `MSELoss` against the teacher's embeddings"
    checks_own_checkpoints = True  # `load_sentence_transformer_checkpoint` refuses missing or unexpected weights

    def applies(self, model: nn.Module) -> bool:
        return is_sentence_transformer(model)

    def inner(self, model: nn.Module) -> nn.Module:
        # an nn.Sequential whose every child is a stage of its forward pass: its transformer holds the targets
        return transformers_model(model)

    def save_compacted(self, model: nn.Module, save_directory, **kwargs) -> nn.Module:
        return save_compacted_sentence_transformer(model, save_directory, **kwargs)

    def save_pretrained(self, saving_of: type, model: nn.Module, save_directory, is_main_process: bool,
                        state_dict, **kwargs) -> None:
        if is_main_process:  # its save_pretrained takes neither `is_main_process` nor `state_dict`
            saving_of.save_pretrained(model, save_directory, **kwargs)

    def load_checkpoint(self, model: nn.Module, checkpoint) -> bool:
        load_sentence_transformer_checkpoint(model, checkpoint)
        return True


MODEL_WRAPPERS.append(SentenceTransformersWrapper())
