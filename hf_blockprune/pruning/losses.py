"""Regularization and density terms computed from the block scores."""

from __future__ import annotations

import torch
from torch import nn

from .layer import MaskedLinear
from .model import block_scores


def _weighted_sum(model: nn.Module, kind: str | None, values) -> tuple[torch.Tensor | None, float]:
    total_value, total_weights = None, 0.0
    for scores in block_scores(model):
        if kind is not None and scores.kind != kind:
            continue
        value = values(scores).sum() * scores.weights_per_block
        total_value = value if total_value is None else total_value + value
        total_weights += scores.scores.numel() * scores.weights_per_block
    return total_value, total_weights


def expected_density(model: nn.Module, kind: str | None = None) -> torch.Tensor:
    """Differentiable L1 term: `sum_b n_b * sigmoid(S_b) / sum_b n_b` over all blocks `b` of `model`.

    `n_b` is the number of weights block `b` governs (a shared FFN-neuron score counts its row and its column), so
    the value is the fraction of prunable weights that `sigmoid(scores)` would keep; it is the quantity soft movement
    pruning's L1 penalty drives down.

    Args:
        model (`nn.Module`): a masked model.
        kind (`str`, *optional*): `"attention"` or `"ffn"` to restrict the sum; all blocks by default.
    """
    value, weights = _weighted_sum(model, kind, lambda s: torch.sigmoid(s.effective_scores()))
    if value is None:
        raise ValueError("The model has no block-pruning masks of that kind.")
    return value / weights


@torch.no_grad()
def mask_density(model: nn.Module, kind: str | None = None) -> torch.Tensor:
    """Fraction of prunable weights kept by the current binary masks (a 0-dim tensor; `.item()` it to log)."""
    kept = total = None
    for module in model.modules():
        if isinstance(module, MaskedLinear) and (kind is None or module.scores_module.kind == kind):
            mask = module.full_mask()
            kept = mask.sum() if kept is None else kept + mask.sum()
            total = mask.numel() if total is None else total + mask.numel()
    if kept is None:
        return torch.tensor(1.0)
    return kept / total
