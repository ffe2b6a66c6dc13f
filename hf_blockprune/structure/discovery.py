"""Find a model's prunable structure in its module tree, once, and keep it with the model.

`structure_of(model)` is the one way in: it returns the `ModelStructure` kept on the model, or finds it (the stacks
from the user's module patterns or the built-in map, the layers from the module tree, the head slots from the model
config or, for a compacted model, from `config.blockprune_layout`) and keeps it. Nothing outside this module walks the
module tree to find layers (`tests/test_layout.py` checks it).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .architectures import AttentionSpec, LayerStackSpec, ModulePatterns, find_layer_lists, stack_specs
from .layers import PrunableLayer, width
from .model_structure import (
    LAYOUT_ATTRIBUTE,
    PRUNING_CONFIG_KEY,
    STREAM_ATTRIBUTE,
    STRUCTURE_ATTRIBUTE,
    AttentionStructure,
    LayerStructure,
    ModelStructure,
    StreamStructure,
    attention_record,
    is_removed,
    layout_entry,
    record_slots,
)
from .wrappers import transformers_model


def _config_count(model: nn.Module, attribute: str, field_name: str) -> int:
    value = getattr(getattr(model, "config", None), attribute, None)
    if not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"Cannot read a head count from model.config.{attribute}; set `{field_name}` to the model-config field "
            "that holds it."
        )
    return value


def _head_counts(model: nn.Module, spec: AttentionSpec) -> tuple[int, int]:
    """`(query heads, key/value heads)` of a dense attention block, from the model config."""
    heads = _config_count(model, spec.num_heads, "num_heads_attribute")
    if spec.num_kv_heads is None:
        return heads, heads
    return heads, _config_count(model, spec.num_kv_heads, "num_kv_heads_attribute")


def _attention(model: nn.Module, layer: nn.Module, name: str, spec: AttentionSpec, entry: dict):
    """An attention's structure: from its layout record (a compacted model), else the config's head counts."""
    record = attention_record(entry, spec)
    if record is not None:
        slots, kv_slots = record_slots(record)
        return AttentionStructure(spec, record["head_dim"], tuple(slots), tuple(kv_slots))
    heads, kv_heads = _head_counts(model, spec)
    if spec.fused:
        head_dim = width(layer, name, spec.fused) // (heads + 2 * kv_heads)
    else:
        head_dim = width(layer, name, spec.query) // heads  # 0 (not a projection): refused by check_prunable
    return AttentionStructure(spec, head_dim, tuple(range(heads)), tuple(range(kv_heads)))


def _layer(model: nn.Module, name: str, layer: nn.Module, stack: LayerStackSpec, layout: dict | None):
    entry, ffn = layout_entry(layout, name), layout_entry(layout, name).get("ffn") or {}
    specs = [spec for spec in stack.attentions if not is_removed(attention_record(entry, spec))]
    attentions = tuple(_attention(model, layer, name, spec, entry) for spec in specs)
    return LayerStructure(name, stack, attentions, bool(ffn.get("placeholder")), is_removed(ffn))


def find_structure(model: nn.Module, patterns: ModulePatterns | None = None) -> ModelStructure:
    """Find the prunable structure of `model` in its module tree (see the module docstring); keeps nothing.

    Raises:
        `ValueError`: the model type has no built-in map and no patterns are given, it cannot be pruned exactly, no
            `nn.ModuleList` matches, a module is missing, or a head count cannot be read.
    """
    layout = getattr(getattr(model, "config", None), LAYOUT_ATTRIBUTE, None)
    layers = []
    for stack in stack_specs(model, patterns):
        lists = find_layer_lists(model, stack.layers)
        if not lists:
            raise ValueError(f"No nn.ModuleList named like {stack.layers!r} in {type(model).__name__}.")
        for list_name, layer_list in lists:
            for index, layer in enumerate(layer_list):
                layers.append(_layer(model, f"{list_name}.{index}", layer, stack, layout))
    return ModelStructure(tuple(layers), patterns, _recorded_stream(model))


def _inner_path(model: nn.Module) -> str:
    """The path of the transformers model whose config records the stream inside `model` (`""`: `model` itself, or a
    model that holds none or several)."""
    try:
        inner = transformers_model(model)
    except ValueError:
        return ""
    return next(name for name, module in model.named_modules() if module is inner)


def _recorded_stream(model: nn.Module) -> StreamStructure | None:
    """The stream recorded in `model.config` (paths relative to the transformers model it belongs to): while its
    hidden size is masked (`keep_stream`), else the one its layout compacted; `None` if neither."""
    config = getattr(model, "config", None)
    record = getattr(config, STREAM_ATTRIBUTE, None)
    if record is None:
        record = (getattr(config, LAYOUT_ATTRIBUTE, None) or {}).get("hidden")
    return None if record is None else StreamStructure.from_record(record).moved("", _inner_path(model))


def kept_structure(model: nn.Module) -> ModelStructure | None:
    """The structure kept on `model` itself (not on a module it wraps or is wrapped by, nor on the model it was copied
    from: a copy may be changed, e.g. truncated, so it finds its own), or `None`."""
    owner, structure = model.__dict__.get(STRUCTURE_ATTRIBUTE, (None, None))
    return structure if owner == id(model) else None


def keep_structure(model: nn.Module, structure: ModelStructure) -> ModelStructure:
    """Keep `structure` on `model`, forgetting any kept on a module inside it (their shapes may be stale)."""
    for module in model.modules():
        module.__dict__.pop(STRUCTURE_ATTRIBUTE, None)
    model.__dict__[STRUCTURE_ATTRIBUTE] = (id(model), structure)  # a deep copy carries it, but not as its own
    return structure


def structure_of(model: nn.Module, config=None) -> ModelStructure:
    """The prunable structure of `model`: the one kept on it, else found now (`find_structure`) and kept.

    Args:
        model (`nn.Module`): a transformers model (or a container of one), masked or not, compacted or not.
        config (`BlockPruningConfig`, `ModulePatterns` or `dict`, *optional*): module patterns for an architecture
            without a built-in entry. Patterns that differ from those the kept structure was found with make it found
            again (`apply_block_pruning` passes its config); a config without patterns leaves the kept structure
            alone. Without a kept structure and without patterns, the patterns recorded in `model.config` (a checkpoint
            or compacted model of a custom architecture) are used, else the built-in map.

    Returns:
        `ModelStructure`: kept on `model` for every later call.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from hf_blockprune.structure.discovery import structure_of
        >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4))
        >>> attention = structure_of(model).layers[0].attentions[0]
        >>> attention.spec.fused, attention.head_dim, attention.spec.sets_cache_length
        ('attn.c_attn', 8, True)
    """
    patterns = ModulePatterns.of(config)
    kept = kept_structure(model)
    if kept is not None and (patterns is None or patterns == kept.patterns):
        return kept
    if patterns is None:
        patterns = ModulePatterns.of(getattr(getattr(model, "config", None), PRUNING_CONFIG_KEY, None))
    return keep_structure(model, find_structure(model, patterns))


def keep_stream(model: nn.Module, stream: StreamStructure) -> ModelStructure:
    """Keep `stream` (found by `hf_blockprune.structure.stream.find_stream`) in the structure kept on `model`, and
    record it in `model.config` while the hidden size is masked (so that a copy of the model finds it again)."""
    structure = structure_of(model)
    if getattr(model, "config", None) is not None:  # recorded relative to the transformers model owning the config
        setattr(model.config, STREAM_ATTRIBUTE, stream.moved(_inner_path(model), "").record())
    return keep_structure(model, replace(structure, stream=stream))


def forget_stream(model: nn.Module) -> None:
    """Undo `keep_stream` once the hidden mask is gone: the kept structure's stream is again the one the layout
    records (or none)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, STREAM_ATTRIBUTE):
        delattr(config, STREAM_ATTRIBUTE)
    structure = kept_structure(model)
    if structure is not None:
        keep_structure(model, replace(structure, stream=_recorded_stream(model)))


def prunable_layers(model: nn.Module) -> list[PrunableLayer]:
    """The layers of `model` that block pruning acts on, in module-tree order, bound to its modules:
    `structure_of(model).bind(model)`.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from hf_blockprune.structure.discovery import prunable_layers
        >>> model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37))
        >>> [(layer.name, layer.ffn_input.out_features) for layer in prunable_layers(model)]
        [('encoder.layer.0', 37), ('encoder.layer.1', 37)]
    """
    return structure_of(model).bind(model)
