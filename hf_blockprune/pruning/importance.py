"""How much each block, head or FFN neuron matters, measured on a few batches before anything is pruned.

The measure is the empirical Fisher information of a mask variable (Kwon et al. 2022, *A Fast Post-Training Pruning
Framework for Transformers*): give unit `u` a multiplier `m_u`, 1 when kept; removing it changes the loss by about
`F_u / 2` (second order, the first-order term averaging out at a trained model), with

    F_u = sum over calibration batches of (dL / dm_u) ** 2.

Two parametrizations of `m_u` are measured here:

- **block scores** (`score_fisher`): `m_u` is the mask of one score of a masked model, on every weight it governs (a
  head's query, key and value rows and output columns; a neuron's input rows and output column; a block). Its
  gradient is the scores' straight-through gradient `dL/dM`, for every granularity. `initialize_scores` turns it into
  starting scores, so that a run starts from the Fisher ranking rather than from one constant for every block.
- **units** (`unit_fisher`): `m_u` scales the input of the output projection that a head's (or a neuron's) columns
  read, as Kwon et al. do: `dL/dm_u = sum over u's columns of W * dL/dW`. This is what the one-shot pruner ranks.

The calibration runs in eval mode (no dropout), with the masks as they are, and leaves the model's weights, their
gradients and its train/eval mode as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .layer import BlockScores
from .model import block_scores

LossFunction = Callable[[nn.Module, dict], torch.Tensor]


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss the model computes itself from `batch` (which must hold the labels).

    Raises:
        `ValueError`: the model returns no loss (no labels in the batch, or a model whose loss is computed outside
            it, such as a sentence-transformers model).
    """
    outputs = model(**batch)
    loss = outputs.get("loss") if hasattr(outputs, "get") else (outputs[0] if isinstance(outputs, tuple) else None)
    if not torch.is_tensor(loss) or loss.dim() != 0:
        raise ValueError(
            f"{type(model).__name__} returned no loss on a calibration batch: the importance of the blocks is the "
            "gradient of the training loss, so the batches must hold labels and the model must compute its loss "
            "(with BlockPruningTrainer, its `compute_loss` is used instead)."
        )
    return loss


def calibration_batches(dataloader, num_examples: int, seed: int) -> list[dict]:
    """`num_examples` examples of a training dataloader's dataset, collated in batches of its batch size.

    A map-style dataset gives a random subset drawn with its own generator seeded by `seed` (so every process of a
    distributed run draws the same one, and the training data order is left alone); an iterable dataset gives its
    first examples.

    Args:
        dataloader (`torch.utils.data.DataLoader`): the Trainer's training dataloader (its dataset and collator).
        num_examples (`int`): how many examples.
        seed (`int`): seed of the subset.
    """
    dataset, collate = dataloader.dataset, dataloader.collate_fn
    batch_size = dataloader.batch_size or getattr(getattr(dataloader, "batch_sampler", None), "batch_size", None) or 8
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_examples]
        examples = [dataset[int(index)] for index in order]
    else:
        examples = [example for _, example in zip(range(num_examples), dataset)]
    return [collate(examples[start:start + batch_size]) for start in range(0, len(examples), batch_size)]


def to_device(batch: dict, device: torch.device) -> dict:
    """`batch` with its tensors moved to `device` (other values as they are)."""
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """Eval mode (no dropout) for the calibration; the model's modes are restored afterwards."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@contextlib.contextmanager
def _requiring_grad(parameters: list[torch.Tensor]):
    """`parameters` require gradients inside the block (a frozen weight's importance is measured too)."""
    frozen = [p for p in parameters if not p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def _squared_gradients(model: nn.Module, batches: Iterable[dict], parameters: list[torch.Tensor],
                       reduce: Callable[[list[torch.Tensor | None]], list[torch.Tensor]],
                       loss_fn: LossFunction | None, group: int = 1) -> list[torch.Tensor]:
    """`sum_groups reduce(dL/dparameters) ** 2`, elementwise, with the model in eval mode, `dL/dparameters` the mean
    gradient of `group` consecutive batches (the optimizer step's batch under gradient accumulation)."""
    if group < 1:
        raise ValueError(f"`group` must be at least 1, got {group}.")
    loss_fn = loss_fn or model_loss
    device = parameters[0].device
    totals, pending, count = None, None, 0

    def flush():
        nonlocal totals, pending, count
        squared = [(value / count) ** 2 for value in reduce(pending)]
        totals = squared if totals is None else [t + s for t, s in zip(totals, squared)]
        pending, count = None, 0

    with evaluating(model), _requiring_grad(parameters):
        for batch in batches:
            loss = loss_fn(model, to_device(dict(batch), device))
            grads = [None if g is None else g.detach().float()
                     for g in torch.autograd.grad(loss, parameters, allow_unused=True)]
            pending = grads if pending is None else [
                g if p is None else (p if g is None else p + g) for p, g in zip(pending, grads)]
            count += 1
            if count == group:
                flush()
        if count:
            flush()
    if totals is None:
        raise ValueError("No calibration batch was given: pass at least one batch.")
    return totals


def score_fisher(model: nn.Module, batches: Iterable[dict], loss_fn: LossFunction | None = None,
                 group: int = 1) -> list[tuple[BlockScores, torch.Tensor]]:
    """The Fisher information of every block mask of a masked model (see the module docstring).

    Args:
        model (`nn.Module`): a model masked by `apply_block_pruning`.
        batches (iterable of `dict`): collated batches with labels, on any device.
        loss_fn (`Callable`, *optional*): `(model, batch) -> loss`; defaults to the loss the model returns.
        group (`int`, *optional*, defaults to 1): batches whose mean gradient is squared together: a training run's
            gradient accumulation steps times its processes, so that the importance depends on the optimizer
            step's batch only, not on how it is split into micro-batches.

    Returns:
        `list[tuple[BlockScores, torch.Tensor]]`: each score module with a float tensor of its scores' shape.
    """
    modules = list(block_scores(model))
    if not modules:
        raise ValueError("The model has no block-pruning scores: mask it with apply_block_pruning first.")
    parameters = [module.scores for module in modules]

    def zeros_for_unused(grads):
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, parameters)]

    return list(zip(modules, _squared_gradients(model, batches, parameters, zeros_for_unused, loss_fn, group)))


def unit_fisher(model: nn.Module, layers: list, batches: Iterable[dict],
                loss_fn: LossFunction | None = None) -> dict[tuple[int, int | None], torch.Tensor]:
    """The Fisher information of every head and FFN neuron, with its mask on the output projection's input columns
    (see the module docstring): `dL/dm_u = sum over u's columns of W * dL/dW` at `m = 1`.

    Args:
        model (`nn.Module`): the model (masked or not: a masked projection's weight is its base layer's).
        layers (`list[PrunableLayer]`): `prunable_layers(model)`.
        batches (iterable of `dict`): calibration batches with labels.
        loss_fn (`Callable`, *optional*): `(model, batch) -> loss`; defaults to the loss the model returns.

    Returns:
        `dict`: `(layer index, attention index) -> (num_heads,)` for every attention block with heads, and
        `(layer index, None) -> (intermediate,)` for every FFN with neurons.
    """
    keys, weights, widths = [], [], []
    for index, layer in enumerate(layers):
        for position, attention in enumerate(layer.attentions):
            if attention.real_heads:
                keys.append((index, position))
                weights.append(attention.output.weight)
                widths.append(attention.head_dim)
        if layer.has_ffn and layer.ffn_input.out_features and not layer.ffn_placeholder:
            keys.append((index, None))
            weights.append(layer.ffn_output.weight)
            widths.append(1)

    def per_unit(grads):
        return [(w.detach() * (torch.zeros_like(w) if g is None else g)).sum(0).view(-1, width).sum(1)
                for w, g, width in zip(weights, grads, widths)]

    return dict(zip(keys, _squared_gradients(model, batches, weights, per_unit, loss_fn)))


def centered_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks of `values` scaled to [-1, 1] (lowest -1, highest 1; equal values share their mean rank)."""
    if values.numel() < 2:
        return torch.zeros_like(values)
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    if unique.numel() == 1:
        return torch.zeros_like(values)
    starts = torch.cumsum(counts, 0) - counts
    mean_rank = starts.to(values.dtype) + (counts.to(values.dtype) - 1) / 2
    return 2 * mean_rank[inverse] / (values.numel() - 1) - 1


@torch.no_grad()
def initialize_scores(importance: list[tuple[BlockScores, torch.Tensor]], init_value: float,
                      spread: float = 1.0, above: bool = False) -> None:
    """Start each score at `init_value + spread * r`, `r` its Fisher rank among all scores of its kind, in [-1, 1]
    (with `above`, at `init_value + spread * (r + 1)`: none below `init_value`).

    Attention and FFN scores are ranked apart (each kind spans the whole range), across all layers, so that layers
    compete as they do for a shared score cut. The scores' effective values are set (the callback's reparametrized
    scores included).

    Args:
        importance (`list[tuple[BlockScores, torch.Tensor]]`): from `score_fisher`.
        init_value (`float`): the centre (the config's `mask_init_value`).
        spread (`float`, *optional*, defaults to 1.0): half-width of the range.
        above (`bool`, *optional*, defaults to False): shift the range to start at `init_value`, for a fixed cut at
            the constant start (soft movement with a fixed lambda), so that every block starts kept.
    """
    for kind in sorted({module.kind for module, _ in importance}):
        pairs = [(module, values) for module, values in importance if module.kind == kind]
        ranks = centered_ranks(torch.cat([values.flatten().cpu() for _, values in pairs]))
        offset = 0
        for module, values in pairs:
            count = values.numel()
            value = init_value + spread * (ranks[offset:offset + count].view_as(values) + (1.0 if above else 0.0))
            module.scores.copy_((value / module._scale_value).to(module.scores.device, module.scores.dtype))
            offset += count


def broadcast_scores(model: nn.Module, source: int = 0) -> None:
    """Give every process the scores of process `source` (no effect without `torch.distributed`)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() < 2:
        return
    for module in block_scores(model):
        torch.distributed.broadcast(module.scores.data, source)
