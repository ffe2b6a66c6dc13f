"""Binary masks from scores, with straight-through gradients (Sanh et al. 2020, movement pruning).

Both functions return a {0, 1} mask `M` of the scores' shape in the forward pass and pass the incoming gradient
unchanged to the scores in the backward pass (`dL/dS = dL/dM`), so a score grows when its block's weights move away
from zero and shrinks when they move towards it.
"""

from __future__ import annotations

import torch


class TopKBinarizer(torch.autograd.Function):
    """`M_i = 1` for the `round(keep_fraction * n)` largest scores `S_i`, else 0; straight-through backward."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, keep_fraction: float) -> torch.Tensor:
        """Mask keeping the top `keep_fraction` of `scores` (a Python float, so no host sync)."""
        flat = scores.reshape(-1)
        kept = min(flat.numel(), max(0, int(round(keep_fraction * flat.numel()))))
        mask = torch.zeros_like(flat)
        if kept > 0:
            mask[torch.topk(flat, kept, sorted=False).indices] = 1.0
        return mask.view_as(scores)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        """Straight-through: the mask's gradient goes to the scores as is."""
        return grad_output, None


class SigmoidThresholdBinarizer(torch.autograd.Function):
    """`M_i = 1[sigmoid(S_i) > threshold] = 1[S_i > logit(threshold)]`; straight-through backward to the scores.

    The comparison is made in score space (`score_cut = logit(threshold)`), which stays exact where the sigmoid
    saturates in floating point (|S| > ~17).
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, score_cut: torch.Tensor) -> torch.Tensor:
        """Mask of the scores above `score_cut` (a 0-dim tensor, so no host sync)."""
        return (scores > score_cut).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        """Straight-through: the mask's gradient goes to the scores as is."""
        return grad_output, None


def binarize(scores: torch.Tensor, method: str, score_cut: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """Return the {0, 1} mask of `scores` for `method` (`"topk"` or `"sigmoid_threshold"`).

    Args:
        scores (`torch.Tensor`): the scores, any shape.
        method (`str`): `"topk"` uses `keep_fraction`; `"sigmoid_threshold"` uses `score_cut`.
        score_cut (`torch.Tensor`): 0-dim tensor, `logit(threshold)`: scores above it are kept.
        keep_fraction (`float`): fraction of blocks kept by top-k.
    """
    if method == "topk":
        return TopKBinarizer.apply(scores, keep_fraction)
    return SigmoidThresholdBinarizer.apply(scores, score_cut)
