"""Binary masks from scores, with straight-through gradients (Sanh et al. 2020, movement pruning).

Both return a {0, 1} mask `M` of the scores' shape in the forward pass and pass the incoming gradient
unchanged to the scores in the backward pass (`dL/dS = dL/dM`), so a score grows when its block's weights move away
from zero and shrinks when they move towards it.
"""

from __future__ import annotations

import torch


def topk_mask(scores: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """`M_i = 1` for the `round(keep_fraction * n)` largest scores `S_i`, else 0; straight-through backward.

    A pure function rather than an `autograd.Function`, which `torch.compile` (torch 2.13) fails to trace here: the
    mask is `hard + (S - S.detach())`, whose value is exactly `hard` (`S - S` is 0 for finite scores) and whose
    gradient to `S` is the mask's.

    Args:
        scores (`torch.Tensor`): the scores, any shape.
        keep_fraction (`float`): a Python float, so no host sync.
    """
    flat = scores.detach().reshape(-1)
    kept = min(flat.numel(), max(0, int(round(keep_fraction * flat.numel()))))
    hard = torch.zeros_like(flat)
    if kept > 0:
        hard[torch.topk(flat, kept, sorted=False).indices] = 1.0
    return hard.view_as(scores) + (scores - scores.detach())


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
        return topk_mask(scores, keep_fraction)
    return SigmoidThresholdBinarizer.apply(scores, score_cut)
