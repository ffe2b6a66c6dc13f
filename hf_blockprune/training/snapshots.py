"""Several sparsity levels from one run: compacted snapshots saved as the schedule passes requested densities or
speedups (`snapshot_densities`, `snapshot_speedups` in `BlockPruningConfig`).

With a target, the masks follow the cubic schedule of the target density (`DensityTargets.scheduled`): between steps
they realize the scheduled density (see `PruningController.after_optimizer_step`). The first time the scheduled
density reaches a requested density, the model is saved compacted, as `save_model()` saves the final one, into
`<output_dir>/snapshot-density-<d>`; a requested speedup is the density at which the run's cost model (FLOPs, or the
latency table) gives that speedup, saved into `<output_dir>/snapshot-speedup-<s>x`. Each snapshot also holds
`snapshot.json`: the step, the scheduled and realized densities and the FLOPs-predicted speedup.

Snapshots are taken by the main process only; one whose folder holds a model already (a resumed run) is not taken
again. Saves are all-or-nothing (`save_compacted`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from torch import nn

from ..compact.flops import densities_for_speedup, predicted_speedup
from ..compact.saving import save_compacted
from ..pruning.losses import mask_density
from ..pruning.schedule import schedule_progress
from ..structure.wrappers import model_wrapper
from .controller import PruningController

logger = logging.getLogger(__name__)

SNAPSHOT_INFO = "snapshot.json"


def snapshot_folder(output_dir: str | os.PathLike, kind: str, value: float) -> Path:
    """Where the snapshot of `kind` (`"density"` or `"speedup"`) at `value` goes."""
    suffix = "x" if kind == "speedup" else ""
    return Path(output_dir) / f"snapshot-{kind}-{value:g}{suffix}"


class Snapshots:
    """The snapshots a run asks for, and when each is due (see the module docstring).

    Args:
        controller (`PruningController`): the run's controller (its config and density targets).
    """

    def __init__(self, controller: PruningController):
        self.controller = controller
        config = controller.config
        self.requests = [("density", value) for value in config.snapshot_densities or ()]
        self.requests += [("speedup", value) for value in config.snapshot_speedups or ()]
        self._densities: dict[tuple[str, float], float] | None = None

    def prepare(self, model: nn.Module, output_dir: str | None) -> None:
        """Work out when each snapshot is due (at train begin, once the targets are known).

        Raises:
            `ValueError`: a request the schedule never reaches (below the final target density, or a speedup above
                `target_speedup`).
        """
        if not self.requests or self.controller.targets is None:
            return
        self._densities = self._plan(self._costed(model), output_dir)
        final = min(self.controller.targets.targets.values())
        for (kind, value), due in self._densities.items():
            if due < final - 1e-6:
                raise ValueError(
                    f"The snapshot at {kind} {value:g} is due at density {due:.3f}, below the run's final target "
                    f"density {final:.3f}: the schedule never reaches it. Ask for snapshots between the start and "
                    "the target."
                )

    def _plan(self, model: nn.Module, output_dir: str | None) -> dict[tuple[str, float], float]:
        """The scheduled density at which each request is due."""
        config = self.controller.config
        plan = {}
        for kind, value in self.requests:
            if kind == "density":
                plan[(kind, value)] = value
            elif config.speedup_cost_model == "latency":
                from ..compact.latency import LatencyTable, densities_for_latency

                path = config.latency_table or os.path.join(output_dir or "", "latency_table.json")
                plan[(kind, value)] = densities_for_latency(LatencyTable.load(path), model, value)["attention"]
            else:
                plan[(kind, value)] = densities_for_speedup(model, value, config.speedup_sequence_length)["attention"]
        return plan

    def scheduled_density(self, step: int, total_steps: int) -> float:
        """The density the masks realize after optimizer step `step` (the lowest group's, for per-group targets)."""
        config = self.controller.config
        progress = schedule_progress(step, max(total_steps, 1), config.initial_warmup, config.final_warmup)
        return min(self.controller.targets.scheduled(progress).values())

    def after_step(self, model: nn.Module, step: int, total_steps: int, output_dir: str | None, processing_class=None,
                   is_main_process: bool = True) -> list[Path]:
        """Save the snapshots due at `step` (called after the cuts are re-placed); returns the folders written."""
        if not self.requests or self.controller.targets is None or not output_dir:
            return []
        if self._densities is None:
            self._densities = self._plan(self._costed(model), output_dir)
        density = self.scheduled_density(step, total_steps)
        written = []
        for (kind, value), due in self._densities.items():
            folder = snapshot_folder(output_dir, kind, value)
            if density > due + 1e-9 or (folder / "config.json").exists() or (folder / "modules.json").exists():
                continue
            if is_main_process:
                self._save(model, folder, kind, value, step, density, processing_class)
                written.append(folder)
        return written

    @staticmethod
    def _costed(model: nn.Module) -> nn.Module:
        wrapper = model_wrapper(model)
        return model if wrapper is None else wrapper.inner(model)

    def _save(self, model, folder: Path, kind: str, value: float, step: int, density: float, processing_class):
        save_compacted(model, folder, processing_class=processing_class)
        costed = self._costed(model)
        info = {
            "kind": kind, "requested": value, "step": step, "scheduled_density": density,
            "realized_density": float(mask_density(costed)),
            "flops_speedup": predicted_speedup(costed, costed, self.controller.config.speedup_sequence_length),
        }
        draft = folder / f".{SNAPSHOT_INFO}.draft"
        draft.write_text(json.dumps(info, indent=2))
        os.replace(draft, folder / SNAPSHOT_INFO)
        logger.info("Snapshot at step %d (%s %g): saved to %s", step, kind, value, folder)
