"""`compact_model`: physically remove the attention heads and FFN neurons the block masks have pruned.

A head goes when all its value-projection rows or all its output-projection columns are masked; an FFN neuron goes
when its input row or its output column is masked. What such a unit still contributes is a constant, folded into the
bias of the output projection:

- head `h` with masked value rows: softmax weights sum to 1, so it outputs its value bias `b_v[h]` at every position,
  and the layer output gains `W_o[:, h] @ b_v[h]`;
- neuron `i` with a masked input row and a live output column: it outputs `act(b_1[i])`, and the layer output gains
  `act(b_1[i]) * W_2[:, i]`;
- a unit whose output columns are masked contributes zero.

Where there is no bias to fold into (Qwen2's output projection, a biasless FFN output), such a unit is kept as it is
(its masked weights are zero), which is exact too. With grouped-query attention, a query head goes alone, and a
key/value head goes when every query head of its group has gone; the kept key/value heads must keep query groups of
one size (the attention repeats each key/value head `num_key_value_groups` times), so a smaller group is padded with
zero query slots (zero query rows, zero output columns: they add exactly 0). A neuron of a gated FFN (gate, up ->
down) is one row of each input and one column of the output, and only neuron scores prune it.

Heads that survive in part stay whole (their masked blocks stay zero in the weight) and keep their size, so the
attention code, which reshapes with `-1` heads, runs unchanged. The kept heads and FFN sizes, which differ from layer
to layer, are recorded in `model.config.blockprune_layout` (see `compaction_layout`); the config's head count and FFN
size keep their original values.

A sublayer left with no unit is removed (layout version 6): an attention with no head is replaced by a
`RemovedAttention`, an FFN with no neuron has its input projections replaced by `InputStub`s, and the output
projection of either by a `ConstantOutput` that holds its folded bias (what the sublayer still adds at every position;
nothing when it has no bias). No projection with zero features is left (runtimes such as OpenVINO cannot build one),
and the sublayer costs nothing. An attention whose keys give generation's KV-cache length
(`AttentionSpec.sets_cache_length`, a decoder's self-attention) writes one zero key of size 1 per position into the
cache when removed, so that transformers' cache keeps the real length (with no keys it would report 0 and restart the
positions at every step). An attention described by the user's module patterns (`AttentionSpec.removable` false),
whose calling convention is not known, keeps empty projections instead, or, where the cache reads its length, one
placeholder head whose query, key and value rows and output-projection columns are zero (it adds exactly 0; the
layout records `"heads": [], "placeholder": true`).

Fused projections (GPT-2's
`c_attn`, ModernBERT's `Wqkv` and `Wi`) are compacted part by part and fused back; the layout names them (`"fused"`).

A compacted model can be masked and compacted again: its head slots come from the layout, and the new layout
records the kept heads by their original index (and keeps the first `dense_parameters`).
"""

from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..pruning.model import (
    CONFIG_ATTRIBUTE,
    check_model,
    hidden_scores,
    is_block_pruned,
    remove_block_pruning,
    unmask_stream,
)
from ..pruning.norm import sliced_norm
from ..pruning.report import ffn_rows_alive, removed_heads, weight_mask
from ..structure.architectures import known_activation_paths
from ..structure.discovery import keep_structure, prunable_layers, structure_of
from ..structure.layers import AttentionModules, PrunableLayer, has_module
from ..structure.model_structure import LAYOUT_ATTRIBUTE, PRUNING_CONFIG_KEY, StreamStructure
from ..structure.modeling_blockprune import as_block_pruned, is_constant_output, remove_sublayers, set_head_counts
from ..structure.projections import fuse_projections
from .depth import drop_layers

logger = logging.getLogger(__name__)

# 2: an attention record may hold a placeholder head (`"placeholder": true`). 3: a grouped-query attention record lists
# its query and key/value slots (`"slots"`, `"kv_heads"`), an FFN record may have several inputs (`"inputs"`, a gated
# MLP). 4: a record may name a fused projection (`"fused"`, split into the named parts while masked) and projections
# with head rows (`"head_rows"`). 5: the hidden size was compacted (`"hidden"`, see `StreamStructure.record`). 6: a
# sublayer left with no unit is removed (`"removed": true`, see `remove_sublayers`). Each layout is written with the
# lowest version that describes it, which older loaders read.
LAYOUT_VERSION = 6

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
            no real head and must keep one, see `AttentionSpec.keeps_a_head`).
        slots (`list[list[int | None]]`): for each attention block, the query slots of the compacted weights: the
            current slot each comes from, or `None` for a zero slot (a placeholder, or padding that gives every kept
            key/value head of a grouped-query attention the same number of query slots).
        kv_slots (`list[list[int | None]]`): the same for the key/value slots.
        ffn_placeholder (`bool`, *optional*, defaults to `False`): the FFN of an earlier compaction that kept one
            zero neuron when it lost every neuron (layout versions before 6): it stays as it is.
        removed (`list[bool]`): for each attention block, whether it keeps no head and is removed (replaced by a
            `RemovedAttention`, see `AttentionSpec.removable`).
        ffn_removed (`bool`, *optional*, defaults to `False`): the FFN keeps no neuron and is removed (its inputs
            replaced by `InputStub`s, its output projection by a `ConstantOutput` holding its folded bias).
    """

    name: str
    heads: list[list[int]]
    neurons: list[int] | None
    constant_neurons: list[int]
    placeholders: list[bool]
    slots: list[list[int | None]]
    kv_slots: list[list[int | None]]
    ffn_placeholder: bool = False
    removed: list[bool] = field(default_factory=list)
    ffn_removed: bool = False


def _indices(flags: torch.Tensor) -> list[int]:
    return flags.nonzero().flatten().tolist()


@torch.no_grad()
def _ffn_neurons(layer: PrunableLayer) -> tuple[list[int], list[int]]:
    rows_alive = ffn_rows_alive(layer)  # (intermediate,)
    cols_alive = weight_mask(layer.ffn_output).any(dim=0)  # (intermediate,)
    constant = ~rows_alive & cols_alive
    if len(layer.ffn_inputs) > 1 or layer.ffn_output.bias is None:
        # no single activation to fold through (gated), or no bias to fold into: such neurons stay, exactly as they are
        return _indices((rows_alive | constant) & cols_alive), []
    return _indices(rows_alive & cols_alive), _indices(constant)


def _kept_heads(attention: AttentionModules) -> list[int]:
    """Real query slots compaction keeps: all but `removed_heads` (dead, with any constant folded away)."""
    removed = set(removed_heads(attention))
    return [slot for slot, head in enumerate(attention.slots) if head is not None and slot not in removed]


def _slot_plan(attention: AttentionModules, kept: list[int]) -> tuple[list[int | None], list[int | None], bool]:
    """`(query slots, key/value slots, placeholder)` of the compacted block (see `LayerPlan`)."""
    if not kept:
        placeholder = attention.spec.keeps_a_head
        return ([None], [None], True) if placeholder else ([], [], False)
    groups: dict[int, list[int]] = {}
    for slot in kept:
        groups.setdefault(slot // attention.group, []).append(slot)
    width = max(len(members) for members in groups.values())
    slots = [member for kv in sorted(groups) for member in groups[kv] + [None] * (width - len(groups[kv]))]
    return slots, sorted(groups), False


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
        slot_plans = [_slot_plan(attention, kept) for attention, kept in zip(layer.attentions, heads)]
        neurons, constant, ffn_placeholder = None, [], False
        if layer.has_ffn:
            neurons, constant = _ffn_neurons(layer)
            ffn_placeholder = layer.ffn_placeholder
            neurons = [0] if ffn_placeholder else neurons
        plans.append(
            LayerPlan(
                layer.name, heads, neurons, constant,
                placeholders=[placeholder for _, _, placeholder in slot_plans],
                slots=[slots for slots, _, _ in slot_plans],
                kv_slots=[kv_slots for _, kv_slots, _ in slot_plans],
                ffn_placeholder=ffn_placeholder,
                removed=[attention.spec.removable and not slots for attention, (slots, _, _) in
                         zip(layer.attentions, slot_plans)],
                ffn_removed=neurons == [],
            )
        )
    return plans


def _original(indices: list[int | None], slots: list[int | None]) -> list[int | None]:
    """Map slots (indices into `indices`, or `None`) to what `indices` holds there (original head or `None`)."""
    return [None if slot is None else indices[slot] for slot in slots]


def _attention_record(attention: AttentionModules, kept: list[int], slots, kv_slots, placeholder: bool,
                      removed: bool) -> dict:
    """The layout record of one attention: its paths, head size and kept heads by original index."""
    record = {**attention.spec.paths(), "head_dim": attention.head_dim, "heads": _original(attention.slots, kept)}
    if removed:
        record.update(removed=True, module=attention.spec.module_path)
        if attention.spec.sets_cache_length:
            record["caches"] = True
        if attention.spec.input_norm:
            record["input_norm"] = attention.spec.input_norm
    if attention.spec.fused:
        record["fused"] = attention.spec.fused
    if attention.head_rows:
        record["head_rows"] = list(attention.head_rows)
    if attention.spec.grouped:
        record["slots"] = _original(attention.slots, slots)
        record["kv_heads"] = _original(attention.kv_slots, kv_slots)
    if placeholder:
        record["placeholder"] = True
    return record


def _layer_entry(layer: PrunableLayer, plan: LayerPlan) -> dict:
    records = zip(layer.attentions, plan.heads, plan.slots, plan.kv_slots, plan.placeholders, plan.removed,
                  strict=True)
    entry = {"attention": [_attention_record(*record) for record in records]}
    if plan.neurons is not None:
        inputs = layer.ffn_spec.inputs
        ffn = {"input": inputs[0]} if len(inputs) == 1 else {"inputs": list(inputs)}
        if layer.ffn_spec.fused:
            ffn["fused"] = layer.ffn_spec.fused
        entry["ffn"] = {**ffn, "output": layer.ffn_spec.output, "size": len(plan.neurons)}
        if plan.ffn_placeholder:
            entry["ffn"]["placeholder"] = True
        if plan.ffn_removed:
            entry["ffn"]["removed"] = True
            if layer.ffn_spec.input_norm:
                entry["ffn"]["input_norm"] = layer.ffn_spec.input_norm
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


def _layout_version(entries: dict, hidden: bool = False) -> int:
    records = [record for entry in entries.values() for record in entry.get("attention", [])]
    ffns = [entry["ffn"] for entry in entries.values() if "ffn" in entry]
    if any(record.get("removed") for record in records + ffns):
        return 6
    if hidden:
        return 5
    if any("fused" in record or "head_rows" in record for record in records + ffns):
        return 4
    if any("slots" in record for record in records) or any("inputs" in e.get("ffn", {}) for e in entries.values()):
        return 3
    return 2 if any(record.get("placeholder") for record in records) else 1


def compaction_layout(layers: list[PrunableLayer], plans: list[LayerPlan], previous: dict | None = None) -> dict:
    """The JSON-serializable layout stored in `config.blockprune_layout`, enough to rebuild the layer shapes.

    Args:
        layers (`list[PrunableLayer]`): the layers of the model before compaction (`prunable_layers(model)`).
        plans (`list[LayerPlan]`): what compaction keeps of each (`compaction_plan(model)`).
        previous (`dict`, *optional*): the layout of an earlier compaction of the same model: the new one records
            heads by their original index, keeps the layers and entries this compaction does not cover, and keeps
            its other keys (`dense_parameters`).

    Returns:
        `dict`: `{"version": 1, 2 or 3, "layers": {<layer path>: {"attention": [{"query": <path>, "key": <path>,
        "value": <path>, "output": <path>, "head_dim": int, "heads": [kept original head indices]}, ...],
        "ffn": {"input": <path>, "output": <path>, "size": int}}}}`, module paths relative to the layer; `"ffn"` is
        left out for a layer without FFN. An attention that keeps a placeholder head has `"heads": []` and
        `"placeholder": true` (version 2). Version 3: a grouped-query attention also lists `"slots"` (per query slot,
        the original head or `null` for a zero slot) and `"kv_heads"` (per key/value slot, the same); a gated FFN
        has `"inputs": [<path>, ...]` instead of `"input"`.
    """
    previous = copy.deepcopy(previous or {})
    entries = previous.pop("layers", {})
    for layer, plan in zip(layers, plans, strict=True):
        entries[plan.name] = _merge_entries(entries.get(plan.name), _layer_entry(layer, plan))
    previous.pop("version", None)
    return {"version": _layout_version(entries, "hidden" in previous), "layers": entries, **previous}


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
def _select_slots_(linear: nn.Linear, slots: list[int | None], head_dim: int, dim: int) -> None:
    """Rebuild rows (`dim=0`) or columns (`dim=1`) of `linear` head by head: slot `s` copies head `s`, `None` zeros."""
    device = linear.weight.device
    zero = linear.weight.shape[dim] // head_dim  # index of an appended zero head
    index = _head_index([zero if slot is None else slot for slot in slots], head_dim, device)
    if None in slots:
        shape = list(linear.weight.shape)
        shape[dim] = head_dim
        weight = torch.cat([linear.weight, linear.weight.new_zeros(shape)], dim)
        linear.weight = nn.Parameter(weight, linear.weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            linear.bias = nn.Parameter(torch.cat([linear.bias, linear.bias.new_zeros(head_dim)]),
                                       linear.bias.requires_grad)
    _select_(linear, index, dim)


@torch.no_grad()
def _add_to_bias_(linear: nn.Linear, delta: torch.Tensor) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros_like(delta, dtype=linear.weight.dtype))
    linear.bias.add_(delta.to(linear.bias.dtype))


@torch.no_grad()
def _compact_attention(attention: AttentionModules, plan: LayerPlan, index: int, layer_module) -> None:
    device, head_dim = attention.query.weight.device, attention.head_dim
    slots, kv_slots = plan.slots[index], plan.kv_slots[index]
    removed = sorted(set(range(attention.num_heads)) - {slot for slot in slots if slot is not None})
    value, output = attention.value, attention.output
    if removed and value.bias is not None and output.bias is not None:
        # Removed heads output b_v of their key/value head (masked value rows) or have zero output columns here.
        values = _head_index([slot // attention.group for slot in removed], head_dim, device)
        columns = _head_index(removed, head_dim, device)
        _add_to_bias_(output, output.weight[:, columns] @ value.bias[values])
    for linear in (attention.query, *attention.head_rows.values()):
        _select_slots_(linear, slots, head_dim, dim=0)
    _select_slots_(attention.key, kv_slots, head_dim, dim=0)
    _select_slots_(value, kv_slots, head_dim, dim=0)
    _select_slots_(output, slots, head_dim, dim=1)
    module = layer_module.get_submodule(attention.spec.module_path) if attention.spec.module_path else layer_module
    set_head_counts(module, len(slots), len(kv_slots), head_dim)


def _ffn_activation(layer: PrunableLayer, layer_module: nn.Module):
    spec = layer.ffn_spec
    paths = [spec.activation] if spec.activation else known_activation_paths()
    for path in paths:
        try:
            return operator.attrgetter(path)(layer_module)
        except AttributeError:
            continue
    raise ValueError(
        f"Cannot find the FFN activation of layer {layer.name!r} (tried {paths}); give its path as `activation` in "
        "the architecture's `FFNSpec`."
    )


@torch.no_grad()
def _compact_ffn(layer: PrunableLayer, plan: LayerPlan, activation) -> None:
    ffn_input, ffn_output = layer.ffn_input, layer.ffn_output
    device = ffn_input.weight.device
    if plan.constant_neurons:
        index = torch.tensor(plan.constant_neurons, dtype=torch.long, device=device)
        bias = ffn_input.bias[index] if ffn_input.bias is not None else ffn_input.weight.new_zeros(len(index))
        _add_to_bias_(ffn_output, ffn_output.weight[:, index] @ activation(bias))  # (out, k) @ (k,)
    kept = torch.tensor(plan.neurons, dtype=torch.long, device=device)
    for linear in layer.ffn_inputs:
        _select_(linear, kept, dim=0)
    _select_(ffn_output, kept, dim=1)
    if plan.ffn_placeholder:  # a zero neuron: zero input rows (and biases) and output column
        for linear in layer.ffn_inputs:
            linear.weight.zero_()
            if linear.bias is not None:
                linear.bias.zero_()
        ffn_output.weight.zero_()


@torch.no_grad()
def kept_channels(model: nn.Module) -> list[int] | None:
    """The hidden channels (current indices) the hidden mask of `model` keeps; `None` if its hidden size is not
    masked (the mask always keeps one, see `BlockScores`)."""
    scores = hidden_scores(model)
    return None if scores is None else _indices(scores.mask().detach() > 0)


@torch.no_grad()
def compact_stream(model: nn.Module, stream: StreamStructure, kept: list[int]) -> StreamStructure:
    """Slice every module of the residual stream to the channels `kept`, in place (tables and readers by column,
    writers by row with their bias, norms entry by entry; a tensor shared by several modules, as tied embeddings are,
    is sliced once and stays shared). Returns the compacted stream (channels by original index)."""
    device = model.get_submodule(stream.norms[0]).weight.device
    index = torch.tensor(kept, dtype=torch.long, device=device)
    sliced: dict[int, nn.Parameter] = {}

    def cut(parameter: nn.Parameter, dim: int) -> nn.Parameter:
        if id(parameter) not in sliced:
            sliced[id(parameter)] = nn.Parameter(parameter.index_select(dim, index).clone(), parameter.requires_grad)
        return sliced[id(parameter)]

    for path in stream.embeddings:
        table = model.get_submodule(path)
        table.weight = cut(table.weight, 1)
        table.embedding_dim = len(kept)
    for path, role in [(path, "reader") for path in stream.readers] + [(path, "writer") for path in stream.writers]:
        linear = model.get_submodule(path)
        if is_constant_output(linear):  # the output of a sublayer removed before: its constant, channel by channel
            if linear.bias is not None:
                linear.bias = cut(linear.bias, 0)
            linear.out_features = len(kept)
            continue
        conv1d = isinstance(linear, Conv1D)  # weight (in, out)
        if role == "reader":
            linear.weight = cut(linear.weight, 0 if conv1d else 1)
            setattr(linear, "nx" if conv1d else "in_features", len(kept))
            continue
        linear.weight = cut(linear.weight, 1 if conv1d else 0)
        if linear.bias is not None:
            linear.bias = cut(linear.bias, 0)
        setattr(linear, "nf" if conv1d else "out_features", len(kept))
    for path in stream.norms:
        sliced_norm(model.get_submodule(path), index)
    channels = tuple(stream.channels[channel] for channel in kept)
    return StreamStructure(channels, stream.embeddings, stream.norms, stream.readers, stream.writers,
                           stream.original_size)


def _present(model: nn.Module, hidden: dict) -> dict:
    """The hidden record with only the modules `model` still has (an `nn.Identity` in place of a norm is not one)."""
    def present(path: str) -> bool:
        return has_module(model, path) and not isinstance(model.get_submodule(path), nn.Identity)

    return {**hidden, **{key: [path for path in hidden[key] if present(path)]
                         for key in ("embeddings", "norms", "readers", "writers", "sources") if key in hidden}}


def _compact_layer(model: nn.Module, layer, plan: LayerPlan) -> None:
    layer_module = model.get_submodule(layer.name)
    for index, attention in enumerate(layer.attentions):
        _compact_attention(attention, plan, index, layer_module)
    if plan.neurons is not None:
        activation = _ffn_activation(layer, layer_module) if plan.constant_neurons else None
        _compact_ffn(layer, plan, activation)


def compact_model(model: nn.Module) -> nn.Module:
    """Turn a block-masked model into a plain transformers model with physically smaller Linear layers, in place.

    Merges the masks into the weights (`remove_block_pruning(model, merge=True)`), then removes the heads and FFN
    neurons of `compaction_plan(model)`, folding the constant output of removed units into the output-projection
    biases, so that the result computes the same function as the masked model in eval mode (attention dropout
    would make a removed head's output no longer constant in training). A layer may lose every head or every
    neuron: the sublayer is then removed, its constant kept (see the module docstring). The layout is recorded in
    `model.config.blockprune_layout` (see `compaction_layout`); a model compacted before, masked again, gets the two
    layouts composed. Deep-copy the model first to keep the masked one.

    Args:
        model (`nn.Module`): a model masked by `apply_block_pruning`.

    Returns:
        `nn.Module`: the same model object, compacted, with no masks and no scores.

    Raises:
        `ValueError`: the model holds no block-pruning masks, or is wrapped (`DataParallel`, DDP).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_blockprune import BlockPruningConfig, apply_block_pruning, compact_model, is_block_pruned
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> config = BlockPruningConfig.from_preset("struct", initial_threshold=0.5, mask_init_value=1.0)
        >>> model = apply_block_pruning(model, config).eval()  # a block is kept while sigmoid(score) > 0.5
        >>> layer = model.bert.encoder.layer[0]
        >>> inputs = torch.tensor([[1, 2, 3, 4]])
        >>> with torch.no_grad():  # as training could leave them: 2 heads and 17 FFN neurons below the threshold
        ...     layer.attention.self.query.scores_module.scores[:2] = -1.0
        ...     layer.intermediate.dense.scores_module.scores[:17] = -1.0
        ...     masked_logits = model(input_ids=inputs).logits
        >>> model = compact_model(model)
        >>> is_block_pruned(model), type(model).__name__
        (False, 'BlockPrunedBertForSequenceClassification')
        >>> layer = model.bert.encoder.layer[0]
        >>> layer.attention.self.query.weight.shape, layer.intermediate.dense.weight.shape
        (torch.Size([16, 32]), torch.Size([20, 32]))
        >>> with torch.no_grad():  # the same function as the masked model
        ...     torch.allclose(model(input_ids=inputs).logits, masked_logits, atol=1e-5)
        True
    """
    check_model(model)
    if not is_block_pruned(model):
        raise ValueError("compact_model expects a model masked by apply_block_pruning (with its masks still on).")
    pruning_config = getattr(model, CONFIG_ATTRIBUTE, None)  # removed with the masks
    structure = structure_of(model)  # still describes the weights until they are cut
    plans = compaction_plan(model)
    masked_layers = structure.bind(model)  # what the layout records (paths, slots) is read from the masked layers
    channels = kept_channels(model)
    previous = getattr(model.config, LAYOUT_ATTRIBUTE, None)
    if channels is not None:
        unmask_stream(model)  # the channels are sliced below: nothing to merge
    remove_block_pruning(model, merge=True, fuse=False)
    if pruning_config is not None:  # the compacted model records how it was pruned
        setattr(model.config, PRUNING_CONFIG_KEY, pruning_config.to_dict())
    for layer, plan in zip(structure.bind(model), plans, strict=True):
        _compact_layer(model, layer, plan)
    fuse_projections(model)
    stream = compact_stream(model, structure.stream, channels) if channels is not None else None
    if stream is not None:
        previous = {**(previous or {}), "hidden": stream.record()}
    layout = compaction_layout(masked_layers, plans, previous)
    remove_sublayers(model, layout)
    if "hidden" in layout:  # what a removed sublayer read (its projections, its pre-norm) is no longer in the stream
        layout["hidden"] = _present(model, layout["hidden"])
    compacted, layout = drop_layers(model, structure.with_layout(layout), layout)  # the compacted shapes
    setattr(model.config, LAYOUT_ATTRIBUTE, layout)
    keep_structure(model, compacted)
    as_block_pruned(model)  # saves with its loader, under a model type plain transformers cannot mistake
    kept_heads = sum(len(heads) for plan in plans for heads in plan.heads)
    kept_neurons = sum(len(plan.neurons or ()) for plan in plans)
    logger.info("Compacted %d layers: %d heads and %d FFN neurons kept.", len(plans), kept_heads, kept_neurons)
    return model
