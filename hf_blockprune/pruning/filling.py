"""The filled stage of hybrid-filled pruning: surviving heads become dense again, the FFN structure is frozen."""

from __future__ import annotations

import torch
from torch import nn

from ..structure.discovery import prunable_layers
from .layer import BlockScores, MaskedLinear
from .report import dead_heads, weight_mask


def _head_rows(num_heads: int, width: int, alive: list[int], like: torch.Tensor) -> torch.Tensor:
    """A `(width,)` {0, 1} vector: 1 on the rows (or columns) of the heads in `alive`."""
    per_head = torch.zeros(num_heads, dtype=like.dtype, device=like.device)
    per_head[alive] = 1.0
    return per_head.repeat_interleave(width // num_heads)


@torch.no_grad()
def _fill_attention(attention) -> None:
    if attention.real_heads == 0:  # compacted to no head before (or only a zero placeholder): nothing to refill
        return
    dead = set(dead_heads(attention))
    alive = [slot for slot, head in enumerate(attention.slots) if head is not None and slot not in dead]
    alive_kv = sorted({slot // attention.group for slot in alive})
    for linear, slots, count in ((attention.query, alive, attention.num_heads),
                                 (attention.key, alive_kv, attention.num_kv_heads),
                                 (attention.value, alive_kv, attention.num_kv_heads)):
        rows = _head_rows(count, linear.out_features, slots, linear.weight)
        _freeze(linear, rows[:, None].expand_as(linear.weight))
    output = attention.output
    cols = _head_rows(attention.num_heads, output.in_features, alive, output.weight)
    _freeze(output, cols[None, :].expand_as(output.weight))


@torch.no_grad()
def _freeze(linear: nn.Module, mask: torch.Tensor) -> None:
    if not isinstance(linear, MaskedLinear):
        return
    # Zero what the block mask removed, so the function does not jump at the switch and filled blocks start at 0,
    # as they do when filling starts from a saved compacted model. Not again on resume: they have trained since.
    if not linear.scores_module.filled_value:
        linear.base_layer.weight.mul_(weight_mask(linear))
    linear.fix_mask(mask.contiguous())


def fill_surviving_heads(model: nn.Module) -> None:
    """Switch a masked model to the filled stage, in place.

    Every head that is not dead (see `report.dead_heads`) becomes dense: its masked blocks are zeroed and become
    trainable. Dead heads stay removed, and the FFN (and hidden-size) masks are frozen as they are. The scores no
    longer take gradients (`requires_grad=False`), so the optimizer leaves them alone. On a model restored from a
    checkpoint taken after the switch, only the masks are rebuilt (from the scores, which have not moved since).
    """
    for layer in prunable_layers(model):
        for attention in layer.attentions:
            _fill_attention(attention)
        for linear in (*layer.ffn_inputs, layer.ffn_output):
            if isinstance(linear, MaskedLinear):
                _freeze(linear, weight_mask(linear))
    for module in model.modules():
        if isinstance(module, BlockScores):  # the hidden scores (`prune_hidden`) too: the stream is frozen as well
            module.scores.requires_grad_(False)
            module.mark_filled()


def is_filled(model: nn.Module) -> bool:
    """Whether `fill_surviving_heads` has been applied to `model`."""
    return any(isinstance(m, MaskedLinear) and m.fixed_mask is not None for m in model.modules())
