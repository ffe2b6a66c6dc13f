"""PEFT-wrapped models (LoRA) in a pruning run: their training checkpoints and their compacted save.

peft saves only the adapters (`adapter_model.safetensors`), so a checkpoint of a masked PEFT model also gets
`blockprune_state.safetensors`: the mask scores, their thresholds and the density controller's state, everything a
resumed run needs besides the adapters (the base weights are frozen and come from the base model). The compacted model
is saved from a copy whose adapters are merged into the masked weights (`merged_copy`): a plain compacted model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ..pruning.model import CONFIG_ATTRIBUTE, TARGETS_ATTRIBUTE, rename_legacy_keys

try:
    from peft import PeftModel
except ImportError:  # pragma: no cover
    PeftModel = ()

PRUNING_STATE_NAME = "blockprune_state.safetensors"


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel` (e.g. made by `get_peft_model`)."""
    return bool(PeftModel) and isinstance(model, PeftModel)


def is_peft_model_class(cls: type) -> bool:
    """Whether `cls` is `peft.PeftModel` or a subclass."""
    return bool(PeftModel) and isinstance(cls, type) and issubclass(cls, PeftModel)


def _is_pruning_key(key: str) -> bool:
    return ".block_scores." in f".{key}" or key.split(".", 1)[0] == TARGETS_ATTRIBUTE


def pruning_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of `model.state_dict()` that hf_blockprune adds: mask scores, their buffers, the controller's."""
    return {key: value for key, value in model.state_dict().items() if _is_pruning_key(key)}


def save_pruning_state(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write `pruning_state(model)` to `<save_directory>/blockprune_state.safetensors`."""
    from safetensors.torch import save_file

    state = {key: value.detach().contiguous().cpu() for key, value in pruning_state(model).items()}
    save_file(state, str(Path(save_directory) / PRUNING_STATE_NAME), metadata={"format": "pt"})


def load_pruning_state(model: nn.Module, directory: str | os.PathLike) -> None:
    """Load `blockprune_state.safetensors` of a checkpoint folder into the masked `model`.

    Raises:
        `ValueError`: the folder has no such file (a checkpoint of the adapters alone would restart the scores), or its
            entries do not match the model's masks.
    """
    from safetensors.torch import load_file

    path = Path(directory) / PRUNING_STATE_NAME
    if not path.is_file():
        raise ValueError(
            f"{directory} holds the adapters of a block-pruned PEFT model but no {PRUNING_STATE_NAME} (mask scores): "
            "it was not written by a pruning run, and resuming from it would restart the masks. Resume from a "
            "checkpoint written by BlockPruningTrainer or BlockPruningCallback."
        )
    state = rename_legacy_keys(load_file(str(path)))
    expected = set(pruning_state(model))
    if set(state) != expected:
        difference = sorted(expected ^ set(state))[:5]
        raise ValueError(
            f"{path} does not match this model's masks (e.g. {difference}): build the model and the pruning config "
            "as in the run that wrote it."
        )
    model.load_state_dict(state, strict=False)


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of a masked PEFT model with every adapter merged (peft's `merge_and_unload()`), masks kept: the masked
    transformers model computing what the adapted model computes."""
    clone = copy.deepcopy(model)
    merged = clone.merge_and_unload()
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is not None:
        setattr(merged, CONFIG_ATTRIBUTE, config)
    return merged
