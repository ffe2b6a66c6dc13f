"""Put block masks into a whole model, find them again, and take them out (`apply` / `remove`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

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
    """The four projections of one attention block, its head count and their names relative to the layer."""

    query: nn.Module
    key: nn.Module
    value: nn.Module
    output: nn.Module
    num_heads: int
    spec: AttentionSpec


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


def _attention(layer: nn.Module, layer_name: str, spec: AttentionSpec, num_heads: int) -> AttentionModules:
    modules = [_submodule(layer, layer_name, path) for path in (spec.query, spec.key, spec.value, spec.output)]
    return AttentionModules(*modules, num_heads=num_heads, spec=spec)


def _layer_head_counts(model: nn.Module, layer_name: str, spec: LayerStackSpec, default: int) -> list[int]:
    """Head count of each attention block of a layer: from the compaction layout if the model has one."""
    layout = getattr(getattr(model, "config", None), LAYOUT_ATTRIBUTE, None)
    entry = (layout or {}).get("layers", {}).get(layer_name)
    if entry is None:
        return [default] * len(spec.attentions)
    return [len(attention["heads"]) for attention in entry["attention"]]


def prunable_layers(model: nn.Module, config: BlockPruningConfig | None = None) -> list[PrunableLayer]:
    """List the layers of `model` that block pruning acts on, in module-tree order.

    Args:
        model (`nn.Module`): a transformers model, masked or not.
        config (`BlockPruningConfig`, *optional*): defaults to the config the model was masked with.
    """
    config = config or getattr(model, CONFIG_ATTRIBUTE, None) or BlockPruningConfig()
    layers = []
    for spec in stack_specs(model, config):
        lists = find_layer_lists(model, spec.layers)
        if not lists:
            raise ValueError(f"No nn.ModuleList named like {spec.layers!r} in {type(model).__name__}.")
        num_heads = _num_heads(model, spec) if spec.attentions else 0
        for list_name, layer_list in lists:
            for index, layer in enumerate(layer_list):
                name = f"{list_name}.{index}"
                heads = _layer_head_counts(model, name, spec, num_heads)
                attentions = [_attention(layer, name, attn, n) for attn, n in zip(spec.attentions, heads)]
                ffn_in = _submodule(layer, name, spec.ffn.input) if spec.ffn else None
                ffn_out = _submodule(layer, name, spec.ffn.output) if spec.ffn else None
                layers.append(PrunableLayer(name, attentions, ffn_in, ffn_out, spec.ffn))
    return layers


def _replace(parent_layer: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = parent_layer.get_submodule(parent_path) if parent_path else parent_layer
    setattr(parent, child, new)


def _wrap(linear: nn.Module, scores: BlockScores, view: str, owns: bool) -> MaskedLinear:
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"Block pruning masks nn.Linear layers, got {type(linear).__name__}.")
    return MaskedLinear(linear, scores, view, owns)


def _new_scores(grid, config: BlockPruningConfig, kind: str, score_scale: float, like: nn.Linear) -> BlockScores:
    scores = BlockScores(
        grid, config.pruning_method, kind, config.mask_init_value, config.initial_threshold, score_scale
    )
    return scores.to(like.weight.device)


def _block_grid(linear: nn.Linear, block_size: list[int]) -> tuple[int, int]:
    out_features, in_features = linear.weight.shape
    rows, cols = block_size
    if out_features % rows or in_features % cols:
        raise ValueError(
            f"Block size {rows}x{cols} does not divide a {out_features}x{in_features} weight; pick a block size "
            "that divides every matrix it applies to."
        )
    return out_features // rows, in_features // cols


def _masked_attention(attn: AttentionModules, config, score_scale) -> list[MaskedLinear]:
    linears = [attn.query, attn.key, attn.value, attn.output]
    if config.attention_granularity == "head":
        shared = _new_scores((attn.num_heads,), config, "attention", score_scale, attn.query)
        views = ["rows", "rows", "rows", "cols"]
        return [_wrap(lin, shared, view, owns=i == 0) for i, (lin, view) in enumerate(zip(linears, views))]
    return [
        _wrap(lin, _new_scores(_block_grid(lin, config.attention_block_size), config, "attention", score_scale, lin),
              "grid", owns=True)
        for lin in linears
    ]


def _masked_ffn(ffn_in: nn.Linear, ffn_out: nn.Linear, config, score_scale) -> list[MaskedLinear]:
    if config.ffn_granularity == "neuron":
        shared = _new_scores((ffn_in.out_features,), config, "ffn", score_scale, ffn_in)
        return [_wrap(ffn_in, shared, "rows", owns=True), _wrap(ffn_out, shared, "cols", owns=False)]
    return [
        _wrap(lin, _new_scores(_block_grid(lin, config.ffn_block_size), config, "ffn", score_scale, lin), "grid", True)
        for lin in (ffn_in, ffn_out)
    ]


def apply_block_pruning(model: nn.Module, config: BlockPruningConfig, score_scale: float = 1.0) -> nn.Module:
    """Wrap the prunable Linear layers of `model` in `MaskedLinear` with fresh scores, in place.

    Args:
        model (`nn.Module`): a model of a supported architecture (or one described by `config`'s module patterns).
        config (`BlockPruningConfig`): granularity, method, initial threshold and score initialisation.
        score_scale (`float`, *optional*, defaults to 1.0): see `BlockScores` (used by the callback to give the
            scores their own learning rate inside the optimizer's default parameter groups).

    Returns:
        `nn.Module`: the same model, masked.
    """
    if is_block_pruned(model):
        raise ValueError("This model already has block-pruning masks; call remove_block_pruning(model) first.")
    for layer in prunable_layers(model, config):
        owner = model.get_submodule(layer.name)
        # paths first: once a module is wrapped, the original sits one level deeper
        pairs = []
        for attn in layer.attentions:
            originals = (attn.query, attn.key, attn.value, attn.output)
            pairs += zip(originals, _masked_attention(attn, config, score_scale))
        if layer.ffn_input is not None and layer.ffn_output is not None:
            originals = (layer.ffn_input, layer.ffn_output)
            pairs += zip(originals, _masked_ffn(*originals, config, score_scale))
        paths = [_relative_path(owner, original) for original, _ in pairs]
        for path, (_, masked) in zip(paths, pairs):
            _replace(owner, path, masked)
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
