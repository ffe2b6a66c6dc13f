"""hf_blockprune: block movement pruning (Lagunas et al., 2021) for the Hugging Face Trainer.

The package has the shape of its architecture (each subpackage imports only from those listed before it):

- `structure`: what a model looks like (`architectures`; the structure found once and kept with the model,
  `discovery`; the saved loader `modeling_blockprune`);
- `pruning`: config, scores and masked layers, masking a model, schedule, regularization, targets;
- `compact`: compaction, the FLOPs model, saving and loading, masked checkpoints, the model card;
- `training`: `BlockPruningTrainer`, `BlockPruningCallback`, the schedule's controller, distillation, gradient
  accumulation;
- `integrations`: peft and sentence-transformers, one file each, registered with the core;
- `tasks`: task data, embedded defaults, question answering, the command line.

The public names below are importable from `hf_blockprune`.
"""

from . import integrations  # noqa: F401  (registers peft and sentence-transformers support with the core)
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
