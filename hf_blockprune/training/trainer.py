"""`BlockPruningTrainer`: a `Trainer` that fine-prunes its model with block movement pruning."""

from __future__ import annotations

from transformers import Trainer

from ..pruning.config import BlockPruningConfig
from ..pruning.model import score_parameters
from ..structure.wrappers import model_wrapper
from .accumulation import micro_batch_weight
from .distillation import check_teacher_given
from .lifecycle import LifecycleEvents, PruningLifecycle, attach_run_card_data
from .trainer_patches import create_or_keep_model_card


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

    Example:
        >>> import tempfile
        >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        >>> from hf_blockprune import BlockPruningConfig, BlockPruningTrainer, from_pretrained, is_block_pruned
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> data = [{"input_ids": [2, 3 + i, 5, 7], "labels": i % 2} for i in range(16)]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     args = TrainingArguments(output_dir=tmp, max_steps=2, use_cpu=True, report_to="none",
        ...                              disable_tqdm=True, logging_strategy="no", save_strategy="no")
        ...     trainer = BlockPruningTrainer(model=model, args=args, train_dataset=data,
        ...                                   pruning_config=BlockPruningConfig.from_preset("struct"))
        ...     _ = trainer.train()  # doctest: +ELLIPSIS
        ...     trainer.save_model()  # the compacted model, its loading code and its model card
        ...     loaded = from_pretrained(tmp)
        {'train_runtime': ...}
        >>> is_block_pruned(trainer.model)  # the trained model keeps its masks; what it saves is compacted
        True
        >>> type(loaded).__name__
        'BlockPrunedBertForSequenceClassification'
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
        if self.model is None or self.model_init is not None:
            raise ValueError("BlockPruningTrainer needs `model=`; `model_init` is not supported.")
        self.pruning_config = pruning_config
        self.lifecycle = PruningLifecycle(self.model, pruning_config, self.args, teacher)
        self.add_callback(LifecycleEvents(self.lifecycle, lambda model, batch: self.compute_loss(model, batch)))

    @property
    def pruning(self):
        """The run's `PruningController` (schedule, targets)."""
        return self.lifecycle.controller

    @property
    def distiller(self):
        """The run's `Distiller`, or `None` without a teacher."""
        return self.lifecycle.distiller

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

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Train with pruning; afterwards `save_model()` writes the compacted model. `resume_from_checkpoint` is
        resolved by the lifecycle (an incomplete checkpoint is skipped, one without mask scores refused)."""
        checkpoint = self.lifecycle.resolve_checkpoint(self.args.output_dir, resume_from_checkpoint)
        return super().train(checkpoint, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the Trainer does; a compacted model's card gets the run's last evaluation, Hub id, steps and
        teacher."""
        attach_run_card_data(self.model, self.args, self.state, self.distiller)
        super().save_model(output_dir, _internal_call)

    def _load_from_checkpoint(self, checkpoint, *args, **kwargs):
        """Load a checkpoint (to resume, or the best model at the end); a wrapper may load it into the masked model
        itself (a sentence-transformers model, module by module: `ModelWrapper.load_checkpoint`)."""
        wrapper = model_wrapper(self.model)
        if wrapper is not None and wrapper.load_checkpoint(self.model, checkpoint):
            return None
        return super()._load_from_checkpoint(checkpoint, *args, **kwargs)

    def create_model_card(self, *args, **kwargs):
        """Keep the pruning model card written with the compacted model, adding the run's evaluation results and
        the given datasets, tasks, license, ... to its metadata; otherwise write the Trainer's card (same arguments
        as `Trainer.create_model_card`)."""
        return create_or_keep_model_card(self, super().create_model_card, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss (a per-batch mean), mixed with distillation and plus the regularization in training."""
        teacher_inputs = dict(inputs)  # the Trainer pops `labels` when it computes the loss itself
        if model.training and self.lifecycle.needs_hidden_states:
            inputs = {**inputs, "output_hidden_states": True}
        # the model gets no item count, so its loss is a per-micro-batch mean whatever its forward does with it
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=None)
        if model.training:
            weight = self._accumulation_weight(teacher_inputs, num_items_in_batch)
            loss = self.lifecycle.training_loss(loss, outputs, teacher_inputs, weight)
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
        self.lifecycle.add_metrics(logs)
        super().log(logs, start_time)
