"""`compact_model`: physically remove the attention heads and FFN neurons the block masks have pruned.

A head goes when all its value-projection rows or all its output-projection columns are masked; an FFN neuron goes
when its input row or its output column is masked. What such a unit still contributes is a constant, folded into the
bias of the output projection:

- head `h` with masked value rows: softmax weights sum to 1, so it outputs its value bias `b_v[h]` at every position,
  and the layer output gains `W_o[:, h] @ b_v[h]`;
- neuron `i` with a masked input row and a live output column: it outputs `act(b_1[i])`, and the layer output gains
  `act(b_1[i]) * W_2[:, i]`;
- a unit whose output columns are masked contributes zero.

Heads that survive in part stay whole (their masked blocks stay zero in the weight) and keep their size, so the
attention code, which reshapes with `-1` heads, runs unchanged. The kept heads and FFN sizes, which differ from layer
to layer, are recorded in `model.config.blockprune_layout` (see `compaction_layout`); the config's head count and FFN
size keep their original values.

An attention whose keys give generation's KV-cache length (`AttentionSpec.sets_cache_length`, a decoder's
self-attention) never ends with no head: transformers' cache would report length 0 and restart the positions at
every step. When it keeps no real head it keeps one placeholder head whose query, key and value rows (weights and
biases) and output-projection columns are zero: it adds exactly 0, and its cached keys have the real length. The
layout records it as `"heads": [], "placeholder": true` (0 real heads).

A compacted model can be masked and compacted again: its head slots come from the layout, and the new layout
records the kept heads by their original index (and keeps the first `dense_parameters`).
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass

import torch
from torch import nn

from .model import (
    CONFIG_ATTRIBUTE,
    LAYOUT_ATTRIBUTE,
    AttentionModules,
    PrunableLayer,
    check_model,
    is_block_pruned,
    prunable_layers,
    remove_block_pruning,
)
from .modeling_blockprune import as_block_pruned, base_model_type
from .report import dead_heads, weight_mask

logger = logging.getLogger(__name__)

# 2: an attention record may hold a placeholder head (`"placeholder": true`); layouts without one are still
# written as version 1, which older loaders read.
LAYOUT_VERSION = 2

# Where each architecture keeps the FFN activation, relative to one layer. Only needed to fold neurons whose input
# row is masked but whose output column is not; for another architecture every path below is tried.
FFN_ACTIVATIONS: dict[str, str] = {
    "bert": "intermediate.intermediate_act_fn",
    "roberta": "intermediate.intermediate_act_fn",
    "electra": "intermediate.intermediate_act_fn",
    "distilbert": "ffn.activation",
    "bart": "activation_fn",
}

# Head-count attributes of attention modules (BERT-likes, BART, DistilBERT). The transformers 5 forward passes do not
# read them (they reshape with -1 heads); they are updated so that the modules describe themselves truthfully.
HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_heads")


@dataclass
class LayerPlan:
    """What compaction keeps of one layer.

    Args:
        name (`str`): module path of the layer, as in `prunable_layers` (e.g. `"bert.encoder.layer.0"`).
        heads (`list[list[int]]`): for each attention block of the layer, the kept head slots: indices into the
            current weights, which are the original head indices unless the model was compacted before.
        neurons (`list[int]`, *optional*): indices of the kept FFN neurons; `None` if the layer has no FFN.
        constant_neurons (`list[int]`): removed neurons whose input row is masked but whose output column is not:
            they output `act(b_1[i])` whatever the input, and are folded into the FFN output bias.
        placeholders (`list[bool]`): for each attention block, whether it keeps one zero placeholder head (it keeps
            no real head and sets the KV-cache length, see `AttentionSpec.sets_cache_length`).
    """

    name: str
    heads: list[list[int]]
    neurons: list[int] | None
    constant_neurons: list[int]
    placeholders: list[bool]


def _indices(flags: torch.Tensor) -> list[int]:
    return flags.nonzero().flatten().tolist()


@torch.no_grad()
def _ffn_neurons(ffn_input: nn.Module, ffn_output: nn.Module) -> tuple[list[int], list[int]]:
    rows_alive = weight_mask(ffn_input).any(dim=1)  # (intermediate,)
    cols_alive = weight_mask(ffn_output).any(dim=0)  # (intermediate,)
    return _indices(rows_alive & cols_alive), _indices(~rows_alive & cols_alive)


def _kept_heads(attention: AttentionModules) -> list[int]:
    dead = set(dead_heads(attention))
    return [head for head in range(attention.real_heads) if head not in dead]  # a placeholder is never "kept"


def compaction_plan(model: nn.Module) -> list[LayerPlan]:
    """Per layer, the heads and FFN neurons that `compact_model` keeps, read from the current masks.

    A plain (unmasked) layer keeps everything.

    Args:
        model (`nn.Module`): a model masked by `apply_block_pruning`.

    Returns:
        `list[LayerPlan]`: one plan per layer, in the order of `prunable_layers(model)`.
    """
    plans = []
    for layer in prunable_layers(model):
        heads = [_kept_heads(attention) for attention in layer.attentions]
        placeholders = [attn.spec.sets_cache_length and not kept for attn, kept in zip(layer.attentions, heads)]
        neurons, constant = None, []
        if layer.ffn_input is not None and layer.ffn_output is not None:
            neurons, constant = _ffn_neurons(layer.ffn_input, layer.ffn_output)
        plans.append(LayerPlan(layer.name, heads, neurons, constant, placeholders))
    return plans


def _attention_record(attention: AttentionModules, kept: list[int], placeholder: bool) -> dict:
    """The layout record of one attention: its paths, head size and kept heads by original index."""
    record = {**attention.spec.paths(), "head_dim": attention.head_dim, "heads": [attention.heads[h] for h in kept]}
    if placeholder:
        record["placeholder"] = True
    return record


def _layer_entry(layer: PrunableLayer, plan: LayerPlan) -> dict:
    records = zip(layer.attentions, plan.heads, plan.placeholders, strict=True)
    entry = {"attention": [_attention_record(*record) for record in records]}
    if plan.neurons is not None:
        entry["ffn"] = {"input": layer.ffn_spec.input, "output": layer.ffn_spec.output, "size": len(plan.neurons)}
    return entry


def _merge_entries(previous: dict | None, entry: dict) -> dict:
    """A layer's new entry, keeping the records of an earlier layout that this compaction did not cover."""
    if previous is None:
        return entry
    records = {record["query"]: record for record in previous.get("attention", [])}
    records.update({record["query"]: record for record in entry["attention"]})
    merged = {"attention": list(records.values())}
    ffn = entry.get("ffn", previous.get("ffn"))
    if ffn is not None:
        merged["ffn"] = ffn
    return merged


def _layout_version(entries: dict) -> int:
    records = (record for entry in entries.values() for record in entry.get("attention", []))
    return LAYOUT_VERSION if any(record.get("placeholder") for record in records) else 1


def compaction_layout(layers: list[PrunableLayer], plans: list[LayerPlan], previous: dict | None = None) -> dict:
    """The JSON-serializable layout stored in `config.blockprune_layout`, enough to rebuild the layer shapes.

    Args:
        layers (`list[PrunableLayer]`): the layers of the model before compaction (`prunable_layers(model)`).
        plans (`list[LayerPlan]`): what compaction keeps of each (`compaction_plan(model)`).
        previous (`dict`, *optional*): the layout of an earlier compaction of the same model: the new one records
            heads by their original index, keeps the layers and entries this compaction does not cover, and keeps
            its other keys (`dense_parameters`).

    Returns:
        `dict`: `{"version": 1 or 2, "layers": {<layer path>: {"attention": [{"query": <path>, "key": <path>,
        "value": <path>, "output": <path>, "head_dim": int, "heads": [kept original head indices]}, ...],
        "ffn": {"input": <path>, "output": <path>, "size": int}}}}`, module paths relative to the layer; `"ffn"` is
        left out for a layer without FFN. An attention that keeps a placeholder head has `"heads": []` and
        `"placeholder": true` (version 2; version 1 has no placeholder).
    """
    previous = copy.deepcopy(previous or {})
    entries = previous.pop("layers", {})
    for layer, plan in zip(layers, plans, strict=True):
        entries[plan.name] = _merge_entries(entries.get(plan.name), _layer_entry(layer, plan))
    previous.pop("version", None)
    return {"version": _layout_version(entries), "layers": entries, **previous}


def _head_index(heads: list[int], head_dim: int, device) -> torch.Tensor:
    """Row indices of head slots `heads` in a projection of heads of `head_dim` rows each."""
    offsets = torch.arange(head_dim, device=device)
    starts = torch.tensor(heads, dtype=torch.long, device=device) * head_dim
    return (starts[:, None] + offsets[None, :]).flatten()


@torch.no_grad()
def _select_(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep rows (`dim=0`, with their bias) or columns (`dim=1`) `index` of `linear`, in place.

    Unlike `transformers.pytorch_utils.prune_linear_layer`, this keeps the module object, its dtype and its hooks.
    """
    linear.weight = nn.Parameter(linear.weight.index_select(dim, index).clone(), linear.weight.requires_grad)
    if dim == 0:
        linear.out_features = len(index)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, index).clone(), linear.bias.requires_grad)
    else:
        linear.in_features = len(index)


@torch.no_grad()
def _add_to_bias_(linear: nn.Linear, delta: torch.Tensor) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros_like(delta, dtype=linear.weight.dtype))
    linear.bias.add_(delta.to(linear.bias.dtype))


def _parent(root: nn.Module, child: nn.Module) -> nn.Module:
    for module in root.modules():
        if any(grandchild is child for grandchild in module.children()):
            return module
    raise ValueError("Internal error: module not found under its layer.")


def _set_head_count(module: nn.Module, num_heads: int, inner_size: int) -> None:
    for name in HEAD_COUNT_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, num_heads)
    if isinstance(getattr(module, "all_head_size", None), int):
        module.all_head_size = inner_size


@torch.no_grad()
def _grow_with_zeros_(linear: nn.Linear, size: int, dim: int) -> None:
    """Append `size` zero rows (`dim=0`, with zero biases) or zero columns (`dim=1`) to `linear`, in place."""
    shape = list(linear.weight.shape)
    shape[dim] = size
    weight = torch.cat([linear.weight, linear.weight.new_zeros(shape)], dim)
    linear.weight = nn.Parameter(weight, linear.weight.requires_grad)
    if dim == 1:
        linear.in_features += size
        return
    linear.out_features += size
    if linear.bias is not None:
        bias = torch.cat([linear.bias, linear.bias.new_zeros(size)])
        linear.bias = nn.Parameter(bias, linear.bias.requires_grad)


def _add_placeholder_head_(attention: AttentionModules) -> None:
    """Give an attention without heads one head that adds exactly 0 (zero Q/K/V rows and biases, zero O columns)."""
    for linear in (attention.query, attention.key, attention.value):
        _grow_with_zeros_(linear, attention.head_dim, dim=0)
    _grow_with_zeros_(attention.output, attention.head_dim, dim=1)


@torch.no_grad()
def _compact_attention(attention: AttentionModules, kept: list[int], placeholder: bool, layer_module) -> None:
    device, head_dim = attention.query.weight.device, attention.head_dim
    removed = sorted(set(range(attention.num_heads)) - set(kept))
    value, output = attention.value, attention.output
    if removed and value.bias is not None:
        # Heads with masked value rows output b_v[h]; those with masked output columns have zero columns here.
        index = _head_index(removed, head_dim, device)
        _add_to_bias_(output, output.weight[:, index] @ value.bias[index])
    if removed:
        index = _head_index(kept, head_dim, device)
        for linear in (attention.query, attention.key, value):
            _select_(linear, index, dim=0)
        _select_(output, index, dim=1)
    if placeholder:
        _add_placeholder_head_(attention)
    _set_head_count(_parent(layer_module, attention.query), len(kept) + int(placeholder), attention.query.out_features)


def _ffn_activation(model: nn.Module, layer_module: nn.Module, layer_name: str):
    model_type = base_model_type(getattr(getattr(model, "config", None), "model_type", None))
    if model_type in FFN_ACTIVATIONS:
        paths = [FFN_ACTIVATIONS[model_type]]
    else:
        paths = list(dict.fromkeys(FFN_ACTIVATIONS.values()))
    for path in paths:
        try:
            return operator.attrgetter(path)(layer_module)
        except AttributeError:
            continue
    raise ValueError(
        f"Cannot find the FFN activation of layer {layer_name!r} (tried {paths}); add its path to "
        "`hf_blockprune.compaction.FFN_ACTIVATIONS` for this model type."
    )


@torch.no_grad()
def _compact_ffn(ffn_input: nn.Linear, ffn_output: nn.Linear, plan: LayerPlan, activation) -> None:
    device = ffn_input.weight.device
    if plan.constant_neurons:
        index = torch.tensor(plan.constant_neurons, dtype=torch.long, device=device)
        bias = ffn_input.bias[index] if ffn_input.bias is not None else ffn_input.weight.new_zeros(len(index))
        _add_to_bias_(ffn_output, ffn_output.weight[:, index] @ activation(bias))  # (out, k) @ (k,)
    kept = torch.tensor(plan.neurons, dtype=torch.long, device=device)
    _select_(ffn_input, kept, dim=0)
    _select_(ffn_output, kept, dim=1)


def _compact_layer(model: nn.Module, layer, plan: LayerPlan) -> None:
    layer_module = model.get_submodule(layer.name)
    for attention, kept, placeholder in zip(layer.attentions, plan.heads, plan.placeholders, strict=True):
        _compact_attention(attention, kept, placeholder, layer_module)
    if plan.neurons is not None:
        activation = _ffn_activation(model, layer_module, layer.name) if plan.constant_neurons else None
        _compact_ffn(layer.ffn_input, layer.ffn_output, plan, activation)


def compact_model(model: nn.Module) -> nn.Module:
    """Turn a block-masked model into a plain transformers model with physically smaller Linear layers, in place.

    Merges the masks into the weights (`remove_block_pruning(model, merge=True)`), then removes the heads and FFN
    neurons of `compaction_plan(model)`, folding the constant output of removed units into the output-projection
    biases, so that the result computes the same function as the masked model in eval mode (attention dropout
    would make a removed head's output no longer constant in training). A layer may lose every head or every
    neuron (an attention that sets the KV-cache length then keeps a zero placeholder head). The layout is recorded in
    `model.config.blockprune_layout` (see `compaction_layout`); a model compacted before, masked again, gets the two
    layouts composed. Deep-copy the model first to keep the masked one.

    Args:
        model (`nn.Module`): a model masked by `apply_block_pruning`.

    Returns:
        `nn.Module`: the same model object, compacted, with no masks and no scores.

    Raises:
        `ValueError`: the model holds no block-pruning masks, or is wrapped (`DataParallel`, DDP).
    """
    check_model(model)
    if not is_block_pruned(model):
        raise ValueError("compact_model expects a model masked by apply_block_pruning (with its masks still on).")
    pruning_config = getattr(model, CONFIG_ATTRIBUTE, None)  # removed with the masks, needed to find the layers again
    plans = compaction_plan(model)
    layout = compaction_layout(prunable_layers(model), plans, getattr(model.config, LAYOUT_ATTRIBUTE, None))
    remove_block_pruning(model, merge=True)
    # The layers are found under the earlier layout (if any), which still describes the weights.
    for layer, plan in zip(prunable_layers(model, pruning_config), plans, strict=True):
        _compact_layer(model, layer, plan)
    setattr(model.config, LAYOUT_ATTRIBUTE, layout)
    as_block_pruned(model)  # saves with its loader, under a model type plain transformers cannot mistake
    kept_heads = sum(len(heads) for plan in plans for heads in plan.heads)
    kept_neurons = sum(len(plan.neurons or ()) for plan in plans)
    logger.info("Compacted %d layers: %d heads and %d FFN neurons kept.", len(plans), kept_heads, kept_neurons)
    return model
