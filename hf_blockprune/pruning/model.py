"""Put block masks into a whole model, find them again, and take them out (`apply` / `remove`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from ..structure.architectures import AttentionSpec, FFNSpec, LayerStackSpec, find_layer_lists, stack_specs
from ..structure.projections import ProjectionView, SplitProjection, fuse_projections, split_views
from .adapters import check_lora_base, check_lora_layer, is_lora_layer
from .config import BlockPruningConfig
from .layer import BlockScores, MaskedLinear

# Every name hf_blockprune adds to a model, its config or its state dict starts with `blockprune_`.
CONFIG_ATTRIBUTE = "blockprune_config"  # the BlockPruningConfig object a model was masked with (not saved)
LAYOUT_ATTRIBUTE = "blockprune_layout"
PRUNING_CONFIG_KEY = "blockprune_config"  # the pruning config, as a dict, in model.config (so checkpoints carry it)
RECORD_BEFORE_ATTRIBUTE = "_blockprune_config_before"  # model.config's record before masking, restored by remove
TARGETS_ATTRIBUTE = "blockprune_targets"  # the density controller's state (hf_blockprune.pruning.targets), saved
LEGACY_TARGETS_ATTRIBUTE = "block_pruning_targets"  # its name in checkpoints written before 0.1.0: still read


@dataclass
class AttentionModules:
    """The four projections of one attention block, its head slots and their names relative to the layer.

    A *slot* is a head's place in the projections' weights: query slot `s` is rows `s * head_dim ...` of the query
    projection and the same columns of the output projection; key/value slot `g` is rows `g * head_dim ...` of the
    key and value projections, and serves the query slots `g * group ... (g + 1) * group - 1` (`group =
    num_heads // num_kv_heads`, 1 without grouped-query attention).

    Args:
        query (`nn.Module`), key (`nn.Module`), value (`nn.Module`), output (`nn.Module`): the projections.
        spec (`AttentionSpec`): the projections' paths, head-count attributes and cache role.
        head_dim (`int`): the size of one head (from the layout for a compacted model, which may have no head left).
        slots (`list[int | None]`): per query slot, the original index of the head it holds (all heads of a model
            never compacted, the kept heads recorded in `config.blockprune_layout` for a compacted one), or `None`
            for a zero placeholder slot (zero query rows and output columns: it adds exactly 0).
        kv_slots (`list[int | None]`): the same for key/value slots (equal to `slots` without grouped-query
            attention); `None` is a zero placeholder key/value head, kept so that generation's KV cache has a length
            (see `AttentionSpec.keeps_a_head`).
        head_rows (`dict[str, nn.Module]`, *optional*): the projections of `spec.head_rows` this layer has, by path
            (one block of rows per query slot; not masked).

    A projection that is part of a fused one, or a `Conv1D`, is read through a `ProjectionView` until the model is
    masked (`split_projections`).
    """

    query: nn.Module
    key: nn.Module
    value: nn.Module
    output: nn.Module
    spec: AttentionSpec
    head_dim: int
    slots: list[int | None]
    kv_slots: list[int | None]
    head_rows: dict[str, nn.Module] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        """Query head slots in the projections' weights (placeholders included)."""
        return len(self.slots)

    @property
    def num_kv_heads(self) -> int:
        """Key/value head slots in the key and value projections (placeholders included)."""
        return len(self.kv_slots)

    @property
    def group(self) -> int:
        """Query slots per key/value slot (1 without grouped-query attention)."""
        return self.num_heads // max(self.num_kv_heads, 1)

    @property
    def heads(self) -> list[int]:
        """The original indices of the real heads, in slot order."""
        return [head for head in self.slots if head is not None]

    @property
    def real_heads(self) -> int:
        """Query slots that hold real heads (all but placeholders)."""
        return len(self.heads)

    @property
    def placeholder(self) -> bool:
        """Whether the block holds a zero placeholder slot and no real head (a decoder self-attention emptied)."""
        return self.num_heads > 0 and self.real_heads == 0


@dataclass
class PrunableLayer:
    """One transformer layer: its name, its attention blocks and its FFN projections (`ffn_inputs` empty if absent).

    `ffn_inputs` holds one input projection (classic FFN) or several combined element-wise (a gated MLP: gate, up).
    `ffn_placeholder`: a compacted FFN that lost every neuron but keeps one zero neuron (its `Conv1D` output projection
    cannot read 0 features); it has nothing left to prune.
    """

    name: str
    attentions: list[AttentionModules]
    ffn_inputs: list[nn.Module]
    ffn_output: nn.Module | None
    ffn_spec: FFNSpec | None = None
    ffn_placeholder: bool = False

    @property
    def ffn_input(self) -> nn.Module | None:
        """The first FFN input projection (the only one of a classic FFN), or `None` without FFN."""
        return self.ffn_inputs[0] if self.ffn_inputs else None

    @property
    def has_ffn(self) -> bool:
        """Whether the layer has an FFN to prune."""
        return bool(self.ffn_inputs) and self.ffn_output is not None

    def ffn_paths(self) -> dict[str, str]:
        """The FFN projections' full module paths by role (`input`, `input.1`, ..., `output`)."""
        inputs = self.ffn_spec.inputs
        paths = {("input" if i == 0 else f"input.{i}"): f"{self.name}.{path}" for i, path in enumerate(inputs)}
        return {**paths, "output": f"{self.name}.{self.ffn_spec.output}"}

    def linears(self) -> list[nn.Module]:
        """Every prunable projection of the layer: each attention's query, key, value, output, then the FFN's."""
        modules = [m for attn in self.attentions for m in (attn.query, attn.key, attn.value, attn.output)]
        return modules + list(self.ffn_inputs) + ([self.ffn_output] if self.ffn_output is not None else [])


def _submodule(layer: nn.Module, layer_name: str, path: str) -> nn.Module:
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        raise ValueError(f"Layer {layer_name!r} has no module {path!r}; check the module names.") from None
    check_lora_base(f"{layer_name}.{path}", module)  # before reading its shape
    return module


def _projection(layer: nn.Module, layer_name: str, path: str) -> nn.Module:
    """The module at `path`; a `Conv1D` is read through a `ProjectionView` (its weight is stored transposed)."""
    module = _submodule(layer, layer_name, path)
    return ProjectionView(module, path) if type(module).__name__ == "Conv1D" else module


def _parts(layer: nn.Module, layer_name: str, fused: str, paths: list[str], sizes: list[int]) -> list[nn.Module]:
    """The parts of the fused projection at `fused`: its `SplitProjection` children once split, else views of
    consecutive rows of `sizes`."""
    module = _submodule(layer, layer_name, fused)
    if isinstance(module, SplitProjection):
        return [_submodule(layer, layer_name, path) for path in paths]
    whole = ProjectionView(module, fused).out_features
    if sum(sizes) != whole:
        raise ValueError(
            f"{layer_name}.{fused} has {whole} output features, which do not split into parts of {sizes}: check the "
            "head counts (`num_heads_attribute`, `num_kv_heads_attribute`)."
        )
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [ProjectionView(module, fused, path.rpartition(".")[2], start, start + size)
            for path, start, size in zip(paths, starts, sizes)]


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


def _layout_record(model: nn.Module, layer_name: str, spec: AttentionSpec) -> dict | None:
    """The record of this attention in `config.blockprune_layout` (a compacted model), matched by query path."""
    layout = getattr(getattr(model, "config", None), LAYOUT_ATTRIBUTE, None) or {}
    entry = layout.get("layers", {}).get(layer_name) or {}
    return next((record for record in entry.get("attention", []) if record["query"] == spec.query), None)


def record_slots(record: dict) -> tuple[list[int | None], list[int | None]]:
    """`(query slots, key/value slots)` of a layout record (see `AttentionModules`; `None` is a zero placeholder).

    Version 3 records of grouped-query attention list them (`"slots"`, `"kv_heads"`); earlier records hold the kept
    heads, then one placeholder slot if `"placeholder"` is true, with as many key/value heads as query heads.
    """
    if "slots" in record:
        return list(record["slots"]), list(record["kv_heads"])
    slots = list(record["heads"]) + ([None] if record.get("placeholder") else [])
    return slots, list(slots)


def _width(layer: nn.Module, layer_name: str, path: str) -> int:
    """Output features of the projection at `path` (summed over the parts of a split fused projection)."""
    module = _submodule(layer, layer_name, path)
    if isinstance(module, SplitProjection):
        return sum(module.get_submodule(name).out_features for name in module.part_names)
    return getattr(_projection(layer, layer_name, path), "out_features", 0)  # not a Linear: refused later


def _slots_and_head_dim(model, layer, layer_name: str, spec: AttentionSpec) -> tuple[list, list, int]:
    """`(query slots, key/value slots, head size)`: from the layout of a compacted model, else the config."""
    record = _layout_record(model, layer_name, spec)
    if record is not None:
        return *record_slots(record), record["head_dim"]
    heads, kv_heads = _head_counts(model, spec)
    if spec.fused:
        head_dim = _width(layer, layer_name, spec.fused) // (heads + 2 * kv_heads)
    else:
        head_dim = _width(layer, layer_name, spec.query) // heads
    return list(range(heads)), list(range(kv_heads)), head_dim  # head_dim 0: refused by check_prunable


def _has_module(layer: nn.Module, path: str) -> bool:
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True


def _attention(model: nn.Module, layer: nn.Module, layer_name: str, spec: AttentionSpec) -> AttentionModules:
    slots, kv_slots, head_dim = _slots_and_head_dim(model, layer, layer_name, spec)
    if spec.fused:
        sizes = [len(slots) * head_dim, len(kv_slots) * head_dim, len(kv_slots) * head_dim]
        modules = _parts(layer, layer_name, spec.fused, [spec.query, spec.key, spec.value], sizes)
    else:
        modules = [_projection(layer, layer_name, path) for path in (spec.query, spec.key, spec.value)]
    output = _projection(layer, layer_name, spec.output)
    head_rows = {path: _projection(layer, layer_name, path) for path in spec.head_rows if _has_module(layer, path)}
    return AttentionModules(*modules, output, spec, head_dim, slots, kv_slots, head_rows)


def _ffn_inputs(layer: nn.Module, layer_name: str, spec: FFNSpec) -> list[nn.Module]:
    if spec.fused is None:
        return [_projection(layer, layer_name, path) for path in spec.inputs]
    size = _width(layer, layer_name, spec.fused) // len(spec.inputs)
    return _parts(layer, layer_name, spec.fused, list(spec.inputs), [size] * len(spec.inputs))


def _prunable_layer(model: nn.Module, name: str, layer: nn.Module, spec: LayerStackSpec) -> PrunableLayer:
    attentions = [_attention(model, layer, name, attention) for attention in spec.attentions]
    ffn_inputs = _ffn_inputs(layer, name, spec.ffn) if spec.ffn else []
    ffn_output = _projection(layer, name, spec.ffn.output) if spec.ffn else None
    layout = getattr(getattr(model, "config", None), LAYOUT_ATTRIBUTE, None) or {}
    placeholder = bool(((layout.get("layers", {}).get(name) or {}).get("ffn") or {}).get("placeholder"))
    return PrunableLayer(name, attentions, ffn_inputs, ffn_output, spec.ffn, placeholder)


def split_projections(model: nn.Module, config: BlockPruningConfig | None = None) -> list[PrunableLayer]:
    """Give every prunable projection read through a `ProjectionView` its own `nn.Linear`, in place.

    A fused projection becomes a `SplitProjection` of its parts, a `Conv1D` a `Conv1DLinear`; the model computes the
    same function. `fuse_projections` (called by `remove_block_pruning` and compaction) undoes it.

    Returns:
        `list[PrunableLayer]`: the layers listed again, now holding the new modules.
    """
    for layer in prunable_layers(model, config):
        owner = model.get_submodule(layer.name)
        modules = layer.linears() + [m for attention in layer.attentions for m in attention.head_rows.values()]
        by_source: dict[int, list[ProjectionView]] = {}
        for view in (m for m in modules if isinstance(m, ProjectionView)):
            by_source.setdefault(id(view.source), []).append(view)
        for views in by_source.values():
            views.sort(key=lambda view: view.start)
            _replace(owner, views[0].path, split_views(views, [view.part for view in views]))
    return prunable_layers(model, config)


def prunable_layers(model: nn.Module, config: BlockPruningConfig | None = None) -> list[PrunableLayer]:
    """List the layers of `model` that block pruning acts on, in module-tree order.

    The head slots of each attention come from `config.blockprune_layout` when the model was compacted before.

    Args:
        model (`nn.Module`): a transformers model, masked or not, compacted or not.
        config (`BlockPruningConfig`, *optional*): defaults to the config the model was masked with, else the one
            recorded in `model.config` (a compacted model: its module patterns, for architectures without a map).
    """
    config = config or getattr(model, CONFIG_ATTRIBUTE, None) or _recorded_config(model) or BlockPruningConfig()
    layers = []
    for spec in stack_specs(model, config):
        lists = find_layer_lists(model, spec.layers)
        if not lists:
            raise ValueError(f"No nn.ModuleList named like {spec.layers!r} in {type(model).__name__}.")
        for list_name, layer_list in lists:
            for index, layer in enumerate(layer_list):
                layers.append(_prunable_layer(model, f"{list_name}.{index}", layer, spec))
    return layers


def _recorded_config(model: nn.Module) -> BlockPruningConfig | None:
    """The pruning config recorded in `model.config` (saved with every checkpoint and compacted model), if any."""
    recorded = getattr(getattr(model, "config", None), PRUNING_CONFIG_KEY, None)
    return BlockPruningConfig.from_dict(recorded) if isinstance(recorded, dict) else None


def check_model(model: nn.Module) -> None:
    """Refuse a model that block pruning cannot act on: wrapped for data parallelism, or without weights (`meta`).

    Raises:
        `ValueError`: naming what is wrong and how to fix it.
    """
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise ValueError(
            f"The model is wrapped in {type(model).__name__}: pass the model inside it (`model.module`), and wrap "
            "again afterwards (the Trainer wraps the model itself)."
        )
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    meta = next((name for name, tensor in tensors if tensor.is_meta), None)
    if meta is not None:
        raise ValueError(
            f"`{meta}` is on the meta device (a model without weights, e.g. built under `init_empty_weights` or "
            "loaded with `device_map='meta'`): materialize the weights first (load the model normally with "
            "`from_pretrained`, or `model.to_empty(device=...)` then `model.load_state_dict(...)`)."
        )


def _replace(parent_layer: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = parent_layer.get_submodule(parent_path) if parent_path else parent_layer
    setattr(parent, child, new)


def _wrap(linear: nn.Linear, scores: BlockScores, view: str, owns: bool) -> MaskedLinear:
    return MaskedLinear(linear, scores, view, owns)


def _new_scores(grid, config: BlockPruningConfig, kind: str, score_scale: float, like: nn.Linear) -> BlockScores:
    scores = BlockScores(
        grid, config.pruning_method, kind, config.mask_init_value, config.initial_threshold, score_scale
    ).to(like.weight.device)
    if len(grid) == 2 and config.cuts_on_units(kind):  # blocks inside heads or neurons, cut on those units
        scores.use_unit_floor()
    return scores


def _block_grid(linear: nn.Linear, block_size: list[int], field_name: str, path: str) -> tuple[int, int]:
    """The `(rows, cols)` grid of `block_size` blocks over `linear`'s weight (the module at `path`)."""
    out_features, in_features = linear.weight.shape
    rows, cols = block_size
    if out_features % rows or in_features % cols:
        raise ValueError(
            f"`{field_name}` {rows}x{cols} does not divide the {out_features}x{in_features} weight of {path}; pick "
            f"a `{field_name}` that divides every matrix it applies to."
        )
    return out_features // rows, in_features // cols


def _check_linear(path: str, module: nn.Module, config: BlockPruningConfig) -> None:
    if is_lora_layer(module):
        check_lora_layer(path, module, config)
        return
    if isinstance(module, ProjectionView) and is_lora_layer(module.source):
        raise ValueError(
            f"{path} is part of a fused projection wrapped by LoRA: block pruning splits fused projections into their "
            "parts, which would drop the adapter. Leave the fused projection out of the LoRA `target_modules`."
        )
    if not isinstance(module, (nn.Linear, ProjectionView)):
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        raise ValueError(
            f"{path} is a {kind}, not an nn.Linear: block pruning masks nn.Linear layers (and transformers' Conv1D) "
            "only. Name such modules in `attention_modules` / `ffn_modules`."
        )


def _check_head_widths(paths: dict[str, str], attention: AttentionModules) -> None:
    """Refuse projections that do not split into the configured query and key/value heads of one size."""
    heads, kv_heads = attention.num_heads, attention.num_kv_heads
    width = attention.query.out_features
    if width != heads * attention.head_dim or attention.head_dim == 0:
        raise ValueError(
            f"{paths['query']} has {width} output features, which {heads} heads do not divide: check "
            "`num_heads_attribute` (the model-config field holding the head count)."
        )
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"{paths['query']}: {heads} query heads do not split into groups over {kv_heads} key/value heads; check "
            "`num_kv_heads_attribute`."
        )
    kv_width = kv_heads * attention.head_dim
    for role in ("key", "value"):
        size = getattr(attention, role).out_features
        if size != kv_width:
            hint = (
                "it looks like grouped-query attention: set `num_kv_heads_attribute` (e.g. 'num_key_value_heads')."
                if not attention.spec.grouped and size < width and width % size == 0
                else "check `attention_modules` and the head-count attributes."
            )
            raise ValueError(
                f"{paths[role]} has {size} output features but {kv_heads} key/value heads of {attention.head_dim} "
                f"need {kv_width}: {hint}"
            )
    if attention.output.in_features != width:
        raise ValueError(
            f"{paths['output']} reads {attention.output.in_features} features but {paths['query']} makes {width}: "
            "the output projection must read the concatenated heads; check `attention_modules`."
        )


def _check_attention(layer_name: str, attention: AttentionModules, config: BlockPruningConfig) -> None:
    paths = {role: f"{layer_name}.{path}" for role, path in attention.spec.paths().items()}
    for role, path in paths.items():
        _check_linear(path, getattr(attention, role), config)
    if attention.real_heads == 0:
        return  # nothing left to score
    _check_head_widths(paths, attention)
    if config.attention_granularity == "block":
        for role, path in paths.items():
            _block_grid(getattr(attention, role), config.attention_block_size, "attention_block_size", path)


def _check_ffn(layer: PrunableLayer, config: BlockPruningConfig) -> None:
    paths = layer.ffn_paths()
    for linear, path in zip([*layer.ffn_inputs, layer.ffn_output], paths.values()):
        _check_linear(path, linear, config)
    for linear, path in zip(layer.ffn_inputs, paths.values()):
        if linear.out_features != layer.ffn_output.in_features:
            raise ValueError(
                f"{path} makes {linear.out_features} features but {paths['output']} reads "
                f"{layer.ffn_output.in_features}: they are not the two sides of one FFN; check `ffn_modules`."
            )
    if config.ffn_granularity == "block" and layer.ffn_input.out_features:
        if len(layer.ffn_inputs) > 1:
            raise ValueError(
                f"{layer.name} has a gated FFN ({', '.join(paths.values())}): blocks of one input projection do not "
                "remove neurons there (a neuron is a row of every input), so `ffn_granularity='block'` cannot be "
                "compacted exactly. Use `ffn_granularity='neuron'` (the `hybrid` and `struct` presets do)."
            )
        for linear, path in zip([*layer.ffn_inputs, layer.ffn_output], paths.values()):
            _block_grid(linear, config.ffn_block_size, "ffn_block_size", path)


def check_prunable(layers: list[PrunableLayer], config: BlockPruningConfig) -> None:
    """Refuse, before any module changes, layers that `config` cannot mask: modules that are not `nn.Linear`,
    attention projections that do not split into equal heads, block sizes that do not divide a weight.

    Raises:
        `ValueError`: naming the module, its type or shape, and the config field to change.
    """
    for layer in layers:
        for attention in layer.attentions:
            _check_attention(layer.name, attention, config)
        if layer.has_ffn:
            _check_ffn(layer, config)


def _masked_attention(attn: AttentionModules, config, score_scale, layer_name) -> list[MaskedLinear]:
    linears = [attn.query, attn.key, attn.value, attn.output]
    if config.attention_granularity == "head":
        # One score per query slot; a key/value head is kept while any query head of its group is.
        shared = _new_scores((attn.num_heads,), config, "attention", score_scale, attn.query)
        views = ["rows", "rows", "rows", "cols"]
        groups = [1, attn.group, attn.group, 1]
        return [
            MaskedLinear(lin, shared, view, owns_scores=i == 0, row_groups=group)
            for i, (lin, view, group) in enumerate(zip(linears, views, groups))
        ]
    paths = [f"{layer_name}.{path}" for path in attn.spec.paths().values()]
    grids = [_block_grid(lin, config.attention_block_size, "attention_block_size", path)
             for lin, path in zip(linears, paths)]
    return [_wrap(lin, _new_scores(grid, config, "attention", score_scale, lin), "grid", owns=True)
            for lin, grid in zip(linears, grids)]


def _masked_ffn(layer: PrunableLayer, config, score_scale) -> list[MaskedLinear]:
    linears = [*layer.ffn_inputs, layer.ffn_output]
    if config.ffn_granularity == "neuron":
        shared = _new_scores((layer.ffn_input.out_features,), config, "ffn", score_scale, layer.ffn_input)
        shared.round_to = getattr(config, "ffn_round_to", 1)
        views = ["rows"] * len(layer.ffn_inputs) + ["cols"]
        return [_wrap(lin, shared, view, owns=i == 0) for i, (lin, view) in enumerate(zip(linears, views))]
    paths = layer.ffn_paths().values()
    grids = [_block_grid(lin, config.ffn_block_size, "ffn_block_size", path) for lin, path in zip(linears, paths)]
    return [_wrap(lin, _new_scores(grid, config, "ffn", score_scale, lin), "grid", True)
            for lin, grid in zip(linears, grids)]


def _has_units(layer: PrunableLayer) -> bool:
    """Whether a layer still has a head or an FFN neuron (something to score)."""
    ffn = layer.has_ffn and layer.ffn_input.out_features > 0 and not layer.ffn_placeholder
    return ffn or any(attention.real_heads for attention in layer.attentions)


def _mask_layer(model: nn.Module, layer: PrunableLayer, config: BlockPruningConfig, score_scale: float) -> None:
    """Wrap the projections of one layer; an attention without heads or an FFN without neurons gets no scores."""
    owner = model.get_submodule(layer.name)
    pairs = []
    for attn in layer.attentions:
        if attn.real_heads:
            originals = (attn.query, attn.key, attn.value, attn.output)
            pairs += zip(originals, _masked_attention(attn, config, score_scale, layer.name))
    if layer.has_ffn and layer.ffn_input.out_features and not layer.ffn_placeholder:
        pairs += zip((*layer.ffn_inputs, layer.ffn_output), _masked_ffn(layer, config, score_scale))
    # paths first: once a module is wrapped, the original sits one level deeper
    paths = [_relative_path(owner, original) for original, _ in pairs]
    for path, (_, masked) in zip(paths, pairs):
        _replace(owner, path, masked)


def apply_block_pruning(model: nn.Module, config: BlockPruningConfig, score_scale: float = 1.0) -> nn.Module:
    """Wrap the prunable Linear layers of `model` in `MaskedLinear` with fresh scores, in place.

    A model compacted before (loaded with `hf_blockprune.from_pretrained`) is masked by its remaining heads and
    neurons; an attention with no head left or an FFN with no neuron left gets no scores. Everything is checked
    before any module changes.

    Args:
        model (`nn.Module`): a model of a supported architecture (or one described by `config`'s module patterns).
        config (`BlockPruningConfig`): granularity, method, initial threshold and score initialisation.
        score_scale (`float`, *optional*, defaults to 1.0): see `BlockScores` (used by the callback to give the
            scores their own learning rate inside the optimizer's default parameter groups).

    Returns:
        `nn.Module`: the same model, masked.

    Raises:
        `ValueError`: the model is wrapped (`DataParallel`, DDP), on the meta device or masked already, `config`
            prunes nothing, it does not fit the model (see `check_prunable`), or nothing is left to prune.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_blockprune import BlockPruningConfig, apply_block_pruning, sparsity_report
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> model = apply_block_pruning(model, BlockPruningConfig.from_preset("struct"))
        >>> query = model.bert.encoder.layer[0].attention.self.query
        >>> type(query).__name__, query.scores_module.scores.shape  # one score per head
        ('MaskedLinear', torch.Size([4]))
        >>> model.bert.encoder.layer[0].intermediate.dense.scores_module.scores.shape  # one per FFN neuron
        torch.Size([37])
        >>> sparsity_report(model)[0]["ffn_neurons_kept"]  # fresh scores keep every block
        37
        >>> model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape
        torch.Size([1, 2])
    """
    check_model(model)
    if not getattr(config, "enabled", True):
        raise ValueError(
            "This BlockPruningConfig prunes nothing (`pruning_preset='none'`, or no pruning field set): name a preset "
            "(e.g. `BlockPruningConfig.from_preset('struct')`) or set the granularity and method."
        )
    if is_block_pruned(model):
        raise ValueError("This model already has block-pruning masks; call remove_block_pruning(model) first.")
    layers = prunable_layers(model, config)
    check_prunable(layers, config)
    if not any(_has_units(layer) for layer in layers):
        raise ValueError(
            "Nothing left to prune: every attention head and FFN neuron these layers had was removed by an earlier "
            "compaction (see `config.blockprune_layout`)."
        )
    for layer in split_projections(model, config):
        _mask_layer(model, layer, config, score_scale)
    setattr(model, CONFIG_ATTRIBUTE, config)
    if getattr(model, "config", None) is not None:
        # kept so that `remove_block_pruning` restores it (a compacted model keeps the record of its compaction)
        setattr(model, RECORD_BEFORE_ATTRIBUTE, getattr(model.config, PRUNING_CONFIG_KEY, None))
        setattr(model.config, PRUNING_CONFIG_KEY, config.to_dict())
    return model


def _relative_path(owner: nn.Module, target: nn.Module) -> str:
    for name, module in owner.named_modules():
        if module is target:
            return name
    raise ValueError("Internal error: module not found under its layer.")


def remove_block_pruning(model: nn.Module, merge: bool = True, fuse: bool = True) -> nn.Module:
    """Replace every `MaskedLinear` by its `nn.Linear`, in place; `merge=True` multiplies the mask into the weight.

    `fuse=True` also turns split fused projections and `Conv1D`s back into their original modules
    (`fuse_projections`), so the model has its original structure.

    The pruning record `apply_block_pruning` wrote into `model.config` goes too (a compacted model gets back the
    record of its compaction), so `apply` then `remove` leaves the model as it was.

    Returns:
        `nn.Module`: the same model, with no masks and no scores.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_blockprune import BlockPruningConfig, apply_block_pruning, remove_block_pruning
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> config = BlockPruningConfig.from_preset("struct", initial_threshold=0.5, mask_init_value=1.0)
        >>> model = apply_block_pruning(model, config)  # a block is kept while sigmoid(score) > 0.5
        >>> with torch.no_grad():  # as training could leave it: head 0 of layer 0 below the threshold
        ...     model.bert.encoder.layer[0].attention.self.query.scores_module.scores[0] = -1.0
        >>> model = remove_block_pruning(model)  # merge=True: the masks are multiplied into the weights
        >>> query = model.bert.encoder.layer[0].attention.self.query
        >>> type(query).__name__, query.weight.shape
        ('Linear', torch.Size([32, 32]))
        >>> bool((query.weight[:8] == 0).all()), bool((query.weight[8:] == 0).any())  # head 0's rows are zero
        (True, False)
    """
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, MaskedLinear)]
    # Merge everything before unwrapping: a shared score lives in the first layer that uses it.
    plain = [(name, module.merge() if merge else module.base_layer) for name, module in wrapped]
    for name, linear in plain:
        _replace(model, name, linear)
    if hasattr(model, CONFIG_ATTRIBUTE):
        delattr(model, CONFIG_ATTRIBUTE)
        _restore_config_record(model)
    for module in list(model.modules()):  # the model, or the transformer inside a sentence-transformers model
        if hasattr(module, TARGETS_ATTRIBUTE):
            delattr(module, TARGETS_ATTRIBUTE)
    return fuse_projections(model) if fuse else model


def rename_legacy_keys(state: dict, prefix: str = "") -> dict:
    """`state` (a state dict, changed in place and returned) with the density controller's entries under their
    pre-0.1.0 name (`block_pruning_targets.*`, after `prefix`) moved to the current one (`blockprune_targets.*`)."""
    old, new = f"{prefix}{LEGACY_TARGETS_ATTRIBUTE}.", f"{prefix}{TARGETS_ATTRIBUTE}."
    for key in [key for key in state if key.startswith(old)]:
        state[new + key[len(old):]] = state.pop(key)
    return state


def read_legacy_keys(module, state_dict, prefix, *args) -> None:
    """A load-state-dict pre-hook (`register_load_state_dict_pre_hook`) for the module holding the density
    controller's state: checkpoints written before 0.1.0 load as current ones (see `rename_legacy_keys`)."""
    rename_legacy_keys(state_dict, prefix)


def _restore_config_record(model: nn.Module) -> None:
    """Give `model.config` back the pruning record it had before `apply_block_pruning` (none for a dense model)."""
    before = model.__dict__.pop(RECORD_BEFORE_ATTRIBUTE, None)
    config = getattr(model, "config", None)
    if config is None:
        return
    if before is None:
        if hasattr(config, PRUNING_CONFIG_KEY):
            delattr(config, PRUNING_CONFIG_KEY)
    else:
        setattr(config, PRUNING_CONFIG_KEY, before)


def is_block_pruned(model: nn.Module) -> bool:
    """Whether `model` holds block-pruning masks.

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_blockprune import BlockPruningConfig, apply_block_pruning, is_block_pruned, remove_block_pruning
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> is_block_pruned(model)
        False
        >>> is_block_pruned(apply_block_pruning(model, BlockPruningConfig.from_preset("struct")))
        True
        >>> is_block_pruned(remove_block_pruning(model))
        False
    """
    return any(isinstance(module, MaskedLinear) for module in model.modules())


def block_scores(model: nn.Module) -> Iterator[BlockScores]:
    """Every `BlockScores` of `model`, each once."""
    for module in model.modules():
        if isinstance(module, BlockScores):
            yield module


def score_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The mask-score parameters of `model`."""
    return [scores.scores for scores in block_scores(model)]


def set_threshold(model: nn.Module, value: float, kind: str | None = None) -> None:
    """Set the mask threshold (kept fraction for top-k) of every `BlockScores` of `model` (of one `kind` if given)."""
    for scores in block_scores(model):
        if kind is None or scores.kind == kind:
            scores.set_threshold(value)
