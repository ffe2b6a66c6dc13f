"""Families outside the built-in entries: refused with the reason where compaction cannot be exact, described by
module patterns otherwise (and loaded back by the right auto class)."""

import json

import pytest
import torch
from transformers import (
    AutoModelForImageClassification,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

import hf_blockprune
from hf_blockprune import BlockPruningConfig, apply_block_pruning, compact_model, is_block_pruned, save_compacted
from hf_blockprune.pruning.model import block_scores, set_threshold

T5_ATTENTION = ["layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
                "layer.0.SelfAttention.o"]


def _tiny_t5(cls=T5ForConditionalGeneration):
    torch.manual_seed(0)
    return cls(T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, dropout_rate=0.0,
                        decoder_start_token_id=0))


@pytest.mark.parametrize("patterns", [{}, {"layers_pattern": "block", "attention_modules": T5_ATTENTION}])
def test_t5_attention_is_refused_with_the_reason_before_anything_changes(patterns):
    model = _tiny_t5()
    with pytest.raises(ValueError, match=r"'t5' models exactly: its relative-position bias .* Prune only the FFN"):
        apply_block_pruning(model, BlockPruningConfig.from_preset("struct", **patterns))
    assert not is_block_pruned(model)


def test_the_ffn_of_a_t5_encoder_prunes_and_compacts_exactly():
    model = _tiny_t5(T5EncoderModel).eval()
    config = BlockPruningConfig.from_preset("struct", pruning_method="topk", layers_pattern="block",
                                            ffn_modules=["layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo"])
    apply_block_pruning(model, config)
    set_threshold(model, 0.5)
    ids = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
        compact_model(model)
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
    assert model.encoder.block[0].layer[1].DenseReluDense.wi.out_features == round(0.5 * 37)


def test_an_image_classifier_described_by_patterns_loads_back_with_the_image_auto_class(tmp_path):
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                                                num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                                num_labels=3, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0)).eval()
    config = BlockPruningConfig.from_preset(
        "struct", pruning_method="sigmoid_threshold", layers_pattern="vit.layers",
        attention_modules=["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"],
        ffn_modules=["mlp.fc1", "mlp.fc2"],
    )
    apply_block_pruning(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=generator))
    set_threshold(model, 0.5)
    pixels = torch.randn(2, 3, 16, 16, generator=generator)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    save_compacted(model, tmp_path / "vit")
    auto_map = json.loads((tmp_path / "vit" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "modeling_blockprune.BlockPrunedViTForImageClassification"
    for loaded in (hf_blockprune.from_pretrained(tmp_path / "vit"),
                   AutoModelForImageClassification.from_pretrained(tmp_path / "vit", trust_remote_code=True)):
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(pixel_values=pixels).logits, expected, atol=1e-5, rtol=1e-5)
