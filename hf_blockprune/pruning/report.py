"""`sparsity_report`: what the masks keep, layer by layer."""

from __future__ import annotations

import torch
from torch import nn

from ..structure.discovery import prunable_layers
from ..structure.layers import AttentionModules
from .layer import MaskedLinear


@torch.no_grad()
def weight_mask(linear: nn.Module) -> torch.Tensor:
    """The `(out, in)` {0, 1} mask of a layer's weight: its block mask expanded, or all ones for a plain Linear."""
    if not isinstance(linear, MaskedLinear):
        return torch.ones_like(linear.weight)
    return linear.full_mask()


@torch.no_grad()
def value_heads_alive(attention: AttentionModules) -> torch.Tensor:
    """`(num_kv_heads,)` bool: the key/value slots with a value row that survives the mask."""
    return weight_mask(attention.value).view(attention.num_kv_heads, -1).any(dim=1)


@torch.no_grad()
def output_heads_alive(attention: AttentionModules) -> torch.Tensor:
    """`(num_heads,)` bool: the query slots with an output-projection column that survives the mask."""
    output = weight_mask(attention.output)  # (out, H * d)
    return output.view(output.shape[0], attention.num_heads, -1).any(dim=0).any(dim=1)


@torch.no_grad()
def dead_heads(attention: AttentionModules) -> list[int]:
    """Query slots whose output-projection columns, or the value rows of their key/value head, are all masked.

    Such a head's contribution is constant (its value bias through its output columns, or zero). Placeholder slots
    (see `AttentionModules.slots`) are not heads: they are never listed.
    """
    if attention.real_heads == 0:
        return []
    value_alive = value_heads_alive(attention)
    output_alive = output_heads_alive(attention)
    return [
        slot
        for slot, head in enumerate(attention.slots)
        if head is not None and not (value_alive[slot // attention.group] and output_alive[slot])
    ]


@torch.no_grad()
def removed_heads(attention: AttentionModules) -> list[int]:
    """The dead heads (`dead_heads`) that compaction removes: all but those whose constant output has nowhere to go.

    A head whose value rows are masked but whose output columns are not outputs its value bias through them; with no
    output-projection bias to fold that constant into (Qwen2's `o_proj`), compaction keeps the head as it is.
    """
    dead = dead_heads(attention)
    if attention.output.bias is None and attention.value.bias is not None:
        output_alive = output_heads_alive(attention)
        dead = [slot for slot in dead if not output_alive[slot]]
    return dead


@torch.no_grad()
def ffn_rows_alive(layer) -> torch.Tensor:
    """`(intermediate,)` bool: FFN neurons with a surviving row in some input projection."""
    rows = torch.stack([weight_mask(linear).any(dim=1) for linear in layer.ffn_inputs])
    return rows.any(dim=0)


@torch.no_grad()
def ffn_neurons_alive(layer) -> torch.Tensor:
    """`(intermediate,)` bool: FFN neurons kept by compaction (a surviving input row and output column)."""
    return ffn_rows_alive(layer) & weight_mask(layer.ffn_output).any(dim=0)


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

    Example:
        >>> import pprint
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_blockprune import BlockPruningConfig, apply_block_pruning, sparsity_report
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> config = BlockPruningConfig.from_preset("struct", initial_threshold=0.5, mask_init_value=1.0)
        >>> model = apply_block_pruning(model, config)  # a block is kept while sigmoid(score) > 0.5
        >>> layer = model.bert.encoder.layer[0]
        >>> with torch.no_grad():  # as training could leave them: 2 heads and 17 FFN neurons below the threshold
        ...     layer.attention.self.query.scores_module.scores[:2] = -1.0
        ...     layer.intermediate.dense.scores_module.scores[:17] = -1.0
        >>> report = sparsity_report(model)
        >>> pprint.pprint(report[0])
        {'attention_density': 0.5,
         'ffn_neurons_kept': 20,
         'ffn_neurons_total': 37,
         'heads_pruned': [[0, 1]],
         'layer': 'bert.encoder.layer.0',
         'num_heads': [4]}
        >>> report[1]["heads_pruned"], report[1]["attention_density"], report[1]["ffn_neurons_kept"]
        ([[]], 1.0, 37)
    """
    report = []
    for layer in prunable_layers(model):
        real = [attn for attn in layer.attentions if attn.real_heads]  # a placeholder holds no real weight
        linears = [m for attn in real for m in (attn.query, attn.key, attn.value, attn.output)]
        kept_neurons = total_neurons = 0
        if layer.has_ffn:
            alive = ffn_neurons_alive(layer)
            kept_neurons = 0 if layer.ffn_placeholder else int(alive.sum().item())
            total_neurons = alive.numel()
        report.append(
            {
                "layer": layer.name,
                "heads_pruned": [[attn.heads[h] for h in removed_heads(attn)] for attn in layer.attentions],
                "num_heads": [attn.real_heads for attn in layer.attentions],
                "attention_density": _density(linears),
                "ffn_neurons_kept": kept_neurons,
                "ffn_neurons_total": total_neurons,
            }
        )
    return report


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """`{"prunable_linear": n, "total": m}`: weights of the prunable Linear layers, and all parameters but scores."""
    linears = {id(m): m for layer in prunable_layers(model) for m in layer.linears()}
    prunable = sum(m.weight.numel() for m in linears.values())
    total = sum(p.numel() for name, p in model.named_parameters() if not name.endswith("block_scores.scores"))
    return {"prunable_linear": prunable, "total": total}
