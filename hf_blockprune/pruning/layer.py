"""Block scores and the masked `nn.Linear` wrapper that applies them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .binarizers import binarize

GRID_VIEWS = ("grid", "rows", "cols")


def _logit(probability: float) -> float:
    """`log(p / (1 - p))`, with -inf at 0 and +inf at 1."""
    if probability <= 0.0:
        return -math.inf
    if probability >= 1.0:
        return math.inf
    return math.log(probability / (1.0 - probability))


def round_kept(mask: torch.Tensor, scores: torch.Tensor, multiple: int) -> torch.Tensor:
    """`mask` (1-D, {0, 1}) changed to keep the `round(kept / multiple) * multiple` highest `scores` (all of them
    when `mask` keeps all), with `mask`'s gradient (straight through). No host sync."""
    kept = mask.detach().sum()
    rounded = torch.round(kept / multiple) * multiple
    count = torch.where(kept == mask.numel(), kept, rounded)
    ranks = torch.empty_like(scores, dtype=torch.long)
    ranks[torch.argsort(scores, descending=True, stable=True)] = torch.arange(scores.numel(), device=scores.device)
    target = (ranks < count).to(mask.dtype)
    return mask + (target - mask).detach()


def keep_one(mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """`mask` (1-D, {0, 1}), or the highest of `scores` alone where it keeps nothing, with `mask`'s gradient
    (straight through). No host sync."""
    best = torch.zeros_like(mask).scatter(0, torch.argmax(scores).reshape(1), 1.0)
    target = torch.where(mask.detach().sum() > 0, mask.detach(), best)
    return mask + (target - mask).detach()


class BlockScores(nn.Module):
    """Learnable scores over a grid of blocks, and the binary mask they give.

    One instance may be shared by several `MaskedLinear` layers (an FFN neuron is row i of the input projection
    and column i of the output projection; a head is rows of Q, K, V and columns of the output projection): it is
    registered as a child of the first, so it is saved once.

    With `score_scale = c != 1` the stored parameter is `raw = value / c` and the forward uses
    `value = raw + (c - 1) * raw.detach()` (numerically `c * raw`, gradient 1 with respect to `raw`). Adam-family
    optimizers take steps of a size independent of the gradient's scale, so the scores then move `c` times faster than
    the optimizer's learning rate: this gives them their own learning rate without an extra optimizer group.

    With a unit floor (`use_unit_floor()`: blocks inside heads or neurons under a `target_speedup`, see
    `hf_blockprune.pruning.targets.UnitSet`), the mask is 1 wherever the `unit_floor` buffer is: the blocks of the
    heads and neurons the cut on units keeps, which compaction keeps whole. The buffer is set with every cut and saved
    with the scores; the gradient still goes straight through to every score.

    With `round_to = m > 1` (1-D scores: FFN neurons), the mask keeps a multiple of `m` entries: the count the
    method gives, rounded to the nearest multiple (all entries stay when all are kept), the highest scores first; the
    gradient still goes straight through to the scores.

    Hidden-size scores (`kind="hidden"`) always keep at least one entry, the highest-scored (a model without hidden
    channels computes a constant).

    Args:
        grid_shape (`tuple[int, ...]`): shape of the score grid.
        method (`str`): `"topk"` or `"sigmoid_threshold"`.
        kind (`str`): `"attention"`, `"ffn"` or `"hidden"`, for density reporting.
        init_value (`float`): initial score value.
        threshold (`float`): initial threshold (kept fraction for top-k).
        score_scale (`float`, *optional*, defaults to 1.0): the reparametrisation factor `c` above.
    """

    def __init__(self, grid_shape, method, kind, init_value, threshold, score_scale=1.0):
        super().__init__()
        self.method = method
        self.kind = kind
        self.scores = nn.Parameter(torch.full(tuple(grid_shape), init_value / score_scale))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("score_cut", torch.tensor(_logit(threshold)))
        self.register_buffer("score_scale", torch.tensor(float(score_scale)))
        # 1 on the blocks a cut on units keeps whatever their own score (None: no such cut; see `use_unit_floor`)
        self.register_buffer("unit_floor", None)
        # 1 once the filled stage has zeroed the masked weights: saved, so a resumed run does not zero them again
        self.register_buffer("filled", torch.tensor(0.0))
        self._threshold_value = float(threshold)
        self._scale_value = float(score_scale)
        self.filled_value = False
        self.weights_per_block = 0.0  # filled in by the layers that use these scores
        self.round_to = 1  # keep a multiple of this many entries (see the class docstring); set from the config
        self.keeps_one = kind == "hidden"  # a model with no hidden channel left computes a constant
        # dL/dM summed over the masks' uses since the last reset, while tracked (see `track_task_gradient`)
        self.register_buffer("task_gradient", None, persistent=False)
        self.register_load_state_dict_post_hook(BlockScores._sync_mirrors)

    @staticmethod
    def _sync_mirrors(module, incompatible_keys):
        # The Python copies avoid host syncs in the forward pass; a load is the one place they must be refreshed.
        module._threshold_value = float(module.threshold)
        module._scale_value = float(module.score_scale)
        module.filled_value = bool(module.filled)

    def effective_scores(self) -> torch.Tensor:
        """Scores as the mask sees them (`score_scale * raw`, with gradient 1 to `raw`)."""
        if self._scale_value == 1.0:
            return self.scores
        return self.scores + (self._scale_value - 1.0) * self.scores.detach()

    def mask(self) -> torch.Tensor:
        """The {0, 1} mask over the grid, with a straight-through gradient to the scores."""
        mask = binarize(self.effective_scores(), self.method, self.score_cut, self._threshold_value)
        if self.unit_floor is not None:
            mask = mask + (torch.maximum(mask, self.unit_floor.to(mask.dtype)) - mask).detach()
        if self.round_to > 1:
            mask = round_kept(mask, self.effective_scores().detach(), self.round_to)
        if self.keeps_one:
            mask = keep_one(mask, self.effective_scores().detach())
        if self.task_gradient is not None and mask.requires_grad:
            mask = self._tracked(mask)
        return mask

    @torch.compiler.disable
    def _tracked(self, mask: torch.Tensor) -> torch.Tensor:
        # Outside any compiled graph: a hook on a tensor made inside one makes the compiled model drop its loss
        # (torch.compile, aot_eager backend, torch 2.13), so the hook goes on the tensor eager code hands it.
        mask.register_hook(self._add_task_gradient)
        return mask

    def use_unit_floor(self) -> None:
        """Give these scores a unit floor (all zeros until a cut on units sets it, see the class docstring)."""
        self.unit_floor = torch.zeros_like(self.scores, dtype=torch.float32, requires_grad=False)

    @torch.no_grad()
    def set_unit_floor(self, floor: torch.Tensor) -> None:
        """Set the unit floor (score-shaped, {0, 1}) to `floor` (giving these scores one if they had none); no host
        sync."""
        if self.unit_floor is None:
            self.use_unit_floor()
        self.unit_floor.copy_(floor)

    def _add_task_gradient(self, grad: torch.Tensor) -> None:
        self.task_gradient.add_(grad.detach().to(self.task_gradient.dtype))

    def track_task_gradient(self, enabled: bool = True) -> None:
        """Sum, into the `task_gradient` buffer, the gradient that reaches the scores through the masks (the loss's
        gradient without the regularization, which acts on `sigmoid(scores)` directly); `False` stops and drops it."""
        self.task_gradient = torch.zeros_like(self.scores, dtype=torch.float32) if enabled else None

    def set_threshold(self, value: float) -> None:
        """Set the threshold (kept fraction for top-k; bound on `sigmoid(score)` otherwise) used by `mask()`."""
        self._threshold_value = float(value)
        self.threshold.fill_(float(value))
        self.score_cut.fill_(_logit(value))

    @torch.no_grad()
    def set_score_cut(self, cut: torch.Tensor) -> None:
        """Keep the blocks whose score exceeds `cut` (a 0-dim tensor; sigmoid threshold only, no host sync)."""
        self.score_cut.copy_(cut)
        self.threshold.copy_(torch.sigmoid(cut))

    def mark_filled(self) -> None:
        """Record that the filled stage has started (the masked weights are zeroed)."""
        self.filled_value = True
        self.filled.fill_(1.0)

    def set_score_scale(self, scale: float) -> None:
        """Change the reparametrisation factor while keeping the effective scores unchanged."""
        with torch.no_grad():
            self.scores.mul_(self._scale_value / scale)
        self._scale_value = float(scale)
        self.score_scale.fill_(float(scale))

    def extra_repr(self) -> str:
        """Shape, method and kind, for `print(model)`."""
        return f"grid={tuple(self.scores.shape)}, method={self.method}, kind={self.kind}"


class WrappedLinear:
    """What `MaskedLinear` needs to know of a module that wraps an `nn.Linear` and adds to its output (peft's LoRA
    layers): one instance per kind, in `WRAPPED_LINEARS`, registered by its integration
    (`hf_blockprune.integrations.peft`), so that the core never imports the library that defines the wrapper.

    Example:
        >>> from torch import nn
        >>> from hf_blockprune.pruning.layer import wrapped_linear
        >>> wrapped_linear(nn.Linear(4, 4)) is None  # a plain nn.Linear is masked as it is
        True
    """

    def applies(self, module: nn.Module) -> bool:
        """Whether `module` is a wrapper of this kind."""
        raise NotImplementedError

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The `(out, in)` weight the wrapper computes with (base plus its deltas, with their gradient)."""
        raise NotImplementedError

    def linear(self, module: nn.Module) -> nn.Linear:
        """The wrapped `nn.Linear`."""
        raise NotImplementedError

    def separate_delta(self, module: nn.Module) -> bool:
        """Whether, in training, its delta must be computed apart from the base (a dropout on the delta's input)."""
        return False

    def delta_output(self, module: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The delta's share of the output with the `(out, in)` mask applied (used when `separate_delta`)."""
        raise NotImplementedError

    def unwrap(self, module: nn.Module, merge: bool, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """The wrapped layer, the deltas merged into its weight if `merge`."""
        raise NotImplementedError

    def check(self, path: str, module: nn.Module, config) -> None:
        """Refuse (`ValueError`, naming `path`) a wrapper that masks cannot act on exactly under `config`."""


WRAPPED_LINEARS: list[WrappedLinear] = []


def wrapped_linear(module: nn.Module) -> WrappedLinear | None:
    """The registered kind of wrapper `module` is (`WRAPPED_LINEARS`), or `None` for a plain layer."""
    return next((kind for kind in WRAPPED_LINEARS if kind.applies(module)), None)


class MaskedLinear(nn.Module):
    """An `nn.Linear` whose weight is multiplied, block by block, by the mask of a `BlockScores`.

    The mask grid `(R, C)` splits the `(out, in)` weight into `R x C` blocks of `(out / R, in / C)`; `grid_view`
    reads a 1-D score vector as rows (`"rows"`: `(n, 1)`) or columns (`"cols"`: `(1, n)`). With `row_groups = g > 1`
    (`"rows"` only), row block `j` is kept while any of the mask entries `j * g ... (j + 1) * g - 1` is: the key and
    value projections of grouped-query attention, whose heads each serve `g` query heads.

    The base layer may be a peft LoRA layer over an `nn.Linear`: the mask then applies to its effective weight (base
    plus the active adapters' deltas, see `WrappedLinear` and `hf_blockprune.integrations.peft`), and peft's
    `merge_and_unload()` keeps the mask (`unload_and_optionally_merge_module`).

    Args:
        base_layer (`nn.Linear` or a peft LoRA `Linear`): the layer to mask; kept as the child `base_layer`.
        block_scores (`BlockScores`): the scores to use.
        grid_view (`str`): `"grid"`, `"rows"` or `"cols"`.
        owns_scores (`bool`): register `block_scores` as a child (saved with this layer) or only refer to it.
        row_groups (`int`, *optional*, defaults to 1): mask entries per row block, see above.
    """

    def __init__(
        self, base_layer: nn.Linear, block_scores: BlockScores, grid_view: str, owns_scores: bool, row_groups: int = 1
    ):
        super().__init__()
        self.base_layer = base_layer
        self.grid_view = grid_view
        self.row_groups = int(row_groups)
        if self.row_groups > 1 and (grid_view != "rows" or block_scores.scores.shape[0] % self.row_groups):
            raise ValueError(f"row_groups={row_groups} needs a 'rows' view over a multiple of {row_groups} scores.")
        if owns_scores:
            self.block_scores = block_scores
        else:
            object.__setattr__(self, "_shared_scores", block_scores)
        rows, cols = self._grid_shape(block_scores.scores.shape)
        out_features, in_features = base_layer.weight.shape
        if out_features % rows or in_features % cols:
            raise ValueError(
                f"A block grid of {rows}x{cols} does not divide a {out_features}x{in_features} weight; choose a block "
                "size that divides the matrix (e.g. a divisor of the head size)."
            )
        # per score entry: a row block shared by `row_groups` entries counts for each in proportion
        block_scores.weights_per_block += (out_features // rows) * (in_features // cols) / self.row_groups
        # Set by `fix_mask` for the filled stage; not saved: it is recomputed from the scores on resume.
        self.register_buffer("fixed_mask", None, persistent=False)

    def _grid_shape(self, shape) -> tuple[int, int]:
        if self.grid_view == "rows":
            return shape[0] // self.row_groups, 1
        if self.grid_view == "cols":
            return 1, shape[0]
        return shape[0], shape[1]

    @property
    def scores_module(self) -> BlockScores:
        """The `BlockScores` this layer is masked by (owned or shared)."""
        return self.block_scores if "block_scores" in self._modules else self._shared_scores

    @property
    def weight(self) -> torch.Tensor:
        """The unmasked weight of the wrapped layer."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias of the wrapped layer (never masked)."""
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        """Input size of the wrapped layer."""
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        """Output size of the wrapped layer."""
        return self.base_layer.out_features

    def weight_mask(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mask as a `(R, C)` grid (from the scores unless `mask`, a score-shaped tensor, is given)."""
        mask = self.scores_module.mask() if mask is None else mask
        if self.row_groups > 1:
            return mask.reshape(-1, self.row_groups).amax(dim=1, keepdim=True)
        return mask.reshape(self._grid_shape(mask.shape))

    def full_mask(self) -> torch.Tensor:
        """The `(out, in)` {0, 1} mask of the weight: the fixed mask if set, else the block mask expanded."""
        if self.fixed_mask is not None:
            return self.fixed_mask
        grid = self.weight_mask()
        out_features, in_features = self.base_layer.weight.shape
        rows, cols = grid.shape
        return grid.repeat_interleave(out_features // rows, 0).repeat_interleave(in_features // cols, 1)

    @torch.no_grad()
    def fix_mask(self, mask: torch.Tensor) -> None:
        """Freeze the mask to `mask` (`(out, in)`, {0, 1}): the scores stop mattering (filled stage)."""
        self.fixed_mask = mask.to(self.base_layer.weight.dtype)

    def masked_weight(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The (effective) weight multiplied block by block by the mask grid (or by the fixed mask, once set)."""
        kind = wrapped_linear(self.base_layer)
        weight = self.base_layer.weight if kind is None else kind.weight(self.base_layer)
        if self.fixed_mask is not None and mask is None:
            return weight * self.fixed_mask
        grid = self.weight_mask(mask)
        rows, cols = grid.shape
        out_features, in_features = weight.shape
        blocks = weight.reshape(rows, out_features // rows, cols, in_features // cols)  # (R, r, C, c)
        return (blocks * grid[:, None, :, None].to(weight.dtype)).view(out_features, in_features)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`F.linear` with the masked weight and the unmasked bias."""
        base = self.base_layer
        kind = wrapped_linear(base)
        if self.training and kind is not None and kind.separate_delta(base):
            # the adapters see their dropout's input, as in peft: W x + delta dropout(x), both masked
            mask = self.full_mask()
            output = F.linear(hidden_states, kind.linear(base).weight * mask, self.bias)
            return output + kind.delta_output(base, hidden_states, mask)
        return F.linear(hidden_states, self.masked_weight(), self.bias)

    def merge(self) -> nn.Linear:
        """Return the wrapped `nn.Linear` with the current mask multiplied into its (effective) weight; a LoRA layer
        is taken out, its deltas merged."""
        with torch.no_grad():
            weight = self.masked_weight()
            kind = wrapped_linear(self.base_layer)
            linear = self.base_layer if kind is None else kind.linear(self.base_layer)
            linear.weight.copy_(weight)
        return linear

    def unload_and_optionally_merge_module(self, merge: bool = True, safe_merge: bool = False, adapter_names=None):
        """peft's `merge_and_unload()` / `unload()` hook: take out the LoRA layer under the mask (its deltas merged
        into the base weight if `merge`), keep the mask and scores. Returns this module."""
        kind = wrapped_linear(self.base_layer)
        if kind is not None:
            self.base_layer = kind.unwrap(self.base_layer, merge, safe_merge, adapter_names)
        return self
