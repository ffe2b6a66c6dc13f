"""Depth: drop the layers compaction left with nothing, where the architecture allows it (`LayerStackSpec.droppable`).

A pre-norm layer computes `x + attention(norm(x))`, then `x + ffn(norm(x))`. Once compaction has removed both
sublayers (`remove_sublayers`), the layer only adds a constant: the biases its `ConstantOutput`s hold (nothing in
Llama, Mistral and Qwen2, whose `o_proj` and `down_proj` have no bias). It is dropped from its `nn.ModuleList` when
that constant is zero, or can be added instead to the bias of the last writer of the layer kept before it (its FFN
output projection, GPT-2's `mlp.c_proj`), or, before the first layer kept, to every row of a position table (GPT-2's
`wpe`: each token reads one row once). The config gets fewer layers (`num_hidden_layers`, and `layer_types` where the
config lists one per layer), and every module of the later layers that addresses the KV cache by `layer_idx` is
renumbered, so that a stock config describes the result and `generate()` gives the same tokens. A layer whose constant
has nowhere to go stays, and each stack keeps at least one layer.

The layout records, per stack, the original index of each layer left (`"layer_map"`) and the original indices of the
dropped ones (`"dropped_layers"`); its layer entries and its hidden-size record use the new paths. Hidden states per
layer (`output_hidden_states=True`) have one entry less per dropped layer; a folded constant shows in the state of the
layer kept before (it equals the masked model's state after the dropped layers), the logits are unchanged.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import replace

import torch
from torch import nn

from ..structure.model_structure import LayerStructure, ModelStructure, StreamStructure
from ..structure.modeling_blockprune import is_constant_output

logger = logging.getLogger(__name__)

DROPPED_KEY, MAP_KEY = "dropped_layers", "layer_map"


def _constant(model: nn.Module, layer: LayerStructure) -> torch.Tensor | None | bool:
    """`False` if a sublayer of `layer` is left; else what the layer adds to the stream at every position (the sum of
    its `ConstantOutput` biases), `None` for nothing."""
    if layer.attentions or (layer.stack.ffn is not None and not layer.ffn_removed):
        return False
    outputs = [spec.output for spec in layer.stack.attentions] + ([layer.stack.ffn.output] if layer.stack.ffn else [])
    modules = [model.get_submodule(f"{layer.name}.{path}") for path in outputs]
    if not all(is_constant_output(module) for module in modules):
        return False
    biases = [module.bias for module in modules if module.bias is not None and module.bias.any()]
    return torch.stack(biases).sum(0).detach() if biases else None


def _fold_target(model: nn.Module, layers: list[LayerStructure], before: list[int]) -> str | None:
    """Where a constant added by a dropped layer can go instead: the output projection of the last layer kept before it
    (`before`, its last writer), if it has a bias; for the first layers, the position table (every token reads one
    of its rows once, before the first layer); `None` if neither can take it."""
    spec = layers[0].stack
    if before:
        path = f"{layers[before[-1]].name}.{spec.ffn.output}" if spec.ffn else None
        module = model.get_submodule(path) if path else None
        return path if module is not None and getattr(module, "bias", None) is not None else None
    if spec.position_table is None:
        return None
    return next((name for name, module in model.named_modules() if isinstance(module, nn.Embedding) and
                 (name == spec.position_table or name.endswith("." + spec.position_table))), None)


def _drop_plan(model: nn.Module, structure: ModelStructure) -> dict[str, list[tuple[int, torch.Tensor | None, str]]]:
    """Per layer list, the layers to drop: `(index, constant, where the constant goes)` (see `droppable_layers`)."""
    config = getattr(model, "config", None)
    stacks: dict[str, list[LayerStructure]] = {}
    for layer in structure.layers:
        stacks.setdefault(layer.stack_name, []).append(layer)
    plan = {}
    for path, layers in stacks.items():
        spec = layers[0].stack
        if not spec.droppable or any(getattr(config, flag, False) for flag in spec.index_flags):
            continue
        if getattr(config, "num_hidden_layers", None) != len(model.get_submodule(path)):
            continue  # the config does not count this list's layers: it could not describe fewer
        kept, drops = [], []
        for index, layer in enumerate(layers):
            constant = _constant(model, layer)
            target = None if constant is False or constant is None else _fold_target(model, layers, kept)
            last_one = not kept and index == len(layers) - 1  # every stack keeps a layer
            if constant is False or (constant is not None and target is None) or last_one:
                kept.append(index)  # a sublayer is left, or a constant that has nowhere to go
            else:
                drops.append((index, constant, target))
        if drops:
            plan[path] = drops
    return plan


def droppable_layers(model: nn.Module, structure: ModelStructure) -> dict[str, list[int]]:
    """Per layer list (its path), the indices of the layers of a compacted `model` that can go: every sublayer removed,
    and what the layer still adds (its output biases) either nothing or foldable into an earlier writer.

    Args:
        model (`nn.Module`): a compacted model (sublayers removed, see `remove_sublayers`).
        structure (`ModelStructure`): its compacted structure.

    Returns:
        `dict[str, list[int]]`: the current indices to drop, for each stack that has any (every stack keeps one
        layer).

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from hf_blockprune import BlockPruningConfig, apply_block_pruning, compact_model
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
        ...     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2))
        >>> model = apply_block_pruning(model, BlockPruningConfig.from_preset(
        ...     "struct", pruning_method="sigmoid_threshold", initial_threshold=0.5, mask_init_value=1.0))
        >>> layer = model.model.layers[1]
        >>> with torch.no_grad():  # layer 1 loses every head and every neuron
        ...     _ = layer.self_attn.q_proj.scores_module.scores.fill_(-1.0)
        ...     _ = layer.mlp.gate_proj.scores_module.scores.fill_(-1.0)
        >>> model = compact_model(model)  # drops it (see `drop_layers`)
        >>> len(model.model.layers), model.config.num_hidden_layers, model.config.blockprune_layout["layer_map"]
        (2, 2, {'model.layers': [0, 2]})
    """
    return {path: [index for index, _, _ in drops] for path, drops in _drop_plan(model, structure).items()}


@torch.no_grad()
def _fold(model: nn.Module, constant: torch.Tensor, target: str) -> None:
    module = model.get_submodule(target)
    if isinstance(module, nn.Embedding):
        module.weight.add_(constant.to(module.weight.dtype))  # every row: each token reads one, once
    else:
        module.bias.add_(constant.to(module.bias.dtype))


def _renamed(path: str, moves: dict[str, str]) -> str | None:
    """`path` with its layer prefix moved (`moves`: old layer path -> new one or `None`, dropped); else unchanged."""
    for old, new in moves.items():
        if path == old or path.startswith(old + "."):
            return None if new is None else new + path[len(old):]
    return path


def _moved_layout(layout: dict, moves: dict[str, str | None]) -> dict:
    layout = copy.deepcopy(layout)
    layout["layers"] = {_renamed(name, moves): entry for name, entry in layout.get("layers", {}).items()
                        if _renamed(name, moves) is not None}
    hidden = layout.get("hidden")
    if hidden is not None:
        for key in ("embeddings", "norms", "readers", "writers", "sources"):
            paths = [_renamed(path, moves) for path in hidden.get(key, [])]
            hidden[key] = [path for path in paths if path is not None]
    return layout


def _renumber(layers: nn.ModuleList, kept: list[int]) -> nn.ModuleList:
    """The layers `kept` in a new list; each module that held its layer's index (`layer_idx`) gets the new one."""
    new = nn.ModuleList([layers[index] for index in kept])
    for position, (index, layer) in enumerate(zip(kept, new)):
        for module in layer.modules():
            if getattr(module, "layer_idx", None) == index:
                module.layer_idx = position
    return new


def drop_layers(model: nn.Module, structure: ModelStructure, layout: dict) -> tuple[ModelStructure, dict]:
    """Drop `droppable_layers(model, structure)` from a compacted `model`, in place (see the module docstring).

    Args:
        model (`nn.Module`): a compacted model.
        structure (`ModelStructure`): its compacted structure.
        layout (`dict`): its layout (`config.blockprune_layout`, with the current layer paths).

    Returns:
        `tuple[ModelStructure, dict]`: the structure and the layout with the layers left, under their new paths (the
        same objects when nothing is dropped). Example: see `droppable_layers`.
    """
    plan = _drop_plan(model, structure)
    if not plan:
        return structure, layout
    moves: dict[str, str | None] = {}
    dropped, maps = dict(layout.get(DROPPED_KEY, {})), dict(layout.get(MAP_KEY, {}))
    for path, drops in plan.items():
        for _, constant, target in drops:
            if constant is not None:
                _fold(model, constant, target)
        indices = [index for index, _, _ in drops]
        layers = model.get_submodule(path)
        original = maps.get(path, list(range(len(layers))))
        kept = [index for index in range(len(layers)) if index not in indices]
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, _renumber(layers, kept))
        moves.update({f"{path}.{index}": None for index in indices})
        moves.update({f"{path}.{old}": f"{path}.{new}" for new, old in enumerate(kept) if new != old})
        dropped[path] = sorted(dropped.get(path, []) + [original[index] for index in indices])
        maps[path] = [original[index] for index in kept]
        _shorten_config(model.config, kept, len(layers))
        logger.info("Dropped %d layers of %s that add nothing (original indices %s).", len(indices), path,
                    [original[index] for index in indices])
    layout = {**_moved_layout(layout, moves), DROPPED_KEY: dropped, MAP_KEY: maps}
    layers = tuple(replace(layer, name=_renamed(layer.name, moves)) for layer in structure.layers
                   if _renamed(layer.name, moves) is not None)
    stream = StreamStructure.from_record(layout["hidden"]) if "hidden" in layout else structure.stream
    return replace(structure, layers=layers, stream=stream), layout


def _shorten_config(config, kept: list[int], total: int) -> None:
    config.num_hidden_layers = len(kept)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:
        config.layer_types = [layer_types[index] for index in kept]
