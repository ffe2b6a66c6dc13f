"""Checks of a run's `TrainingArguments` against block pruning, done when the trainer or the callback is built."""

from __future__ import annotations

import logging
import os

from ..pruning.config import BlockPruningConfig

logger = logging.getLogger(__name__)


def check_training_arguments(args, config: BlockPruningConfig) -> None:
    """Raise if the `TrainingArguments` cannot run `config` (called by the trainer and the callback at init).

    Multi-process training (`torchrun`, `accelerate launch --multi_gpu`) needs nothing special: every process computes
    the same cuts and multipliers from the same (all-reduced) scores. Refused:

    - parameter sharding (FSDP, DeepSpeed ZeRO stage 3), see `check_parameters_not_sharded`;
    - the filled stage of `hybrid-filled` with `ddp_find_unused_parameters=False`: it freezes the scores mid-run, and
      DDP then stops at the next step waiting for their gradients.
    """
    check_parameters_not_sharded(args)
    distributed = getattr(args, "world_size", 1) > 1
    if distributed and config.fills and getattr(args, "ddp_find_unused_parameters", None) is False:
        raise ValueError(
            f"`fill_after={config.fill_after}` (the filled stage of hybrid-filled) freezes the mask scores during "
            "training, which DDP only allows with unused-parameter detection: leave `ddp_find_unused_parameters` "
            "unset (the Trainer's default is True) or set it to True, or run the filled stage as a second run "
            "(`fill_after=1.0`, then fine-tune the saved compacted model)."
        )


_DATA_PARALLEL = (
    "Train with data parallelism instead, where every process holds the whole model: `torchrun --nproc_per_node N "
    "script.py` or `accelerate launch --multi_gpu --num_processes N script.py` (DDP)"
)


def check_parameters_not_sharded(args) -> None:
    """Refuse the settings that shard the parameters across processes: FSDP and DeepSpeed ZeRO stage 3.

    The score cuts, the density targets and the compacted model are all computed outside the forward pass, from whole
    tensors: with sharded parameters each process would see only its shard (FSDP2 turns each score grid into a
    `DTensor` holding a slice of its rows; ZeRO-3 leaves an empty placeholder outside the forward pass), so the
    processes would cut differently and the compacted model could not be built. DeepSpeed ZeRO stages 1 and 2 shard
    only the optimizer state and the gradients: every process keeps the whole, identical parameters, as with DDP.

    Args:
        args (`TrainingArguments`): the run's arguments; `accelerate launch --use_fsdp` is read from the environment
            (`ACCELERATE_USE_FSDP`), `--use_deepspeed` from the DeepSpeed plugin the arguments build.

    Raises:
        `ValueError`: naming the setting and the supported alternative.
    """
    fsdp = _fsdp_setting(args)
    if fsdp is not None:
        raise ValueError(
            f"Block pruning does not support FSDP ({fsdp}): FSDP shards the parameters, and the masks and the "
            f"compacted model need whole weights. {_DATA_PARALLEL}."
        )
    deepspeed = _deepspeed_config(args)
    if deepspeed is None:
        return
    if deepspeed.is_zero3():
        raise ValueError(
            "Block pruning does not support DeepSpeed ZeRO stage 3 (`zero_optimization.stage: 3`): it partitions the "
            "parameters, and the masks and the compacted model need whole weights. Use ZeRO stage 1 or 2 (optimizer "
            f"state and gradients only). {_DATA_PARALLEL}."
        )
    if "optimizer" in deepspeed.config:
        logger.warning(
            "The DeepSpeed config has an `optimizer` section: DeepSpeed then builds the optimizer, so "
            "BlockPruningTrainer's group for the mask scores (`mask_scores_learning_rate`) is not used and the scores "
            "train at the weights' learning rate. Remove the section to let the Trainer build the optimizer."
        )


def _fsdp_setting(args) -> str | None:
    """What turns FSDP on for this run, or `None`."""
    if getattr(args, "fsdp", None) or getattr(args, "fsdp_plugin_args", None) is not None:
        return "`fsdp` in the TrainingArguments"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":  # as accelerate's Accelerator reads it
        return "`accelerate launch --use_fsdp`, or an accelerate config with `distributed_type: FSDP`"
    return None


def _deepspeed_config(args):
    """The run's DeepSpeed config (an accelerate `HfDeepSpeedConfig`), or `None` without DeepSpeed.

    `TrainingArguments` builds a DeepSpeed plugin from `deepspeed=` or from `accelerate launch --use_deepspeed`
    (`ACCELERATE_USE_DEEPSPEED`, its ZeRO stage and config file); arguments without it are read from `deepspeed=`.
    """
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        return plugin.hf_ds_config
    if getattr(args, "deepspeed", None):
        from accelerate.utils.deepspeed import HfDeepSpeedConfig

        return HfDeepSpeedConfig(args.deepspeed)
    return None
