"""A model's prunable layers bound to its modules: the projections of each attention and FFN, as consumers use them.

These are views, built from a `ModelStructure` (`hf_blockprune.structure.model_structure`) by `ModelStructure.bind`:
they hold references to the model's modules, so they are made fresh whenever a consumer needs them and never kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from .architectures import AttentionSpec, FFNSpec
from .projections import ProjectionView, SplitProjection


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

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> from hf_blockprune.structure.discovery import prunable_layers
        >>> model = BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        ...                              intermediate_size=37))
        >>> attention = prunable_layers(model)[0].attentions[0]
        >>> attention.num_heads, attention.head_dim, attention.query is model.encoder.layer[0].attention.self.query
        (4, 8, True)
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

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from hf_blockprune.structure.discovery import prunable_layers
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
        ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
        >>> layer = prunable_layers(model)[0]
        >>> layer.name, list(layer.ffn_paths())
        ('model.layers.0', ['input', 'input.1', 'output'])
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


# Checks of a projection before its shape is read, `check(full_path, module)` raising `ValueError`: registered by the
# integrations whose wrappers hide the shape (peft's LoRA over a `Conv1D`, `hf_blockprune.integrations.peft`).
MODULE_CHECKS: list[Callable[[str, nn.Module], None]] = []


def submodule(layer: nn.Module, layer_name: str, path: str) -> nn.Module:
    """The module at `path` in `layer` (named `layer_name` in the model), passed through `MODULE_CHECKS`.

    Raises:
        `ValueError`: `layer` has no such module (naming both), or a check refuses it.
    """
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        raise ValueError(f"Layer {layer_name!r} has no module {path!r}; check the module names.") from None
    for check in MODULE_CHECKS:
        check(f"{layer_name}.{path}", module)
    return module


def has_module(layer: nn.Module, path: str) -> bool:
    """Whether `layer` has a module at `path`."""
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True


def projection(layer: nn.Module, layer_name: str, path: str) -> nn.Module:
    """The module at `path`; a `Conv1D` is read through a `ProjectionView` (its weight is stored transposed)."""
    module = submodule(layer, layer_name, path)
    return ProjectionView(module, path) if type(module).__name__ == "Conv1D" else module


def width(layer: nn.Module, layer_name: str, path: str) -> int:
    """Output features of the projection at `path` (summed over the parts of a split fused projection); 0 for a
    module that is not a projection (refused by the checks that follow)."""
    module = submodule(layer, layer_name, path)
    if isinstance(module, SplitProjection):
        return sum(module.get_submodule(name).out_features for name in module.part_names)
    return getattr(projection(layer, layer_name, path), "out_features", 0)


def fused_parts(layer: nn.Module, layer_name: str, fused: str, paths: list[str], sizes: list[int]) -> list[nn.Module]:
    """The parts of the fused projection at `fused`: its `SplitProjection` children once split, else views of
    consecutive rows of `sizes`.

    Raises:
        `ValueError`: the projection's output does not split into `sizes`.
    """
    module = submodule(layer, layer_name, fused)
    if isinstance(module, SplitProjection):
        return [submodule(layer, layer_name, path) for path in paths]
    whole = ProjectionView(module, fused).out_features
    if sum(sizes) != whole:
        raise ValueError(
            f"{layer_name}.{fused} has {whole} output features, which do not split into parts of {sizes}: check the "
            "head counts (`num_heads_attribute`, `num_kv_heads_attribute`)."
        )
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [ProjectionView(module, fused, path.rpartition(".")[2], start, start + size)
            for path, start, size in zip(paths, starts, sizes)]
