"""Put block masks into a whole model, find them again, and take them out (`apply` / `remove`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from .architectures import AttentionSpec, FFNSpec, LayerStackSpec, find_layer_lists, stack_specs
from .config import BlockPruningConfig
from .layer import BlockScores, MaskedLinear

CONFIG_ATTRIBUTE = "block_pruning_config"
LAYOUT_ATTRIBUTE = "blockprune_layout"
PRUNING_CONFIG_KEY = "blockprune_config"  # the pruning config, as a dict, in model.config (so checkpoints carry it)
TARGETS_ATTRIBUTE = "block_pruning_targets"  # the density controller's state (hf_blockprune.targets)


@dataclass
class AttentionModules:
    """The four projections of one attention block, its head slots and their names relative to the layer.

    Args:
        query (`nn.Module`), key (`nn.Module`), value (`nn.Module`), output (`nn.Module`): the projections.
        num_heads (`int`): head slots in the projections' weights (a placeholder included).
        spec (`AttentionSpec`): the projections' paths and whether the attention sets the KV-cache length.
        head_dim (`int`): the size of one head (from the layout for a compacted model, which may have no head left).
        heads (`list[int]`, *optional*): the original index of each real head slot, in order: all heads of a model
            never compacted, the kept heads recorded in `config.blockprune_layout` for a compacted one.
        placeholder (`bool`, *optional*, defaults to `False`): the one slot is a zero placeholder head, kept so
            that generation's KV cache has a length (see `AttentionSpec.sets_cache_length`), not a real head.
    """

    query: nn.Module
    key: nn.Module
    value: nn.Module
    output: nn.Module
    num_heads: int
    spec: AttentionSpec
    head_dim: int
    heads: list[int] = field(default_factory=list)
    placeholder: bool = False

    @property
    def real_heads(self) -> int:
        """Head slots that hold real heads (all but a placeholder)."""
        return self.num_heads - int(self.placeholder)


@dataclass
class PrunableLayer:
    """One transformer layer: its name, its attention blocks and its FFN projections (`None` if absent)."""

    name: str
    attentions: list[AttentionModules]
    ffn_input: nn.Module | None
    ffn_output: nn.Module | None
    ffn_spec: FFNSpec | None = None


def _submodule(layer: nn.Module, layer_name: str, path: str) -> nn.Module:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        raise ValueError(f"Layer {layer_name!r} has no module {path!r}; check the module names.") from None


def _num_heads(model: nn.Module, spec: LayerStackSpec) -> int:
    num_heads = getattr(getattr(model, "config", None), spec.num_heads_attribute, None)
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(
            f"Cannot read the head count from model.config.{spec.num_heads_attribute}; set `num_heads_attribute`."
        )
    return num_heads


def _layout_record(model: nn.Module, layer_name: str, spec: AttentionSpec) -> dict | None:
    """The record of this attention in `config.blockprune_layout` (a compacted model), matched by query path."""
    layout = getattr(getattr(model, "config", None), LAYOUT_ATTRIBUTE, None) or {}
    entry = layout.get("layers", {}).get(layer_name) or {}
    return next((record for record in entry.get("attention", []) if record["query"] == spec.query), None)


def _attention(layer: nn.Module, layer_name: str, spec: AttentionSpec, num_heads: int, record) -> AttentionModules:
    modules = [_submodule(layer, layer_name, path) for path in spec.paths().values()]
    if record is None:
        head_dim = getattr(modules[0], "out_features", 0) // num_heads  # not a Linear: refused by check_prunable
        return AttentionModules(*modules, num_heads, spec, head_dim, heads=list(range(num_heads)))
    placeholder = bool(record.get("placeholder", False))
    slots = len(record["heads"]) + int(placeholder)
    return AttentionModules(*modules, slots, spec, record["head_dim"], list(record["heads"]), placeholder)


def _prunable_layer(model: nn.Module, name: str, layer: nn.Module, spec: LayerStackSpec, heads: int) -> PrunableLayer:
    attentions = [_attention(layer, name, attn, heads, _layout_record(model, name, attn)) for attn in spec.attentions]
    ffn_in = _submodule(layer, name, spec.ffn.input) if spec.ffn else None
    ffn_out = _submodule(layer, name, spec.ffn.output) if spec.ffn else None
    return PrunableLayer(name, attentions, ffn_in, ffn_out, spec.ffn)


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
        num_heads = _num_heads(model, spec) if spec.attentions else 0
        for list_name, layer_list in lists:
            for index, layer in enumerate(layer_list):
                layers.append(_prunable_layer(model, f"{list_name}.{index}", layer, spec, num_heads))
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
    )
    return scores.to(like.weight.device)


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


def _check_linear(path: str, module: nn.Module) -> None:
    if not isinstance(module, nn.Linear):
        kind = f"{type(module).__module__}.{type(module).__qualname__}"
        raise ValueError(
            f"{path} is a {kind}, not an nn.Linear: block pruning masks nn.Linear layers only (GPT-2's Conv1D, for "
            "one, stores its weight transposed). Name nn.Linear modules in `attention_modules` / `ffn_modules`."
        )


def _check_head_widths(paths: dict[str, str], attention: AttentionModules) -> None:
    """Refuse projections that do not split into `num_heads` equal heads (grouped-query attention, wrong count)."""
    width = attention.query.out_features
    for role in ("key", "value"):
        size = getattr(attention, role).out_features
        if size != width:
            raise ValueError(
                f"{paths[role]} has {size} output features but the query projection {paths['query']} has {width}: "
                "grouped-query or multi-query attention (fewer key/value heads than query heads) is not supported "
                "yet. Prune only the FFN (`attention_modules=None`)."
            )
    if attention.output.in_features != width:
        raise ValueError(
            f"{paths['output']} reads {attention.output.in_features} features but {paths['query']} makes {width}: "
            "the output projection must read the concatenated heads; check `attention_modules`."
        )
    if width != attention.num_heads * attention.head_dim:
        raise ValueError(
            f"{paths['query']} has {width} output features, which {attention.num_heads} heads do not divide: check "
            "`num_heads_attribute` (the model-config field holding the head count)."
        )


def _check_attention(layer_name: str, attention: AttentionModules, config: BlockPruningConfig) -> None:
    paths = {role: f"{layer_name}.{path}" for role, path in attention.spec.paths().items()}
    for role, path in paths.items():
        _check_linear(path, getattr(attention, role))
    if attention.real_heads == 0:
        return  # nothing left to score
    _check_head_widths(paths, attention)
    if config.attention_granularity == "block":
        for role, path in paths.items():
            _block_grid(getattr(attention, role), config.attention_block_size, "attention_block_size", path)


def _check_ffn(layer: PrunableLayer, config: BlockPruningConfig) -> None:
    paths = {"input": f"{layer.name}.{layer.ffn_spec.input}", "output": f"{layer.name}.{layer.ffn_spec.output}"}
    _check_linear(paths["input"], layer.ffn_input)
    _check_linear(paths["output"], layer.ffn_output)
    if layer.ffn_input.out_features != layer.ffn_output.in_features:
        raise ValueError(
            f"{paths['input']} makes {layer.ffn_input.out_features} features but {paths['output']} reads "
            f"{layer.ffn_output.in_features}: they are not the two sides of one FFN; check `ffn_modules`."
        )
    if config.ffn_granularity == "block" and layer.ffn_input.out_features:
        for linear, path in ((layer.ffn_input, paths["input"]), (layer.ffn_output, paths["output"])):
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
        if layer.ffn_input is not None and layer.ffn_output is not None:
            _check_ffn(layer, config)


def _masked_attention(attn: AttentionModules, config, score_scale, layer_name) -> list[MaskedLinear]:
    linears = [attn.query, attn.key, attn.value, attn.output]
    if config.attention_granularity == "head":
        shared = _new_scores((attn.num_heads,), config, "attention", score_scale, attn.query)
        views = ["rows", "rows", "rows", "cols"]
        return [_wrap(lin, shared, view, owns=i == 0) for i, (lin, view) in enumerate(zip(linears, views))]
    paths = [f"{layer_name}.{path}" for path in attn.spec.paths().values()]
    grids = [_block_grid(lin, config.attention_block_size, "attention_block_size", path)
             for lin, path in zip(linears, paths)]
    return [_wrap(lin, _new_scores(grid, config, "attention", score_scale, lin), "grid", owns=True)
            for lin, grid in zip(linears, grids)]


def _masked_ffn(layer: PrunableLayer, config, score_scale) -> list[MaskedLinear]:
    ffn_in, ffn_out = layer.ffn_input, layer.ffn_output
    if config.ffn_granularity == "neuron":
        shared = _new_scores((ffn_in.out_features,), config, "ffn", score_scale, ffn_in)
        return [_wrap(ffn_in, shared, "rows", owns=True), _wrap(ffn_out, shared, "cols", owns=False)]
    linears = (ffn_in, ffn_out)
    paths = (f"{layer.name}.{layer.ffn_spec.input}", f"{layer.name}.{layer.ffn_spec.output}")
    grids = [_block_grid(lin, config.ffn_block_size, "ffn_block_size", path) for lin, path in zip(linears, paths)]
    return [_wrap(lin, _new_scores(grid, config, "ffn", score_scale, lin), "grid", True)
            for lin, grid in zip(linears, grids)]


def _has_units(layer: PrunableLayer) -> bool:
    """Whether a layer still has a head or an FFN neuron (something to score)."""
    ffn = layer.ffn_input is not None and layer.ffn_output is not None and layer.ffn_input.out_features > 0
    return ffn or any(attention.real_heads for attention in layer.attentions)


def _mask_layer(model: nn.Module, layer: PrunableLayer, config: BlockPruningConfig, score_scale: float) -> None:
    """Wrap the projections of one layer; an attention without heads or an FFN without neurons gets no scores."""
    owner = model.get_submodule(layer.name)
    pairs = []
    for attn in layer.attentions:
        if attn.real_heads:
            originals = (attn.query, attn.key, attn.value, attn.output)
            pairs += zip(originals, _masked_attention(attn, config, score_scale, layer.name))
    if layer.ffn_input is not None and layer.ffn_output is not None and layer.ffn_input.out_features:
        pairs += zip((layer.ffn_input, layer.ffn_output), _masked_ffn(layer, config, score_scale))
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
    for layer in layers:
        _mask_layer(model, layer, config, score_scale)
    setattr(model, CONFIG_ATTRIBUTE, config)
    if getattr(model, "config", None) is not None:
        setattr(model.config, PRUNING_CONFIG_KEY, config.to_dict())
    return model


def _relative_path(owner: nn.Module, target: nn.Module) -> str:
    for name, module in owner.named_modules():
        if module is target:
            return name
    raise ValueError("Internal error: module not found under its layer.")


def remove_block_pruning(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every `MaskedLinear` by its `nn.Linear`, in place; `merge=True` multiplies the mask into the weight.

    Returns:
        `nn.Module`: the same model, with no masks and no scores.
    """
    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, MaskedLinear)]
    # Merge everything before unwrapping: a shared score lives in the first layer that uses it.
    plain = [(name, module.merge() if merge else module.base_layer) for name, module in wrapped]
    for name, linear in plain:
        _replace(model, name, linear)
    if hasattr(model, CONFIG_ATTRIBUTE):
        delattr(model, CONFIG_ATTRIBUTE)
    if hasattr(model, TARGETS_ATTRIBUTE):
        delattr(model, TARGETS_ATTRIBUTE)
    return model


def is_block_pruned(model: nn.Module) -> bool:
    """Whether `model` holds block-pruning masks."""
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
