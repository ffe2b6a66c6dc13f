"""`BlockPruningTrainer`: a `Trainer` that fine-prunes its model with block movement pruning."""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from ..compact.model_card import attach_card_data, run_card_data
from ..compact.saving import checkpoint_on_save, compact_on_save, is_compacted
from ..compact.sentence_transformers import load_sentence_transformer_checkpoint
from ..pruning.config import BlockPruningConfig
from ..pruning.controller import PruningController, warn_if_stacks_emptied
from ..pruning.model import apply_block_pruning, is_block_pruned, score_parameters
from ..structure.wrappers import is_sentence_transformer
from .accumulation import micro_batch_weight
from .arguments import check_training_arguments
from .callback import create_or_keep_model_card
from .distillation import Distiller, check_teacher_given
from .snapshots import Snapshots


class _AfterOptimizerStep(TrainerCallback):
    """At train begin, set the latency targets, initialize the scores (`mask_init="fisher"`) and plan the snapshots;
    at every step end, before any checkpoint: stop on non-finite values, re-place the cuts (see
    `PruningController.check_finite` and `after_optimizer_step`), then save the snapshots due."""

    def __init__(self, controller: PruningController, loss_fn):
        self.controller = controller
        self.loss_fn = loss_fn
        self.snapshots = Snapshots(controller)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.controller.resolve_latency_targets(state.global_step, args.output_dir)
        self.controller.initialize_scores(train_dataloader, args.seed, state.global_step, self.loss_fn,
                                          args.gradient_accumulation_steps * args.world_size)
        self.snapshots.prepare(model, args.output_dir)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        self.controller.check_finite(state.global_step, args.output_dir)
        self.controller.after_optimizer_step(state.global_step, state.max_steps)
        self.snapshots.after_step(model, state.global_step, state.max_steps, args.output_dir, processing_class,
                                  state.is_world_process_zero)


class BlockPruningTrainer(Trainer):
    """`Trainer` with block movement pruning: masks the model, trains the scores, schedules and regularizes.

    The mask scores get their own optimizer group (`mask_scores_learning_rate`, no weight decay, following the
    learning-rate scheduler). The regularization is added to the training loss only. The training loss of each
    micro-batch is weighted by its share of the step's labelled items (or divided by the number of accumulation
    steps when the Trainer does not count them), so a run with gradient accumulation matches one with the larger
    batch (see `hf_blockprune.training.accumulation`).

    Checkpoints written during training keep the masks and scores (so `resume_from_checkpoint` works); once
    training ends, `save_model()` and `push_to_hub()` write the compacted model (pruned heads and FFN neurons
    removed), its loading code and its model card; `create_model_card()` keeps that card, adding the run's
    evaluation results and the given datasets to its Hub metadata.

    With a teacher (`teacher_model=` or `pruning_config.teacher_model`), the training loss is
    `alpha * T^2 * KL(teacher || student) + (1 - alpha) * task loss` on the classification, QA start/end or per-token
    logits; the teacher runs frozen, in eval mode, on the student's device.

    Args:
        *args, **kwargs: as for `transformers.Trainer` (`model` is required; `model_init` is not supported).
        pruning_config (`BlockPruningConfig`): what to prune and how.
        teacher_model (`nn.Module` or `str`, *optional*): a dense teacher, or its path / Hub id.
    """

    # compute_loss weights each micro-batch itself (see `_accumulation_weight`): the Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, pruning_config: BlockPruningConfig | None = None, teacher_model=None, **kwargs):
        if not isinstance(pruning_config, BlockPruningConfig):
            raise ValueError(
                "BlockPruningTrainer needs `pruning_config=BlockPruningConfig(...)` (e.g. "
                "BlockPruningConfig.from_preset('hybrid'))."
            )
        teacher = teacher_model if teacher_model is not None else pruning_config.teacher_model
        check_teacher_given(pruning_config, teacher)
        super().__init__(*args, **kwargs)
        check_training_arguments(self.args, pruning_config)
        if self.model is None or self.model_init is not None:
            raise ValueError("BlockPruningTrainer needs `model=`; `model_init` is not supported.")
        if pruning_config.enabled and not is_block_pruned(self.model):
            apply_block_pruning(self.model, pruning_config)
        self.pruning_config = pruning_config
        self.pruning = PruningController(self.model, pruning_config)
        self.add_callback(_AfterOptimizerStep(self.pruning, lambda model, batch: self.compute_loss(model, batch)))
        self.distiller = None if teacher is None else Distiller.from_config(teacher, self.model, pruning_config)

    def create_optimizer(self, model=None):
        """Build the Trainer's optimizer, then move the mask scores into a group of their own."""
        if self.optimizer is not None:
            return self.optimizer
        optimizer = super().create_optimizer(model)
        scores = score_parameters(self.model if model is None else model)
        if not scores:
            return optimizer
        score_ids = {id(p) for p in scores}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in score_ids]
        optimizer.add_param_group(
            {"params": scores, "lr": self.pruning_config.mask_scores_learning_rate, "weight_decay": 0.0}
        )
        return optimizer

    def train(self, *args, **kwargs):
        """Train with pruning; afterwards `save_model()` writes the compacted model."""
        checkpoint_on_save(self.model)  # checkpoints keep the scores, under a marked config
        output = super().train(*args, **kwargs)
        if is_block_pruned(self.model):
            warn_if_stacks_emptied(self.model)
        if is_block_pruned(self.model) or is_compacted(self.model):
            compact_on_save(self.model)
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the Trainer does; a compacted model's card gets the run's last evaluation, Hub id, steps and
        teacher."""
        teacher = self.distiller.teacher if self.distiller is not None else None
        attach_card_data(self.model, run_card_data(self.state.log_history, self.args.hub_model_id, teacher))
        super().save_model(output_dir, _internal_call)

    def _load_from_checkpoint(self, checkpoint, *args, **kwargs):
        """Load a checkpoint (to resume, or the best model at the end); a masked sentence-transformers model is
        loaded module by module into the masked model (see `load_sentence_transformer_checkpoint`)."""
        if is_sentence_transformer(self.model):
            load_sentence_transformer_checkpoint(self.model, checkpoint)
            return None
        return super()._load_from_checkpoint(checkpoint, *args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        """Keep the pruning model card written with the compacted model, adding the run's evaluation results and
        the given datasets, tasks, license, ... to its metadata; otherwise write the Trainer's card (same arguments
        as `Trainer.create_model_card`)."""
        return create_or_keep_model_card(self, super().create_model_card, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Set the schedule for the current optimizer step, then train as usual."""
        self.pruning.update(self.state.global_step, self.state.max_steps)
        self.pruning.set_fill_learning_rate(self.optimizer, self.lr_scheduler)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss (a per-batch mean), mixed with distillation and plus the regularization in training."""
        teacher_inputs = dict(inputs)  # the Trainer pops `labels` when it computes the loss itself
        if model.training and self.distiller is not None and self.distiller.needs_hidden_states:
            inputs = {**inputs, "output_hidden_states": True}
        # the model gets no item count, so its loss is a per-micro-batch mean whatever its forward does with it
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=None)
        if model.training:
            if self.distiller is not None:
                loss = self.distiller.loss(loss, outputs, teacher_inputs)
            term = self.pruning.regularization()
            self.pruning.record_terms(loss, term)
            if term is not None:
                loss = loss + term
            loss = loss * self._accumulation_weight(teacher_inputs, num_items_in_batch)
            self.pruning.record_loss(loss)
        return (loss, outputs) if return_outputs else loss

    def _accumulation_weight(self, inputs: dict, num_items_in_batch):
        """`n_i / N` (times the process count the Trainer divides out when it averages items across processes), or
        `1 / accumulation steps` when the Trainer counted no items."""
        weight = micro_batch_weight(inputs, num_items_in_batch, getattr(self, "_loss_shifts_labels", False))
        if weight is None:
            return 1.0 / max(getattr(self, "current_gradient_accumulation_steps", 1), 1)
        if self.args.average_tokens_across_devices:
            weight = weight * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return weight

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the `pruning/*` values to training logs, so every `report_to` target sees them."""
        if "loss" in logs:
            logs.update(self.pruning.metrics())
        super().log(logs, start_time)
