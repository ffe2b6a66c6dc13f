"""Models that wrap a transformers model: sentence-transformers containers, and the model inside them."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

_PACKAGE = "sentence_transformers"


def is_sentence_transformer(model: nn.Module) -> bool:
    """Whether `model` is a sentence-transformers model (a class of that package, or a subclass of one)."""
    return any(cls.__module__.split(".")[0] == _PACKAGE for cls in type(model).__mro__)


def _contains(outer: nn.Module, module: nn.Module) -> bool:
    return any(inner is module for inner in outer.modules())


def transformers_model(model: nn.Module) -> PreTrainedModel:
    """The transformers model inside a sentence-transformers `model` (e.g. the `BertModel` of a SentenceTransformer).

    Raises:
        `ValueError`: `model` holds no transformers model, or several (e.g. a `Router` of two encoders).
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
