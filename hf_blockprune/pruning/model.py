"""Put block masks into a whole model, find them again, and take them out (`apply` / `remove`)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from torch import nn

from ..structure.discovery import forget_stream, keep_stream, prunable_layers, structure_of
from ..structure.layers import AttentionModules, PrunableLayer
from ..structure.model_structure import PRUNING_CONFIG_KEY, StreamStructure
from ..structure.modeling_blockprune import is_constant_output
from ..structure.projections import ProjectionView, fuse_projections, linear_weight, split_views
from ..structure.stream import find_stream
from .config import BlockPruningConfig
from .layer import BlockScores, MaskedLinear, wrapped_linear
from .norm import MaskedNorm, MaskedSource, check_maskable_norm

# Every name hf_blockprune adds to a model, its config or its state dict starts with `blockprune_` (the structure's
# records: hf_blockprune.structure.model_structure).
CONFIG_ATTRIBUTE = "blockprune_config"  # the BlockPruningConfig object a model was masked with (not saved)
RECORD_BEFORE_ATTRIBUTE = "_blockprune_config_before"  # model.config's record before masking, restored by remove
TARGETS_ATTRIBUTE = "blockprune_targets"  # the density controller's state (hf_blockprune.pruning.targets), saved
LEGACY_TARGETS_ATTRIBUTE = "block_pruning_targets"  # its name in checkpoints written before 0.1.0: still read


def split_projections(model: nn.Module) -> list[PrunableLayer]:
    """Give every prunable projection read through a `ProjectionView` its own `nn.Linear`, in place.

    A fused projection becomes a `SplitProjection` of its parts, a `Conv1D` a `Conv1DLinear`; the model computes the
    same function. `fuse_projections` (called by `remove_block_pruning` and compaction) undoes it. The layers are
    those of `structure_of(model)`, whose paths stay valid.

    Returns:
        `list[PrunableLayer]`: the layers bound again, now holding the new modules.
    """
    for layer in prunable_layers(model):
        owner = model.get_submodule(layer.name)
        modules = layer.linears() + [m for attention in layer.attentions for m in attention.head_rows.values()]
        by_source: dict[int, list[ProjectionView]] = {}
        for view in (m for m in modules if isinstance(m, ProjectionView)):
            by_source.setdefault(id(view.source), []).append(view)
        for views in by_source.values():
            views.sort(key=lambda view: view.start)
            _replace(owner, views[0].path, split_views(views, [view.part for view in views]))
    return prunable_layers(model)


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
    kind = wrapped_linear(module)
    if kind is not None:  # a LoRA layer (hf_blockprune.integrations.peft)
        kind.check(path, module, config)
        return
    if isinstance(module, ProjectionView) and wrapped_linear(module.source) is not None:
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
    structure = structure_of(model, config)  # found (and kept) with config's module patterns
    layers = structure.bind(model, check=False)
    check_prunable(layers, config)
    stream = _checked_stream(model, structure) if getattr(config, "prune_hidden", False) else None
    channel_weights = _stream_weights(model, stream) if stream is not None else 0.0  # before projections are split
    if not any(_has_units(layer) for layer in layers):
        raise ValueError(
            "Nothing left to prune: every attention head and FFN neuron these layers had was removed by an earlier "
            "compaction (see `config.blockprune_layout`)."
        )
    for layer in split_projections(model):
        _mask_layer(model, layer, config, score_scale)
    if stream is not None:
        _mask_stream(model, stream, config, score_scale, channel_weights)
        keep_stream(model, stream)
    setattr(model, CONFIG_ATTRIBUTE, config)
    if getattr(model, "config", None) is not None:
        # kept so that `remove_block_pruning` restores it (a compacted model keeps the record of its compaction)
        setattr(model, RECORD_BEFORE_ATTRIBUTE, getattr(model.config, PRUNING_CONFIG_KEY, None))
        setattr(model.config, PRUNING_CONFIG_KEY, config.to_dict())
    return model


def _checked_stream(model: nn.Module, structure) -> StreamStructure:
    """The residual stream of `model`, refused (before anything changes) where masking it would not be exact."""
    wrapped = next((name for name, module in model.named_modules() if wrapped_linear(module) is not None), None)
    if wrapped is not None:
        raise ValueError(
            f"{wrapped} is wrapped by a LoRA adapter: hidden-size pruning does not slice adapters yet. Leave "
            "`prune_hidden` off, or prune the hidden size before adding the adapters."
        )
    stream = find_stream(model, structure)
    for path in stream.norms:
        check_maskable_norm(path, model.get_submodule(path))
    return stream


def _stream_weights(model: nn.Module, stream: StreamStructure) -> float:
    """Weights one hidden channel governs: a column of every table and reader, a row of every writer, one entry per
    norm (each shared tensor counted once)."""
    seen, total = set(), 0
    for path in stream.embeddings + stream.readers + stream.writers:
        module = model.get_submodule(path)
        if is_constant_output(module):  # a removed sublayer's constant: one bias entry per channel, if any
            total += int(module.bias is not None)
            continue
        weight = module.weight if isinstance(module, nn.Embedding) else linear_weight(module)
        if id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += weight.shape[1] if path in stream.writers else weight.shape[0]
    return float(total + len(stream.norms))


def _mask_stream(model: nn.Module, stream: StreamStructure, config: BlockPruningConfig, score_scale: float,
                 channel_weights: float) -> None:
    """Put one set of hidden scores on the model: every norm of the stream becomes a `MaskedNorm` sharing it."""
    first = model.get_submodule(stream.norms[0])
    scores = _new_scores((stream.size,), config, "hidden", score_scale, first)
    scores.weights_per_block = channel_weights
    for index, path in enumerate(stream.norms):
        _replace(model, path, MaskedNorm(model.get_submodule(path), scores, owns_scores=index == 0))
    for path in stream.sources:
        _replace(model, path, MaskedSource(model.get_submodule(path), scores))


def hidden_scores(model: nn.Module) -> BlockScores | None:
    """The hidden-size scores of a masked `model` (`prune_hidden`), or `None`."""
    return next((module.scores_module for module in model.modules() if isinstance(module, MaskedNorm)), None)


def unmask_stream(model: nn.Module) -> None:
    """Put the norms of the stream back in place of their `MaskedNorm`s (their hidden mask is dropped)."""
    masked = [(name, module) for name, module in model.named_modules()
              if isinstance(module, (MaskedNorm, MaskedSource))]
    for name, module in masked:
        _replace(model, name, module.base_layer)
    if masked:
        forget_stream(model)


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
    if merge and hidden_scores(model) is not None:
        raise ValueError(
            "This model's hidden size is masked (`prune_hidden`): the mask cannot be merged into the weights (its "
            "norms compute over the kept channels only). compact_model removes the pruned channels; "
            "remove_block_pruning(model, merge=False) drops the masks."
        )
    unmask_stream(model)
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
