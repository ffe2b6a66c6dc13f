"""From masks to a smaller model: the compaction plan and layout, the FLOPs cost model of what compaction keeps,
all-or-nothing saving, loading, dense export, masked training checkpoints and the model card."""
