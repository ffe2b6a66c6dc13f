"""A FLOPs cost model of a transformer (masked, compacted or dense) for one sequence of `T` tokens.

One multiply-add is 2 FLOPs. What is counted, per prunable layer (`prunable_layers(model)`), from the actual Linear
shapes (a `MaskedLinear` counts its whole `base_layer` unless `kept_only=True`):

- attention projections: `2 * T * in * out` for each of the query, key, value and output projections (with
  grouped-query attention the key and value projections have the key/value heads' width);
- attention scores: `2 * 2 * T * T_kv * w` for `Q @ K^T` and for `probs @ V`, with `w = heads * head_dim` the query
  projection's output size. `T_kv = T` for self-attention, and for BART's cross-attention too: the decoder sequence
  is taken as long as the encoder sequence (both are `T`);
- FFN: `2 * T * in * out` for each input projection (two in a gated MLP) and for the output projection.

With hidden-size pruning, `in` of every projection reading the stream and `out` of every one writing it is the kept
hidden width, so a projection's cost is the product of its kept channels and its kept heads or neurons.

Fixed cost, which head and neuron pruning does not shrink (hidden-size pruning narrows the inputs of those that read
the stream): the matmuls of every other `nn.Linear` in the model (pooler, classification or LM head, ELECTRA's
embedding projection). The pooler and the heads of sequence-level tasks see one
token per sequence (`POOLED_MODULES`, `SEQUENCE_HEAD_MODULES`), every other fixed Linear sees `T` tokens.

Not counted at all: bias adds, activations, softmax, scaling and masking of the scores, LayerNorm, residual adds,
dropout and embedding lookups. They are elementwise, `O(T * width)` (softmax: `O(T^2 * heads)`), a few percent of the
matmuls at BERT sizes, but memory-bound, so on a CPU they take a larger share of the time than of the FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..pruning.model import is_block_pruned
from ..structure.discovery import prunable_layers, structure_of
from ..structure.layers import AttentionModules, PrunableLayer
from ..structure.projections import ProjectionView, is_projection, linear_weight
from .compaction import LayerPlan, compaction_plan, kept_channels

# Path components of non-prunable Linear layers that see one token per sequence: the pooler reads the first token.
POOLED_MODULES = ("pooler",)
# Heads that read one pooled token (first or EOS) per sequence, in models of the task classes below; the same names
# in other models (e.g. a token-classification `classifier`) see every token.
SEQUENCE_HEAD_MODULES = ("pre_classifier", "classifier", "classification_head", "head")  # head: ModernBERT
SEQUENCE_TASK_SUFFIXES = ("ForSequenceClassification", "ForMultipleChoice")


@dataclass
class FlopsBreakdown:
    """FLOPs of one forward pass over one sequence, by what pruning can shrink.

    Args:
        attention_projections (`int`): query, key, value and output projections of every attention block.
        attention_scores (`int`): `Q @ K^T` and `probs @ V` of every attention block.
        ffn (`int`): both FFN projections of every layer.
        fixed (`int`): the other Linear layers (pooler, heads, embedding projections), which pruning leaves alone.
    """

    attention_projections: int = 0
    attention_scores: int = 0
    ffn: int = 0
    fixed: int = 0

    @property
    def total(self) -> int:
        """All counted FLOPs."""
        return self.attention_projections + self.attention_scores + self.ffn + self.fixed


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    """`2 * tokens * in_features * out_features`: a `(tokens, in) @ (in, out)` matmul."""
    return 2 * tokens * in_features * out_features


def attention_flops(
    attention: AttentionModules, seq_len: int, kept_heads: int | None = None, kept_kv_heads: int | None = None,
    hidden: int | None = None,
) -> tuple[int, int]:
    """FLOPs of one attention block: `(projections, scores)`.

    Args:
        attention (`AttentionModules`): the block, as listed by `prunable_layers`.
        seq_len (`int`): `T`, also used as the key/value length `T_kv`.
        kept_heads (`int`, *optional*): count only this many query slots at full head size; defaults to the
            projections' actual sizes (placeholder and padding slots, which compaction may keep, are computed like
            heads and counted).
        kept_kv_heads (`int`, *optional*): the same for key/value slots (defaults to `kept_heads`, or to the actual
            sizes).
        hidden (`int`, *optional*): count this many channels of the hidden stream (what the query, key and value
            projections read and the output projection writes); defaults to the projections' actual sizes.
    """
    if kept_kv_heads is None:
        kept_kv_heads = kept_heads

    def width(size: int, kept: int | None) -> int:  # the heads' share of a projection side
        return size if kept is None else attention.head_dim * kept

    def stream(size: int) -> int:  # the stream's share of a projection side
        return size if hidden is None else hidden

    projections = linear_flops(
        seq_len, stream(attention.query.in_features), width(attention.query.out_features, kept_heads)
    )
    projections += sum(
        linear_flops(seq_len, stream(linear.in_features), width(linear.out_features, kept_kv_heads))
        for linear in (attention.key, attention.value)
    )
    projections += linear_flops(
        seq_len, width(attention.output.in_features, kept_heads), stream(attention.output.out_features)
    )
    # DeBERTa-v2's relative-position projections run over the position embeddings: counted as `seq_len` rows
    projections += sum(
        linear_flops(seq_len, linear.in_features, width(linear.out_features, kept_heads))
        for linear in attention.head_rows.values()
    )
    scores = 2 * 2 * seq_len * seq_len * width(attention.query.out_features, kept_heads)
    return projections, scores


def ffn_flops(layer: PrunableLayer, seq_len: int, kept_neurons: int | None = None, hidden: int | None = None) -> int:
    """FLOPs of one FFN (every input projection and the output projection), all neurons or `kept_neurons`, at the
    projections' hidden width or `hidden` channels."""
    neurons = layer.ffn_input.out_features if kept_neurons is None else kept_neurons
    expand = sum(linear_flops(seq_len, linear.in_features if hidden is None else hidden, neurons)
                 for linear in layer.ffn_inputs)
    output = layer.ffn_output.out_features if hidden is None else hidden
    return expand + linear_flops(seq_len, neurons, output)


def _prunable_modules(layers: list[PrunableLayer]) -> set[int]:
    """Ids of the prunable projections and of the Linear each `MaskedLinear` wraps."""
    modules = [m for layer in layers for m in layer.linears()]
    modules += [m for layer in layers for attention in layer.attentions for m in attention.head_rows.values()]
    modules += [m.base_layer for m in modules if hasattr(m, "base_layer")]
    modules += [m.source for m in modules if isinstance(m, ProjectionView)]  # a fused or Conv1D projection
    return {id(module) for module in modules}


def _fixed_tokens(model: nn.Module, name: str, seq_len: int) -> int:
    parts = set(name.split("."))
    sequence_task = type(model).__name__.endswith(SEQUENCE_TASK_SUFFIXES)
    if parts & set(POOLED_MODULES) or (sequence_task and parts & set(SEQUENCE_HEAD_MODULES)):
        return 1
    return seq_len


def fixed_flops(model: nn.Module, layers: list[PrunableLayer], seq_len: int, hidden: int | None = None) -> int:
    """Matmul FLOPs of the `nn.Linear` (and `Conv1D`) layers of `model` not among the prunable projections of
    `layers`; with `hidden`, those that read the hidden stream (`StreamStructure.readers`) read that many channels
    and those that write it (ELECTRA's embedding projection) write that many."""
    prunable = _prunable_modules(layers)
    stream = structure_of(model).stream
    counted = stream is not None and hidden is not None
    readers, writers = (set(stream.readers), set(stream.writers)) if counted else (set(), set())
    total = 0
    for name, module in model.named_modules():
        if is_projection(module) and id(module) not in prunable:
            out_features, in_features = linear_weight(module).shape
            path = name.removesuffix(".base_layer")  # a stream source is wrapped while masked
            total += linear_flops(_fixed_tokens(model, name, seq_len), hidden if path in readers else in_features,
                                  hidden if path in writers else out_features)
    return total


def _layer_flops(layer: PrunableLayer, plan: LayerPlan | None, seq_len: int, hidden: int | None) -> FlopsBreakdown:
    flops = FlopsBreakdown()
    for index, attention in enumerate(layer.attentions):
        kept = kept_kv = None
        if plan is not None:
            kept, kept_kv = len(plan.slots[index]), len(plan.kv_slots[index])
        projections, scores = attention_flops(attention, seq_len, kept, kept_kv, hidden)
        flops.attention_projections += projections
        flops.attention_scores += scores
    if layer.has_ffn:
        kept = None if plan is None else len(plan.neurons)
        flops.ffn = ffn_flops(layer, seq_len, kept, hidden)
    return flops


def model_flops(model: nn.Module, seq_len: int, kept_only: bool = False) -> FlopsBreakdown:
    """FLOPs of one forward pass of `model` over one sequence of `seq_len` tokens (see the module docstring).

    Args:
        model (`nn.Module`): a dense, masked (`apply_block_pruning`) or compacted (`compact_model`) model.
        seq_len (`int`): the sequence length `T` (encoder and decoder sequences both, for encoder-decoders).
        kept_only (`bool`, *optional*, defaults to `False`): for a masked model, count only what `compact_model`
            would keep: heads that are not dead (`report.dead_heads`), at full head size, and FFN neurons whose input
            row and output column both survive (`compaction_plan`), at the hidden width the hidden mask keeps
            (`prune_hidden`; the stream's readers outside the layers too). This is the cost of the compacted model.
            With `False`, a masked model costs as much as the dense one. No effect on an unmasked model.

    The layers are those of `structure_of(model)` (a custom architecture's are found with its module patterns when
    it is masked, and kept with the model).

    Returns:
        `FlopsBreakdown`: the counts by kind.
    """
    if seq_len < 1:
        raise ValueError(f"`seq_len` must be >= 1, got {seq_len}.")
    layers = prunable_layers(model)
    masked = kept_only and is_block_pruned(model)
    plans = compaction_plan(model) if masked else [None] * len(layers)
    channels = kept_channels(model) if masked else None
    hidden = None if channels is None else len(channels)
    flops = FlopsBreakdown(fixed=fixed_flops(model, layers, seq_len, hidden))
    for layer, plan in zip(layers, plans, strict=True):
        part = _layer_flops(layer, plan, seq_len, hidden)
        flops.attention_projections += part.attention_projections
        flops.attention_scores += part.attention_scores
        flops.ffn += part.ffn
    return flops


def predicted_speedup(dense_model: nn.Module, pruned_model: nn.Module, seq_len: int) -> float:
    """Speedup the FLOPs model predicts: dense FLOPs / pruned FLOPs at `seq_len`.

    Args:
        dense_model (`nn.Module`): the reference; if masked, its dense cost is counted (it may be `pruned_model`).
        pruned_model (`nn.Module`): a compacted model, or a masked one, counted as it will be once compacted
            (`kept_only=True`).
        seq_len (`int`): the sequence length `T`.

    Returns:
        `float`: the ratio of total FLOPs (`math.inf` if the pruned model has no FLOPs left).
    """
    dense = model_flops(dense_model, seq_len).total
    pruned = model_flops(pruned_model, seq_len, kept_only=is_block_pruned(pruned_model)).total
    return dense / pruned if pruned else math.inf


def hidden_width(model: nn.Module, density: float | None) -> int | None:
    """The hidden channels a hidden-size target keeps: `floor(density * size)` of the model's stream (at least one),
    as the cut on the channel scores realizes it; `None` without a target (`density` `None`).

    Example:
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_blockprune import BlockPruningConfig, apply_block_pruning
        >>> model = apply_block_pruning(BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)),
        ...     BlockPruningConfig.from_preset("struct", prune_hidden=True))
        >>> hidden_width(model, 0.5), hidden_width(model, None)
        (16, None)
    """
    if density is None:
        return None
    stream = structure_of(model).stream
    if stream is None:
        raise ValueError("A hidden-size target needs a model whose hidden size is masked (`prune_hidden`).")
    return max(1, math.floor(density * stream.size * (1 + 1e-6)))


def densities_for_speedup(model: nn.Module, target_speedup: float, seq_len: int,
                          hidden_density: float | None = None) -> dict[str, float]:
    """The attention and FFN target densities that make the cost model predict `target_speedup`.

    Attention projections and scores shrink with the fraction of heads kept and the FFN with the fraction of neurons
    kept; the fixed cost does not shrink. One density `d` for both, `d = (total / target - fixed) / shrinkable`, gives
    exactly the wished cost when whole heads and neurons go (the `struct` preset); with blocks inside heads
    (`hybrid`), a head costs its full size while any of its blocks survives, so the realized speedup is lower.

    With `hidden_density` (hidden-size pruning), the hidden channels keep that fraction (`hidden_width`): the fixed
    cost and the projections are counted at that width, and `d` is what the heads and neurons keep of the rest,
    capped at 1 (the hidden size alone may already meet the target).

    Args:
        model (`nn.Module`): the dense (or masked) model.
        target_speedup (`float`): wished dense / pruned cost, > 1.
        seq_len (`int`): sequence length of the cost model.
        hidden_density (`float`, *optional*): the fraction of hidden channels kept (the model's hidden size must be
            masked).

    Returns:
        `dict[str, float]`: `{"attention": d, "ffn": d}`, and `"hidden"` (the fraction of channels kept) with
        `hidden_density`.

    Raises:
        `ValueError`: the fixed cost alone exceeds the cost the target allows.
    """
    cost = model_flops(model, seq_len)
    total = cost.total
    hidden = hidden_width(model, hidden_density)
    if hidden is not None:
        layers = prunable_layers(model)
        cost = FlopsBreakdown(fixed=fixed_flops(model, layers, seq_len, hidden))
        for layer in layers:
            part = _layer_flops(layer, None, seq_len, hidden)
            cost.attention_projections += part.attention_projections
            cost.attention_scores += part.attention_scores
            cost.ffn += part.ffn
    shrinkable = cost.attention_projections + cost.attention_scores + cost.ffn
    density = (total / target_speedup - cost.fixed) / shrinkable
    if density <= 0:
        raise ValueError(
            f"`target_speedup` {target_speedup} is out of reach at sequence length {seq_len}: the parts pruning "
            f"cannot shrink cost {cost.fixed / total:.1%} of the model, which caps the speedup at "
            f"{total / max(cost.fixed, 1):.1f}x."
        )
    if hidden is None:
        return {"attention": density, "ffn": density}
    size = structure_of(model).stream.size
    return {"attention": min(density, 1.0), "ffn": min(density, 1.0), "hidden": hidden / size}
