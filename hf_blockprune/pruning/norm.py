"""Hidden-size pruning: one score per channel of the residual stream, and the norms that mask it exactly.

A channel of the residual stream is column `c` of every embedding table and of every projection that reads the stream,
row `c` of every projection that writes it, and entry `c` of every norm. One `BlockScores` of kind `"hidden"` holds one
score per channel for the whole model (every layer reads and writes the same stream). While masked, only the norms
change: `MaskedNorm` computes its statistics (mean and variance for a LayerNorm, mean square for an RMSNorm) over the
kept channels only and zeroes the others in its output. Everything that reads the stream reads a norm's output
(`hf_blockprune.structure.stream` proves it by a probe before anything changes), so it sees zeros on the pruned
channels, and the norms see exactly what the compacted model's narrower norms see: compaction, which slices every
module of the stream to the kept channels, gives the same function, not an approximation. What the writers put on a
pruned channel of the stream is never read.

The mask's straight-through gradient reaches a pruned channel's score too: the norm's output there is computed (with
the kept channels' statistics) before it is multiplied by the mask.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .layer import BlockScores


def norm_kind(module: nn.Module) -> str | None:
    """`"layer"` for an `nn.LayerNorm`, `"rms"` for an RMSNorm of the Llama form (`weight * x / rms(x)`, a class named
    `...RMSNorm` with a `variance_epsilon` or `eps`), else `None`.

    Example:
        >>> from torch import nn
        >>> norm_kind(nn.LayerNorm(8)), norm_kind(nn.Linear(8, 8))
        ('layer', None)
    """
    if isinstance(module, nn.LayerNorm):
        return "layer"
    if type(module).__name__.endswith("RMSNorm") and _rms_epsilon(module) is not None:
        return "rms"
    return None


def _rms_epsilon(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


class MaskedNorm(nn.Module):
    """A norm of the residual stream normalizing over the channels the hidden mask keeps (see the module docstring).

    Args:
        base_layer (`nn.Module`): the norm (`norm_kind` must know it); kept as the child `base_layer`.
        block_scores (`BlockScores`): the hidden scores, one per channel.
        owns_scores (`bool`): register `block_scores` as a child (saved with this norm) or only refer to it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hf_blockprune.pruning.layer import BlockScores
        >>> scores = BlockScores((4,), "sigmoid_threshold", "hidden", init_value=1.0, threshold=0.5)
        >>> with torch.no_grad():
        ...     scores.scores[3] = -1.0  # channel 3 is pruned
        >>> norm, x = nn.LayerNorm(4), torch.randn(2, 4)
        >>> masked = MaskedNorm(norm, scores, owns_scores=True)(x)
        >>> float(masked[:, 3].abs().max())  # zero on the pruned channel
        0.0
        >>> narrow = nn.functional.layer_norm(x[:, :3], (3,))  # what the compacted model's norm computes
        >>> torch.allclose(masked[:, :3], narrow, atol=1e-6)
        True
    """

    def __init__(self, base_layer: nn.Module, block_scores: BlockScores, owns_scores: bool):
        super().__init__()
        kind = norm_kind(base_layer)
        if kind is None:
            raise ValueError(f"{type(base_layer).__name__} is not a norm hidden-size pruning can mask.")
        self.base_layer = base_layer
        self.kind = kind
        if owns_scores:
            self.block_scores = block_scores
        else:
            object.__setattr__(self, "_shared_scores", block_scores)

    @property
    def scores_module(self) -> BlockScores:
        """The hidden `BlockScores` (owned or shared)."""
        return self.block_scores if "block_scores" in self._modules else self._shared_scores

    @property
    def weight(self) -> torch.Tensor | None:
        """The norm's weight."""
        return getattr(self.base_layer, "weight", None)

    @property
    def bias(self) -> torch.Tensor | None:
        """The norm's bias (a LayerNorm's; `None` for an RMSNorm)."""
        return getattr(self.base_layer, "bias", None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The norm over the kept channels, zero on the others."""
        mask = self.scores_module.mask()
        keep = mask.detach().to(torch.float32)
        count = keep.sum().clamp_min(1.0)
        values = hidden_states.to(torch.float32)
        base = self.base_layer
        if self.kind == "layer":
            mean = (values * keep).sum(-1, keepdim=True) / count
            centered = values - mean
            variance = (centered * centered * keep).sum(-1, keepdim=True) / count
            normalized = centered * torch.rsqrt(variance + base.eps)
            if base.weight is not None:
                normalized = normalized * base.weight.to(torch.float32)
            if base.bias is not None:
                normalized = normalized + base.bias.to(torch.float32)
            output = normalized.to(hidden_states.dtype)
        else:  # weight * x / sqrt(mean(x^2) + eps), in float32, as Llama's RMSNorm computes it
            variance = (values * values * keep).sum(-1, keepdim=True) / count
            normalized = (values * torch.rsqrt(variance + _rms_epsilon(base))).to(hidden_states.dtype)
            output = base.weight * normalized
        return output * mask.to(output.dtype)

    def extra_repr(self) -> str:
        """The norm's kind, for `print(model)`."""
        return f"kind={self.kind}"


class MaskedSource(nn.Module):
    """A projection that starts the residual stream with no norm after it (ELECTRA's embedding projection), its output
    multiplied by the hidden mask, so that what reads it sees zeros on the pruned channels.

    Args:
        base_layer (`nn.Module`): the projection; kept as the child `base_layer`.
        block_scores (`BlockScores`): the hidden scores (owned elsewhere, by the first `MaskedNorm`).
    """

    def __init__(self, base_layer: nn.Module, block_scores: BlockScores):
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_shared_scores", block_scores)

    @property
    def scores_module(self) -> BlockScores:
        """The hidden `BlockScores`."""
        return self._shared_scores

    @property
    def weight(self) -> torch.Tensor:
        """The projection's weight."""
        return self.base_layer.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The projection's output, zero on the pruned channels."""
        output = self.base_layer(hidden_states)
        return output * self._shared_scores.mask().to(output.dtype)


@torch.no_grad()
def sliced_norm(norm: nn.Module, index: torch.Tensor) -> nn.Module:
    """`norm` narrowed, in place, to the channels `index` (weight, bias and the normalized shape); returns it."""
    for name in ("weight", "bias"):
        parameter = getattr(norm, name, None)
        if isinstance(parameter, nn.Parameter):
            setattr(norm, name, nn.Parameter(parameter.index_select(-1, index).clone(), parameter.requires_grad))
    if isinstance(norm, nn.LayerNorm):
        norm.normalized_shape = (len(index),)
    return norm


@torch.no_grad()
def check_maskable_norm(path: str, norm: nn.Module) -> None:
    """Refuse (`ValueError`, naming `path`) a norm that `MaskedNorm` does not reproduce exactly: its kind is unknown,
    or, on a random input, masking it does not equal the norm itself (all channels kept) and the norm narrowed to the
    kept channels (some pruned)."""
    kind = norm_kind(norm)
    if kind is None:
        raise ValueError(
            f"{path} is a {type(norm).__name__}, which hidden-size pruning cannot mask exactly (it knows nn.LayerNorm "
            "and Llama-style RMSNorm). Leave `prune_hidden` off."
        )
    width = norm.weight.shape[-1]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(3, width, generator=generator).to(norm.weight.device, norm.weight.dtype)
    scores = BlockScores((width,), "sigmoid_threshold", "hidden", init_value=1.0, threshold=0.5)
    scores = scores.to(norm.weight.device)
    masked = MaskedNorm(norm, scores, owns_scores=True)
    same = torch.allclose(masked(sample), norm(sample), atol=1e-4, rtol=1e-3)
    kept = torch.arange(0, width, 2, device=sample.device)
    scores.scores.fill_(-1.0)
    scores.scores[kept] = 1.0
    narrow = sliced_norm(copy.deepcopy(norm), kept)(sample[:, kept])
    same = same and torch.allclose(masked(sample)[:, kept], narrow, atol=1e-4, rtol=1e-3)
    if not same:
        raise ValueError(
            f"{path} ({type(norm).__name__}) does not compute what hidden-size pruning assumes of a {kind} norm, so "
            "masking it would not be exact. Leave `prune_hidden` off."
        )
