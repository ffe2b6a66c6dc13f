"""What a transformer layer looks like: the one structure description (per-family entries, the user's override)
and the self-contained loader that rebuilds a compacted model's per-layer shapes from its recorded layout."""
