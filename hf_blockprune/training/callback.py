"""`BlockPruningCallback`: block pruning for any unmodified `Trainer` (or subclass) via `callbacks=[...]`."""

from __future__ import annotations

import logging

import torch

from ..pruning.config import BlockPruningConfig
from ..pruning.model import score_parameters
from ..structure.wrappers import model_wrapper
from .accumulation import loss_shifts_labels, micro_batch_weight
from .distillation import check_teacher_given
from .lifecycle import LifecycleEvents, PruningLifecycle, attach_run_card_data
from .trainer_patches import (
    keep_model_card,
    load_checkpoints_through_wrapper,
    log_before_other_callbacks,
    resume_through_lifecycle,
    trainer_being_built,
)

logger = logging.getLogger(__name__)

_ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW)


class BlockPruningCallback(LifecycleEvents):
    """Adds block movement pruning to a `Trainer` that is otherwise left as it is.

    Pass it at construction, `Trainer(..., callbacks=[BlockPruningCallback(config)])`: it masks the model in
    `on_init_end`, before the Trainer builds its optimizer, so the scores are ordinary parameters of the default
    optimizer groups and `resume_from_checkpoint` restores the optimizer state cleanly. The scores still get
    `config.mask_scores_learning_rate`: they are stored scaled by `learning_rate / mask_scores_learning_rate` and
    scaled back in the forward pass, which, with Adam-family optimizers, multiplies their step size by exactly that
    ratio (see `BlockScores`). They follow the learning-rate scheduler like every parameter.

    The regularization reaches the loss through a forward hook on the model that adds it to `outputs.loss` in
    training mode. Checkpoints keep masks and scores; after training, `trainer.save_model()` writes the compacted
    model with its loading code and model card, whose metadata carries the run's last evaluation. The callback makes
    its Trainer's `create_model_card()` (called by `push_to_hub` and by transformers' example scripts) keep that card
    instead of writing the Trainer's own (see `trainer_patches.keep_model_card`). Every step of the run is that of
    `BlockPruningTrainer`: both call one `PruningLifecycle`.

    The `pruning/*` values are added to the Trainer's training logs (and `trainer_state.json`). The Trainer runs the
    `report_to` integrations before user callbacks and hands every callback the same `logs` dict, so at construction
    the callback moves itself to the front of its Trainer's callback list: TensorBoard, W&B, ... and every other
    callback then receive the values, as with `BlockPruningTrainer` (see
    `trainer_patches.log_before_other_callbacks`). If it cannot, it warns at train start.

    With a teacher (`teacher_model=` or `pruning_config.teacher_model`), the same hook replaces the training loss by
    `alpha * KD + (1 - alpha) * task loss`, running the frozen teacher on the same inputs.

    Args:
        pruning_config (`BlockPruningConfig`): what to prune and how.
        teacher_model (`nn.Module` or `str`, *optional*): a dense teacher, or its path / Hub id.

    Example:
        >>> import tempfile
        >>> from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
        >>> from hf_blockprune import BlockPruningCallback, BlockPruningConfig, from_pretrained, is_block_pruned
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> data = [{"input_ids": [2, 3 + i, 5, 7], "labels": i % 2} for i in range(16)]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     args = TrainingArguments(output_dir=tmp, max_steps=2, use_cpu=True, report_to="none",
        ...                              disable_tqdm=True, logging_strategy="no", save_strategy="no")
        ...     trainer = Trainer(model=model, args=args, train_dataset=data,
        ...                       callbacks=[BlockPruningCallback(BlockPruningConfig.from_preset("struct"))])
        ...     _ = trainer.train()  # doctest: +ELLIPSIS
        ...     trainer.save_model()  # the compacted model, its loading code and its model card
        ...     loaded = from_pretrained(tmp)
        {'train_runtime': ...}
        >>> is_block_pruned(trainer.model)  # the trained model keeps its masks; what it saves is compacted
        True
        >>> type(loaded).__name__
        'BlockPrunedBertForSequenceClassification'
    """

    def __init__(self, pruning_config: BlockPruningConfig, teacher_model=None):
        if not isinstance(pruning_config, BlockPruningConfig):
            raise ValueError(
                f"`pruning_config` must be a BlockPruningConfig, got {type(pruning_config).__name__}."
            )
        super().__init__()
        self.pruning_config = pruning_config
        self.teacher_model = teacher_model if teacher_model is not None else pruning_config.teacher_model
        check_teacher_given(pruning_config, self.teacher_model)
        self._hooks = []
        self._items_in_step = None  # the Trainer's num_items_in_batch for the current micro-batch, kept from the model
        self.logs_first = False  # whether on_log runs before the reporting integrations (`log_before_other_callbacks`)

    @property
    def controller(self):
        """The run's `PruningController` (`None` before the Trainer is built)."""
        return None if self.lifecycle is None else self.lifecycle.controller

    @property
    def distiller(self):
        """The run's `Distiller`, or `None` without a teacher."""
        return None if self.lifecycle is None else self.lifecycle.distiller

    def on_init_end(self, args, state, control, model=None, **kwargs):
        """Mask the model before the Trainer builds the optimizer (the lifecycle's construction); patch the Trainer
        being built (see `trainer_patches`); run first among the Trainer's callbacks, for the logs."""
        if model is None:
            raise ValueError(
                "BlockPruningCallback needs a model at Trainer construction; `model_init` is not supported."
            )
        trainer = trainer_being_built(self)
        _refuse_loss_computed_outside_the_model(model, args, trainer, self.pruning_config, self.teacher_model)
        self.lifecycle = PruningLifecycle(model, self.pruning_config, args, self.teacher_model,
                                          score_scale=self._score_scale(args))
        hook = _RegularizationHook(self)
        self._hooks = [
            model.register_forward_pre_hook(hook.before, with_kwargs=True),
            model.register_forward_hook(hook, with_kwargs=True),
        ]
        self._shift_labels = loss_shifts_labels(model)
        if trainer is None:
            logger.info("BlockPruningCallback did not find its Trainer: call `keep_model_card(trainer)` (from "
                        "hf_blockprune.training.trainer_patches) so that `trainer.create_model_card()` keeps the "
                        "pruning model card; `resume_from_checkpoint` does not skip incomplete checkpoints.")
        else:
            keep_model_card(trainer)
            resume_through_lifecycle(trainer, self.lifecycle)
            log_before_other_callbacks(trainer, self)
        wrapper = model_wrapper(model)
        if wrapper is not None:
            load_checkpoints_through_wrapper(trainer, args, wrapper)

    def _score_scale(self, args) -> float | None:
        """The scores' reparametrisation factor that gives them `mask_scores_learning_rate` (see `BlockScores`)."""
        if not self.pruning_config.enabled:
            return None
        if not args.learning_rate > 0:
            raise ValueError(
                f"BlockPruningCallback gives the mask scores their learning rate relative to `learning_rate`, which is"
                f" {args.learning_rate}: set `learning_rate` > 0, or use BlockPruningTrainer, which gives the scores "
                "an optimizer group of their own (e.g. to train only the scores)."
            )
        return self.pruning_config.mask_scores_learning_rate / args.learning_rate

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        """Check that the pruning can work with this Trainer, then begin the run (see `PruningLifecycle.begin`)."""
        if self.lifecycle is None:
            raise RuntimeError(
                "BlockPruningCallback was added after the Trainer was built, so its scores are not in the optimizer. "
                "Pass it at construction: Trainer(..., callbacks=[BlockPruningCallback(config)])."
            )
        self._check_optimizer(optimizer)
        self._warn_if_reporters_miss_logs(args)
        super().on_train_begin(args, state, control, model=model, train_dataloader=train_dataloader, **kwargs)

    def _warn_if_reporters_miss_logs(self, args) -> None:
        if self.logs_first or not self.pruning_config.enabled or not args.report_to:
            return
        logger.warning(
            "BlockPruningCallback could not put itself before the `report_to` integrations (%s), which therefore log "
            "no `pruning/*` values (trainer_state.json and the callbacks after this one still get them). Use "
            "BlockPruningTrainer, or call `log_before_other_callbacks(trainer, callback)` (from "
            "hf_blockprune.training.trainer_patches) before `train()`.",
            ", ".join(map(str, args.report_to)),
        )

    def _check_optimizer(self, optimizer) -> None:
        if optimizer is None:
            return
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not all(id(p) in in_optimizer for p in score_parameters(self.lifecycle.model)):
            raise RuntimeError(
                "The optimizer does not hold the mask scores: it was built before BlockPruningCallback masked the "
                "model. Pass the callback at Trainer construction and let the Trainer build its optimizer, or use "
                "BlockPruningTrainer."
            )
        inner = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(inner, _ADAM_FAMILY):
            logger.warning(
                "BlockPruningCallback gives the scores their own learning rate exactly only with Adam-family "
                "optimizers; with %s the scores' step size is only approximately mask_scores_learning_rate. "
                "BlockPruningTrainer builds a separate optimizer group instead.",
                type(inner).__name__,
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the `pruning/*` values to training logs (in place: the callbacks after this one get the same dict) and
        to their entry in `state.log_history`; an evaluation goes to the card data."""
        if logs is not None and self.lifecycle is not None:
            metrics = self.lifecycle.add_metrics(logs)
            if metrics and state.log_history:
                state.log_history[-1].update(metrics)
        if logs is not None and any(key.startswith("eval_") for key in logs):
            attach_run_card_data(kwargs.get("model"), args, state, self.distiller)

    def _hold_item_count(self, module, args, kwargs):
        """Keep the Trainer's `num_items_in_batch` from the model, so its loss is a per-micro-batch mean; ask for the
        hidden states when the distillation is layer-wise."""
        self._items_in_step = None
        if not (module.training and self.lifecycle.training):
            return None
        kwargs = dict(kwargs)
        if self.lifecycle.needs_hidden_states:
            kwargs["output_hidden_states"] = True
        # without labels in the call the model computes no loss (the Trainer does, e.g. with label smoothing)
        if "num_items_in_batch" in kwargs and "labels" in kwargs:
            self._items_in_step = kwargs.pop("num_items_in_batch")
        return args, kwargs

    def _add_regularization(self, module, args, kwargs, output):
        if not (module.training and self.lifecycle.training):
            return None
        # the Trainer passed an item count, so it will not divide by the accumulation steps: weight n_i / N here
        weight = micro_batch_weight(kwargs, self._items_in_step, self._shift_labels)
        self._items_in_step = None
        loss = _loss_or_none(output)
        if loss is None:
            if self.lifecycle.changes_loss(weight):
                raise RuntimeError(_NO_LOSS)
            return None
        if self.lifecycle.distiller is not None and isinstance(output, tuple):
            raise RuntimeError("Distillation needs dict-like model outputs: do not set `return_dict=False`.")
        new_loss = self.lifecycle.training_loss(loss, output, kwargs, weight)
        if new_loss is loss:
            return None
        if isinstance(output, tuple):
            return (new_loss,) + output[1:]
        output["loss"] = new_loss
        return output


def adds_loss_terms(config: BlockPruningConfig, teacher_model=None) -> bool:
    """Whether training with `config` changes the loss: a distillation, or a regularization of the scores (a fixed
    `final_lambda` > 0, or a density target with soft movement pruning). Top-k pruning adds no term."""
    if teacher_model is not None:
        return True
    if not config.enabled:
        return False
    if config.has_target:
        return config.pruning_method == "sigmoid_threshold"
    return config.final_lambda > 0


def _refuse_loss_computed_outside_the_model(model, args, trainer, config: BlockPruningConfig, teacher_model) -> None:
    """Refuse, at Trainer construction, a distillation or regularization the callback could not add.

    The callback adds its terms to the loss the model returns. Some Trainers compute the loss outside the model, from
    its logits or embeddings: with `label_smoothing_factor` > 0, with `compute_loss_func`, and always for
    sentence-transformers models (the Trainer applies its loss module to the embeddings). There the terms would be
    silently missing, so the run is refused unless it needs none (top-k pruning without a teacher). The Fisher
    initialization of the scores (`mask_init="fisher"`) differentiates the loss the model returns, which a
    sentence-transformers model does not: refused there too.
    """
    wrapper = model_wrapper(model)
    without_loss = wrapper is not None and not wrapper.returns_loss  # e.g. a sentence-transformers model
    if config.enabled and config.mask_init == "fisher" and without_loss:
        raise ValueError(
            f"`mask_init='fisher'` measures the gradient of the loss the model returns, and {type(model).__name__} "
            "returns embeddings (its Trainer's loss module computes the loss). Train with class PruningTrainer("
            f"BlockPruningTrainer, {wrapper.trainer_class}), which measures it through the Trainer's loss, or "
            "leave `mask_init` at 'constant'."
        )
    if not adds_loss_terms(config, teacher_model):
        return
    if without_loss:
        reason = f"{type(model).__name__} returns embeddings, and its Trainer computes the loss outside the model"
        fix = (f"class PruningTrainer(BlockPruningTrainer, {wrapper.trainer_class}) (BlockPruningTrainer adds the "
               "terms to any loss)")
    elif getattr(args, "label_smoothing_factor", 0) > 0:
        reason = "with `label_smoothing_factor` > 0 the Trainer computes the loss outside the model"
        fix = "BlockPruningTrainer(..., pruning_config=config), which adds the terms to any loss"
    elif getattr(trainer, "compute_loss_func", None) is not None:
        reason = "with `compute_loss_func` the Trainer computes the loss outside the model"
        fix = "BlockPruningTrainer(..., compute_loss_func=...), which adds the terms to any loss"
    else:
        return
    terms = "the distillation" if teacher_model is not None else "the pruning regularization"
    raise ValueError(
        f"BlockPruningCallback adds {terms} to the loss the model returns, but {reason}. Train with {fix}, or, "
        "without a teacher, prune with `pruning_method='topk'`, which adds nothing to the loss."
    )


def _loss_or_none(output) -> torch.Tensor | None:
    """The loss a model returned (a 0-dim first tensor of a tuple, or `output["loss"]`), or `None`."""
    if isinstance(output, tuple):
        first = output[0] if output else None
        return first if torch.is_tensor(first) and first.dim() == 0 else None
    loss = output.get("loss")
    return loss if torch.is_tensor(loss) else None


class _RegularizationHook:
    """The forward hooks; shared, not copied, when the model is deep-copied (e.g. to compact it for saving)."""

    def __init__(self, callback: BlockPruningCallback):
        self.callback = callback

    def before(self, module, args, kwargs):
        """Forward pre-hook: see `BlockPruningCallback._hold_item_count`."""
        return self.callback._hold_item_count(module, args, kwargs)

    def __call__(self, module, args, kwargs, output):
        return self.callback._add_regularization(module, args, kwargs, output)

    def __deepcopy__(self, memo):
        return self


_NO_LOSS = (
    "BlockPruningCallback must add its regularization to the model's loss, but the model returned none in training. "
    "This happens when the Trainer computes the loss itself (`label_smoothing_factor` > 0 or `compute_loss_func`). "
    "Use BlockPruningTrainer(..., pruning_config=config), which adds the term to any loss."
)
