"""A latency cost model measured on this machine, so that `target_speedup` means measured time.

The FLOPs model (`hf_blockprune.compact.flops`) leaves out what does not shrink with the heads and neurons
(embeddings, LayerNorm, softmax, the head, per-operation overhead) and how fast a matmul of a given size runs; at batch
1 or on small models, a FLOPs ratio overstates the speedup a user times. As Kwon et al. (2022) do, the latency table
is measured once for a model at the batch size and sequence length it will serve:

- `dense`: the dense model's latency;
- per layer stack and attention block, the latency change per layer when every layer of the stack keeps `k` heads of
  that attention (the others dense), for a grid of `k`; per stack, the same for `n` FFN neurons.

Each point times a compacted copy of the model (built with the library's own masks and compaction, so it is exactly
the model a run would save) against the dense model, interleaved, and divides the difference by the stack's layer
count. A pruned model's latency is then predicted as

    dense + sum over layers of (attention change at its kept heads + FFN change at its kept neurons),

interpolating linearly between grid points. Each change is measured as a fraction of the dense latency timed beside
it, so a machine that drifts between points does not skew them.

That sum treats the parts as independent, and they are not quite: measured on MiniLM at batch 32 on 2 CPU cores, a
model keeping 4 of 12 heads and 576 of 1,536 neurons in every layer ran 2.75x faster where the sum predicted 3.32x
(each part's change alone was within 15% of its table entry). So the table also times the whole model pruned
uniformly (every layer keeping the same fraction of its heads and neurons, a grid of fractions) and keeps, for each
such model, the pair (the sum's prediction, the measured latency), both as fractions of the dense latency: `joint`.
A prediction maps the sum through these pairs (linear between them), so a model is predicted at what a uniformly
pruned model of equal summed cost measured; a table without `joint` (made by hand, or by an earlier version) predicts
the sum alone. `densities_for_latency` turns a target speedup into the density of heads and neurons that the
prediction meets, in place of the FLOPs model's `densities_for_speedup`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..pruning.config import BlockPruningConfig
from ..pruning.model import apply_block_pruning, block_scores, is_block_pruned, remove_block_pruning, set_threshold
from ..structure.discovery import prunable_layers, structure_of
from ..structure.layers import PrunableLayer
from .compaction import LAYOUT_ATTRIBUTE, compact_model, compaction_plan
from .depth import DROPPED_KEY

logger = logging.getLogger(__name__)

# 2: changes measured as fractions of the dense latency timed beside them, and `joint`; 1: absolute changes, no `joint`
TABLE_VERSION = 2


def timing_inputs(config, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token inputs for timing a text model: `input_ids` and `attention_mask` of `(batch_size, seq_len)`,
    and `decoder_input_ids` for an encoder-decoder.

    Raises:
        `ValueError`: `seq_len` exceeds the model's `max_position_embeddings`, or the config has no vocabulary.
    """
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise ValueError(f"Sequence length {seq_len} exceeds the model's max_position_embeddings ({limit}).")
    vocab = getattr(config, "vocab_size", None)
    if not vocab:
        raise ValueError("Timing inputs are token ids: the model's config has no `vocab_size` (not a text model).")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, vocab - 1), vocab, (batch_size, seq_len), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def median_latencies(models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], rounds: int, warmup: int,
                     progress=None) -> dict[str, float]:
    """Median latency (seconds) of each model, timed round-robin with a rotating start after `warmup` calls each.

    Args:
        models (`dict[str, nn.Module]`): the models to time, by name (in eval mode).
        inputs (`dict[str, torch.Tensor]`): the keyword inputs of every call.
        rounds (`int`): timed calls per model.
        warmup (`int`): untimed calls per model first.
        progress (`Callable`, *optional*): wraps the round iterators (e.g. `functools.partial(tqdm, desc=...)`).

    Returns:
        `dict[str, float]`: the median latency of each model, in seconds.
    """
    progress = progress or (lambda iterable, **kwargs: iterable)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    devices = {tensor.device for tensor in inputs.values() if torch.is_tensor(tensor) and tensor.device.type != "cpu"}

    def synchronize():  # an accelerator runs asynchronously: time what it did, not what was queued
        for device in devices:
            torch.accelerator.synchronize(device)

    with torch.inference_mode():
        for _ in progress(range(warmup), desc="warmup", unit="round"):
            for name in names:
                models[name](**inputs)
        for index in progress(range(rounds), desc="timing", unit="round"):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                synchronize()
                start = time.perf_counter()
                models[name](**inputs)
                synchronize()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass
class LatencyTable:
    """Measured latency of a model and of its per-layer changes with kept heads and neurons (see the module
    docstring).

    Args:
        batch_size (`int`), seq_len (`int`): the shape it was measured at.
        dense (`float`): the dense model's latency, in seconds.
        attention (`dict[str, list[list[float]]]`): `"<stack>#<attention index>"` -> `[[kept heads, change per
            layer in seconds], ...]`, sorted by heads; the full head count has change 0.
        ffn (`dict[str, list[list[float]]]`): `"<stack>"` -> `[[kept neurons, change per layer], ...]`.
        environment (`dict`): where it was measured (device, threads, torch version).
        joint (`list[list[float]]`): `[[summed prediction / dense, measured latency / dense], ...]` for models pruned
            uniformly, sorted, the measured fractions non-decreasing; empty: the summed prediction is used as it is.
        version (`int`): how it was measured (`TABLE_VERSION` for a table measured now; 1 for one saved before).
    """

    batch_size: int
    seq_len: int
    dense: float
    attention: dict[str, list[list[float]]] = field(default_factory=dict)
    ffn: dict[str, list[list[float]]] = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    joint: list[list[float]] = field(default_factory=list)
    version: int = 1

    @staticmethod
    def _interpolate(points: list[list[float]], kept: float) -> float:
        """The change at `kept`, linear between the measured points (and beyond the ends)."""
        (x0, y0), (x1, y1) = points[0], points[-1]
        for (a, ya), (b, yb) in zip(points, points[1:]):
            if a <= kept <= b:
                (x0, y0), (x1, y1) = (a, ya), (b, yb)
                break
        if kept < points[0][0]:
            (x0, y0), (x1, y1) = points[0], points[1]
        return y0 if x1 == x0 else y0 + (y1 - y0) * (kept - x0) / (x1 - x0)

    def layer_change(self, kept_heads: list[float], kept_neurons: float | None, stack: str) -> float:
        """Latency change of one layer of `stack` keeping `kept_heads` (one per attention block) and `kept_neurons`."""
        change = sum(self._interpolate(self.attention[f"{stack}#{index}"], heads)
                     for index, heads in enumerate(kept_heads) if f"{stack}#{index}" in self.attention)
        if kept_neurons is not None and stack in self.ffn:
            change += self._interpolate(self.ffn[stack], kept_neurons)
        return change

    def calibrated(self, summed: float) -> float:
        """The latency predicted for a model whose per-part changes sum to `summed` (seconds): mapped through
        `joint` where the table has it, else `summed` itself."""
        if len(self.joint) < 2:
            return summed
        return self.dense * self._interpolate(self.joint, summed / self.dense)

    def predict(self, model: nn.Module) -> float:
        """Predicted latency of `model` (dense, masked: counted as compaction will keep it, or compacted)."""
        return self.calibrated(self.summed(model))

    def summed(self, model: nn.Module) -> float:
        """The dense latency plus the per-layer changes of `model`'s kept heads and neurons (before `joint`)."""
        plans = compaction_plan(model) if is_block_pruned(model) else None
        total = self.dense
        described = structure_of(model).layers
        for index, layer in enumerate(prunable_layers(model)):
            stack = layer.name.rpartition(".")[0]
            if plans is not None:
                present = [len(slots) for slots in plans[index].slots]
                neurons = None if plans[index].neurons is None else len(plans[index].neurons)
            else:
                present = [attention.num_heads for attention in layer.attentions]
                neurons = layer.ffn_input.out_features if layer.has_ffn else None
            # a sublayer removed at an earlier compaction keeps nothing: 0 heads, 0 neurons
            heads_by_query = {attention.spec.query: count for attention, count in zip(layer.attentions, present)}
            heads = [heads_by_query.get(spec.query, 0) for spec in described[index].stack.attentions]
            neurons = 0 if described[index].ffn_removed else neurons
            total += self.layer_change(heads, neurons, stack)
        return total + self._dropped_change(model, described)

    def _dropped_change(self, model: nn.Module, described) -> float:
        """The change of the layers an earlier compaction dropped (`"dropped_layers"`): each keeps nothing."""
        dropped = (getattr(getattr(model, "config", None), LAYOUT_ATTRIBUTE, None) or {}).get(DROPPED_KEY, {})
        change = 0.0
        for stack, indices in dropped.items():
            layer = next((layer for layer in described if layer.stack_name == stack), None)
            if layer is not None:  # each stack keeps a layer, which tells what its layers held
                empty = self.layer_change([0] * len(layer.stack.attentions), 0 if layer.stack.ffn else None, stack)
                change += len(indices) * empty
        return change

    def to_dict(self) -> dict:
        """A JSON-serializable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> LatencyTable:
        """The table of `to_dict()` output (a table saved before `joint` existed reads with an empty one)."""
        return cls(**values)

    def save(self, path: str | os.PathLike) -> None:
        """Write the table as JSON."""
        with open(path, "w") as handle:
            json.dump(self.to_dict(), handle, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTable:
        """Read a table written by `save`."""
        with open(path) as handle:
            return cls.from_dict(json.load(handle))


def _grid(full: int, points: int) -> list[int]:
    """`points` counts from 0 to `full`, evenly spread (every count when `full` is small)."""
    if full + 1 <= points:
        return list(range(full + 1))
    return sorted({round(full * i / (points - 1)) for i in range(points)})


def _dense_copy(model: nn.Module) -> nn.Module:
    """An unmasked copy of `model` (its LoRA adapters merged), in eval mode: what the variants are cut from."""
    dense = copy.deepcopy(model)
    if is_block_pruned(dense):
        remove_block_pruning(dense, merge=False)
    if callable(getattr(dense, "merge_and_unload", None)):  # a peft model
        dense = dense.merge_and_unload()
    return dense.eval()


@torch.no_grad()
def _variant(dense: nn.Module, keep) -> nn.Module:
    """A compacted copy of `dense` in which every prunable layer keeps its first `keep(layer, part, full)` units of
    each part: `part` an attention block's index (heads) or `None` (FFN neurons), `full` that part's unit count."""
    model = copy.deepcopy(dense)
    apply_block_pruning(model, BlockPruningConfig.from_preset("struct"))
    for module in block_scores(model):
        module.scores.fill_(1.0)
    for layer in prunable_layers(model):
        parts = [(index, attention.query.scores_module.scores, attention.num_heads)
                 for index, attention in enumerate(layer.attentions)]
        if layer.has_ffn:
            parts.append((None, layer.ffn_input.scores_module.scores, layer.ffn_input.out_features))
        for part, scores, full in parts:
            scores[keep(layer, part, full):] = -1.0
    set_threshold(model, 0.5)
    return compact_model(model).eval()


def _one_part(stack: str, attention: int | None, kept: int):
    """`_variant`'s `keep` for: the layers of `stack` keep `kept` units of one part, everything else whole."""
    return lambda layer, part, full: kept if layer.name.rpartition(".")[0] == stack and part == attention else full


def _uniform(density: float):
    """`_variant`'s `keep` for: every layer keeps `density` of the units of every part (rounded)."""
    return lambda layer, part, full: round(density * full)


def _relative(latency: dict[str, float], dense: float) -> float:
    """The variant's latency as a change measured against the dense model timed beside it, in `dense`'s seconds."""
    return (latency["variant"] / latency["dense"] - 1.0) * dense


def _stacks(layers: list[PrunableLayer]) -> dict[str, list[PrunableLayer]]:
    stacks: dict[str, list[PrunableLayer]] = {}
    for layer in layers:
        stacks.setdefault(layer.name.rpartition(".")[0], []).append(layer)
    return stacks


def _check_uniform(stack: str, layers: list[PrunableLayer]) -> None:
    """Refuse a stack whose layers differ in size (a compacted model): the table holds changes of one layer size."""
    def sizes(layer):
        heads = tuple((attention.num_heads, attention.real_heads) for attention in layer.attentions)
        return heads, (layer.ffn_input.out_features if layer.has_ffn else None), layer.ffn_placeholder

    if len({sizes(layer) for layer in layers}) > 1:
        raise ValueError(
            f"The layers of {stack} differ in size (a model compacted before): the latency table measures layers of "
            "one size. Use `speedup_cost_model='flops'` to prune it again, or measure the table on the dense model."
        )


def measure_latency_table(model: nn.Module, batch_size: int, seq_len: int, rounds: int = 5, warmup: int = 1,
                          head_points: int = 9, neuron_points: int = 9, joint_points: int = 8) -> LatencyTable:
    """Measure the `LatencyTable` of `model` on its device, at `batch_size` x `seq_len` tokens.

    Args:
        model (`nn.Module`): a text model (dense, masked or compacted: its current sizes are the full ones).
        batch_size (`int`), seq_len (`int`): the shape to time.
        rounds (`int`, *optional*, defaults to 5): timed calls of each variant and of the dense model.
        warmup (`int`, *optional*, defaults to 1): untimed calls first.
        head_points (`int`, *optional*, defaults to 9), neuron_points (`int`, *optional*, defaults to 9): grid sizes.
        joint_points (`int`, *optional*, defaults to 8): uniformly pruned models timed for `joint` (fractions 0,
            1/joint_points, ...; 0 measures none and keeps the summed prediction).

    Returns:
        `LatencyTable`: dense latency, per-layer changes and the uniform models' pairs.
    """
    dense = _dense_copy(model)
    device = next(dense.parameters()).device
    inputs = {k: v.to(device) for k, v in timing_inputs(dense.config, batch_size, seq_len).items()}
    dense_latency = median_latencies({"dense": dense}, inputs, rounds, warmup)["dense"]
    table = LatencyTable(batch_size, seq_len, dense_latency, environment={
        "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__},
        version=TABLE_VERSION)

    def timed(keep) -> tuple[nn.Module, float]:
        variant = _variant(dense, keep)
        latency = median_latencies({"dense": dense, "variant": variant}, inputs, rounds, warmup)
        return variant, _relative(latency, dense_latency)

    for stack, layers in _stacks(prunable_layers(dense)).items():
        _check_uniform(stack, layers)
        parts = [(f"{stack}#{i}", i, attention.num_heads) for i, attention in enumerate(layers[0].attentions)]
        if layers[0].has_ffn:
            parts.append((stack, None, layers[0].ffn_input.out_features))
        for key, attention, full in parts:
            points = [[float(full), 0.0]]
            for kept in _grid(full, head_points if attention is not None else neuron_points)[:-1]:
                variant, change = timed(_one_part(stack, attention, kept))
                points.append([float(kept), change / len(layers)])
                del variant
            (table.attention if attention is not None else table.ffn)[key] = sorted(points)
    table.joint = _measure_joint(table, timed, joint_points)
    logger.info("Latency table at batch %d x %d tokens: dense %.2f ms.", batch_size, seq_len, dense_latency * 1e3)
    return table


def _measure_joint(table: LatencyTable, timed, points: int) -> list[list[float]]:
    """`joint`: the uniformly pruned models keeping 0, 1/points, ... of every part, each timed (`timed(keep)` ->
    `(variant, change in seconds)`) and paired with the table's summed prediction for it; empty when `points` is 0."""
    pairs = []
    for step in range(points):
        variant, change = timed(_uniform(step / points))
        pairs.append([table.summed(variant) / table.dense, 1.0 + change / table.dense])
    return monotone_fit(pairs) if points else []


def monotone_fit(pairs: list[list[float]]) -> list[list[float]]:
    """`joint` from the uniform models' `[summed / dense, measured / dense]` pairs: the least-squares non-decreasing
    fit (pool adjacent violators; timing noise can make two close models cross, and a smaller model is never
    predicted slower than a larger one), ending at the dense model's exact `[1.0, 1.0]`. A pair whose sum is not
    below the dense latency (a table too noisy to tell that model from the dense one) is left out."""
    # the dense model's pair is exact, not a measurement: no model is predicted slower than it
    points = sorted((x, min(y, 1.0)) for x, y in pairs if x < 1.0)
    blocks: list[list[float]] = []  # [sum of y, number of points]
    for _, y in points:
        blocks.append([y, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1] = [blocks[-1][0] + total, blocks[-1][1] + count]
    fitted = [total / count for total, count in blocks for _ in range(count)]
    out: list[list[float]] = []
    for (x, _), y in zip(points, fitted):
        if out and x == out[-1][0]:
            out[-1][1] = max(out[-1][1], y)
        else:
            out.append([x, y])
    return out + [[1.0, 1.0]]


def _uniform_latency(table: LatencyTable, model: nn.Module, density: float) -> float:
    """Predicted latency when every layer keeps `density` of its heads and of its FFN neurons (fractional counts)."""
    total = table.dense
    for layer in prunable_layers(model):
        heads = [density * attention.num_heads for attention in layer.attentions]
        neurons = density * layer.ffn_input.out_features if layer.has_ffn else None
        total += table.layer_change(heads, neurons, layer.name.rpartition(".")[0])
    return table.calibrated(total)


def densities_for_latency(table: LatencyTable, model: nn.Module, target_speedup: float) -> dict[str, float]:
    """The attention and FFN density (one value for both) at which `table` predicts `target_speedup`.

    Args:
        table (`LatencyTable`): measured for `model`.
        model (`nn.Module`): the dense (or masked) model.
        target_speedup (`float`): wished dense / pruned latency, > 1.

    Returns:
        `dict[str, float]`: `{"attention": d, "ffn": d}`.

    Raises:
        `ValueError`: even removing every head and neuron does not reach the target (the latency that does not
            shrink is too large).
    """
    wished = table.dense / target_speedup
    floor = _uniform_latency(table, model, 0.0)
    if floor >= wished:
        raise ValueError(
            f"`target_speedup` {target_speedup} is out of reach in measured time at batch {table.batch_size} x "
            f"{table.seq_len} tokens: without any head or FFN neuron the model still takes {floor * 1e3:.2f} ms of "
            f"{table.dense * 1e3:.2f} ms, which caps the speedup at {table.dense / floor:.2f}x."
        )
    low, high = 0.0, 1.0
    for _ in range(50):  # the predicted latency grows with the density
        middle = (low + high) / 2
        low, high = (middle, high) if _uniform_latency(table, model, middle) < wished else (low, middle)
    return {"attention": low, "ffn": low}
