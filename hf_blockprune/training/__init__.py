"""The Trainer integration: `BlockPruningTrainer`, `BlockPruningCallback`, distillation from a dense teacher and
gradient-accumulation bookkeeping."""
