"""`BlockPruningCallback`: block pruning for any unmodified `Trainer` (or subclass) via `callbacks=[...]`."""

from __future__ import annotations

import functools
import inspect
import logging

import torch
from transformers import Trainer, TrainerCallback

from ..compact.model_card import attach_card_data, run_card_data, update_model_card
from ..compact.saving import checkpoint_on_save, compact_on_save, is_compacted
from ..compact.sentence_transformers import load_sentence_transformer_checkpoint
from ..pruning.config import BlockPruningConfig
from ..pruning.controller import PruningController, warn_if_stacks_emptied
from ..pruning.model import apply_block_pruning, block_scores, is_block_pruned, score_parameters
from ..structure.wrappers import is_sentence_transformer
from .accumulation import loss_shifts_labels, micro_batch_weight
from .arguments import check_training_arguments
from .distillation import Distiller, check_teacher_given
from .snapshots import Snapshots

logger = logging.getLogger(__name__)

_ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW)


class BlockPruningCallback(TrainerCallback):
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
    instead of writing the Trainer's own (see `keep_model_card`).

    The `pruning/*` values are added to the Trainer's training logs (and `trainer_state.json`). The Trainer runs the
    `report_to` integrations before user callbacks and hands every callback the same `logs` dict, so at construction
    the callback moves itself to the front of its Trainer's callback list: TensorBoard, W&B, ... and every other
    callback then receive the values, as with `BlockPruningTrainer` (see `log_before_other_callbacks`). If it cannot,
    it warns at train start.

    With a teacher (`teacher_model=` or `pruning_config.teacher_model`), the same hook replaces the training loss by
    `alpha * KD + (1 - alpha) * task loss`, running the frozen teacher on the same inputs.

    Args:
        pruning_config (`BlockPruningConfig`): what to prune and how.
        teacher_model (`nn.Module` or `str`, *optional*): a dense teacher, or its path / Hub id.
    """

    def __init__(self, pruning_config: BlockPruningConfig, teacher_model=None):
        if not isinstance(pruning_config, BlockPruningConfig):
            raise ValueError(
                f"`pruning_config` must be a BlockPruningConfig, got {type(pruning_config).__name__}."
            )
        self.pruning_config = pruning_config
        self.teacher_model = teacher_model if teacher_model is not None else pruning_config.teacher_model
        check_teacher_given(pruning_config, self.teacher_model)
        self.distiller: Distiller | None = None
        self.controller: PruningController | None = None
        self._hooks = []
        self._training = False
        self._items_in_step = None  # the Trainer's num_items_in_batch for the current micro-batch, kept from the model
        self._logs_first = False  # whether on_log runs before the reporting integrations
        self.snapshots: Snapshots | None = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        """Mask the model before the Trainer builds the optimizer; make the Trainer's `create_model_card` keep the
        pruning card (see `keep_model_card`); run first among the Trainer's callbacks, for the logs."""
        if model is None:
            raise ValueError(
                "BlockPruningCallback needs a model at Trainer construction; `model_init` is not supported."
            )
        check_training_arguments(args, self.pruning_config)
        trainer = _trainer_being_built(self)
        _refuse_loss_computed_outside_the_model(model, args, trainer, self.pruning_config, self.teacher_model)
        if self.pruning_config.enabled:
            self._mask(model, args)
        self.controller = PruningController(model, self.pruning_config)
        checkpoint_on_save(model)  # already here: a resumed PEFT run loads its scores through the model (load_adapter)
        if self.teacher_model is not None:
            self.distiller = Distiller.from_config(self.teacher_model, model, self.pruning_config)
        hook = _RegularizationHook(self)
        self._hooks = [
            model.register_forward_pre_hook(hook.before, with_kwargs=True),
            model.register_forward_hook(hook, with_kwargs=True),
        ]
        self._shift_labels = loss_shifts_labels(model)
        self._keep_card_of_trainer()
        if trainer is not None:
            log_before_other_callbacks(trainer, self)
        if is_sentence_transformer(model):
            _resume_masked_sentence_transformer(trainer, args)

    def _keep_card_of_trainer(self) -> None:
        """`keep_model_card` on the Trainer being built, if it can be found."""
        trainer = _trainer_being_built(self)
        if trainer is None:
            logger.info("BlockPruningCallback did not find its Trainer: call `keep_model_card(trainer)` so that "
                        "`trainer.create_model_card()` keeps the pruning model card.")
            return
        keep_model_card(trainer)

    def _mask(self, model, args) -> None:
        if not args.learning_rate > 0:
            raise ValueError(
                f"BlockPruningCallback gives the mask scores their learning rate relative to `learning_rate`, which is"
                f" {args.learning_rate}: set `learning_rate` > 0, or use BlockPruningTrainer, which gives the scores "
                "an optimizer group of their own (e.g. to train only the scores)."
            )
        scale = self.pruning_config.mask_scores_learning_rate / args.learning_rate
        if is_block_pruned(model):
            for scores in block_scores(model):
                scores.set_score_scale(scale)
        else:
            apply_block_pruning(model, self.pruning_config, score_scale=scale)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        """Check that the pruning can work with this Trainer, initialize the scores (`mask_init="fisher"`), then set
        the schedule for the first step."""
        if self.controller is None:
            raise RuntimeError(
                "BlockPruningCallback was added after the Trainer was built, so its scores are not in the optimizer. "
                "Pass it at construction: Trainer(..., callbacks=[BlockPruningCallback(config)])."
            )
        self._check_optimizer(optimizer)
        self._warn_if_reporters_miss_logs(args)
        self.controller.resolve_latency_targets(state.global_step, args.output_dir)
        self.controller.initialize_scores(train_dataloader, args.seed, state.global_step,
                                          group=args.gradient_accumulation_steps * args.world_size)
        self.snapshots = Snapshots(self.controller)
        self.snapshots.prepare(model, args.output_dir)
        self.controller.update(state.global_step, state.max_steps)
        checkpoint_on_save(model)  # checkpoints keep the scores, under a marked config
        self._training = True

    def _warn_if_reporters_miss_logs(self, args) -> None:
        if self._logs_first or not self.pruning_config.enabled or not args.report_to:
            return
        logger.warning(
            "BlockPruningCallback could not put itself before the `report_to` integrations (%s), which therefore log "
            "no `pruning/*` values (trainer_state.json and the callbacks after this one still get them). Use "
            "BlockPruningTrainer, or call `log_before_other_callbacks(trainer, callback)` (from "
            "hf_blockprune.training.callback) before `train()`.",
            ", ".join(map(str, args.report_to)),
        )

    def _check_optimizer(self, optimizer) -> None:
        if optimizer is None:
            return
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not all(id(p) in in_optimizer for p in score_parameters(self.controller.model)):
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

    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        """Set threshold and lambda for this optimizer step (and the filled stage's learning rate)."""
        self.controller.update(state.global_step, state.max_steps)
        if optimizer is not None:
            self.controller.set_fill_learning_rate(optimizer, lr_scheduler)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Stop on a non-finite loss or score (before any checkpoint), keep a density target's masks on the
        scheduled density between steps (for evaluation, logs, saving), then save the snapshots due."""
        self.controller.check_finite(state.global_step, args.output_dir)
        self.controller.after_optimizer_step(state.global_step, state.max_steps)
        if self.snapshots is not None:
            self.snapshots.after_step(model, state.global_step, state.max_steps, args.output_dir, processing_class,
                                      state.is_world_process_zero)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the `pruning/*` values to training logs (in place: the callbacks after this one get the same dict) and
        to their entry in `state.log_history`."""
        if logs is not None and "loss" in logs and self.controller is not None:
            metrics = self.controller.metrics()
            logs.update(metrics)
            if state.log_history:
                state.log_history[-1].update(metrics)
        if logs is not None and any(key.startswith("eval_") for key in logs):
            _attach_run_card_data(kwargs.get("model"), args, state, self.distiller)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Stop adding the regularization; from now on `trainer.save_model()` writes the compacted model."""
        self._training = False
        if model is not None and is_block_pruned(model):
            warn_if_stacks_emptied(model)
        if model is not None and (is_block_pruned(model) or is_compacted(model)):
            compact_on_save(model)
        _attach_run_card_data(model, args, state, self.distiller)

    def _hold_item_count(self, module, args, kwargs):
        """Keep the Trainer's `num_items_in_batch` from the model, so its loss is a per-micro-batch mean; ask for the
        hidden states when the distillation is layer-wise."""
        self._items_in_step = None
        if not (module.training and self._training):
            return None
        kwargs = dict(kwargs)
        if self.distiller is not None and self.distiller.needs_hidden_states:
            kwargs["output_hidden_states"] = True
        # without labels in the call the model computes no loss (the Trainer does, e.g. with label smoothing)
        if "num_items_in_batch" in kwargs and "labels" in kwargs:
            self._items_in_step = kwargs.pop("num_items_in_batch")
        return args, kwargs

    def _add_regularization(self, module, args, kwargs, output):
        if not (module.training and self._training):
            return None
        term = self.controller.regularization()
        # the Trainer passed an item count, so it will not divide by the accumulation steps: weight n_i / N here
        weight = micro_batch_weight(kwargs, self._items_in_step, self._shift_labels)
        self._items_in_step = None
        if term is None and self.distiller is None and weight is None:
            loss = output[0] if isinstance(output, tuple) else output.get("loss")
            if torch.is_tensor(loss):
                self.controller.record_loss(loss)
                self.controller.record_terms(loss, None)
            return None
        loss = _loss_of(output)
        if self.distiller is not None:
            if isinstance(output, tuple):
                raise RuntimeError("Distillation needs dict-like model outputs: do not set `return_dict=False`.")
            loss = self.distiller.loss(loss, output, kwargs)
        self.controller.record_terms(loss, term)
        if term is not None:
            loss = loss + term
        if weight is not None:
            loss = loss * weight
        self.controller.record_loss(loss)
        if isinstance(output, tuple):
            return (loss,) + output[1:]
        output["loss"] = loss
        return output


def _resume_masked_sentence_transformer(trainer: Trainer | None, args) -> None:
    """Make a sentence-transformers Trainer load its masked checkpoints (to resume, and for `load_best_model_at_end`)
    into the masked model; its own loader builds a new model from the folder, which a masked checkpoint refuses."""
    if trainer is None:
        if getattr(args, "load_best_model_at_end", False):
            raise ValueError(
                "BlockPruningCallback did not find its Trainer, so the sentence-transformers Trainer could not load "
                "the best masked checkpoint at the end (it would keep the last model and only log an error). Leave "
                "out `load_best_model_at_end`, or train with `class PruningTrainer(BlockPruningTrainer, "
                "SentenceTransformerTrainer)`."
            )
        return

    def load_from_checkpoint(checkpoint, model=None):
        load_sentence_transformer_checkpoint(trainer.model, checkpoint)

    trainer._load_from_checkpoint = load_from_checkpoint


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
    if config.enabled and config.mask_init == "fisher" and is_sentence_transformer(model):
        raise ValueError(
            f"`mask_init='fisher'` measures the gradient of the loss the model returns, and {type(model).__name__} "
            "returns embeddings (its Trainer's loss module computes the loss). Train with class PruningTrainer("
            "BlockPruningTrainer, SentenceTransformerTrainer), which measures it through the Trainer's loss, or "
            "leave `mask_init` at 'constant'."
        )
    if not adds_loss_terms(config, teacher_model):
        return
    if is_sentence_transformer(model):
        reason = f"{type(model).__name__} returns embeddings, and its Trainer computes the loss outside the model"
        fix = ("class PruningTrainer(BlockPruningTrainer, SentenceTransformerTrainer) (BlockPruningTrainer adds the "
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


def _attach_run_card_data(model, args, state, distiller=None) -> None:
    """Give `model` the run's last evaluation, Hub id, steps and teacher, for the card of its next compacted save."""
    if model is not None:
        teacher = distiller.teacher if distiller is not None else None
        attach_card_data(model, run_card_data(state.log_history, args.hub_model_id, teacher))


def pruning_card_data(trainer: Trainer, *args, **kwargs) -> dict:
    """The card data `trainer` knows (see `run_card_data`): its last evaluation, `args.hub_model_id`, and the
    arguments of a `create_model_card(*args, **kwargs)` call (`dataset`, `tasks`, `finetuned_from`, ...)."""
    try:
        arguments = inspect.signature(Trainer.create_model_card).bind(trainer, *args, **kwargs).arguments
    except TypeError:  # a subclass's own signature: only its keyword arguments are understood
        arguments = dict(kwargs)
    arguments.pop("self", None)
    return run_card_data(trainer.state.log_history, trainer.args.hub_model_id, **arguments)


def create_or_keep_model_card(trainer: Trainer, create, *args, **kwargs):
    """Keep the hf_blockprune card of `trainer.args.output_dir`, updated with what the Trainer knows, or else call
    `create(*args, **kwargs)` (the Trainer's own `create_model_card`)."""
    if not trainer.is_world_process_zero():
        return None
    if update_model_card(trainer.args.output_dir, pruning_card_data(trainer, *args, **kwargs)):
        return None
    return create(*args, **kwargs)


def keep_model_card(trainer: Trainer) -> Trainer:
    """Make `trainer.create_model_card()` keep an hf_blockprune card in `output_dir`, on this Trainer instance.

    `Trainer.push_to_hub` (before it uploads) and transformers' example scripts (after every run) call
    `create_model_card`, which would replace the card that `save_model()` wrote with the Trainer's own. Once this
    ran, a `README.md` carrying the hf_blockprune marker is kept and gets the run's last evaluation and the call's
    datasets, tasks, license, ... in its Hub metadata (see `update_model_card`); any other README.md is replaced by
    the Trainer's card as before. `BlockPruningCallback` calls this on the Trainer it is passed to; call it yourself
    when a Trainer gets the callback some other way.

    Args:
        trainer (`Trainer`): any Trainer (or subclass); changed in place.

    Returns:
        `Trainer`: `trainer`.
    """
    create = trainer.create_model_card
    if getattr(create, "keeps_pruning_card", False):
        return trainer

    @functools.wraps(create)
    def create_model_card(*args, **kwargs):
        return create_or_keep_model_card(trainer, create, *args, **kwargs)

    create_model_card.keeps_pruning_card = True
    trainer.create_model_card = create_model_card
    return trainer


def log_before_other_callbacks(trainer: Trainer, callback: BlockPruningCallback) -> bool:
    """Move `callback` to the front of `trainer`'s callback list, so that the `pruning/*` values it adds to the logs
    reach every callback after it: the `report_to` integrations (which the Trainer puts before user callbacks), the
    console printer and any other logger. `BlockPruningCallback` does this itself when it finds its Trainer.

    Every other event then also reaches it first, which is harmless: it reads nothing the other callbacks set, and
    it checks its arguments and marks the model for compaction before e.g. an integration starts a run or saves it.

    Args:
        trainer (`Trainer`): the Trainer that `callback` was passed to.
        callback (`BlockPruningCallback`): the callback to move.

    Returns:
        `bool`: whether `callback` is now first (`False` when it is not among `trainer`'s callbacks).
    """
    callbacks = trainer.callback_handler.callbacks
    if callback not in callbacks:
        return False
    # Safe while the handler iterates over this list (e.g. in on_init_end): the callback being called moves from index
    # i to 0, the ones before it move up by one, and the iteration goes on at index i + 1 with the same next callback.
    callbacks.remove(callback)
    callbacks.insert(0, callback)
    callback._logs_first = True
    return True


def _trainer_being_built(callback: TrainerCallback, depth: int = 16) -> Trainer | None:
    """The Trainer whose `__init__` is calling `callback.on_init_end`, found on the call stack: callbacks are not
    handed their Trainer, and only a method of the instance can keep `create_model_card` from replacing our card."""
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            candidate = frame.f_locals.get("self") if frame is not None else None
            handler = getattr(candidate, "callback_handler", None)
            if isinstance(candidate, Trainer) and callback in getattr(handler, "callbacks", ()):
                return candidate
    finally:
        del frame
    return None


def _loss_of(output) -> torch.Tensor:
    if isinstance(output, tuple):
        if not (len(output) and torch.is_tensor(output[0]) and output[0].dim() == 0):
            raise RuntimeError(_NO_LOSS)
        return output[0]
    if output.get("loss") is None:
        raise RuntimeError(_NO_LOSS)
    return output["loss"]


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
