"""hf_blockprune: block movement pruning (Lagunas et al., 2021) for the Hugging Face Trainer."""

from .callback import BlockPruningCallback
from .checkpoints import load_masked_checkpoint
from .compaction import compact_model
from .config import BlockPruningConfig
from .model import apply_block_pruning, is_block_pruned, remove_block_pruning
from .report import sparsity_report
from .saving import export_dense, from_pretrained, save_compacted
from .trainer import BlockPruningTrainer

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
    "remove_block_pruning",
    "save_compacted",
    "sparsity_report",
]
