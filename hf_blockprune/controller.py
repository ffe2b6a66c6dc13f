"""Schedule state shared by `BlockPruningTrainer` and `BlockPruningCallback`."""

from __future__ import annotations

import torch
from torch import nn

from .config import BlockPruningConfig
from .filling import fill_surviving_heads, is_filled
from .losses import expected_density, mask_density
from .model import set_threshold
from .schedule import schedule_values


class PruningController:
    """Drives the threshold and the regularization weight of a masked model from the training step.

    All its state is a function of the step (the schedule is pure) or lives in the model's state dict (scores and
    thresholds), so a resumed run continues exactly where the interrupted one stopped.

    Args:
        model (`nn.Module`): a model masked by `apply_block_pruning`.
        config (`BlockPruningConfig`): the schedule.
    """

    def __init__(self, model: nn.Module, config: BlockPruningConfig):
        self.model = model
        self.config = config
        self.threshold = config.initial_threshold
        self.lambda_value = 0.0
        self._last_regularization: torch.Tensor | None = None

    def update(self, step: int, total_steps: int) -> None:
        """Set the threshold and lambda for optimizer step `step` of `total_steps`; start the filled stage on time."""
        total_steps = max(total_steps, 1)
        self.threshold, self.lambda_value = schedule_values(step, total_steps, self.config)
        if self.config.fill_after is not None and step >= self.config.fill_after * total_steps:
            self.lambda_value = 0.0
            if not is_filled(self.model):
                # from the scores, so a run resumed after the switch fills exactly as the uninterrupted one did
                set_threshold(self.model, self.threshold)
                fill_surviving_heads(self.model)
            return
        set_threshold(self.model, self.threshold)

    def regularization(self) -> torch.Tensor | None:
        """`lambda * expected_density(model)` to add to the training loss, or `None` while lambda is 0."""
        if self.lambda_value == 0.0:
            self._last_regularization = None
            return None
        term = self.lambda_value * expected_density(self.model)
        self._last_regularization = term.detach()
        return term

    def metrics(self) -> dict[str, float]:
        """The `pruning/*` values to log (this syncs with the device: call it at log steps only)."""
        last = self._last_regularization
        return {
            "pruning/threshold": self.threshold,
            "pruning/lambda": self.lambda_value,
            "pruning/regularization": 0.0 if last is None else last.item(),
            "pruning/density_attention": mask_density(self.model, "attention").item(),
            "pruning/density_ffn": mask_density(self.model, "ffn").item(),
            "pruning/density": mask_density(self.model).item(),
        }
