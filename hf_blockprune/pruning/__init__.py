"""The pruning core: the config and its presets, block scores and masked layers, masking a model, the cubic
schedule, the regularization, the density targets and their controller, the filled stage and the sparsity report."""
