"""Projections that are not one plain `nn.Linear` per role: fused (QKV in one matrix, a GLU's two inputs in one) or
stored transposed (transformers' `Conv1D`, GPT-2).

Reading them (head counts, FLOPs, reports) goes through `ProjectionView`, an `nn.Linear`-like view of some output
rows of a projection that changes nothing in the model. Masking needs one `nn.Linear` per role: `split_projection`
swaps a fused projection for a `SplitProjection` (named `nn.Linear` parts, outputs concatenated, so the function is
the same) and a `Conv1D` for a `Conv1DLinear` (its weight transposed); `fuse_projections` turns them back into the
original module types, which is what gets saved and what plain transformers loads.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def is_projection(module: nn.Module) -> bool:
    """Whether `module` is an `nn.Linear` or a transformers `Conv1D` (a linear map with its weight transposed)."""
    return isinstance(module, (nn.Linear, Conv1D))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The `(out, in)` weight of an `nn.Linear` or `Conv1D` (a transposed view for `Conv1D`)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


class ProjectionView:
    """Output rows `[start, stop)` of an `nn.Linear` or `Conv1D`, read as an `nn.Linear` (`weight` is `(out, in)`).

    Args:
        source (`nn.Module`): the projection.
        path (`str`): its path relative to the layer (the module to replace when splitting).
        part (`str`, *optional*): the name of the part a fused projection is split into (e.g. `"query"`).
        start (`int`, *optional*, defaults to 0), stop (`int`, *optional*): the rows; `None`: to the end.
    """

    def __init__(self, source: nn.Module, path: str, part: str | None = None, start: int = 0,
                 stop: int | None = None):
        self.source = source
        self.path = path
        self.part = part
        self.start = start
        self.stop = linear_weight(source).shape[0] if stop is None else stop

    @property
    def weight(self) -> torch.Tensor:
        """The `(out, in)` weight rows of the view."""
        return linear_weight(self.source)[self.start : self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias entries of the view's rows, or `None`."""
        bias = self.source.bias
        return None if bias is None else bias[self.start : self.stop]

    @property
    def out_features(self) -> int:
        """Rows of the view."""
        return self.stop - self.start

    @property
    def in_features(self) -> int:
        """Input size of the projection."""
        return linear_weight(self.source).shape[1]

    def to_linear(self) -> nn.Linear:
        """A new `nn.Linear` (a `Conv1DLinear` for a `Conv1D` source) holding a copy of the view's weights."""
        weight = self.source.weight
        cls = Conv1DLinear if isinstance(self.source, Conv1D) else nn.Linear
        linear = cls(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                     dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(weight.requires_grad)
        if linear.bias is not None:
            linear.bias.requires_grad_(self.source.bias.requires_grad)
        return linear


class Conv1DLinear(nn.Linear):
    """The `nn.Linear` form of a transformers `Conv1D` while it is masked; `fuse_projections` turns it back."""

    def to_conv1d(self) -> Conv1D:
        """A `Conv1D` computing the same map (weight transposed back)."""
        conv = Conv1D(self.out_features, self.in_features)
        conv.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight = nn.Parameter(self.weight.t().contiguous(), self.weight.requires_grad)
            if self.bias is None:
                conv.bias = None
            else:
                conv.bias = nn.Parameter(self.bias.detach().clone(), self.bias.requires_grad)
        return conv


class SplitProjection(nn.Module):
    """A fused projection split into named `nn.Linear` parts: `forward` concatenates their outputs in order.

    Args:
        parts (`dict[str, nn.Linear]`): the parts, in output order (e.g. `query`, `key`, `value`).
        conv1d (`bool`): the fused projection was a `Conv1D` (`fused()` rebuilds one).
    """

    def __init__(self, parts: dict[str, nn.Linear], conv1d: bool):
        super().__init__()
        self.part_names = list(parts)
        self.conv1d = conv1d
        for name, part in parts.items():
            self.add_module(name, part)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The parts' outputs, concatenated along the last dimension."""
        return torch.cat([self.get_submodule(name)(hidden_states) for name in self.part_names], dim=-1)

    def fused(self) -> nn.Module:
        """One `nn.Linear` (or `Conv1D`) with the parts' rows stacked: the module this one was split from.

        Raises:
            `ValueError`: a part is still masked (remove the masks first).
        """
        parts = [self.get_submodule(name) for name in self.part_names]
        if any(type(part) not in (nn.Linear, Conv1DLinear) for part in parts):
            raise ValueError("Internal error: fuse a split projection only after its masks are removed.")
        weight = torch.cat([part.weight.detach() for part in parts], dim=0)
        has_bias = parts[0].bias is not None
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if has_bias:
                linear.bias.copy_(torch.cat([part.bias.detach() for part in parts]))
        linear.requires_grad_(parts[0].weight.requires_grad)
        if not self.conv1d:
            return linear
        linear.__class__ = Conv1DLinear
        return linear.to_conv1d()


def split_views(views: list[ProjectionView], names: list[str]) -> nn.Module:
    """The module replacing the source of `views`: a `SplitProjection` of several views, else one `nn.Linear`.

    Args:
        views (`list[ProjectionView]`): views of one source covering its rows in order.
        names (`list[str]`): the part name of each view.
    """
    if len(views) == 1 and views[0].out_features == linear_weight(views[0].source).shape[0]:
        return views[0].to_linear()
    return SplitProjection({name: view.to_linear() for name, view in zip(names, views)},
                           conv1d=isinstance(views[0].source, Conv1D))


def fuse_projections(model: nn.Module) -> nn.Module:
    """Turn every `SplitProjection` and `Conv1DLinear` of `model` back into the original module type, in place."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, (SplitProjection, Conv1DLinear))]
    for name, module in found:
        if any(name.startswith(other + ".") for other, _ in found):
            continue  # a part of a split projection: rebuilt with it
        fused = module.fused() if isinstance(module, SplitProjection) else module.to_conv1d()
        parent_path, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, fused)
    return model
