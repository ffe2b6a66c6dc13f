"""Load models compacted by hf_blockprune, whose layers have per-layer head counts and FFN sizes.

This file is self-contained (it imports only torch and transformers): hf_blockprune saves a copy of it next to the
weights, with an `auto_map` in `config.json`, so that plain transformers loads the model with
`AutoModelFor...from_pretrained(path, trust_remote_code=True)`. The `auto_map` also names `AutoModel`, the bare base
model (`BlockPrunedBertModel` of a compacted `BertForSequenceClassification`), which sentence-transformers builds: its
layers are found without the task model's `base_model_prefix` (see `rebase_layout`).

`BlockPruned<Class>` (e.g. `BlockPrunedBertForSequenceClassification`) is `<Class>` from transformers whose
`__init__` resizes the Linear layers named in `config.blockprune_layout` (written by `hf_blockprune.compact_model`):
per layer, the kept heads of each attention block (and the head size) and the FFN size. The normal `from_pretrained`
pipeline then loads the weights into layers of the right shapes; a checkpoint whose shapes differ fails to load.

Its config class `BlockPruned<Config>` (e.g. `BlockPrunedBertConfig`) has the model type `blockpruned_<type>` (e.g.
`blockpruned_bert`), which plain transformers does not know: without `trust_remote_code=True` it stops at once with
an error that asks for it, instead of building a full-size model and failing (or, with `ignore_mismatched_sizes`,
re-initialising the pruned layers). Folders saved before this (model type `bert`, no `AutoConfig` in `auto_map`) still
load.

Layout versions: 1; 2, where an attention record may say `"placeholder": true`: besides its kept `"heads"` (none,
then) it holds one head slot of zero weights, so that generation's KV cache has a real length; 3, where a
grouped-query attention record lists its query `"slots"` and `"kv_heads"` (`null`: a zero slot), and a gated FFN its
`"inputs"`; 4, where a record may name a `"fused"` projection (GPT-2's `c_attn`: the query, key and value rows in one
module; ModernBERT's `Wi`: the FFN inputs in one module) and `"head_rows"` projections (one block of rows per kept
head, DeBERTa-v2's relative-position projections); 5, where the hidden size was compacted: `"hidden"` gives its
`"size"` and the modules of the residual stream by path, the `"embeddings"` tables and `"readers"` (one column per
channel), the `"writers"` (one row per channel) and the `"norms"`, all resized to it (a tensor shared by several of
them, as tied embeddings are, stays shared). The config keeps the original hidden size, which the model's code reads
for its constants (BART's embedding scale, the head size). transformers' `Conv1D` (weight stored transposed) is resized
like an `nn.Linear`; 6, where a sublayer left with no unit is removed: an attention record with `"removed": true`
has its attention module (`"module"`) replaced by a `RemovedAttention` and an FFN record with `"removed": true` has its
input projections replaced by `InputStub`s; the output projection of either becomes a `ConstantOutput`, which outputs
the sublayer's constant contribution (its folded bias, or zero) at every position, and the norm only it read
(`"input_norm"`, a pre-norm layer's) an `nn.Identity` (see `remove_sublayers`).
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

LAYOUT_ATTRIBUTE = "blockprune_layout"
SUPPORTED_LAYOUT_VERSIONS = (1, 2, 3, 4, 5, 6)
CLASS_PREFIX = "BlockPruned"
MODEL_TYPE_PREFIX = "blockpruned_"
_HEAD_COUNT_ATTRIBUTES = ("num_attention_heads", "num_heads", "n_heads")
_KV_HEAD_COUNT_ATTRIBUTES = ("num_key_value_heads", "num_kv_heads")
_GROUP_ATTRIBUTE = "num_key_value_groups"


def _resized(linear: nn.Module, out_features: int, in_features: int) -> nn.Module:
    """A new Linear (or `Conv1D`) of the given shape, on the same device and dtype (weights are loaded later)."""
    weight = linear.weight
    if isinstance(linear, Conv1D):
        return Conv1D(out_features, in_features).to(device=weight.device, dtype=weight.dtype)
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)


def _features(linear: nn.Module) -> tuple[int, int]:
    """`(out_features, in_features)` of an `nn.Linear` or `Conv1D`."""
    out_features, in_features = linear.weight.shape
    return (in_features, out_features) if isinstance(linear, Conv1D) else (out_features, in_features)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


def _linear(layer: nn.Module, layer_path: str, path: str) -> nn.Module:
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise ValueError(
            f"config.{LAYOUT_ATTRIBUTE} names {layer_path}.{path}, which is not an nn.Linear of this model: the saved "
            "pruning layout does not match the model class."
        )
    return module


def _resize_rows(layer: nn.Module, layer_path: str, path: str, rows: int) -> None:
    linear = _linear(layer, layer_path, path)
    _replace(layer, path, _resized(linear, rows, _features(linear)[1]))


def _head_slots(attention: dict) -> tuple[int, int]:
    """`(query slots, key/value slots)` in the weights of a layout record (placeholder and padding slots included)."""
    if "slots" in attention:
        return len(attention["slots"]), len(attention["kv_heads"])
    slots = len(attention["heads"]) + int(bool(attention.get("placeholder", False)))
    return slots, slots


def set_head_counts(module: nn.Module, heads: int, kv_heads: int, head_dim: int) -> None:
    """Make an attention module's head-count attributes describe its resized projections, where it has them.

    `num_attention_heads` / `num_heads` / `n_heads`, the key/value head count, `num_key_value_groups` (query heads
    per key/value head, read by transformers' attention functions), `all_head_size` and `split_size` (GPT-2).
    """
    for name in _HEAD_COUNT_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, heads)
    for name in _KV_HEAD_COUNT_ATTRIBUTES:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, kv_heads)
    if isinstance(getattr(module, _GROUP_ATTRIBUTE, None), int):
        setattr(module, _GROUP_ATTRIBUTE, max(heads // max(kv_heads, 1), 1))
    if isinstance(getattr(module, "all_head_size", None), int):
        module.all_head_size = heads * head_dim
    if isinstance(getattr(module, "split_size", None), int):  # GPT-2: the width of each of query, key and value
        module.split_size = heads * head_dim


def _shrink_attention(layer: nn.Module, layer_path: str, attention: dict) -> None:
    heads, kv_heads = _head_slots(attention)
    head_dim = attention["head_dim"]
    if "fused" in attention:
        _resize_rows(layer, layer_path, attention["fused"], (heads + 2 * kv_heads) * head_dim)
    else:
        for role, slots in (("query", heads), ("key", kv_heads), ("value", kv_heads)):
            _resize_rows(layer, layer_path, attention[role], slots * head_dim)
    for path in attention.get("head_rows", []):
        _resize_rows(layer, layer_path, path, heads * head_dim)
    output = _linear(layer, layer_path, attention["output"])
    _replace(layer, attention["output"], _resized(output, _features(output)[0], heads * head_dim))
    parent_path = attention.get("fused", attention["query"]).rpartition(".")[0]
    set_head_counts(layer.get_submodule(parent_path) if parent_path else layer, heads, kv_heads, head_dim)


def _shrink_ffn(layer: nn.Module, layer_path: str, ffn: dict) -> None:
    inputs = ffn.get("inputs", [ffn.get("input")])
    if "fused" in ffn:
        _resize_rows(layer, layer_path, ffn["fused"], len(inputs) * ffn["size"])
    else:
        for path in inputs:
            _resize_rows(layer, layer_path, path, ffn["size"])
    ffn_output = _linear(layer, layer_path, ffn["output"])
    _replace(layer, ffn["output"], _resized(ffn_output, _features(ffn_output)[0], ffn["size"]))


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _layer_path(model: nn.Module, path: str) -> str | None:
    """Where the layer `path` of a layout lies in `model`, or `None`.

    A layout records paths relative to the model that was compacted: a task model's (`bert.encoder.layer.0`) lie
    under its base model's `base_model_prefix`, which the bare base model (`AutoModel`, as sentence-transformers loads
    it) does not have (`encoder.layer.0`); a bare model's paths lack the prefix a task model adds.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    candidates = [path]
    if prefix:
        candidates += [path[len(prefix) + 1 :]] if path.startswith(prefix + ".") else [f"{prefix}.{path}"]
    return next((candidate for candidate in candidates if _has_submodule(model, candidate)), None)


def _rebase_hidden(model: nn.Module, hidden: dict) -> dict:
    """The hidden record with its paths as they lie in `model`; a reader `model` lacks (the task head, for the bare
    base model) is left out, any other missing module refused."""
    rebased = dict(hidden)
    for key in ("embeddings", "norms", "readers", "writers"):
        paths = []
        for path in hidden.get(key, []):
            found = _layer_path(model, path)
            if found is None and key != "readers":
                raise ValueError(
                    f"config.{LAYOUT_ATTRIBUTE} names {path!r} in the hidden stream, which {type(model).__name__} "
                    "does not have."
                )
            if found is not None:
                paths.append(found)
        rebased[key] = paths
    return rebased


def rebase_layout(model: nn.Module, layout: dict) -> dict:
    """`layout` with its layer paths as they lie in `model` (see `_layer_path`); the same dict if none moves.

    Args:
        model (`nn.Module`): the model the layout is applied to (a task model or its bare base model).
        layout (`dict`): `config.blockprune_layout` of a compacted model.

    Raises:
        `ValueError`: a layer of the layout is not in `model`, with or without the base-model prefix.
    """
    layers = {}
    for path, entry in layout.get("layers", {}).items():
        found = _layer_path(model, path)
        if found is None:
            raise ValueError(
                f"config.{LAYOUT_ATTRIBUTE} names layer {path!r}, which {type(model).__name__} does not have."
            )
        layers[found] = entry
    rebased = layout if list(layers) == list(layout.get("layers", {})) else {**layout, "layers": layers}
    if "hidden" in layout:
        hidden = _rebase_hidden(model, layout["hidden"])
        if hidden != layout["hidden"]:
            rebased = {**rebased, "hidden": hidden}
    return rebased


def _shrink_stream(model: nn.Module, hidden: dict) -> None:
    """Resize the modules of the residual stream to `hidden["size"]` channels (see the module docstring)."""
    size = hidden["size"]
    resized: dict[int, nn.Parameter] = {}

    def new(parameter: nn.Parameter, shape: tuple[int, ...]) -> nn.Parameter:
        if id(parameter) not in resized:
            resized[id(parameter)] = nn.Parameter(parameter.new_zeros(shape), parameter.requires_grad)
        return resized[id(parameter)]

    for path in hidden["embeddings"]:
        table = model.get_submodule(path)
        table.weight = new(table.weight, (table.weight.shape[0], size))
        table.embedding_dim = size
    for path in hidden["readers"] + hidden["writers"]:
        linear = model.get_submodule(path)
        if not isinstance(linear, (nn.Linear, Conv1D)):
            raise ValueError(f"config.{LAYOUT_ATTRIBUTE} names {path}, which is not an nn.Linear of this model.")
        out_features, in_features = _features(linear)
        if path in hidden["readers"]:
            in_features = size
        else:
            out_features = size
            if linear.bias is not None:
                linear.bias = new(linear.bias, (size,))
        conv1d = isinstance(linear, Conv1D)
        linear.weight = new(linear.weight, (in_features, out_features) if conv1d else (out_features, in_features))
        if conv1d:
            linear.nx, linear.nf = in_features, out_features
        else:
            linear.in_features, linear.out_features = in_features, out_features
    for path in hidden["norms"]:
        norm = model.get_submodule(path)
        for name in ("weight", "bias"):
            parameter = getattr(norm, name, None)
            if isinstance(parameter, nn.Parameter):
                setattr(norm, name, new(parameter, (size,)))
        if isinstance(norm, nn.LayerNorm):
            norm.normalized_shape = (size,)


class ConstantOutput(nn.Module):
    """The output projection of a removed sublayer: its bias (or zero) at every position, whatever the input.

    Args:
        out_features (`int`): the width of the output (the hidden size).
        bias (`torch.Tensor`, *optional*): the constant (copied); `None`: the sublayer adds exactly 0.

    Example:
        >>> import torch
        >>> from hf_blockprune.structure.modeling_blockprune import ConstantOutput
        >>> out = ConstantOutput(3, torch.tensor([1.0, 2.0, 3.0]))(torch.randn(2, 5, 1))
        >>> out.shape, out[1, 4].tolist()
        (torch.Size([2, 5, 3]), [1.0, 2.0, 3.0])
    """

    def __init__(self, out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features = out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), bias.requires_grad)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = (*hidden_states.shape[:-1], self.out_features)
        if self.bias is None:
            return hidden_states.new_zeros(shape)
        return self.bias.expand(shape).contiguous()  # a tensor of its own: the caller may add into it in place


class InputStub(nn.Module):
    """An input projection of a removed FFN: the first `width` channels of its input, whose values nothing reads (the
    output is a `ConstantOutput`); `width` is the number of parts a fused input projection is cut into.

    Example:
        >>> import torch
        >>> from hf_blockprune.structure.modeling_blockprune import InputStub
        >>> InputStub(2)(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 2])
    """

    def __init__(self, width: int = 1):
        super().__init__()
        self.width = width

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[..., : self.width]


class RemovedAttention(nn.Module):
    """An attention module with no head left: returns `(output, None)` as transformers' attention modules do.

    The output is its `ConstantOutput` child (at the output projection's path, when that lies inside the module), else
    the first channel of its input, which the `ConstantOutput` that replaced the output projection outside it reads
    only for its shape (BERT's `attention.output.dense`). An attention that gives generation's KV cache its length
    (`caches`) writes one zero key and value of size 1 per position into the cache at its `layer_idx`, so that the
    cache length, the positions and the masks stay right.

    Example:
        >>> import torch
        >>> from hf_blockprune.structure.modeling_blockprune import ConstantOutput, RemovedAttention
        >>> attention = RemovedAttention(output="o_proj", constant=ConstantOutput(4, torch.ones(4)))
        >>> output, weights = attention(torch.randn(1, 3, 4), attention_mask=None)
        >>> output.shape, weights
        (torch.Size([1, 3, 4]), None)
    """

    def __init__(self, output: str | None = None, constant: ConstantOutput | None = None, layer_idx: int | None = None,
                 caches: bool = False):
        super().__init__()
        self.output_path, self.layer_idx, self.caches = output, layer_idx, caches
        if output is not None:
            _put(self, output, constant)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if self.caches and cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache: its self-attention part
            zeros = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)  # (B, 1, T, 1)
            cache.update(zeros, zeros, self.layer_idx)
        if self.output_path is None:
            return hidden_states[..., :1], None
        return self.get_submodule(self.output_path)(hidden_states), None


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    """Set `module` at the dotted `path` under `root`, creating empty parent modules as needed."""
    *parents, name = path.split(".")
    for parent in parents:
        if not hasattr(root, parent):
            root.add_module(parent, nn.Module())
        root = getattr(root, parent)
    root.add_module(name, module)


def _constant_output(layer: nn.Module, layer_path: str, path: str) -> ConstantOutput:
    output = _linear(layer, layer_path, path)
    return ConstantOutput(_features(output)[0], output.bias)


def _remove_attention(layer: nn.Module, layer_path: str, attention: dict) -> None:
    module_path, output = attention["module"], attention["output"]
    module = layer.get_submodule(module_path)
    constant = _constant_output(layer, layer_path, output)
    inner = output[len(module_path) + 1:] if output.startswith(module_path + ".") else None  # its path in the module
    if inner is None:  # the output projection lies outside the attention module (BERT's `attention.output.dense`)
        _replace(layer, output, constant)
    removed = RemovedAttention(inner, constant if inner else None, getattr(module, "layer_idx", None),
                               bool(attention.get("caches")))
    _replace(layer, module_path, removed)
    _remove_input_norm(layer, attention)


def _remove_input_norm(layer: nn.Module, record: dict) -> None:
    """The norm only the removed sublayer read (`"input_norm"`, a pre-norm layer's) goes too: nothing reads it now."""
    if record.get("input_norm"):
        _replace(layer, record["input_norm"], nn.Identity())


def _remove_ffn(layer: nn.Module, layer_path: str, ffn: dict) -> None:
    constant = _constant_output(layer, layer_path, ffn["output"])
    inputs = ffn.get("inputs", [ffn.get("input")])
    if "fused" in ffn:
        _replace(layer, ffn["fused"], InputStub(len(inputs)))
    else:
        for path in inputs:
            _replace(layer, path, InputStub())
    _replace(layer, ffn["output"], constant)
    _remove_input_norm(layer, ffn)


def is_constant_output(module: nn.Module) -> bool:
    """Whether `module` is the `ConstantOutput` of a removed sublayer (also one loaded through remote code).

    Example:
        >>> from torch import nn
        >>> from hf_blockprune.structure.modeling_blockprune import ConstantOutput, is_constant_output
        >>> is_constant_output(ConstantOutput(4)), is_constant_output(nn.Linear(2, 4))
        (True, False)
    """
    return _is(module, ConstantOutput)


def _is(module: nn.Module, cls: type) -> bool:
    """`isinstance` by class name: a model loaded through `trust_remote_code` holds this file's classes under another
    module (transformers' copy of this file)."""
    return type(module).__name__ == cls.__name__


@torch.no_grad()
def remove_sublayers(model: nn.Module, layout: dict) -> nn.Module:
    """Replace the sublayers `layout` records as removed (`"removed": true`) by modules that output their constant
    contribution (see `RemovedAttention`, `ConstantOutput`, `InputStub`), in place; each constant is the bias of the
    output projection it replaces (the folded contribution of a compacted model, or the placeholder a freshly built
    one loads its weights into).

    Args:
        model (`nn.Module`): a model whose layers have the layout's shapes (compacted, or resized by
            `shrink_to_layout`), with paths as in the layout (see `rebase_layout`).
        layout (`dict`): `config.blockprune_layout`.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from hf_blockprune.structure.modeling_blockprune import shrink_to_layout
        >>> model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        ...                              intermediate_size=37))
        >>> ffn = {"input": "intermediate.dense", "output": "output.dense", "size": 0, "removed": True}
        >>> layout = {"version": 6, "layers": {"encoder.layer.0": {"attention": [], "ffn": ffn}}}
        >>> layer = shrink_to_layout(model, layout).encoder.layer[0]  # resized, then the FFN removed
        >>> type(layer.intermediate.dense).__name__, type(layer.output.dense).__name__
        ('InputStub', 'ConstantOutput')
    """
    for layer_path, entry in layout.get("layers", {}).items():
        layer = model.get_submodule(layer_path)
        for attention in entry.get("attention", []):
            if attention.get("removed") and not _is(layer.get_submodule(attention["module"]), RemovedAttention):
                _remove_attention(layer, layer_path, attention)
        ffn = entry.get("ffn") or {}
        if ffn.get("removed") and not _is(layer.get_submodule(ffn["output"]), ConstantOutput):
            _remove_ffn(layer, layer_path, ffn)
    return model


@torch.no_grad()
def shrink_to_layout(model: nn.Module, layout: dict) -> nn.Module:
    """Resize the Linear layers of `model` to the shapes recorded in `layout`, in place (weights to be loaded).

    The layout's layer paths may be those of the task model it was compacted as while `model` is the bare base
    model, or the other way round (see `rebase_layout`).

    Args:
        model (`nn.Module`): a freshly built, full-size transformers model.
        layout (`dict`): `config.blockprune_layout` of a compacted model.

    Raises:
        `ValueError`: the layout's version is unknown or it names modules this model does not have.
    """
    if layout.get("version") not in SUPPORTED_LAYOUT_VERSIONS:
        raise ValueError(
            f"config.{LAYOUT_ATTRIBUTE} has version {layout.get('version')!r}; this loader reads versions "
            f"{list(SUPPORTED_LAYOUT_VERSIONS)}. Upgrade hf_blockprune (or re-save the model with this version)."
        )
    layout = rebase_layout(model, layout)
    if "hidden" in layout:  # first: the layers' projections below are rebuilt with their current hidden width
        _shrink_stream(model, layout["hidden"])
    for layer_path, entry in layout.get("layers", {}).items():
        layer = model.get_submodule(layer_path)
        for attention in entry.get("attention", []):
            _shrink_attention(layer, layer_path, attention)
        if "ffn" in entry:
            _shrink_ffn(layer, layer_path, entry["ffn"])
    return remove_sublayers(model, layout)


# Class-name suffix -> the auto class that loads it (first match wins).
_AUTO_CLASSES = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),  # GPT-2
    ("ForImageClassification", "AutoModelForImageClassification"),
    ("ForAudioClassification", "AutoModelForAudioClassification"),
)


def base_class(cls: type) -> type:
    """The transformers class behind a generated class (`BlockPruned<X>`, ... -> `X`); other classes unchanged."""
    return getattr(cls, "_blockprune_base", cls)


def auto_class_name(model_class: type) -> str:
    """Name of the transformers auto class that loads `model_class` (e.g. `"AutoModelForSequenceClassification"`)."""
    name = base_class(model_class).__name__
    return next((auto for suffix, auto in _AUTO_CLASSES if name.endswith(suffix)), "AutoModel")


def base_model_type(model_type: str | None) -> str | None:
    """The transformers model type behind a compacted model's (`"blockpruned_bert"` -> `"bert"`); others unchanged."""
    if isinstance(model_type, str) and model_type.startswith(MODEL_TYPE_PREFIX):
        return model_type[len(MODEL_TYPE_PREFIX) :]
    return model_type


_CLASSES: dict[str, type] = {}


def block_pruned_config_class(base: type) -> type:
    """`BlockPruned<base>`: the config class `base` under the model type `blockpruned_<base.model_type>`.

    Saved with an `AutoConfig` entry in `auto_map`, so that plain transformers asks for `trust_remote_code=True`.
    """
    base = base_class(base)
    name = CLASS_PREFIX + base.__name__
    if name not in _CLASSES:
        _CLASSES[name] = type(
            name,
            (base,),
            {
                "model_type": MODEL_TYPE_PREFIX + base.model_type,
                "__module__": __name__,
                "__doc__": f"`{base.__name__}` of a model compacted by hf_blockprune (see `{LAYOUT_ATTRIBUTE}`).",
                "_blockprune_base": base,
                "_auto_class": "AutoConfig",
            },
        )
    return _CLASSES[name]


def add_base_model_to_auto_map(model: nn.Module) -> None:
    """Give `model.config.auto_map` an `AutoModel` entry: the `BlockPruned` class of the model's bare base model.

    sentence-transformers (and anyone calling `AutoModel`) builds the bare base model (`BertModel`) of a task
    checkpoint (`BertForSequenceClassification`); transformers loads the task model's weights into it (it drops the
    base-model prefix), and `rebase_layout` finds the layers there. Nothing is added when transformers has no class of
    that name (this file could not build it).

    Args:
        model (`nn.Module`): a compacted transformers model (a task model or a bare base model); changed in place.
    """
    name = base_class(type(getattr(model, "base_model", model))).__name__
    known = getattr(transformers, name, None)
    if not (isinstance(known, type) and issubclass(known, transformers.PreTrainedModel)):
        return
    auto_map = dict(getattr(model.config, "auto_map", None) or {})
    auto_map["AutoModel"] = f"{__name__.rpartition('.')[2]}.{CLASS_PREFIX}{name}"
    model.config.auto_map = auto_map


def block_pruned_class(base: type) -> type:
    """`BlockPruned<base>`: `base` whose `__init__` resizes its layers to `config.blockprune_layout`.

    Its `config_class` is `block_pruned_config_class(base.config_class)`, and it saves this file and an `auto_map`
    (its auto class, `AutoConfig`, and `AutoModel` for its bare base model, see `add_base_model_to_auto_map`) with its
    weights.
    """
    base = base_class(base)
    name = CLASS_PREFIX + base.__name__
    if name not in _CLASSES:

        def __init__(self, config, *args, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            layout = getattr(self.config, LAYOUT_ATTRIBUTE, None)
            if layout:
                # the paths of this model (a task model's layout, loaded as its bare base model, loses the prefix)
                layout = rebase_layout(self, layout)
                setattr(self.config, LAYOUT_ATTRIBUTE, layout)
                shrink_to_layout(self, layout)

        def save_pretrained(self, save_directory, *args, **kwargs):
            add_base_model_to_auto_map(self)
            return base.save_pretrained(self, save_directory, *args, **kwargs)

        def _get_name(self):
            # transformers' Trainer decides by this name whether a model is a causal LM (label smoothing shifts the
            # labels then): answer as the transformers class does
            return base.__name__

        _CLASSES[name] = type(
            name,
            (base,),
            {
                "__init__": __init__,
                "save_pretrained": save_pretrained,
                "_get_name": _get_name,
                "__module__": __name__,
                "__doc__": f"`{base.__name__}` with per-layer head counts and FFN sizes (see `{LAYOUT_ATTRIBUTE}`).",
                "_blockprune_base": base,
                "_auto_class": auto_class_name(base),
                "config_class": block_pruned_config_class(base.config_class),
            },
        )
    return _CLASSES[name]


def as_block_pruned(model: nn.Module) -> nn.Module:
    """Give a compacted `model` (and its config) the `BlockPruned` classes, in place, so that it saves its loader."""
    model.__class__ = block_pruned_class(type(model))
    model.config.__class__ = block_pruned_config_class(type(model.config))
    return model


def __getattr__(name: str):
    """Module-level classes `BlockPruned<Class>` for model and config classes of transformers, made on first use."""
    if name.startswith(CLASS_PREFIX):
        base = getattr(transformers, name[len(CLASS_PREFIX) :], None)
        if isinstance(base, type) and issubclass(base, transformers.PreTrainedModel):
            return block_pruned_class(base)
        if isinstance(base, type) and issubclass(base, transformers.PretrainedConfig):
            return block_pruned_config_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
