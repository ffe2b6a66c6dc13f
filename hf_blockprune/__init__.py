"""hf_blockprune: block movement pruning (Lagunas et al., 2021) for the Hugging Face Trainer.

The package has the shape of its architecture (each subpackage imports only from those listed before it, except
`pruning.controller`, which reads the cost models of `compact.flops` and `compact.latency`):

- `structure`: what a layer looks like (`architectures`, the saved loader `modeling_blockprune`);
- `pruning`: config, scores and masked layers, masking a model, schedule, regularization, targets, controller;
- `compact`: compaction, the FLOPs model, saving and loading, masked checkpoints, the model card;
- `training`: `BlockPruningTrainer`, `BlockPruningCallback`, distillation, gradient accumulation;
- `tasks`: task data, embedded defaults, question answering, the command line.

The public names below are importable from `hf_blockprune`; the modules' former flat paths
(`hf_blockprune.compaction`, `hf_blockprune.saving`, ...) still import, as aliases of their new places.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .compact import sentence_transformers as _sentence_transformers  # noqa: F401  (registers its saver)
from .compact.checkpoints import load_masked_checkpoint
from .compact.compaction import compact_model
from .compact.one_shot import prune_one_shot
from .compact.saving import export_dense, from_pretrained, save_compacted
from .pruning.config import BlockPruningConfig
from .pruning.model import apply_block_pruning, is_block_pruned, remove_block_pruning
from .pruning.report import sparsity_report
from .training.callback import BlockPruningCallback
from .training.trainer import BlockPruningTrainer

__version__ = "0.1.0"

# Former flat module name -> its subpackage.
_MOVED_MODULES = {
    **dict.fromkeys(("architectures", "modeling_blockprune"), "structure"),
    **dict.fromkeys(("binarizers", "config", "controller", "filling", "layer", "losses", "model", "report", "schedule",
                     "targets"), "pruning"),
    **dict.fromkeys(("atomic", "checkpoints", "compaction", "flops", "model_card", "saving"), "compact"),
    **dict.fromkeys(("accumulation", "callback", "distillation", "trainer"), "training"),
    **dict.fromkeys(("cli", "data", "defaults", "qa"), "tasks"),
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `hf_blockprune.<former name>` as the module at its new place (the same module object)."""

    def __init__(self):
        self.own_specs = {}

    def find_spec(self, fullname, path=None, target=None):
        """A spec for a former module path, else `None` (not ours)."""
        package, _, name = fullname.partition(".")
        if package != __name__ or name not in _MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        """The module at its new place, registered under the former name too."""
        name = spec.name.partition(".")[2]
        module = importlib.import_module(f"{__name__}.{_MOVED_MODULES[name]}.{name}")
        self.own_specs[module.__name__] = module.__spec__  # the import machinery sets the alias's spec on it next
        return module

    def exec_module(self, module):
        """Nothing to run (the module executed at its new place): give it back its own spec."""
        module.__spec__ = self.own_specs[module.__name__]


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())  # before the path finders: a stale flat file never wins

__all__ = [
    "BlockPruningCallback",
    "BlockPruningConfig",
    "BlockPruningTrainer",
    "apply_block_pruning",
    "compact_model",
    "export_dense",
    "from_pretrained",
    "is_block_pruned",
    "load_masked_checkpoint",
    "prune_one_shot",
    "remove_block_pruning",
    "save_compacted",
    "sparsity_report",
]
