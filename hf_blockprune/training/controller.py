"""Schedule state shared by `BlockPruningTrainer` and `BlockPruningCallback`: the threshold and lambda of each step,
the density targets (turned into densities with the cost models of `compact`), the Fisher start, the filled stage."""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from ..compact.flops import attention_flops, densities_for_speedup, ffn_flops, hidden_width
from ..compact.latency import LatencyTable, densities_for_latency, measure_latency_table
from ..pruning.config import BlockPruningConfig
from ..pruning.filling import fill_surviving_heads, is_filled
from ..pruning.importance import LossFunction, broadcast_scores, calibration_batches, initialize_scores, score_fisher
from ..pruning.layer import MaskedLinear
from ..pruning.losses import expected_density, mask_density
from ..pruning.model import (
    TARGETS_ATTRIBUTE,
    block_scores,
    hidden_scores,
    read_legacy_keys,
    score_parameters,
    set_threshold,
)
from ..pruning.report import sparsity_report
from ..pruning.schedule import cubic_lambda, cubic_threshold, schedule_progress
from ..pruning.targets import (
    DensityTargets,
    UnitSet,
    head_alive_scores,
    keep_heads,
    keep_neurons,
    neuron_alive_scores,
)
from ..structure.discovery import prunable_layers
from ..structure.wrappers import model_wrapper

logger = logging.getLogger(__name__)

# marks an optimizer group whose learning rate was set to `fill_learning_rate` (saved with the optimizer's state)
FILLED_GROUP_KEY = "blockprune_fill_learning_rate_set"


class PruningController:
    """Drives the threshold and the regularization (fixed lambda or density targets) of a masked model.

    The schedule is a pure function of the step, and everything else lives in the model's state dict (scores,
    thresholds, the density multipliers), so a resumed run continues exactly where the interrupted one stopped.

    Args:
        model (`nn.Module`): a model masked by `apply_block_pruning`.
        config (`BlockPruningConfig`): the schedule.
    """

    def __init__(self, model: nn.Module, config: BlockPruningConfig):
        self.model = model
        self.config = config
        self.threshold = config.initial_threshold
        self.lambda_value = 0.0
        self.progress = 0.0
        self.targets: DensityTargets | None = None
        self._last_regularization: torch.Tensor | None = None
        self._loss_finite: torch.Tensor | None = None  # all training losses of this optimizer step were finite
        self._loss_sums: torch.Tensor | None = None  # (task loss, regularization, micro-batches) since the last log
        if config.has_target:
            self.targets = self._attach_targets()
        if not config.enabled:
            _log_no_pruning(config)

    def _targets_owner(self) -> nn.Module:
        """The module that holds the density targets: the model, or the one a wrapper names (the transformer of a
        sentence-transformers model, an `nn.Sequential` whose every child is a stage of its forward pass)."""
        wrapper = model_wrapper(self.model)
        return self.model if wrapper is None else wrapper.inner(self.model)

    def _attach_targets(self) -> DensityTargets:
        owner = self._targets_owner()
        ratio = self.config.target_penalty_ratio if self.config.pruning_method == "sigmoid_threshold" else 0.0
        existing = getattr(owner, TARGETS_ATTRIBUTE, None)
        if existing is not None:
            existing.penalty_ratio = ratio or None
            existing.units = self._unit_sets()
            existing.track_task_gradients(self.model)
            return existing
        if self.config.target_speedup is None:
            targets = self.config.density_targets()
        elif self.config.speedup_cost_model == "latency":
            targets = {"attention": 1.0, "ffn": 1.0}  # measured when training starts (`resolve_latency_targets`)
        else:
            targets = densities_for_speedup(self.model, self.config.target_speedup,
                                            self.config.speedup_sequence_length, self.config.hidden_density())
        device = next(self.model.parameters()).device
        state = DensityTargets(targets, self.config.target_rate, initial_lambda=1e-2,
                               per_stack=self.config.target_per_stack, penalty_ratio=ratio or None,
                               units=self._unit_sets()).to(device)
        owner.add_module(TARGETS_ATTRIBUTE, state)
        owner.register_load_state_dict_pre_hook(read_legacy_keys)  # a checkpoint from before 0.1.0 resumes too
        state.track_task_gradients(self.model)
        return state

    def _unit_sets(self) -> dict[str, list[UnitSet]]:
        """With `target_speedup` and blocks inside heads or neurons: the units to cut on (see `UnitSet`), each with
        its FLOPs at `speedup_sequence_length` as its cost."""
        config = self.config
        if not (config.cuts_on_units("attention") or config.cuts_on_units("ffn")):
            return {}
        length = config.speedup_sequence_length
        units: dict[str, list[UnitSet]] = {}
        hidden = hidden_width(self.model, config.hidden_density())  # the units cost what they will at that width
        for layer in prunable_layers(self.model):
            stack = layer.name.rpartition(".")[0]
            if config.cuts_on_units("attention"):
                for attention in (a for a in layer.attentions if isinstance(a.query, MaskedLinear)):
                    modules = [m.scores_module for m in (attention.query, attention.key, attention.value,
                                                         attention.output)]
                    cost = sum(attention_flops(attention, length, hidden=hidden)) / attention.num_heads
                    units.setdefault("attention", []).append(
                        UnitSet(stack, modules, functools.partial(head_alive_scores, attention), cost,
                                functools.partial(keep_heads, attention)))
            if config.cuts_on_units("ffn") and layer.has_ffn and isinstance(layer.ffn_output, MaskedLinear):
                modules = [m.scores_module for m in (*layer.ffn_inputs, layer.ffn_output)]
                cost = ffn_flops(layer, length, hidden=hidden) / layer.ffn_input.out_features
                units.setdefault("ffn", []).append(
                    UnitSet(stack, modules, functools.partial(neuron_alive_scores, layer), cost,
                            functools.partial(keep_neurons, layer)))
        return units

    def resolve_latency_targets(self, step: int, output_dir: str | None = None) -> None:
        """With `speedup_cost_model="latency"`, at the start of a run (`step` 0): measure the latency table (or load
        `latency_table`) and set the densities that meet `target_speedup` in measured time.

        Process 0 measures (and writes `latency_table.json` into `output_dir`) and every process takes its
        densities, so all cut alike. A resumed run keeps the densities saved in its checkpoint.
        """
        config = self.config
        if self.targets is None or config.target_speedup is None or config.speedup_cost_model != "latency":
            return
        if step > 0:
            return
        model = self._targets_owner()
        values = torch.zeros(2, dtype=torch.float64)
        if _process_index() == 0:
            if config.latency_table is not None:
                table = LatencyTable.load(config.latency_table)
            else:
                table = measure_latency_table(model, config.speedup_batch_size, config.speedup_sequence_length)
                if output_dir:
                    os.makedirs(output_dir, exist_ok=True)
                    table.save(os.path.join(output_dir, "latency_table.json"))
            density = densities_for_latency(table, model, config.target_speedup)
            values = torch.tensor([density["attention"], density["ffn"]], dtype=torch.float64)
        values = _broadcast(values, next(model.parameters()).device)
        self.targets.set_final_targets({"attention": float(values[0]), "ffn": float(values[1])})
        logger.info("target_speedup %.2f in measured time: densities %.3f (attention) and %.3f (FFN).",
                    config.target_speedup, float(values[0]), float(values[1]))

    def initialize_scores(self, dataloader, seed: int, step: int, loss_fn: LossFunction | None = None,
                          group: int = 1) -> None:
        """With `mask_init="fisher"`, start the scores from the Fisher ranking of their blocks (see
        `hf_blockprune.pruning.importance`), measured on `calibration_examples` examples of `dataloader`'s dataset.

        Runs only at the start of a run (`step` 0): a resumed run keeps its checkpoint's scores. In a distributed run
        every process measures the same examples and takes process 0's scores.

        Args:
            dataloader (`DataLoader`): the training dataloader (its dataset and collator are used).
            seed (`int`): seed of the calibration subset (the run's seed).
            step (`int`): optimizer steps already done.
            loss_fn (`Callable`, *optional*): `(model, batch) -> loss`; defaults to the loss the model returns.
            group (`int`, *optional*, defaults to 1): gradient accumulation steps x processes: the calibration
                batches' gradients are averaged in groups of that many before squaring, as one optimizer step's.
        """
        config = self.config
        if not config.enabled or config.mask_init != "fisher" or step > 0 or dataloader is None:
            return
        batches = calibration_batches(dataloader, config.calibration_examples, seed)
        importance = score_fisher(self.model, batches, loss_fn, group)
        # with a fixed lambda the soft-movement cut does not move with a target: start every block above it
        above = config.pruning_method == "sigmoid_threshold" and self.targets is None
        initialize_scores(importance, config.mask_init_value, above=above)
        broadcast_scores(self.model)
        logger.info("Scores initialized from the Fisher information of %d calibration examples.",
                    sum(len(next(iter(batch.values()))) for batch in batches))

    @property
    def soft_targets(self) -> bool:
        """Whether a density controller replaces the fixed lambda (soft movement pruning with a target)."""
        return self.targets is not None and self.config.pruning_method == "sigmoid_threshold"

    def update(self, step: int, total_steps: int) -> None:
        """Set threshold, lambda or targets for optimizer step `step` of `total_steps`; start the filled stage."""
        config = self.config
        if not config.enabled:
            return
        total_steps = max(total_steps, 1)
        self.progress = schedule_progress(step, total_steps, config.initial_warmup, config.final_warmup)
        self.threshold = cubic_threshold(self.progress, config.initial_threshold, config.final_threshold)
        self.lambda_value = 0.0 if self.targets is not None else cubic_lambda(self.progress, config.final_lambda)
        if config.fills and step >= config.fill_after * total_steps:
            self._fill()
            return
        if self.targets is not None and config.pruning_method == "topk":
            for group, value in self.targets.scheduled(self.progress).items():
                for kind in (("attention", "ffn") if group == "all" else (group,)):  # "all": not the hidden channels
                    set_threshold(self.model, value, kind)
            return
        if self.soft_targets:
            # the target owns the cuts: resetting them to logit(threshold) here would unmask everything
            self.targets.update(self.model, self.progress, step)
            return
        set_threshold(self.model, self.threshold)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Re-place the score cuts of a density target on the scores the optimizer step just moved.

        `update` places the cuts before each step's forward pass; the optimizer step then moves the scores (often all
        in the same direction), so until the next step the masks would no longer realize the scheduled density. What
        runs between steps (evaluation, the logged densities, checkpoints, the masks compacted at the end) must see
        the scheduled density: this re-places the cuts at `step`, the optimizer steps done so far. Training itself
        is unchanged, as the next `update` places the same cuts. No effect with top-k, fixed lambda, or once filled.
        It also folds the step's task gradient into the multipliers' bound (`DensityTargets.end_step`).
        """
        if not self.soft_targets or is_filled(self.model):
            return
        config = self.config
        self.targets.end_step(self.model)
        progress = schedule_progress(step, max(total_steps, 1), config.initial_warmup, config.final_warmup)
        self.targets.set_cuts(self.model, progress)

    def set_fill_learning_rate(self, optimizer, lr_scheduler=None) -> None:
        """Once the filled stage has started, give the model's weights `fill_learning_rate` (no effect otherwise).

        Each optimizer group's learning rate becomes `fill_learning_rate` and the scheduler's base rate of that group
        is scaled by the same ratio, so its schedule goes on from there (a linear decay still ends at 0). Groups that
        hold only mask scores are left alone (the scores are frozen in the filled stage). The change is marked in the
        group (saved with the optimizer's state), so a run resumed after the switch does not apply it twice.
        """
        rate = self.config.fill_learning_rate
        if rate is None or not is_filled(self.model):
            return
        scores = {id(parameter) for parameter in score_parameters(self.model)}
        base_lrs = getattr(lr_scheduler, "base_lrs", None)
        for index, group in enumerate(optimizer.param_groups):
            if group.get(FILLED_GROUP_KEY) or all(id(p) in scores for p in group["params"]) or not group["lr"] > 0:
                continue
            ratio = rate / group["lr"]
            group["lr"] = rate
            group[FILLED_GROUP_KEY] = True
            if base_lrs is not None and index < len(base_lrs):
                base_lrs[index] *= ratio
            last = getattr(lr_scheduler, "_last_lr", None)  # what the Trainer logs as `learning_rate`
            if isinstance(last, list) and index < len(last):
                last[index] = rate

    def _fill(self) -> None:
        self.lambda_value = 0.0
        if not is_filled(self.model):
            # from the scores, so a run resumed after the switch fills exactly as the uninterrupted one did
            set_threshold(self.model, self.threshold)
            if self.soft_targets:  # the masks at the switch are the target's, not `score > threshold`
                self.targets.set_cuts(self.model, self.progress)
            fill_surviving_heads(self.model)

    @torch.no_grad()
    def record_loss(self, loss: torch.Tensor) -> None:
        """Remember, on the device (no host sync), whether a micro-batch's training loss was finite."""
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    @torch.no_grad()
    def record_terms(self, task_loss: torch.Tensor, term: torch.Tensor | None) -> None:
        """Add a micro-batch's task loss (distillation included) and regularization term to the sums logged as
        `pruning/task_loss` and `pruning/regularization` (on the device, no host sync)."""
        row = torch.stack([task_loss.detach().float().reshape(()),
                           torch.zeros((), device=task_loss.device) if term is None else term.detach().float(),
                           torch.ones((), device=task_loss.device)])
        self._loss_sums = row if self._loss_sums is None else self._loss_sums + row.to(self._loss_sums.device)

    @torch.no_grad()
    def check_finite(self, step: int, output_dir: str | None) -> None:
        """Stop the run if this optimizer step's loss, the scores or the multipliers are not finite (one host sync).

        Called at the end of every optimizer step, before the Trainer can write a checkpoint, so no checkpoint ever
        holds the non-finite state.

        Raises:
            `FloatingPointError`: naming the step, what was not finite, and the last checkpoint written before it.
        """
        flags = {"the training loss": self._loss_finite} if self._loss_finite is not None else {}
        self._loss_finite = None
        scores = [s.scores for s in block_scores(self.model)]
        if scores:
            flags["the mask scores"] = torch.stack([torch.isfinite(s).all() for s in scores]).all()
        if self.targets is not None:
            flags["the density multipliers"] = torch.isfinite(self.targets.log_lambda).all()
        if not flags:
            return
        finite = torch.stack([flag.to(torch.bool).cpu() for flag in flags.values()]).tolist()
        if all(finite):
            return
        bad = [name for name, ok in zip(flags, finite) if not ok]
        raise FloatingPointError(non_finite_message(step, bad, output_dir))

    @property
    def has_regularization(self) -> bool:
        """Whether `regularization()` gives a term at this step (not with lambda 0, top-k or in the filled stage)."""
        return (self.soft_targets and not is_filled(self.model)) or self.lambda_value != 0.0

    def regularization(self) -> torch.Tensor | None:
        """The term to add to the training loss, or `None` when there is none (see `has_regularization`)."""
        if not self.has_regularization:
            self._last_regularization = None
            return None
        if self.soft_targets and not is_filled(self.model):
            term = self.targets.penalty(self.model)
        else:
            term = self.lambda_value * expected_density(self.model)
        self._last_regularization = term.detach()
        return term

    def metrics(self) -> dict[str, float]:
        """The `pruning/*` values to log (this syncs with the device: call it at log steps only)."""
        if not self.config.enabled:
            return {}
        last = self._last_regularization
        sums, self._loss_sums = self._loss_sums, None
        if sums is not None:
            task_loss, regularization, count = sums.tolist()
            window = {"pruning/task_loss": task_loss / count, "pruning/regularization": regularization / count}
        else:
            window = {"pruning/regularization": 0.0 if last is None else last.item()}
        logs = {
            "pruning/threshold": self.threshold,
            "pruning/lambda": self.lambda_value,
            **window,
            "pruning/density_attention": mask_density(self.model, "attention").item(),
            "pruning/density_ffn": mask_density(self.model, "ffn").item(),
            "pruning/density": mask_density(self.model).item(),
        }
        hidden = hidden_scores(self.model)
        if hidden is not None:  # the fraction of hidden channels kept
            with torch.no_grad():
                logs["pruning/density_hidden"] = hidden.mask().mean().item()
        if self.targets is not None:
            logs.update(self.targets.metrics(self.model, self.progress))
        return logs


def _process_index() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def _broadcast(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`values` of process 0 on every process (as is without `torch.distributed`)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    moved = values.to(device)
    torch.distributed.broadcast(moved, 0)
    return moved.cpu()


def emptied_stacks(model: nn.Module) -> list[str]:
    """What the masks empty entirely across a whole layer stack: e.g. `"model.encoder.layers: attention 0"` when
    no layer of the encoder keeps a head of its first attention, or `"...: FFN"` when none keeps an FFN neuron."""
    stacks: dict[str, list[dict]] = {}
    for row in sparsity_report(model):
        stacks.setdefault(row["layer"].rpartition(".")[0], []).append(row)
    emptied = []
    for stack, rows in stacks.items():
        for index in range(len(rows[0]["num_heads"])):
            if all(row["num_heads"][index] and len(row["heads_pruned"][index]) >= row["num_heads"][index]
                   for row in rows):
                emptied.append(f"{stack}: attention {index}")
        if all(row["ffn_neurons_total"] and row["ffn_neurons_kept"] == 0 for row in rows):
            emptied.append(f"{stack}: FFN")
    return emptied


def warn_if_stacks_emptied(model: nn.Module) -> None:
    """Log a warning naming every layer stack whose attention or FFN the masks removed entirely."""
    emptied = emptied_stacks(model)
    if emptied:
        logger.warning(
            "Pruning removed ALL of %s: the model no longer has that part in any layer of the stack (an encoder "
            "without attention does not mix tokens; a seq2seq model may generate nothing). Check its accuracy; to "
            "prevent it, use a target density (one score cut per stack, `target_per_stack=True`), a milder target, "
            "or per-group targets (`target_density_attention` / `target_density_ffn`).",
            "; ".join(emptied),
        )


def _log_no_pruning(config: BlockPruningConfig) -> None:
    if config.no_pruning_implied:
        logger.warning(
            "BlockPruningConfig names no preset and sets no pruning field: this run fine-tunes WITHOUT pruning "
            "(as `--pruning_preset none`). To prune, give e.g. `--pruning_preset hybrid --target_density 0.3`."
        )
    else:
        logger.info("pruning_preset='none': fine-tuning without pruning.")


def non_finite_message(step: int, what: list[str], output_dir: str | None) -> str:
    """The error of a run stopped on a non-finite value: the step, what was not finite, the last good checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(output_dir) if output_dir and os.path.isdir(output_dir) else None
    where = (
        f"The last good checkpoint is {last}: resume from it (`resume_from_checkpoint`)"
        if last else "No checkpoint was written before it: restart"
    )
    return (
        f"Block pruning stopped at optimizer step {step}: {' and '.join(what)} became NaN or infinite. Nothing was "
        f"saved from this state. {where} with a lower `learning_rate` or `mask_scores_learning_rate`, gradient "
        "clipping (`max_grad_norm`), or fp32 instead of fp16."
    )
