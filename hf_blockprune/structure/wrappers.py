"""Models of other libraries around one transformers model (peft's `PeftModel`, sentence-transformers containers).

The core never imports those libraries. What it must know of such a model is a `ModelWrapper`: one per library, in
`MODEL_WRAPPERS`, registered by its integration (`hf_blockprune.integrations`), and found with `model_wrapper(model)`.
Each method's default describes a wrapper that needs nothing special.
"""

from __future__ import annotations

import copy
import os

from torch import nn
from transformers import PreTrainedModel


class ModelWrapper:
    """What the core needs to know of one library's model class around a transformers model.

    Attributes:
        name (`str`): the library, for messages.
        returns_loss (`bool`): whether its forward returns the loss (False: embeddings, its Trainer computes the loss
            with a loss module, as sentence-transformers does), which the callback and distillation need.
        trainer_class (`str`, *optional*): the library's Trainer subclass, named in the fixes the messages suggest.
        distillation_hint (`str`): how to distil such a model instead, when `returns_loss` is False.
        checks_own_checkpoints (`bool`): its checkpoints are read by its own loader, which checks the mask scores
            (so `check_resumable` leaves them to it).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from hf_blockprune.structure.wrappers import model_wrapper
        >>> model_wrapper(BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
        ...                                    num_attention_heads=4, intermediate_size=37))) is None
        True
    """

    name = ""
    returns_loss = True
    trainer_class: str | None = None
    distillation_hint = ""
    checks_own_checkpoints = False

    def applies(self, model: nn.Module) -> bool:
        """Whether `model` is one of this library's models."""
        raise NotImplementedError

    def applies_to_class(self, cls: type) -> bool:
        """Whether `cls` is one of this library's model classes."""
        return False

    def inner(self, model: nn.Module) -> nn.Module:
        """The module that holds the density targets and whose cost is measured (the transformers model)."""
        return model

    def compaction_copy(self, model: nn.Module) -> nn.Module:
        """A copy of the masked `model` that compaction may change (e.g. with peft's adapters merged)."""
        return copy.deepcopy(model)

    def save_compacted(self, model: nn.Module, save_directory: str | os.PathLike, **kwargs) -> nn.Module | None:
        """Save `model` compacted in the library's own format and return the compacted module; `None`: the core
        saves it (`save_compacted`'s keyword arguments are passed on)."""
        return None

    def save_pretrained(self, saving_of: type, model: nn.Module, save_directory, is_main_process: bool,
                        state_dict, **kwargs) -> None:
        """Call the library's `save_pretrained` of class `saving_of` (a masked checkpoint's weights)."""
        saving_of.save_pretrained(model, save_directory, is_main_process=is_main_process, state_dict=state_dict,
                                  **kwargs)

    def after_checkpoint_save(self, model: nn.Module, save_directory: str | os.PathLike) -> None:
        """Write what a masked checkpoint of `model` needs beside what its `save_pretrained` wrote."""

    def load_checkpoint(self, model: nn.Module, checkpoint: str | os.PathLike) -> bool:
        """Load a masked checkpoint into the masked `model` in place; `False`: the Trainer's loader does it."""
        return False

    def class_methods(self, saving_of: type) -> dict:
        """Methods to override in the save-mode subclass of `saving_of` (see `compact.saving.checkpoint_on_save`)."""
        return {}


MODEL_WRAPPERS: list[ModelWrapper] = []


def model_wrapper(model: nn.Module) -> ModelWrapper | None:
    """The registered wrapper `model` is a model of (`MODEL_WRAPPERS`), or `None` for a transformers model."""
    return next((wrapper for wrapper in MODEL_WRAPPERS if wrapper.applies(model)), None)


def _contains(outer: nn.Module, module: nn.Module) -> bool:
    return any(inner is module for inner in outer.modules())


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The one transformers model inside `model` (e.g. the `BertModel` of a SentenceTransformer).

    Raises:
        `ValueError`: `model` holds no transformers model, or several (e.g. a `Router` of two encoders).

    Example:
        >>> from torch import nn
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        ...                             intermediate_size=37))
        >>> transformers_model(nn.Sequential(bert, nn.Identity())) is bert
        True
    """
    found: list[PreTrainedModel] = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and not any(_contains(outer, module) for outer in found):
            found.append(module)
    if len(found) != 1:
        raise ValueError(
            f"{type(model).__name__} holds {len(found)} transformers models; hf_blockprune saves "
            "sentence-transformers models built around exactly one (`model[0].auto_model`)."
        )
    return found[0]
