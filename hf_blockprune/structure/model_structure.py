"""A model's prunable structure, found once and kept with the model: what every consumer reads.

`ModelStructure` describes, without holding any module, which layers block pruning acts on, what each holds (the
`LayerStackSpec` of its stack) and the current state of each attention (head size, the original head in each query and
key/value slot; a compacted model has fewer, and placeholders). `hf_blockprune.structure.discovery.structure_of` finds
it once (when pruning is applied, or when a compacted model is loaded) and keeps it on the model; compaction replaces
it with the compacted shapes (`ModelStructure.with_layout`). Consumers bind it to the modules (`ModelStructure.bind`)
when they need the projections themselves.

Structure that lives outside the layers, the residual stream (the hidden size: embeddings, norms, what reads it),
is described beside `layers` (`StreamStructure`), found when hidden-size pruning asks for it
(`hf_blockprune.structure.stream`) or read from the layout of a model whose hidden size was compacted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from .architectures import AttentionSpec, LayerStackSpec, ModulePatterns
from .layers import AttentionModules, PrunableLayer, fused_parts, has_module, projection, submodule, width

# Every name hf_blockprune adds to a model, its config or its state dict starts with `blockprune_`.
LAYOUT_ATTRIBUTE = "blockprune_layout"  # the compacted shapes, in model.config (see compact.compaction)
PRUNING_CONFIG_KEY = "blockprune_config"  # the pruning config, as a dict, in model.config (so checkpoints carry it)
STRUCTURE_ATTRIBUTE = "blockprune_structure"  # the ModelStructure kept on the model (not saved: found again at load)
STREAM_ATTRIBUTE = "blockprune_stream"  # the stream of a model whose hidden size is masked, in model.config


@dataclass(frozen=True)
class AttentionStructure:
    """One attention block of a layer: its spec, head size and slots (see `AttentionModules` for what a slot is).

    Args:
        spec (`AttentionSpec`): the projections' paths, head-count attributes and cache role.
        head_dim (`int`): the size of one head.
        slots (`tuple[int | None, ...]`): per query slot, the original head it holds, `None` for a zero slot.
        kv_slots (`tuple[int | None, ...]`): the same for key/value slots.
    """

    spec: AttentionSpec
    head_dim: int
    slots: tuple[int | None, ...]
    kv_slots: tuple[int | None, ...]


@dataclass(frozen=True)
class LayerStructure:
    """One layer: its module path, the stack it belongs to, its attentions and whether its FFN is a placeholder.

    Args:
        name (`str`): the layer's module path in the model (e.g. `"bert.encoder.layer.0"`).
        stack (`LayerStackSpec`): what every layer of its stack holds.
        attentions (`tuple[AttentionStructure, ...]`): one per attention of `stack`, in its order.
        ffn_placeholder (`bool`, *optional*, defaults to `False`): the FFN lost every neuron at compaction and keeps
            one zero neuron (nothing to prune; layout versions before 6).
        ffn_removed (`bool`, *optional*, defaults to `False`): the FFN lost every neuron at compaction and was
            removed (the layer has no FFN left). An attention removed at compaction is not among `attentions`.
    """

    name: str
    stack: LayerStackSpec
    attentions: tuple[AttentionStructure, ...]
    ffn_placeholder: bool = False
    ffn_removed: bool = False

    @property
    def stack_name(self) -> str:
        """The path of the layer's `nn.ModuleList` (the layer's name without its index)."""
        return self.name.rpartition(".")[0]


@dataclass(frozen=True)
class StreamStructure:
    """The residual stream of a model: its width, the original channel each current one is, and the modules it runs
    through, by path from the model's root. Found once by a probe (`hf_blockprune.structure.stream.find_stream`).

    Args:
        channels (`tuple[int, ...]`): per current channel, its index in the original (dense) model; its length is
            the current hidden size.
        embeddings (`tuple[str, ...]`): embedding tables, one column per channel (shared tables listed once).
        norms (`tuple[str, ...]`): the norms that normalize the stream (inside and outside the layers).
        readers (`tuple[str, ...]`): projections reading the stream (one input column per channel): the layers'
            query, key, value and FFN input projections, and what reads it outside the layers (a pooler, a task or
            LM head).
        writers (`tuple[str, ...]`): projections writing the stream (one output row per channel): the layers'
            attention and FFN output projections, and the `sources`.
        original_size (`int`): the hidden size of the dense model.
        sources (`tuple[str, ...]`, *optional*): the writers that start the stream with no norm after them
            (`StreamSpec.sources`), whose output is masked itself.
    """

    channels: tuple[int, ...]
    embeddings: tuple[str, ...]
    norms: tuple[str, ...]
    readers: tuple[str, ...]
    writers: tuple[str, ...]
    original_size: int
    sources: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """The current hidden size."""
        return len(self.channels)

    def record(self) -> dict:
        """The layout record of this stream (`config.blockprune_layout["hidden"]`, JSON-serializable)."""
        return {"size": self.size, "channels": list(self.channels), "original_size": self.original_size,
                "embeddings": list(self.embeddings), "norms": list(self.norms), "readers": list(self.readers),
                "writers": list(self.writers), "sources": list(self.sources)}

    def moved(self, old: str, new: str) -> StreamStructure:
        """This stream with the path prefix `old` (`""`: none) of every module replaced by `new` (paths relative to
        another root: the transformers model inside a sentence-transformers model, or the container)."""
        def move(paths: tuple[str, ...]) -> tuple[str, ...]:
            stripped = [path[len(old) + 1:] if old else path for path in paths]
            return tuple(f"{new}.{path}" if new else path for path in stripped)

        return replace(self, embeddings=move(self.embeddings), norms=move(self.norms), readers=move(self.readers),
                       writers=move(self.writers), sources=move(self.sources))

    @classmethod
    def from_record(cls, record: dict) -> StreamStructure:
        """The stream a layout record describes (see `record`)."""
        return cls(tuple(record["channels"]), tuple(record["embeddings"]), tuple(record["norms"]),
                   tuple(record["readers"]), tuple(record["writers"]), int(record["original_size"]),
                   tuple(record.get("sources", ())))


@dataclass(frozen=True)
class ModelStructure:
    """The prunable structure of one model, relative to that model's root module; holds no module.

    Args:
        layers (`tuple[LayerStructure, ...]`): the prunable layers, in module-tree order.
        patterns (`ModulePatterns`, *optional*): the user's module patterns the structure was found with; `None`:
            the built-in map of the model type (`ARCHITECTURES`).
        stream (`StreamStructure`, *optional*): the residual stream, once found for hidden-size pruning or read from
            a layout that compacted it; `None` otherwise.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from hf_blockprune.structure.discovery import structure_of
        >>> model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37))
        >>> structure = structure_of(model)
        >>> [layer.name for layer in structure.layers], structure.layers[0].attentions[0].slots
        (['encoder.layer.0', 'encoder.layer.1'], (0, 1, 2, 3))
        >>> structure_of(model) is structure  # found once, kept with the model
        True
        >>> structure.bind(model)[1].ffn_output is model.encoder.layer[1].output.dense
        True
    """

    layers: tuple[LayerStructure, ...]
    patterns: ModulePatterns | None = None
    stream: StreamStructure | None = None

    def bind(self, model: nn.Module, check: bool = True) -> list[PrunableLayer]:
        """The layers bound to `model`'s modules (`PrunableLayer`, in the order of `layers`).

        Args:
            model (`nn.Module`): the model this structure describes (masked or not, split or fused).
            check (`bool`, *optional*, defaults to `True`): refuse projections whose widths no longer match the
                slots (a model changed behind its structure's back); `apply_block_pruning` checks them itself.

        Raises:
            `ValueError`: a module is missing, or (`check`) its width does not match the structure.
        """
        return [_bind_layer(model, layer, check) for layer in self.layers]

    def with_layout(self, layout: dict) -> ModelStructure:
        """This structure after a compaction recorded in `layout` (`config.blockprune_layout`): the same layers and
        specs, with the slots, head sizes and FFN placeholders of the layout's records, and the stream it records."""
        stream = StreamStructure.from_record(layout["hidden"]) if "hidden" in layout else self.stream
        return replace(self, layers=tuple(_layer_with_layout(layer, layout) for layer in self.layers), stream=stream)


def record_slots(record: dict) -> tuple[list[int | None], list[int | None]]:
    """`(query slots, key/value slots)` of a layout record (see `AttentionModules`; `None` is a zero placeholder).

    Version 3 records of grouped-query attention list them (`"slots"`, `"kv_heads"`); earlier records hold the kept
    heads, then one placeholder slot if `"placeholder"` is true, with as many key/value heads as query heads.

    Example:
        >>> record_slots({"heads": [0, 2], "head_dim": 8})
        ([0, 2], [0, 2])
        >>> record_slots({"heads": [], "placeholder": True, "head_dim": 8})
        ([None], [None])
    """
    if "slots" in record:
        return list(record["slots"]), list(record["kv_heads"])
    slots = list(record["heads"]) + ([None] if record.get("placeholder") else [])
    return slots, list(slots)


def layout_entry(layout: dict | None, layer_name: str) -> dict:
    """The entry of one layer in a layout (`{}` when the layout or the layer is not there)."""
    return (layout or {}).get("layers", {}).get(layer_name) or {}


def attention_record(entry: dict, spec: AttentionSpec) -> dict | None:
    """The record of the attention `spec` in a layer's layout entry, matched by query path; `None` if absent."""
    return next((record for record in entry.get("attention", []) if record["query"] == spec.query), None)


def _attention_with_layout(attention: AttentionStructure, entry: dict) -> AttentionStructure:
    record = attention_record(entry, attention.spec)
    if record is None:
        return attention
    slots, kv_slots = record_slots(record)
    return replace(attention, head_dim=record["head_dim"], slots=tuple(slots), kv_slots=tuple(kv_slots))


def is_removed(record: dict | None) -> bool:
    """Whether a layout record (of an attention or an FFN) says its sublayer was removed (layout version 6)."""
    return bool((record or {}).get("removed"))


def _layer_with_layout(layer: LayerStructure, layout: dict) -> LayerStructure:
    entry = layout_entry(layout, layer.name)
    ffn = entry.get("ffn") or {}
    kept = [attention for attention in layer.attentions if not is_removed(attention_record(entry, attention.spec))]
    return replace(
        layer,
        attentions=tuple(_attention_with_layout(attention, entry) for attention in kept),
        ffn_placeholder=bool(ffn.get("placeholder")),
        ffn_removed=layer.ffn_removed or is_removed(ffn),
    )


def _check_width(layer_name: str, path: str, module: nn.Module, expected: int) -> None:
    found = getattr(module, "out_features", None)
    if found is not None and found != expected:
        raise ValueError(
            f"{layer_name}.{path} has {found} output features but the model's structure expects {expected}: the "
            "model was changed after its structure was found (by hand, or by a tool other than hf_blockprune). "
            "Reload it, or mask it again with apply_block_pruning."
        )


def _bind_attention(owner: nn.Module, layer_name: str, attention: AttentionStructure, check: bool):
    spec, head_dim = attention.spec, attention.head_dim
    slots, kv_slots = list(attention.slots), list(attention.kv_slots)
    if spec.fused:
        sizes = [len(slots) * head_dim, len(kv_slots) * head_dim, len(kv_slots) * head_dim]
        modules = fused_parts(owner, layer_name, spec.fused, [spec.query, spec.key, spec.value], sizes)
    else:
        modules = [projection(owner, layer_name, path) for path in (spec.query, spec.key, spec.value)]
        if check:
            for path, module, heads in zip((spec.query, spec.key, spec.value), modules, (slots, kv_slots, kv_slots)):
                _check_width(layer_name, path, module, len(heads) * head_dim)
    output = projection(owner, layer_name, spec.output)
    head_rows = {path: projection(owner, layer_name, path) for path in spec.head_rows if has_module(owner, path)}
    return AttentionModules(*modules, output, spec, head_dim, slots, kv_slots, head_rows)


def _ffn_inputs(owner: nn.Module, layer_name: str, layer: LayerStructure) -> list[nn.Module]:
    spec = layer.stack.ffn
    if spec.fused is None:
        return [projection(owner, layer_name, path) for path in spec.inputs]
    size = width(owner, layer_name, spec.fused) // len(spec.inputs)
    return fused_parts(owner, layer_name, spec.fused, list(spec.inputs), [size] * len(spec.inputs))


def _bind_layer(model: nn.Module, layer: LayerStructure, check: bool) -> PrunableLayer:
    owner = submodule(model, type(model).__name__, layer.name)
    attentions = [_bind_attention(owner, layer.name, attention, check) for attention in layer.attentions]
    ffn = None if layer.ffn_removed else layer.stack.ffn
    ffn_inputs = _ffn_inputs(owner, layer.name, layer) if ffn else []
    ffn_output = projection(owner, layer.name, ffn.output) if ffn else None
    return PrunableLayer(layer.name, attentions, ffn_inputs, ffn_output, ffn, layer.ffn_placeholder)
