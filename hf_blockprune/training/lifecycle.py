"""The one lifecycle of a block-pruning run, which `BlockPruningTrainer` and `BlockPruningCallback` both call.

A run goes through the same steps whichever route it takes:

1. at construction: check the `TrainingArguments`, mask the model, build the controller (schedule, targets), the
   distiller (a teacher) and the snapshots; checkpoints keep the scores (`checkpoint_on_save`);
2. before `train()`: pick the checkpoint to resume from (`resolve_checkpoint`: an incomplete checkpoint is skipped,
   one without mask scores refused);
3. at train begin: latency targets, the Fisher start of the scores, the snapshots' plan, the first step's schedule;
4. at each step begin: the step's threshold, lambda or targets, and the filled stage's learning rate;
5. for each training micro-batch: the loss (distillation, regularization, the accumulation weight; `training_loss`);
6. at each step end: stop on non-finite values (before any checkpoint), re-place a target's cuts, save snapshots;
7. at each log: the `pruning/*` values (`add_metrics`);
8. at train end: warn about emptied stacks; from then on `save_model()` writes the compacted model and its card.

The routes differ only in how these calls reach the lifecycle: the subclass overrides `compute_loss`, `log` and
`train` and adds a `LifecycleEvents` callback; the callback is a `LifecycleEvents` itself, adds the loss terms in a
forward hook and reaches `train` through `trainer_patches`. A feature added here reaches both.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import TrainerCallback

from ..compact.card_metadata import attach_card_data, run_card_data
from ..compact.checkpoints import check_resumable, resolve_resume_checkpoint
from ..compact.saving import checkpoint_on_save, compact_on_save, is_compacted
from ..pruning.config import BlockPruningConfig
from ..pruning.model import apply_block_pruning, block_scores, is_block_pruned
from .arguments import check_training_arguments
from .controller import PruningController, warn_if_stacks_emptied
from .distillation import Distiller, check_teacher_given
from .snapshots import Snapshots

logger = logging.getLogger(__name__)


class PruningLifecycle:
    """Everything block pruning does around one Trainer run (see the module docstring for the steps).

    Args:
        model (`nn.Module`): the model the Trainer trains (masked here unless it is already).
        config (`BlockPruningConfig`): what to prune and how.
        args (`TrainingArguments`): the run's arguments (checked against `config`).
        teacher (`nn.Module` or `str`, *optional*): a dense teacher, or its path / Hub id.
        score_scale (`float`, *optional*): the scores' reparametrisation factor (see `BlockScores`; the callback's way
            to give them their own learning rate). `None`: 1, and an already masked model keeps its scores' scale.

    Example:

        >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        >>> from hf_blockprune import BlockPruningConfig
        >>> from hf_blockprune.training.lifecycle import PruningLifecycle
        >>> model = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
        ...                                                  num_attention_heads=4, intermediate_size=37))
        >>> args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
        >>> lifecycle = PruningLifecycle(model, BlockPruningConfig.from_preset("struct"), args)
        >>> lifecycle.controller.config.pruning_preset
        'struct'
    """

    def __init__(self, model: nn.Module, config: BlockPruningConfig, args, teacher=None,
                 score_scale: float | None = None):
        check_teacher_given(config, teacher)
        check_training_arguments(args, config)
        if config.enabled:
            _mask(model, config, score_scale)
        self.model = model
        self.config = config
        self.controller = PruningController(model, config)
        self.distiller = None if teacher is None else Distiller.from_config(teacher, model, config)
        self.snapshots = Snapshots(self.controller)
        self.training = False  # between train begin and train end: the loss terms apply
        checkpoint_on_save(model)  # already here: a resumed PEFT run loads its scores through the model

    # 2) before train()
    def resolve_checkpoint(self, output_dir: str | None, resume_from_checkpoint):
        """The checkpoint to resume from: `resume_from_checkpoint` as the Trainer takes it (`True`, a path, or
        `None`/`False`), with an incomplete checkpoint (a run stopped while writing it) replaced by the newest
        complete one before it, and a checkpoint without this model's mask scores refused.

        Raises:
            `ValueError`: no complete checkpoint, or the checkpoint lacks the mask scores (see `check_resumable`).
        """
        checkpoint = resolve_resume_checkpoint(output_dir, resume_from_checkpoint)
        if checkpoint is not None and self.config.enabled:
            check_resumable(self.model, checkpoint)
        return checkpoint

    # 3) train begin
    def begin(self, args, state, model: nn.Module, train_dataloader=None, loss_fn=None) -> None:
        """Latency targets, the Fisher start (`loss_fn(model, batch)`, default: the model's loss), the snapshots'
        plan and the first step's schedule."""
        self.controller.resolve_latency_targets(state.global_step, args.output_dir)
        self.controller.initialize_scores(train_dataloader, args.seed, state.global_step, loss_fn,
                                          group=args.gradient_accumulation_steps * args.world_size)
        self.snapshots.prepare(model, args.output_dir)
        self.controller.update(state.global_step, state.max_steps)
        checkpoint_on_save(model)  # checkpoints keep the scores, under a marked config
        self.training = True

    # 4) step begin
    def step_begin(self, state, optimizer=None, lr_scheduler=None) -> None:
        """Set threshold, lambda or targets for this optimizer step (and the filled stage's learning rate)."""
        self.controller.update(state.global_step, state.max_steps)
        if optimizer is not None:
            self.controller.set_fill_learning_rate(optimizer, lr_scheduler)

    # 5) each training micro-batch
    @property
    def needs_hidden_states(self) -> bool:
        """Whether the student's forward must return its hidden states (layer-wise distillation)."""
        return self.distiller is not None and self.distiller.needs_hidden_states

    def changes_loss(self, weight) -> bool:
        """Whether `training_loss` adds anything to the task loss (a teacher, a regularization, a weight)."""
        return self.distiller is not None or weight is not None or self.controller.has_regularization

    def training_loss(self, loss: torch.Tensor, outputs, inputs: dict, weight=None) -> torch.Tensor:
        """The training loss of one micro-batch: the task loss mixed with the teacher's (given `outputs` and the
        `inputs` the teacher runs on), plus the regularization, times `weight` (the micro-batch's share of the step,
        or `None`); recorded for the logs and the finiteness check. The same tensor when nothing changes it."""
        if self.distiller is not None:
            loss = self.distiller.loss(loss, outputs, inputs)
        term = self.controller.regularization()
        self.controller.record_terms(loss, term)
        if term is not None:
            loss = loss + term
        if weight is not None:
            loss = loss * weight
        self.controller.record_loss(loss)
        return loss

    # 6) step end
    def step_end(self, args, state, model: nn.Module, processing_class=None) -> None:
        """Stop on a non-finite loss or score (before any checkpoint), keep a density target's masks on the
        scheduled density between steps, then save the snapshots due."""
        self.controller.check_finite(state.global_step, args.output_dir)
        self.controller.after_optimizer_step(state.global_step, state.max_steps)
        self.snapshots.after_step(model, state.global_step, state.max_steps, args.output_dir, processing_class,
                                  state.is_world_process_zero)

    # 7) logs
    def add_metrics(self, logs: dict) -> dict:
        """Add the `pruning/*` values to a training log (one with `"loss"`), in place; returns what was added."""
        if "loss" not in logs:
            return {}
        metrics = self.controller.metrics()
        logs.update(metrics)
        return metrics

    # 8) train end
    def end(self, args, state, model: nn.Module) -> None:
        """Stop adding the loss terms; from now on `save_model()` writes the compacted model, whose card gets the
        run's last evaluation."""
        self.training = False
        if is_block_pruned(model):
            warn_if_stacks_emptied(model)
        if is_block_pruned(model) or is_compacted(model):
            compact_on_save(model)
        attach_run_card_data(model, args, state, self.distiller)


def _mask(model: nn.Module, config: BlockPruningConfig, score_scale: float | None) -> None:
    if not is_block_pruned(model):
        apply_block_pruning(model, config, score_scale=1.0 if score_scale is None else score_scale)
    elif score_scale is not None:
        for scores in block_scores(model):
            scores.set_score_scale(score_scale)


def attach_run_card_data(model: nn.Module | None, args, state, distiller: Distiller | None = None) -> None:
    """Give `model` the run's last evaluation, Hub id, steps and teacher, for the card of its next compacted save."""
    if model is not None:
        teacher = distiller.teacher if distiller is not None else None
        attach_card_data(model, run_card_data(state.log_history, args.hub_model_id, teacher))


class LifecycleEvents(TrainerCallback):
    """The Trainer events that drive a `PruningLifecycle`: train begin, step begin and end, train end.

    `BlockPruningTrainer` adds one; `BlockPruningCallback` is one (its lifecycle is built in `on_init_end`).

    Args:
        lifecycle (`PruningLifecycle`, *optional*): the lifecycle to drive (set later by a subclass).
        loss_fn (`Callable`, *optional*): `(model, batch) -> loss` for the Fisher start (the trainer's
            `compute_loss`); `None`: the loss the model returns.
    """

    def __init__(self, lifecycle: PruningLifecycle | None = None, loss_fn=None):
        self.lifecycle = lifecycle
        self.loss_fn = loss_fn

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        """See `PruningLifecycle.begin`."""
        self.lifecycle.begin(args, state, model, train_dataloader, self.loss_fn)

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        """See `PruningLifecycle.step_begin`."""
        self.lifecycle.step_begin(state, optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """See `PruningLifecycle.step_end`."""
        self.lifecycle.step_end(args, state, model, processing_class)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """See `PruningLifecycle.end`."""
        if model is not None:
            self.lifecycle.end(args, state, model)

