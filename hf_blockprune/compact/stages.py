"""What was done to a compacted model, stage by stage: a record in its config, which its model card reads.

`config.blockprune_stages` (saved in `config.json`) lists the stages, oldest first. Each is a dict with a `"method"`:

- `"block_movement_pruning"`: masks trained with the model (`BlockPruningTrainer`, `BlockPruningCallback`), then
  compacted; `"settings"` is its `BlockPruningConfig` as a dict;
- `"one_shot"`: `prune_one_shot`, without training; `"settings"` are its arguments (the target, the cost model, the
  importance measure, the calibration examples actually used, ...), `"result"` what it reached, `"flops"` the FLOPs
  before and after, `"base_model"` the dense model's Hub id;
- `"fine_tuning"`: a Trainer run on a compacted model with pruning off (the paper's second stage).

A stage may also give `"steps"` (optimizer steps of its training run) and `"teacher"` (the distillation teacher's Hub
id, or that it was a local model). No record holds a local path. A model compacted before stages were recorded reads
as one movement-pruning stage with the pruning config it records.
"""

from __future__ import annotations

from ..structure.model_structure import LAYOUT_ATTRIBUTE, PRUNING_CONFIG_KEY

STAGES_KEY = "blockprune_stages"
MOVEMENT_PRUNING = "block_movement_pruning"
ONE_SHOT = "one_shot"
FINE_TUNING = "fine_tuning"

TITLES = {
    MOVEMENT_PRUNING: "block movement pruning (Lagunas et al., 2021)",
    ONE_SHOT: "one-shot pruning, without training (Kwon et al., 2022)",
    FINE_TUNING: "fine-tuning of the compacted model, with no further pruning",
}
ROLES = {MOVEMENT_PRUNING: "pruning", ONE_SHOT: "one-shot pruning", FINE_TUNING: "fine-tuning"}


def recorded_stages(config, masked: bool = False) -> list[dict]:
    """The stages recorded in a model's `config` (copies), oldest first.

    Args:
        config (`PretrainedConfig`): the config of a compacted (or dense) model.
        masked (`bool`, *optional*, defaults to `False`): whether the model is masked again now: its config then
            records the new pruning config, so an earlier compaction recorded without stages has unknown settings.

    Returns:
        `list[dict]`: empty for a model never compacted.
    """
    stages = getattr(config, STAGES_KEY, None)
    if isinstance(stages, list):
        return [dict(stage) for stage in stages]
    if getattr(config, LAYOUT_ATTRIBUTE, None) is None:
        return []
    settings = None if masked else getattr(config, PRUNING_CONFIG_KEY, None)
    return [{"method": MOVEMENT_PRUNING, "settings": settings}]


def add_stage(config, stage: dict, earlier: list[dict] | None = None) -> None:
    """Record `stage` in `config`, after `earlier` (default: the stages `config` records now).

    Args:
        config (`PretrainedConfig`): the config of the compacted model; changed in place.
        stage (`dict`): the new stage (see the module docstring), JSON-serialisable and free of local paths.
        earlier (`list[dict]`, *optional*): the stages before it, read before the model was masked or compacted.
    """
    setattr(config, STAGES_KEY, (recorded_stages(config) if earlier is None else earlier) + [dict(stage)])


def stage_summary(stage: dict) -> str:
    """One line saying what `stage` did: its method, and its teacher, steps and one-shot settings when known."""
    parts = [TITLES.get(stage.get("method"), str(stage.get("method")))]
    settings = stage.get("settings") or {}
    if stage.get("method") == ONE_SHOT:
        cost = "FLOPs" if settings.get("cost_model", "flops") == "flops" else "measured latency"
        parts.append(f"heads and FFN neurons ranked by their Fisher importance on "
                     f"{settings.get('calibration_examples')} calibration examples and cut to a "
                     f"{settings.get('target_speedup')}x target speedup ({cost} at sequence length "
                     f"{settings.get('sequence_length')})")
        if settings.get("rescale"):
            parts.append("the kept ones rescaled by least squares")
    teacher = stage.get("teacher") or settings.get("teacher_model")
    if teacher:
        parts.append(f"distilled from {teacher}")
    if stage.get("steps"):
        parts.append(f"{stage['steps']} training steps")
    return ", ".join(parts)
