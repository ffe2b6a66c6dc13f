"""`sparsity_report`: what the masks keep, layer by layer."""

from __future__ import annotations

import torch
from torch import nn

from .layer import MaskedLinear
from .model import AttentionModules, prunable_layers


@torch.no_grad()
def weight_mask(linear: nn.Module) -> torch.Tensor:
    """The `(out, in)` {0, 1} mask of a layer's weight: its block mask expanded, or all ones for a plain Linear."""
    if not isinstance(linear, MaskedLinear):
        return torch.ones_like(linear.weight)
    return linear.full_mask()


@torch.no_grad()
def dead_heads(attention: AttentionModules) -> list[int]:
    """Head slots whose value rows or output-projection columns are all masked: their contribution is constant.

    A placeholder slot (see `AttentionModules.placeholder`) is not a head: it is never listed.
    """
    if attention.real_heads == 0:
        return []
    value = weight_mask(attention.value)  # (H * d, in)
    output = weight_mask(attention.output)  # (out, H * d)
    heads = attention.num_heads
    value_alive = value.view(heads, -1).any(dim=1)
    output_alive = output.view(output.shape[0], heads, -1).any(dim=0).any(dim=1)
    return [h for h in range(heads) if not (value_alive[h] and output_alive[h])]


@torch.no_grad()
def _density(linears: list[nn.Module]) -> float:
    kept = sum(weight_mask(linear).sum().item() for linear in linears)
    total = sum(linear.weight.numel() for linear in linears)
    return kept / total if total else 1.0


@torch.no_grad()
def sparsity_report(model: nn.Module) -> list[dict]:
    """Per layer: heads entirely pruned, attention block density and FFN neurons kept.

    Returns:
        `list[dict]`: one dict per layer with `layer` (module path), `heads_pruned` (one list of head indices per
        attention block of the layer: self-attention, then cross-attention for decoders; original indices, also for
        a model compacted before), `num_heads` (the real heads each attention block has now: a compacted one's kept
        heads, a placeholder head not counted), `attention_density` (fraction of Q/K/V/O weights kept),
        `ffn_neurons_kept` and `ffn_neurons_total`.
    """
    report = []
    for layer in prunable_layers(model):
        real = [attn for attn in layer.attentions if attn.real_heads]  # a placeholder holds no real weight
        linears = [m for attn in real for m in (attn.query, attn.key, attn.value, attn.output)]
        kept_neurons = total_neurons = 0
        if layer.ffn_input is not None:
            rows_alive = weight_mask(layer.ffn_input).any(dim=1)
            cols_alive = weight_mask(layer.ffn_output).any(dim=0)
            kept_neurons = int((rows_alive & cols_alive).sum().item())
            total_neurons = rows_alive.numel()
        report.append(
            {
                "layer": layer.name,
                "heads_pruned": [[attn.heads[h] for h in dead_heads(attn)] for attn in layer.attentions],
                "num_heads": [attn.real_heads for attn in layer.attentions],
                "attention_density": _density(linears),
                "ffn_neurons_kept": kept_neurons,
                "ffn_neurons_total": total_neurons,
            }
        )
    return report
