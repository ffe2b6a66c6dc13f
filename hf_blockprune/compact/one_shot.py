"""Pruning without training: measure, cut, rescale and compact a fine-tuned model in minutes (Kwon et al. 2022).

`prune_one_shot(model, batches, target_speedup=...)` follows *A Fast Post-Training Pruning Framework for
Transformers* (Kwon, Kim, Mahoney, Hassoun, Keutzer, Gholami, 2022) on the library's own masks and compaction:

1. **Importance.** The Fisher information of every head and FFN neuron on the calibration batches
   (`hf_blockprune.pruning.importance.unit_fisher`): a head's (neuron's) mask scales the input columns of the output
   projection that it feeds, and `F_u = sum over batches of (dL/dm_u) ** 2`.
2. **Mask search.** Every head and neuron has a cost (FLOPs at `seq_len`, or the latency table's per-unit change).
   Heads and neurons are ranked by importance globally; for every number of kept heads, the rest of the budget goes
   to the most important neurons, and the split with the largest total importance is kept. With the latency model,
   the budget is shrunk until the table's prediction meets the target (its changes are not exactly linear).
3. **Rescaling** (`rescale=True`). Layer by layer, in order, each kept head's (neuron's) output is scaled by the
   least-squares factor that makes the pruned block's output projection reproduce the dense model's, on the
   calibration tokens (the input being the pruned model's own, so each layer corrects what the earlier ones changed).
   Kwon et al. also fold the residual stream's drift into that target; matching each block's own output needs no
   knowledge of where the residual is added, so it holds for every architecture the library describes.
4. **Compaction** with `compact_model`: the scales live in the output projections' columns, so the compacted model
   computes exactly what the rescaled masked model does.

What was done is recorded in the compacted model's config (`hf_blockprune.compact.stages`): the settings actually used
(the target, the cost model, the importance measure, how many calibration examples), what the cut reached, the
parameters and FLOPs of the dense model, and its Hub id, so that the model card describes this pruning.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..pruning.config import BlockPruningConfig
from ..pruning.importance import LossFunction, evaluating, to_device, unit_fisher
from ..pruning.model import apply_block_pruning, block_scores, check_model, is_block_pruned, set_threshold
from ..pruning.report import parameter_counts
from ..structure.discovery import prunable_layers
from ..structure.layers import AttentionModules, PrunableLayer
from ..structure.model_structure import LAYOUT_ATTRIBUTE
from .card_metadata import base_model_metadata, public_stages
from .compaction import compact_model
from .flops import attention_flops, ffn_flops, model_flops
from .stages import ONE_SHOT, add_stage

logger = logging.getLogger(__name__)

MAX_SCALE = 10.0  # a least-squares factor beyond this (in magnitude) is not trusted: that block keeps its scale 1


@dataclass
class PruningUnit:
    """One head or neuron: where it is (layer, attention index or None for the FFN, slot), importance and cost."""

    layer: int
    attention: int | None
    slot: int
    importance: float
    cost: float


def _unit_costs_flops(layer: PrunableLayer, seq_len: int) -> tuple[list[float], float]:
    """(cost of one head per attention block, cost of one FFN neuron), in FLOPs at `seq_len`."""
    heads = [sum(attention_flops(attention, seq_len)) / max(attention.num_heads, 1) for attention in layer.attentions]
    neuron = ffn_flops(layer, seq_len) / layer.ffn_input.out_features if layer.has_ffn else 0.0
    return heads, neuron


def _unit_costs_latency(layer: PrunableLayer, table) -> tuple[list[float], float]:
    """(cost of one head per attention block, of one neuron): the latency a layer saves per unit removed, on
    average over the table's range."""
    stack = layer.name.rpartition(".")[0]
    heads = []
    for index, attention in enumerate(layer.attentions):
        points = table.attention.get(f"{stack}#{index}")
        heads.append(-points[0][1] / max(attention.num_heads, 1) if points else 0.0)
    points = table.ffn.get(stack)
    neuron = -points[0][1] / layer.ffn_input.out_features if points and layer.has_ffn else 0.0
    return heads, neuron


def _units(layers: list[PrunableLayer], importance, costs) -> tuple[list[PruningUnit], list[PruningUnit]]:
    heads, neurons = [], []
    for index, (layer, (head_costs, neuron_cost)) in enumerate(zip(layers, costs)):
        for position, attention in enumerate(layer.attentions):
            values = importance.get((index, position))
            if values is None:
                continue
            heads += [PruningUnit(index, position, slot, float(values[slot]), head_costs[position])
                      for slot, head in enumerate(attention.slots) if head is not None]
        values = importance.get((index, None))
        if values is not None:
            neurons += [PruningUnit(index, None, slot, float(value), neuron_cost) for slot, value in enumerate(values)]
    return heads, neurons


def search_units(heads: list[PruningUnit], neurons: list[PruningUnit],
                 budget: float) -> tuple[list[PruningUnit], list[PruningUnit]]:
    """The heads and neurons to keep within `budget`: for every number of kept heads (most important first), the
    most important neurons that fit in what is left; the split with the largest total importance wins."""
    heads = sorted(heads, key=lambda u: -u.importance)
    neurons = sorted(neurons, key=lambda u: -u.importance)
    neuron_cost = torch.tensor([0.0] + [u.cost for u in neurons], dtype=torch.float64).cumsum(0)
    neuron_value = torch.tensor([0.0] + [u.importance for u in neurons], dtype=torch.float64).cumsum(0)
    best, best_split = -1.0, (0, 0)
    head_cost = head_value = 0.0
    for kept_heads in range(len(heads) + 1):
        if kept_heads:
            head_cost += heads[kept_heads - 1].cost
            head_value += heads[kept_heads - 1].importance
        left = budget - head_cost
        if left < 0:
            break
        kept_neurons = int(torch.searchsorted(neuron_cost, torch.tensor(left, dtype=torch.float64),
                                              right=True)) - 1
        value = head_value + float(neuron_value[kept_neurons])
        if value > best:
            best, best_split = value, (kept_heads, kept_neurons)
    return heads[:best_split[0]], neurons[:best_split[1]]


@torch.no_grad()
def _set_masks(model: nn.Module, layers: list[PrunableLayer], kept_heads: list[PruningUnit],
               kept_neurons: list[PruningUnit]):
    """Scores +1 for the kept units and -1 for the others, threshold 0.5 (cut at 0)."""
    for scores in block_scores(model):
        scores.scores.fill_(-1.0)
    for unit in kept_heads:
        layers[unit.layer].attentions[unit.attention].query.scores_module.scores[unit.slot] = 1.0
    for unit in kept_neurons:
        layers[unit.layer].ffn_input.scores_module.scores[unit.slot] = 1.0
    set_threshold(model, 0.5)


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward pass is skipped."""


def _capture(module: nn.Module, keep_input: bool) -> tuple[list, object]:
    found = []

    def hook(_, args, output):
        found.append(args[0].detach() if keep_input else output.detach())
        raise _Stop

    return found, module.register_forward_hook(hook)


def _run_until(model: nn.Module, module: nn.Module, batch: dict, keep_input: bool) -> torch.Tensor:
    found, handle = _capture(module, keep_input)
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return found[0]


def _tokens(tensor: torch.Tensor, batch: dict) -> torch.Tensor:
    """`(tokens, features)`: the positions the batch's attention mask keeps (all, without a matching mask)."""
    mask = batch.get("attention_mask")
    if torch.is_tensor(mask) and mask.shape == tensor.shape[:2]:
        return tensor[mask.bool()]
    return tensor.reshape(-1, tensor.shape[-1])


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor | None:
    """The least-squares factors, or `None` when the system is not well posed or a factor is beyond `MAX_SCALE`."""
    damping = 1e-6 * gram.diagonal().mean().clamp_min(1e-30)
    try:
        scale = torch.linalg.solve(gram + damping * torch.eye(len(gram), dtype=gram.dtype), rhs)
    except RuntimeError:
        return None
    if not torch.isfinite(scale).all() or scale.abs().max() > MAX_SCALE:
        return None
    return scale


@torch.no_grad()
def _rescale_block(student, teacher, output: nn.Module, dense_output: nn.Module, columns: list[torch.Tensor],
                   batches: list[dict]) -> bool:
    """Scale each group of `output`'s input `columns` (a kept head, or a neuron) by the least-squares factor that
    makes `output` reproduce `dense_output` of the teacher; returns whether it did."""
    weight = output.weight  # (out, in) of the masked projection's base layer
    bias = output.bias
    gram = torch.zeros(len(columns), len(columns), dtype=torch.float64)
    rhs = torch.zeros(len(columns), dtype=torch.float64)
    for batch in batches:
        target = _tokens(_run_until(teacher, dense_output, batch, keep_input=False), batch).double()
        inputs = _tokens(_run_until(student, output, batch, keep_input=True), batch).double()
        if bias is not None:
            target = target - bias.double()
        parts = torch.stack([inputs[:, cols] @ weight[:, cols].double().t() for cols in columns])  # (U, T, out)
        gram += torch.einsum("utd,vtd->uv", parts, parts).cpu()
        rhs += torch.einsum("utd,td->u", parts, target).cpu()
    scale = _solve(gram, rhs)
    if scale is None:
        return False
    for cols, factor in zip(columns, scale.tolist()):
        weight[:, cols] *= factor
    return True


@torch.no_grad()
def _rescale_ffn_block(student, teacher, layer: PrunableLayer, dense_output: nn.Module, kept: torch.Tensor,
                       batches: list[dict]) -> bool:
    """`_rescale_block` for the neurons of an FFN, with the Gram matrix of rank-one contributions in closed form."""
    output = layer.ffn_output
    weight = output.weight[:, kept].double()  # (out, U)
    gram = torch.zeros(len(kept), len(kept), dtype=torch.float64)
    rhs = torch.zeros(len(kept), dtype=torch.float64)
    for batch in batches:
        target = _tokens(_run_until(teacher, dense_output, batch, keep_input=False), batch).double()
        activations = _tokens(_run_until(student, output, batch, keep_input=True), batch)[:, kept].double()
        if output.bias is not None:
            target = target - output.bias.double()
        gram += ((activations.t() @ activations) * (weight.t() @ weight)).cpu()  # (U, U)
        rhs += (activations * (target @ weight)).sum(0).cpu()
    scale = _solve(gram, rhs)
    if scale is None:
        return False
    output.weight[:, kept] *= scale.to(output.weight.dtype).to(output.weight.device)
    return True


def _head_columns(attention: AttentionModules, kept: list[int], device) -> list[torch.Tensor]:
    d = attention.head_dim
    return [torch.arange(slot * d, (slot + 1) * d, device=device) for slot in kept]


def rescale(student: nn.Module, teacher: nn.Module, batches: list[dict]) -> int:
    """Rescale, layer by layer, the kept heads and neurons of a masked `student` so that each block's output
    projection reproduces the dense `teacher`'s (see the module docstring). Returns how many blocks were rescaled."""
    done = 0
    with evaluating(student), evaluating(teacher):
        for layer in prunable_layers(student):
            for attention in layer.attentions:  # the output projection's columns: one block per query slot
                if not hasattr(attention.output, "scores_module"):
                    continue  # no real head: nothing to rescale
                kept = attention.output.weight_mask().flatten().nonzero().flatten().tolist()
                if kept:
                    dense_output = teacher.get_submodule(f"{layer.name}.{attention.spec.output}")
                    columns = _head_columns(attention, kept, attention.output.weight.device)
                    done += _rescale_block(student, teacher, attention.output, dense_output, columns, batches)
            if layer.has_ffn and hasattr(layer.ffn_output, "scores_module"):
                kept = layer.ffn_output.weight_mask().flatten().nonzero().flatten()
                if len(kept):
                    dense_output = teacher.get_submodule(f"{layer.name}.{layer.ffn_spec.output}")
                    done += _rescale_ffn_block(student, teacher, layer, dense_output, kept, batches)
    return done


def prune_one_shot(model: nn.Module, batches: Iterable[dict], target_speedup: float, *, seq_len: int = 128,
                   cost_model: str = "flops", batch_size: int = 1, latency_table=None, rescale_outputs: bool = True,
                   loss_fn: LossFunction | None = None, config: BlockPruningConfig | None = None) -> nn.Module:
    """Prune a fine-tuned model to `target_speedup` without training, and compact it, in place.

    Args:
        model (`nn.Module`): a fine-tuned (dense, unmasked) transformers model of a supported architecture.
        batches (iterable of `dict`): calibration batches with labels (a few hundred examples are enough); read twice
            or more, so a list (or a re-iterable) is expected.
        target_speedup (`float`): wished dense / pruned cost, > 1.
        seq_len (`int`, *optional*, defaults to 128): sequence length of the cost model.
        cost_model (`str`, *optional*, defaults to `"flops"`): `"flops"` or `"latency"` (a table measured on the
            model's device at `batch_size` x `seq_len`, or `latency_table`).
        batch_size (`int`, *optional*, defaults to 1): batch size of a measured latency table.
        latency_table (`LatencyTable`, *optional*): a table measured earlier (`cost_model="latency"`).
        rescale_outputs (`bool`, *optional*, defaults to `True`): rescale the kept heads and neurons by least squares.
        loss_fn (`Callable`, *optional*): `(model, batch) -> loss`; defaults to the loss the model returns.
        config (`BlockPruningConfig`, *optional*): module patterns for an architecture without a built-in entry
            (`prune_hidden` is refused: one-shot pruning does not prune the hidden size yet).

    Returns:
        `nn.Module`: the same model object, compacted (its heads and FFN neurons physically removed), its config
        recording this one-shot stage (see `hf_blockprune.compact.stages`); save it with
        `hf_blockprune.save_compacted`.

    Raises:
        `ValueError`: the model is masked already, the target is out of reach, or `cost_model` is unknown.

    Example:
        >>> import copy
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> from hf_blockprune import is_block_pruned, prune_one_shot
        >>> from hf_blockprune.compact.flops import predicted_speedup
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> dense = copy.deepcopy(model)
        >>> batches = [{"input_ids": torch.randint(2, 64, (8, 16)), "labels": torch.randint(0, 2, (8,))}
        ...            for _ in range(4)]
        >>> model = prune_one_shot(model, batches, target_speedup=2.0, seq_len=16)
        >>> is_block_pruned(model), type(model).__name__  # compacted: heads and FFN neurons physically removed
        (False, 'BlockPrunedBertForSequenceClassification')
        >>> predicted_speedup(dense, model, seq_len=16) >= 2.0
        True
    """
    check_model(model)
    if is_block_pruned(model):
        raise ValueError("prune_one_shot expects an unmasked model: this one holds block-pruning masks already.")
    if not target_speedup > 1:
        raise ValueError(f"`target_speedup` must be > 1, got {target_speedup}.")
    if cost_model not in ("flops", "latency"):
        raise ValueError(f"`cost_model` must be 'flops' or 'latency', got {cost_model!r}.")
    if config is not None and config.prune_hidden:
        raise ValueError("prune_one_shot prunes heads and FFN neurons only: it does not prune the hidden size yet. "
                         "Leave `prune_hidden` off, or prune the hidden size while fine-tuning.")
    batches = list(batches)
    device = next(model.parameters()).device
    batches = [to_device(dict(batch), device) for batch in batches]
    settings = {"target_speedup": target_speedup, "cost_model": cost_model, "sequence_length": seq_len,
                "importance": "fisher", "loss": "the model's" if loss_fn is None else "custom",
                "calibration_examples": _examples(batches), "calibration_batches": len(batches),
                "rescale": rescale_outputs}
    table = None
    if cost_model == "latency":
        from .latency import measure_latency_table

        table = latency_table or measure_latency_table(model, batch_size, seq_len)
        settings.update(batch_size=table.batch_size, latency_table_measured=latency_table is None)
    teacher = copy.deepcopy(model).eval() if rescale_outputs else None
    earlier, base_model = public_stages(model.config), base_model_metadata(model)["base_model"]
    structure = {name: getattr(config, name) for name in ("layers_pattern", "attention_modules", "ffn_modules",
                                                         "num_heads_attribute", "num_kv_heads_attribute")} \
        if config is not None else {}
    apply_block_pruning(model, BlockPruningConfig.from_preset("struct", **structure))
    dense_parameters, dense_flops = parameter_counts(model), model_flops(model, seq_len).total
    layers = prunable_layers(model)
    importance = unit_fisher(model, layers, batches, loss_fn)
    costs = [_unit_costs_flops(layer, seq_len) if table is None else _unit_costs_latency(layer, table)
             for layer in layers]
    heads, neurons = _units(layers, importance, costs)
    if table is None:
        dense = float(dense_flops)
        predict = lambda masked: float(model_flops(masked, seq_len, kept_only=True).total)  # noqa: E731
        where = f"on the FLOPs model at sequence length {seq_len}"
    else:
        dense, predict = table.dense, table.predict
        where = f"in measured time at batch {table.batch_size} x {table.seq_len} tokens"
    kept_heads, kept_neurons = _search_within_target(model, layers, heads, neurons, predict, dense, target_speedup,
                                                     where)
    logger.info("One-shot cut: %d of %d heads and %d of %d FFN neurons kept.", len(kept_heads), len(heads),
                len(kept_neurons), len(neurons))
    rescaled = 0
    if teacher is not None:
        rescaled = rescale(model, teacher, batches)
        logger.info("Rescaled %d blocks by least squares on %d calibration batches.", rescaled, len(batches))
    result = {"predicted_speedup": round(dense / predict(model), 4), "heads_kept": [len(kept_heads), len(heads)],
              "ffn_neurons_kept": [len(kept_neurons), len(neurons)], "rescaled_blocks": rescaled}
    compact_model(model)
    _record(model, earlier, {"method": ONE_SHOT, "settings": settings, "result": result,
                             **({"base_model": base_model} if base_model else {})}, dense_parameters, dense_flops)
    return model


def _record(model: nn.Module, earlier: list[dict], stage: dict, dense_parameters: dict, dense_flops: int) -> None:
    """Record the one-shot `stage` in the compacted model's config, with the dense model's parameters (in the layout,
    as `save_compacted` records them) and its FLOPs next to the compacted model's: the model card reads them."""
    getattr(model.config, LAYOUT_ATTRIBUTE).setdefault("dense_parameters", dense_parameters)
    seq_len = stage["settings"]["sequence_length"]
    flops = {"sequence_length": seq_len, "before": dense_flops, "after": model_flops(model, seq_len).total}
    add_stage(model.config, {**stage, "flops": flops}, earlier)


def _examples(batches: list[dict]) -> int:
    """How many examples the batches hold: the leading size of each batch's first tensor."""
    sizes = (next((value.shape[0] for value in batch.values() if torch.is_tensor(value) and value.dim()), 0)
             for batch in batches)
    return int(sum(sizes))


def _search_within_target(model, layers, heads, neurons, predict, dense: float, target_speedup: float, where: str):
    """The search at the budget the per-unit costs give, shrunk until `predict(model)` (the cost model's value for
    what compaction keeps: a grouped-query layer keeps key/value heads and pads query groups, a latency table is not
    exactly linear) meets the target."""
    wished = dense / target_speedup
    budget = sum(u.cost for u in heads + neurons) - (dense - wished)
    for _ in range(50):
        if budget <= 0:
            break
        kept = search_units(heads, neurons, budget)
        _set_masks(model, layers, *kept)
        predicted = predict(model)
        if predicted <= wished * (1 + 1e-6):
            return kept
        budget -= max(predicted - wished, 1e-9 * dense)
    raise ValueError(
        f"`target_speedup` {target_speedup} is out of reach {where}: the parts pruning cannot shrink cost more than "
        "the target allows."
    )
