"""Where hf_blockprune reaches into a Trainer it does not own: each patch, and why it is needed.

`BlockPruningTrainer` overrides these methods in its class; `BlockPruningCallback` is handed no Trainer (callbacks get
the model, optimizer and dataloaders, never the Trainer), so it finds the Trainer being built on the call stack
(`trainer_being_built`) and patches that one instance. Every patch is listed here and nowhere else:

- `create_model_card` (`keep_model_card`): `push_to_hub` and transformers' example scripts call it after training,
  and the Trainer's own card would replace the pruning card `save_model()` wrote;
- `train` (`resume_through_lifecycle`): the checkpoint to resume from is chosen by the lifecycle (an incomplete
  checkpoint skipped, one without mask scores refused) before the Trainer loads it non-strictly;
- `_load_from_checkpoint` (private; `load_checkpoints_through_wrapper`): a sentence-transformers Trainer loads a
  checkpoint by building a new model from its folder, which a masked checkpoint cannot be;
- `callback_handler.callbacks` (`log_before_other_callbacks`): the Trainer runs the `report_to` integrations before
  user callbacks, so the callback moves itself first for them to log the `pruning/*` values.
"""

from __future__ import annotations

import functools
import inspect

from transformers import Trainer, TrainerCallback

from ..compact.card_metadata import run_card_data
from ..compact.model_card import update_model_card
from ..structure.wrappers import ModelWrapper


def trainer_being_built(callback: TrainerCallback, depth: int = 16) -> Trainer | None:
    """The Trainer whose `__init__` is calling `callback.on_init_end`, found on the call stack (callbacks are not
    handed their Trainer), or `None`."""
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

    Once this ran, a `README.md` carrying the hf_blockprune marker is kept and gets the run's last evaluation and the
    call's datasets, tasks, license, ... in its Hub metadata (see `update_model_card`); any other README.md is
    replaced by the Trainer's card as before. `BlockPruningCallback` calls this on the Trainer it is passed to; call
    it yourself when a Trainer gets the callback some other way.

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


def resume_through_lifecycle(trainer: Trainer, lifecycle) -> Trainer:
    """Make `trainer.train(resume_from_checkpoint=...)` resume from the checkpoint `lifecycle.resolve_checkpoint`
    picks, on this Trainer instance (what `BlockPruningTrainer.train` does in its class)."""
    train = trainer.train
    if getattr(train, "resumes_through_lifecycle", False):
        return trainer

    @functools.wraps(train)
    def resuming_train(resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = lifecycle.resolve_checkpoint(trainer.args.output_dir, resume_from_checkpoint)
        return train(checkpoint, *args, **kwargs)

    resuming_train.resumes_through_lifecycle = True
    trainer.train = resuming_train
    return trainer


def load_checkpoints_through_wrapper(trainer: Trainer | None, args, wrapper: ModelWrapper) -> None:
    """Make the Trainer of a wrapped model load its masked checkpoints (to resume, and for `load_best_model_at_end`)
    with `wrapper.load_checkpoint`, into the masked model: a sentence-transformers Trainer's own loader builds a new
    model from the folder, which a masked checkpoint refuses. Nothing for a wrapper whose checkpoints the Trainer
    loads."""
    if type(wrapper).load_checkpoint is ModelWrapper.load_checkpoint:  # the Trainer's loader reads them
        return
    if trainer is None:
        if getattr(args, "load_best_model_at_end", False):
            raise ValueError(
                f"BlockPruningCallback did not find its Trainer, so the {wrapper.name} Trainer could not load "
                "the best masked checkpoint at the end (it would keep the last model and only log an error). Leave "
                "out `load_best_model_at_end`, or train with `class PruningTrainer(BlockPruningTrainer, "
                f"{wrapper.trainer_class})`."
            )
        return

    def load_from_checkpoint(checkpoint, model=None):
        wrapper.load_checkpoint(trainer.model, checkpoint)

    trainer._load_from_checkpoint = load_from_checkpoint


def log_before_other_callbacks(trainer: Trainer, callback: TrainerCallback) -> bool:
    """Move `callback` to the front of `trainer`'s callback list, so that the `pruning/*` values it adds to the logs
    reach every callback after it: the `report_to` integrations (which the Trainer puts before user callbacks), the
    console printer and any other logger. `BlockPruningCallback` does this itself when it finds its Trainer.

    Every other event then also reaches it first, which is harmless: it reads nothing the other callbacks set, and
    it checks its arguments and marks the model for compaction before e.g. an integration starts a run or saves it.

    Args:
        trainer (`Trainer`): the Trainer that `callback` was passed to.
        callback (`TrainerCallback`): the callback to move (a `BlockPruningCallback`).

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
    callback.logs_first = True
    return True
