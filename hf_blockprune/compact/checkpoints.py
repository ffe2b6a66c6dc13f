"""Masked training checkpoints: recognise them, and rebuild the masked model they hold.

A checkpoint written during training (by `BlockPruningTrainer`, the callback, or `save_model()` before training ends)
holds the mask scores next to the unmasked weights (`...base_layer.weight`, `...block_scores.scores`): plain
`from_pretrained` cannot read it, `load_masked_checkpoint` can, and `hf-blockprune compact` turns it into the compacted
model.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..pruning.config import BlockPruningConfig
from ..pruning.model import TARGETS_ATTRIBUTE, apply_block_pruning, rename_legacy_keys
from ..structure.model_structure import LAYOUT_ATTRIBUTE, PRUNING_CONFIG_KEY
from ..structure.modeling_blockprune import block_pruned_class
from ..structure.wrappers import model_wrapper
from .saving import SCORE_SUFFIX, architecture_class, read_model_config, weight_names

logger = logging.getLogger(__name__)

def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a local checkpoint folder (`model.safetensors`, possibly sharded)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(path / shard).items()}
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"{path} has no model.safetensors.")
    return load_file(path / "model.safetensors")


def recorded_pruning_config(config, config_file: str | None, flags: BlockPruningConfig | None) -> BlockPruningConfig:
    """The config the checkpoint was masked with: `--pruning_config` file, else config.json's record, else flags."""
    if config_file is not None:
        try:
            return BlockPruningConfig.from_dict(json.loads(Path(config_file).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read --pruning_config {config_file}: {error}") from None
    recorded = getattr(config, PRUNING_CONFIG_KEY, None)
    if recorded is not None:
        return BlockPruningConfig.from_dict(recorded)
    if flags is None:
        raise ValueError("The checkpoint does not record its pruning config: pass --pruning_config or preset flags.")
    logger.warning("The checkpoint does not record its pruning config; using the command-line flags.")
    return flags


def load_masked_checkpoint(
    path: str | os.PathLike, pruning_config_file: str | None = None, flags: BlockPruningConfig | None = None
) -> nn.Module:
    """Rebuild the masked model of a checkpoint written by `BlockPruningTrainer` (or the callback) during training.

    Args:
        path (`str` or `os.PathLike`): the checkpoint folder (`config.json` and `model.safetensors` with
            `...base_layer.weight` and `...block_scores.scores` keys).
        pruning_config_file (`str`, *optional*): a JSON file with the `BlockPruningConfig` used in training; defaults
            to the `blockprune_config` recorded in `config.json`.
        flags (`BlockPruningConfig`, *optional*): the config to use when neither of the above exists.

    Returns:
        `nn.Module`: the masked model, in eval mode, with its scores and thresholds as saved.

    Example:
        >>> import os
        >>> import tempfile
        >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
        >>> from hf_blockprune import BlockPruningConfig, BlockPruningTrainer, is_block_pruned, load_masked_checkpoint
        >>> model = BertForSequenceClassification(BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37))
        >>> data = [{"input_ids": [2, 3 + i, 5, 7], "labels": i % 2} for i in range(16)]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     args = TrainingArguments(output_dir=tmp, max_steps=2, use_cpu=True, report_to="none",
        ...                              disable_tqdm=True, logging_strategy="no", save_steps=1)
        ...     trainer = BlockPruningTrainer(model=model, args=args, train_dataset=data,
        ...                                   pruning_config=BlockPruningConfig.from_preset("struct"))
        ...     _ = trainer.train()  # doctest: +ELLIPSIS
        ...     masked = load_masked_checkpoint(os.path.join(tmp, "checkpoint-1"))  # written after step 1
        {'train_runtime': ...}
        >>> is_block_pruned(masked), masked.training
        (True, False)
    """
    path = Path(path)
    config = read_model_config(path)
    state = checkpoint_state(path)
    if not any(key.endswith(SCORE_SUFFIX) for key in state):
        if getattr(config, LAYOUT_ATTRIBUTE, None) is not None:
            raise ValueError(f"{path} holds a compacted model already (its config.json has `{LAYOUT_ATTRIBUTE}` and "
                             "there are no mask scores): load it with `hf_blockprune.from_pretrained`.")
        raise ValueError(f"{path} holds no mask scores (`*.{SCORE_SUFFIX}`): it is not a masked training checkpoint.")
    # The density controller's state (lambda) only matters for resuming training: the masks are the scores and cuts.
    state = {k: v for k, v in rename_legacy_keys(state).items() if not k.startswith(f"{TARGETS_ATTRIBUTE}.")}
    model_class = architecture_class(config)
    if getattr(config, LAYOUT_ATTRIBUTE, None) is not None:  # a compacted model pruned again
        model_class = block_pruned_class(model_class)
    model = model_class(config)
    apply_block_pruning(model, recorded_pruning_config(config, pruning_config_file, flags))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"The weights in {path} do not match the pruning config: {error}") from None
    return model.eval()


TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint (after weights and optimizer)


def incomplete_reason(checkpoint: str | os.PathLike) -> str | None:
    """Why the Trainer checkpoint folder `checkpoint` is incomplete (a run stopped while writing it), or `None`.

    The Trainer writes the weights, then the optimizer, scheduler and RNG states, then `trainer_state.json`: a
    checkpoint is complete once that file is there and reads as JSON.
    """
    state = Path(checkpoint) / TRAINER_STATE
    if not state.is_file():
        return f"it has no {TRAINER_STATE}"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return f"its {TRAINER_STATE} is cut short"
    return None


def _checkpoints_by_step(output_dir: str | os.PathLike) -> list[Path]:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = [(int(match.group(1)), path) for path in Path(output_dir).iterdir()
             if path.is_dir() and (match := pattern.match(path.name))]
    return [path for _, path in sorted(found, reverse=True)]


def resolve_resume_checkpoint(output_dir: str | os.PathLike | None, resume_from_checkpoint) -> str | None:
    """The checkpoint a Trainer resumes from, skipping incomplete ones.

    `resume_from_checkpoint=True` takes the newest checkpoint of `output_dir`, as the Trainer does, but the newest
    *complete* one (see `incomplete_reason`); a path to an incomplete checkpoint (as transformers' example scripts
    pass `get_last_checkpoint(output_dir)`) is replaced by the newest complete checkpoint before it in its folder.
    Each incomplete checkpoint skipped is named in a warning; nothing is deleted.

    Args:
        output_dir (`str`, *optional*): the run's output folder (for `True`).
        resume_from_checkpoint (`bool`, `str` or `None`): as passed to `Trainer.train`.

    Returns:
        `str` or `None`: the checkpoint folder, or `None` when the run does not resume.

    Raises:
        `ValueError`: no complete checkpoint is left to resume from.
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        if output_dir is None or not os.path.isdir(output_dir):
            raise ValueError(f"resume_from_checkpoint=True, but the output folder {output_dir} does not exist.")
        candidates = _checkpoints_by_step(output_dir)
    else:
        named = Path(resume_from_checkpoint)
        if not named.is_dir() or incomplete_reason(named) is None:
            return str(resume_from_checkpoint)  # complete, or not a local folder: the Trainer's own errors apply
        step = _step_of(named)
        candidates = [path for path in _checkpoints_by_step(named.parent) if step is None or _step_of(path) <= step]
    skipped = []
    for candidate in candidates:
        reason = incomplete_reason(candidate)
        if reason is None:
            if skipped:
                logger.warning("Resuming from %s: %s skipped, as a run stopped while writing it (%s).", candidate,
                               ", ".join(str(path) for path, _ in skipped), "; ".join(why for _, why in skipped))
            return str(candidate)
        skipped.append((candidate, reason))
    where = output_dir if resume_from_checkpoint is True else Path(resume_from_checkpoint).parent
    found = "; ".join(f"{path.name}: {why}" for path, why in skipped) or "none"
    raise ValueError(
        f"No complete checkpoint to resume from in {where} (incomplete: {found}): a run was stopped while writing "
        "them. Start the run again without `resume_from_checkpoint`."
    )


def _step_of(path: Path) -> int | None:
    match = re.search(r"-(\d+)$", path.name)
    return int(match.group(1)) if match else None


def check_resumable(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Refuse to resume the masked `model` from a checkpoint that lacks its mask scores.

    The Trainer loads a checkpoint non-strictly: a dense checkpoint, or one whose scores were removed, would leave
    fresh scores in the middle of the schedule with only a generic warning about missing keys. PEFT and
    sentence-transformers checkpoints are checked by their own loaders (`ModelWrapper.checks_own_checkpoints`, see
    `hf_blockprune.integrations`); a folder without `model.safetensors` is left to the Trainer.

    Raises:
        `ValueError`: naming the checkpoint and how many of the model's score tensors it lacks.
    """
    wrapper = model_wrapper(model)
    if wrapper is not None and wrapper.checks_own_checkpoints:
        return
    path = Path(checkpoint)
    names = set(weight_names(path)) if path.is_dir() else set()
    if not names:
        return
    expected = [key for key in model.state_dict() if key.endswith(SCORE_SUFFIX)]
    missing = [key for key in expected if key not in names]
    if missing:
        raise ValueError(
            f"{checkpoint} lacks {len(missing)} of this model's {len(expected)} mask-score tensors (e.g. "
            f"`{missing[0]}`): it was not written by this pruning run (a dense checkpoint, another pruning config) or "
            "its scores were removed, and resuming would restart them in the middle of the schedule. Resume from a "
            "checkpoint of this run, or start without `resume_from_checkpoint`."
        )
