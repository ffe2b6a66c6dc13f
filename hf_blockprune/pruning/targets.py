"""Reach a target density with soft movement pruning.

Soft movement pruning only offers the regularization weight `lambda`, whose effect depends on the task, the data,
the number of steps and the mask learning rate. Given a final target density `T_k` for a group `k` of blocks (all
blocks, or attention and FFN separately), the scheduled target is

    t_k(step) = T_k + (1 - T_k) * (1 - progress) ** 3        (the cubic schedule of the threshold)

and two mechanisms replace the fixed `lambda` and the fixed threshold:

1. **Threshold.** Before every optimizer step the group's score cut `c_k` is set so that the realized density
   `D_k = sum_{b in k} n_b 1[S_b > c_k] / sum_{b in k} n_b` (`n_b`: the weights block `b` governs) is the largest
   not above `t_k`: a weighted quantile of the scores of the whole group. Unlike top-k, which keeps the same fraction
   of every matrix, the cut is shared by the group, so how much each layer and matrix keeps is learned by the scores.
   The realized density therefore follows the schedule to within one block. In a model with several layer
   stacks (BART's encoder and decoder), each stack gets its own cut at the same scheduled density
   (`target_per_stack`, on by default): one shared cut has been seen to empty a whole stack (every encoder head of a
   small BART at `target_density=0.5`), which leaves a model that generates nothing.

2. **Multiplier.** The L1 term becomes `sum_k lambda_k * E_k`, with `E_k = sum_{b in k} n_b sigmoid(S_b) /
   sum_{b in k} n_b` the expected density, and after every optimizer step `lambda_k` follows the gap between
   `E_k` and `t_k` by dual ascent in log space:

       log lambda_k  <-  clip(log lambda_k + rate * (E_k - t_k) / t_k,  log 1e-6,  log 1e4)

   so that the expected density follows the schedule too: too dense raises `lambda_k` geometrically, too sparse
   lowers it. Log space makes the controller independent of the loss scale (the right `lambda` spans orders of
   magnitude across tasks, data sizes and models), and the division by `t_k` makes a given relative error move it
   equally fast at any target. The penalty pushes the scores of blocks whose task gradient is weak below those of
   useful blocks, which is what the cut then removes; the expected and realized densities are both logged.

3. **Bound.** The expected density cannot follow the schedule faster than the scores move: with Adam a score moves
   at most about its learning rate per step, however strong the penalty. While it lags, dual ascent alone keeps
   raising `lambda_k` (it was seen at 500-1,400, the penalty then hundreds of times the task loss) and, once the
   density has caught up, takes hundreds of steps to come down: meanwhile the penalty, not the task, ranks the
   scores, and the expected density overshoots below the target. So `lambda_k` is also held to

       lambda_k  <=  ratio * ||g_task,k|| / ||dE_k / dS||

   with `g_task,k` the task loss's gradient on the group's scores (what reaches them through the masks, a running
   mean of its norm over the last steps) and `dE_k / dS` the penalty's own gradient per unit of `lambda_k`: the
   penalty's pull on the scores is never more than `ratio` times the task's. Adam normalizes every score's step, so
   scores whose task gradient is weak still go at full speed, while those the task needs keep their ranking.
   `ratio=None` removes the bound.

The multipliers are buffers of a small module attached to the model and the cuts are buffers of the scores, so
checkpoints save them and a resumed run continues exactly. So is the step of the last multiplier update: the cuts are
re-placed before every forward pass (every micro-batch of a gradient accumulation, and the first step after a resume)
while the multipliers move exactly once per optimizer step, whoever calls `update` and however often. The task
gradient's running norm is a buffer too, updated at the end of every optimizer step (averaged over the processes of a
distributed run, so that every process bounds alike). Everything runs on the device, with no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..structure.discovery import prunable_layers
from .layer import BlockScores

LOG_LAMBDA_RANGE = (math.log(1e-6), math.log(1e4))
# weight of the newest step in the running norm of the task gradient (about the last 10 steps)
TASK_GRADIENT_MOMENTUM = 0.1


def _in_group(module: BlockScores, kind: str | None) -> bool:
    """Whether `module` belongs to the group of `kind`: that kind, or (`None`, the `"all"` group) any block of the
    attention or FFN; the hidden channels (`prune_hidden`) are a group of their own."""
    return module.kind == kind if kind is not None else module.kind != "hidden"


def _group_modules(model: nn.Module, kind: str | None) -> list[BlockScores]:
    return [m for m in model.modules() if isinstance(m, BlockScores) and _in_group(m, kind)]


def stack_partition(model: nn.Module, modules: list[BlockScores]) -> list[list[BlockScores]]:
    """Split `modules` by the layer stack (e.g. encoder, decoder) whose layers they mask, in first-seen order."""
    from .layer import MaskedLinear

    stack_of = {}
    for layer in prunable_layers(model):
        stack = layer.name.rpartition(".")[0]
        for linear in layer.linears():
            if isinstance(linear, MaskedLinear):
                stack_of.setdefault(id(linear.scores_module), stack)
    parts: dict[str, list[BlockScores]] = {}
    for module in modules:
        parts.setdefault(stack_of.get(id(module), ""), []).append(module)
    return list(parts.values())


@torch.no_grad()
def weighted_score_cut(modules: list[BlockScores], density: float) -> torch.Tensor:
    """The score cut `c` keeping the highest-scored blocks of `modules` up to `density` of their weights.

    Blocks are ranked by effective score over all `modules`; the kept prefix is the longest whose weights stay within
    `density` of the total. Returns a 0-dim tensor between the last kept and the first dropped score.
    """
    scores = torch.cat([m.effective_scores().detach().flatten() for m in modules])
    weights = torch.cat([torch.full((m.scores.numel(),), float(m.weights_per_block), device=scores.device)
                         for m in modules])
    return weighted_cut(scores, weights, density)


@torch.no_grad()
def weighted_cut(scores: torch.Tensor, weights: torch.Tensor, density: float) -> torch.Tensor:
    """The cut keeping the highest `scores` up to `density` of the total `weights` (1-D tensors of one length)."""
    ordered, order = torch.sort(scores, descending=True)
    kept_weight = torch.cumsum(weights[order], 0)
    kept = (kept_weight <= density * kept_weight[-1] * (1 + 1e-6)).sum()
    padded = torch.cat([ordered[:1] + 1.0, ordered, ordered[-1:] - 1.0])  # (n + 2,)
    return (padded[kept] + padded[kept + 1]) / 2


@dataclass
class UnitSet:
    """The heads of one attention block, or the neurons of one FFN, under a cut placed on what compaction keeps.

    With blocks inside heads (`hybrid`) or inside neurons (`block`), the blocks' weight density is not the cost of the
    compacted model: a head costs its whole size while one value block and one output block of it survive. A target
    on the cost (`target_speedup`) is then met by ranking the units by `alive()`, the score their best surviving
    blocks must exceed for compaction to keep them, and cutting at the cost-weighted quantile: the cut keeps exactly
    the units whose cost fits. The blocks of the unit's projections are cut at the same value, and a unit the cut
    keeps keeps all of its blocks (`keep` sets the scores' unit floor, see `BlockScores`): compaction keeps it whole,
    so its cost is paid whatever its blocks' scores, and a zero block inside it would cost accuracy for no speed.

    Args:
        stack (`str`): the layer stack the unit's layer belongs to.
        modules (`list[BlockScores]`): the scores of the unit's projections (all get the cut).
        alive (`Callable[[], torch.Tensor]`): `(units,)` alive scores.
        cost (`float`): the cost of one unit (the cost model's, e.g. FLOPs of one head at the target's sequence
            length).
        keep (`Callable[[torch.Tensor], None]`): given the `(units,)` flags of the kept units, sets the unit floor
            of `modules` to their blocks.
    """

    stack: str
    modules: list[BlockScores]
    alive: Callable[[], torch.Tensor]
    cost: float
    keep: Callable[[torch.Tensor], None]


def _row_scores(linear) -> torch.Tensor:
    """`(out,)`: per output row of a masked projection, the highest effective score of its blocks."""
    grid = linear.weight_mask(linear.scores_module.effective_scores().detach())  # (R, C)
    return grid.amax(dim=1).repeat_interleave(linear.out_features // grid.shape[0])


def _column_scores(linear) -> torch.Tensor:
    """`(in,)`: per input column of a masked projection, the highest effective score of its blocks."""
    grid = linear.weight_mask(linear.scores_module.effective_scores().detach())  # (R, C)
    return grid.amax(dim=0).repeat_interleave(linear.in_features // grid.shape[1])


def head_alive_scores(attention) -> torch.Tensor:
    """`(num_heads,)`: per query slot, the smallest of the best value-row score of its key/value head and the best
    output-column score of its own (compaction keeps a head while both survive, `report.dead_heads`)."""
    d = attention.head_dim
    values = _row_scores(attention.value).view(attention.num_kv_heads, d).amax(dim=1)
    outputs = _column_scores(attention.output).view(attention.num_heads, d).amax(dim=1)
    return torch.minimum(values.repeat_interleave(attention.group), outputs)


def neuron_alive_scores(layer) -> torch.Tensor:
    """`(intermediate,)`: per FFN neuron, the smallest of its best input-row score (over the input projections) and
    its best output-column score (compaction keeps a neuron while both survive)."""
    rows = torch.stack([_row_scores(linear) for linear in layer.ffn_inputs]).amax(dim=0)
    return torch.minimum(rows, _column_scores(layer.ffn_output))


@torch.no_grad()
def _set_floor(linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Set the unit floor of a block-masked projection (which owns its scores, a `(R, C)` grid) to the blocks that
    hold a kept output row (`rows`, `(out,)`) or a kept input column (`cols`, `(in,)`), both {0, 1}."""
    module = linear.scores_module
    n_rows, n_cols = module.scores.shape
    if rows is not None:
        floor = rows.view(n_rows, -1).amax(dim=1, keepdim=True).expand(n_rows, n_cols)
    else:
        floor = cols.view(n_cols, -1).amax(dim=1)[None, :].expand(n_rows, n_cols)
    module.set_unit_floor(floor)


def keep_heads(attention, kept: torch.Tensor) -> None:
    """Set the unit floors of an attention's projections from `kept` (`(num_heads,)` bool, per query slot): the
    query rows and output columns of the kept heads, the key and value rows of the key/value heads serving one."""
    d = attention.head_dim
    kept = kept.float()
    kv = kept.view(attention.num_kv_heads, attention.group).amax(dim=1).repeat_interleave(d)
    _set_floor(attention.query, rows=kept.repeat_interleave(d))
    _set_floor(attention.key, rows=kv)
    _set_floor(attention.value, rows=kv)
    _set_floor(attention.output, cols=kept.repeat_interleave(d))


def keep_neurons(layer, kept: torch.Tensor) -> None:
    """Set the unit floors of an FFN's projections from `kept` (`(intermediate,)` bool): the input rows and the
    output columns of the kept neurons."""
    kept = kept.float()
    for linear in layer.ffn_inputs:
        _set_floor(linear, rows=kept)
    _set_floor(layer.ffn_output, cols=kept)


def _group_sums(model: nn.Module, kind: str | None, values) -> torch.Tensor:
    total_value, total_weights = None, 0.0
    for module in model.modules():
        if isinstance(module, BlockScores) and _in_group(module, kind):
            value = values(module).sum() * module.weights_per_block
            total_value = value if total_value is None else total_value + value
            total_weights += module.scores.numel() * module.weights_per_block
    return total_value / total_weights


class DensityTargets(nn.Module):
    """Per-group log-multipliers and their update (see the module docstring for the maths).

    Args:
        targets (`dict`): group -> final target density; a group is `"attention"`, `"ffn"`, `"all"` (both) or
            `"hidden"` (the hidden channels, `prune_hidden`).
        rate (`float`): step size of the log-multiplier update.
        initial_lambda (`float`): starting multiplier.
        per_stack (`bool`, *optional*, defaults to `True`): place one cut per layer stack (encoder, decoder) so that
            each stack meets the target on its own; `False`: one cut for the whole group.
        penalty_ratio (`float`, *optional*): the bound's `ratio` (see the module docstring); `None`: no bound.
        units (`dict[str, list[UnitSet]]`, *optional*): groups whose cut is placed on the units compaction keeps
            (see `UnitSet`), and their units; the other groups are cut on the blocks' weights.
    """

    def __init__(self, targets: dict[str, float], rate: float, initial_lambda: float, per_stack: bool = True,
                 penalty_ratio: float | None = None, units: dict[str, list[UnitSet]] | None = None):
        super().__init__()
        self.per_stack = per_stack
        self.penalty_ratio = penalty_ratio
        self.units = dict(units or {})
        self._partitions: dict[str, list[list[BlockScores]]] = {}
        self._partition_key: dict[str, tuple] = {}
        self.groups = list(targets)
        self.targets = dict(targets)
        self.rate = rate
        # the final targets, saved: a latency-model target is measured once, at the start of the run
        self.register_buffer("final_targets", torch.tensor([targets[g] for g in self.groups], dtype=torch.float64))
        self.register_buffer("log_lambda", torch.full((len(self.groups),), math.log(initial_lambda)))
        # the optimizer step whose multiplier update is done (0: none yet, as step 0 has no previous masks to follow)
        self.register_buffer("updated_step", torch.tensor(0, dtype=torch.long))
        self._updated_step = 0
        # running norm of the task gradient on each group's scores; -1: no step measured yet
        self.register_buffer("task_gradient_norm", torch.full((len(self.groups),), -1.0))
        self.register_load_state_dict_post_hook(DensityTargets._sync_step)

    @staticmethod
    def _sync_step(module, incompatible_keys):
        module._updated_step = int(module.updated_step)
        module.targets = dict(zip(module.groups, module.final_targets.tolist()))

    def set_final_targets(self, targets: dict[str, float]) -> None:
        """Replace the final target of each group (e.g. once the latency table gives them)."""
        self.targets = {group: float(targets[group]) for group in self.groups}
        self.final_targets.copy_(torch.tensor([self.targets[g] for g in self.groups], dtype=torch.float64))

    @staticmethod
    def _kind(group: str) -> str | None:
        return None if group == "all" else group

    def scheduled(self, progress: float) -> dict[str, float]:
        """The target of each group at `progress` of the cubic schedule."""
        return {g: t + (1.0 - t) * (1.0 - progress) ** 3 for g, t in self.targets.items()}

    @torch.no_grad()
    def set_cuts(self, model: nn.Module, progress: float) -> None:
        """Set each group's score cut so that its realized density is its scheduled target at `progress`."""
        scheduled = self.scheduled(progress)
        for group in self.groups:
            if group in self.units:
                self._set_unit_cuts(self.units[group], scheduled[group])
                continue
            for modules in self._cut_sets(model, group):
                cut = weighted_score_cut(modules, scheduled[group])
                for module in modules:
                    module.set_score_cut(cut)

    def _unit_partition(self, units: list[UnitSet]) -> list[list[UnitSet]]:
        if not self.per_stack:
            return [units]
        stacks: dict[str, list[UnitSet]] = {}
        for unit in units:
            stacks.setdefault(unit.stack, []).append(unit)
        return list(stacks.values())

    @torch.no_grad()
    def _set_unit_cuts(self, units: list[UnitSet], density: float) -> None:
        """One cut per stack on the units' alive scores, keeping `density` of their cost (see `UnitSet`)."""
        for part in self._unit_partition(units):
            alive = [unit.alive() for unit in part]
            costs = torch.cat([torch.full_like(scores, unit.cost) for unit, scores in zip(part, alive)])
            cut = weighted_cut(torch.cat(alive), costs, density)
            for module in {id(m): m for unit in part for m in unit.modules}.values():
                module.set_score_cut(cut)
            for unit, scores in zip(part, alive):
                unit.keep(scores > cut)

    @torch.no_grad()
    def unit_density(self, group: str) -> float:
        """The cost fraction of the units compaction would keep now (a group cut on units)."""
        alive = [(unit.alive() > unit.modules[0].score_cut).float() for unit in self.units[group]]
        costs = [unit.cost for unit in self.units[group]]
        kept = sum(float(flags.sum()) * cost for flags, cost in zip(alive, costs))
        return kept / sum(flags.numel() * cost for flags, cost in zip(alive, costs))

    def _cut_sets(self, model: nn.Module, group: str) -> list[list[BlockScores]]:
        """The sets of scores that share one cut: the group, or the group within each layer stack."""
        modules = _group_modules(model, self._kind(group))
        if not self.per_stack:
            return [modules]
        key = (group, tuple(id(m) for m in modules))
        if self._partition_key.get(group) != key:  # the model's structure is fixed during training: split once
            self._partition_key[group] = key
            self._partitions[group] = stack_partition(model, modules)
        return self._partitions[group]

    @torch.no_grad()
    def update(self, model: nn.Module, progress: float, step: int) -> None:
        """Place each group's score cut at its scheduled target; once per optimizer `step`, move the multipliers.

        Safe to call before every micro-batch: the cuts depend only on the scores (which do not move between the
        micro-batches of one optimizer step) and the multipliers take their dual-ascent step only when `step` is
        past the last one updated (a saved buffer, so a resumed run neither skips nor repeats a step).
        """
        self.set_cuts(model, progress)
        if step <= self._updated_step:
            return
        self._updated_step = int(step)
        self.updated_step.fill_(int(step))
        scheduled = self.scheduled(progress)
        for index, group in enumerate(self.groups):
            expected = _group_sums(model, self._kind(group), lambda s: torch.sigmoid(s.effective_scores()))
            gap = (expected - scheduled[group]) / max(scheduled[group], 1e-3)
            log_lambda = self.log_lambda[index] + self.rate * gap
            if self.penalty_ratio is not None:
                log_lambda = torch.minimum(log_lambda, self._log_bound(model, index, group))
            self.log_lambda[index] = log_lambda.clamp(*LOG_LAMBDA_RANGE)

    def _penalty_gradient_norm(self, model: nn.Module, group: str) -> torch.Tensor:
        """`||dE_k / dS||`: the norm of the expected density's gradient over the group's scores (per unit lambda)."""
        modules = _group_modules(model, self._kind(group))
        total = sum(m.scores.numel() * m.weights_per_block for m in modules)
        squares = [((m.weights_per_block / total) * torch.sigmoid(m.effective_scores().detach())
                    * (1 - torch.sigmoid(m.effective_scores().detach()))).pow(2).sum() for m in modules]
        return torch.stack(squares).sum().sqrt()

    def _log_bound(self, model: nn.Module, index: int, group: str) -> torch.Tensor:
        """`log(ratio * ||g_task|| / ||dE/dS||)`; no bound (the range's top) before any task gradient is measured."""
        norm = self.task_gradient_norm[index]
        bound = torch.log(self.penalty_ratio * norm.clamp_min(0) / self._penalty_gradient_norm(model, group)
                          .clamp_min(1e-30))
        return torch.where(norm < 0, torch.full_like(bound, LOG_LAMBDA_RANGE[1]), bound)

    def track_task_gradients(self, model: nn.Module) -> None:
        """Make every score of the targeted groups sum the task gradient (see `BlockScores.track_task_gradient`);
        needed by the bound only."""
        if self.penalty_ratio is None:
            return
        for group in self.groups:
            for module in _group_modules(model, self._kind(group)):
                if module.task_gradient is None:
                    module.track_task_gradient(True)

    @torch.no_grad()
    def end_step(self, model: nn.Module) -> None:
        """After an optimizer step: fold the step's task gradient into each group's running norm, then reset it.

        In a distributed run the gradients are first averaged over the processes (each holds its own batch's), as
        DDP averages the parameters' gradients.
        """
        if self.penalty_ratio is None:
            return
        for index, group in enumerate(self.groups):
            modules = [m for m in _group_modules(model, self._kind(group)) if m.task_gradient is not None]
            if not modules:
                continue
            gradient = torch.cat([m.task_gradient.flatten() for m in modules])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(gradient)
                gradient /= torch.distributed.get_world_size()
            norm = gradient.norm().to(self.task_gradient_norm.dtype)
            previous = self.task_gradient_norm[index]
            mixed = (1 - TASK_GRADIENT_MOMENTUM) * previous + TASK_GRADIENT_MOMENTUM * norm
            self.task_gradient_norm[index] = torch.where(previous < 0, norm, mixed)
            for module in modules:
                module.task_gradient.zero_()

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """`sum_k lambda_k * E_k`, differentiable in the scores."""
        lambdas = self.log_lambda.exp()
        terms = [
            lambdas[index] * _group_sums(model, self._kind(group), lambda s: torch.sigmoid(s.effective_scores()))
            for index, group in enumerate(self.groups)
        ]
        return torch.stack(terms).sum()

    @torch.no_grad()
    def metrics(self, model: nn.Module, progress: float) -> dict[str, float]:
        """Target, expected and realized density and multiplier of each group, for the logs."""
        logs = {}
        scheduled = self.scheduled(progress)
        for index, group in enumerate(self.groups):
            kind = self._kind(group)
            logs[f"pruning/target_density_{group}"] = scheduled[group]
            logs[f"pruning/expected_density_{group}"] = _group_sums(
                model, kind, lambda s: torch.sigmoid(s.effective_scores())).item()
            logs[f"pruning/realized_density_{group}"] = _group_sums(model, kind, lambda s: s.mask()).item()
            logs[f"pruning/lambda_{group}"] = self.log_lambda[index].exp().item()
            if self.penalty_ratio is not None:
                logs[f"pruning/lambda_bound_{group}"] = self._log_bound(model, index, group).exp().item()
            if group in self.units:
                logs[f"pruning/kept_cost_{group}"] = self.unit_density(group)
        return logs
