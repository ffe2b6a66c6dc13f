"""The structure object: found once, kept with the model, replaced by compaction, and never stale without a word."""

import copy

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

import hf_blockprune
from hf_blockprune import BlockPruningConfig, apply_block_pruning, compact_model, save_compacted, sparsity_report
from hf_blockprune.compact.compaction import compaction_plan
from hf_blockprune.compact.flops import model_flops
from hf_blockprune.pruning.model import block_scores, set_threshold
from hf_blockprune.structure import discovery
from hf_blockprune.structure.discovery import find_structure, prunable_layers, structure_of

from conftest import ARCHS, tiny_model
from helpers import random_masks


@pytest.fixture
def discoveries(monkeypatch):
    """Counts the walks of the module tree (`find_structure`) from here on."""
    calls = []
    original = discovery.find_structure

    def counting(model, patterns=None):
        calls.append(type(model).__name__)
        return original(model, patterns)

    monkeypatch.setattr(discovery, "find_structure", counting)
    return calls


def test_the_structure_is_found_once_per_model_and_once_at_load(discoveries, tmp_path):
    model = random_masks(tiny_model("bert"), "struct", "sigmoid_threshold", seed=0, force_empty=False)
    assert len(discoveries) == 1  # apply_block_pruning
    model_flops(model, 16, kept_only=True)
    sparsity_report(model)
    compaction_plan(model)
    compact_model(model)
    model_flops(model, 16)
    assert len(discoveries) == 1  # every consumer read the kept structure; compaction replaced it
    save_compacted(model, tmp_path / "out", model_card=True)  # a copy finds its own (it could have been changed)
    assert len(discoveries) == 2
    loaded = hf_blockprune.from_pretrained(tmp_path / "out")
    model_flops(loaded, 16)
    sparsity_report(loaded)
    assert len(discoveries) == 3  # found once at load, from the layout


@pytest.mark.parametrize("arch", ARCHS)
def test_compaction_keeps_what_a_fresh_discovery_of_the_compacted_model_finds(arch):
    """The structure compaction derives from its layout is the one the loader would find in the compacted model."""
    model = random_masks(tiny_model(arch), "hybrid", "sigmoid_threshold", seed=3, force_empty=True)
    compact_model(model)
    kept = structure_of(model)
    assert kept == find_structure(model, kept.patterns)
    assert [layer.name for layer in prunable_layers(model)] == [layer.name for layer in kept.layers]


def test_a_copy_changed_before_use_finds_its_own_structure():
    """A deep copy truncated to fewer layers (as a distillation baseline does) is measured as it is."""
    model = tiny_model("bert")
    full = model_flops(model, 16)
    short = copy.deepcopy(model)
    del short.bert.encoder.layer[1]
    assert len(prunable_layers(short)) == 1 and model_flops(short, 16).total < full.total


def test_a_model_changed_behind_its_structure_is_refused():
    model = tiny_model("bert")
    structure_of(model)
    attention = model.bert.encoder.layer[1].attention.self
    attention.query = torch.nn.Linear(32, 16)  # half the heads removed by hand
    with pytest.raises(ValueError, match="changed after its structure was found"):
        model_flops(model, 16)


def test_a_structure_found_with_module_patterns_serves_every_consumer_after_compaction(discoveries):
    """An architecture without a built-in entry: its patterns are given once, at masking; compaction, the FLOPs model
    and a copy need nothing more."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                                                num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                                num_labels=3)).eval()
    config = BlockPruningConfig.from_preset(
        "struct", pruning_method="sigmoid_threshold", layers_pattern="vit.layers",
        attention_modules=["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"],
        ffn_modules=["mlp.fc1", "mlp.fc2"])
    apply_block_pruning(model, config)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=torch.Generator().manual_seed(1)))
    set_threshold(model, 0.5)
    masked_flops = model_flops(model, 16, kept_only=True).total
    compact_model(model)
    assert model_flops(model, 16).total == masked_flops
    assert len(discoveries) == 1
    assert model_flops(copy.deepcopy(model), 16).total == masked_flops  # found again, with the recorded patterns


def test_new_module_patterns_find_the_structure_again():
    """Patterns that differ from those the kept structure was found with replace it (the layers a config names)."""
    model = tiny_model("bert")
    assert len(structure_of(model).layers) == 2 and structure_of(model).patterns is None
    ffn_only = BlockPruningConfig.from_preset("struct", layers_pattern="encoder.layer",
                                              ffn_modules=["intermediate.dense", "output.dense"])
    apply_block_pruning(model, ffn_only)
    structure = structure_of(model)
    assert structure.patterns is not None and all(not layer.attentions for layer in structure.layers)
