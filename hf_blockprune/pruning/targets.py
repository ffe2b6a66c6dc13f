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

The multipliers are buffers of a small module attached to the model and the cuts are buffers of the scores, so
checkpoints save them and a resumed run continues exactly. So is the step of the last multiplier update: the cuts are
re-placed before every forward pass (every micro-batch of a gradient accumulation, and the first step after a resume)
while the multipliers move exactly once per optimizer step, whoever calls `update` and however often. Everything runs
on the device, with no host sync.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layer import BlockScores

LOG_LAMBDA_RANGE = (math.log(1e-6), math.log(1e4))


def _group_modules(model: nn.Module, kind: str | None) -> list[BlockScores]:
    return [m for m in model.modules() if isinstance(m, BlockScores) and (kind is None or m.kind == kind)]


def stack_partition(model: nn.Module, modules: list[BlockScores]) -> list[list[BlockScores]]:
    """Split `modules` by the layer stack (e.g. encoder, decoder) whose layers they mask, in first-seen order."""
    from .layer import MaskedLinear
    from .model import prunable_layers

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
    ordered, order = torch.sort(scores, descending=True)
    kept_weight = torch.cumsum(weights[order], 0)
    kept = (kept_weight <= density * kept_weight[-1] * (1 + 1e-6)).sum()
    padded = torch.cat([ordered[:1] + 1.0, ordered, ordered[-1:] - 1.0])  # (n + 2,)
    return (padded[kept] + padded[kept + 1]) / 2


def _group_sums(model: nn.Module, kind: str | None, values) -> torch.Tensor:
    total_value, total_weights = None, 0.0
    for module in model.modules():
        if isinstance(module, BlockScores) and (kind is None or module.kind == kind):
            value = values(module).sum() * module.weights_per_block
            total_value = value if total_value is None else total_value + value
            total_weights += module.scores.numel() * module.weights_per_block
    return total_value / total_weights


class DensityTargets(nn.Module):
    """Per-group log-multipliers and their update (see the module docstring for the maths).

    Args:
        targets (`dict`): group -> final target density; a group is `"attention"`, `"ffn"` or `"all"`.
        rate (`float`): step size of the log-multiplier update.
        initial_lambda (`float`): starting multiplier.
        per_stack (`bool`, *optional*, defaults to `True`): place one cut per layer stack (encoder, decoder) so that
            each stack meets the target on its own; `False`: one cut for the whole group.
    """

    def __init__(self, targets: dict[str, float], rate: float, initial_lambda: float, per_stack: bool = True):
        super().__init__()
        self.per_stack = per_stack
        self._partitions: dict[str, list[list[BlockScores]]] = {}
        self._partition_key: dict[str, tuple] = {}
        self.groups = list(targets)
        self.targets = dict(targets)
        self.rate = rate
        self.register_buffer("log_lambda", torch.full((len(self.groups),), math.log(initial_lambda)))
        # the optimizer step whose multiplier update is done (0: none yet, as step 0 has no previous masks to follow)
        self.register_buffer("updated_step", torch.tensor(0, dtype=torch.long))
        self._updated_step = 0
        self.register_load_state_dict_post_hook(DensityTargets._sync_step)

    @staticmethod
    def _sync_step(module, incompatible_keys):
        module._updated_step = int(module.updated_step)

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
            for modules in self._cut_sets(model, group):
                cut = weighted_score_cut(modules, scheduled[group])
                for module in modules:
                    module.set_score_cut(cut)

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
            self.log_lambda[index] = (self.log_lambda[index] + self.rate * gap).clamp(*LOG_LAMBDA_RANGE)

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
        return logs
