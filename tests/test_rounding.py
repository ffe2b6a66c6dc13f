"""`ffn_round_to`: every layer keeps a multiple of that many FFN neurons, and compaction keeps exactly those."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_blockprune import BlockPruningConfig, compact_model
from hf_blockprune.pruning.layer import round_kept
from hf_blockprune.pruning.model import block_scores
from hf_blockprune.structure.discovery import prunable_layers

from helpers import make_trainer, model_inputs, model_outputs, preset_config


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(-3, 3), min_size=1, max_size=40), st.integers(1, 8), st.floats(-1, 1))
def test_round_kept_keeps_the_nearest_multiple_of_the_highest_scores(values, multiple, cut):
    scores = torch.tensor(values)
    mask = (scores > cut).float().requires_grad_()
    rounded = round_kept(mask, scores, multiple)
    kept, n = int(mask.sum()), len(values)
    count = int(rounded.sum())
    if kept == n:
        assert count == n
    else:  # the nearest multiple (halves to the even one), or all when that is past the layer's size
        assert count == n or (count % multiple == 0 and abs(count - kept) <= multiple / 2)
    if 0 < count < n:  # the highest scores are the kept ones
        assert scores[rounded.bool()].min() >= scores[~rounded.bool()].max()
    rounded.sum().backward()
    assert torch.equal(mask.grad, torch.ones_like(mask))  # straight through


@pytest.mark.parametrize("route", ["trainer", "callback"])
@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_each_layer_keeps_a_multiple_and_compacts_to_it(route, method, arch, tmp_path):
    overrides = dict(final_threshold=0.4) if method == "topk" else dict(target_density=0.4)
    config = preset_config("struct", arch, pruning_method=method, ffn_round_to=8, **overrides)
    trainer = make_trainer(route, arch, config, tmp_path, max_steps=30)
    trainer.train()
    model = trainer.model.eval()
    counts = [int(layer.ffn_input.scores_module.mask().sum()) for layer in prunable_layers(model)]
    assert all(count % 8 == 0 for count in counts) and all(count < 37 for count in counts)
    inputs = model_inputs(arch)
    masked = model_outputs(model, inputs)
    compacted = compact_model(copy.deepcopy(model))
    sizes = [layer.ffn_input.out_features for layer in prunable_layers(compacted)]
    assert sizes == counts
    for a, b in zip(masked, model_outputs(compacted, inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(s.round_to == 8 for s in block_scores(model) if s.kind == "ffn")


def test_rounding_needs_neuron_granularity():
    with pytest.raises(ValueError, match="ffn_granularity='neuron'"):
        BlockPruningConfig.from_preset("block", ffn_round_to=8)
    with pytest.raises(ValueError, match="needs a pruning preset"):
        BlockPruningConfig(pruning_preset="none", ffn_round_to=8)
    with pytest.raises(ValueError, match="integer >= 1"):
        BlockPruningConfig.from_preset("struct", ffn_round_to=0)
