"""Families outside the built-in entries: refused with the reason where compaction cannot be exact, described by
module patterns otherwise (and loaded back by the right auto class); variants of built-in ones (DeBERTa-v3)."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Phi3Config,
    Phi3ForCausalLM,
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


def test_phi3_attention_is_refused_with_the_reason():
    model = Phi3ForCausalLM(Phi3Config(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    patterns = dict(layers_pattern="layers", attention_modules=["self_attn.qkv_proj", "self_attn.o_proj"])
    with pytest.raises(ValueError, match=r"'phi3' models exactly: its attention cuts .* model-wide head count"):
        apply_block_pruning(model, BlockPruningConfig.from_preset("struct", **patterns))
    assert not is_block_pruned(model)


def _random_masks(model, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=generator))
    set_threshold(model, 0.5)
    return generator


def _biased(model):
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def test_a_fused_conv1d_attention_described_by_patterns_compacts_and_reloads_exactly(tmp_path):
    # GPT-2 through the override: a fused query-key-value Conv1D (two names), Conv1D FFN; the patterns take precedence
    # over the built-in entry and must give the same description
    torch.manual_seed(0)
    model = _biased(GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_inner=37,
                                               n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)))
    config = BlockPruningConfig.from_preset(
        "struct", pruning_method="sigmoid_threshold", layers_pattern="h",
        attention_modules=["attn.c_attn", "attn.c_proj"], ffn_modules=["mlp.c_fc", "mlp.c_proj"],
    )
    apply_block_pruning(model, config)
    generator = _random_masks(model)
    ids = torch.randint(3, 99, (2, 9), generator=generator)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected, tokens = model(input_ids=ids).logits, model.generate(ids, **settings)
    save_compacted(model, tmp_path / "gpt2")
    layout = json.loads((tmp_path / "gpt2" / "config.json").read_text())["blockprune_layout"]
    assert layout["version"] == 4 and layout["layers"]["transformer.h.0"]["attention"][0]["fused"] == "attn.c_attn"
    for loaded in (hf_blockprune.from_pretrained(tmp_path / "gpt2"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", trust_remote_code=True)):
        assert type(loaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert torch.equal(loaded.generate(ids, **settings), tokens)


def test_deberta_v3_style_attention_shares_its_position_projections_and_compacts_exactly(tmp_path):
    # DeBERTa-v3: share_att_key (the relative positions go through query_proj / key_proj), log buckets, a layer that
    # loses every head keeps a zero one (the attention divides by its head count)
    torch.manual_seed(0)
    model = _biased(DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"], share_att_key=True,
        position_buckets=8, norm_rel_ebd="layer_norm", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=2)))
    apply_block_pruning(model, BlockPruningConfig.from_preset("struct", pruning_method="sigmoid_threshold"))
    generator = _random_masks(model)
    with torch.no_grad():
        hf_blockprune.pruning.model.prunable_layers(model)[0].attentions[0].value.scores_module.scores.fill_(-1e4)
    ids = torch.randint(3, 99, (2, 9), generator=generator)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_compacted(model, tmp_path / "deberta")
    layout = json.loads((tmp_path / "deberta" / "config.json").read_text())["blockprune_layout"]
    assert layout["layers"]["deberta.encoder.layer.0"]["attention"][0] == {
        **layout["layers"]["deberta.encoder.layer.0"]["attention"][0], "heads": [], "removed": True}
    for loaded in (hf_blockprune.from_pretrained(tmp_path / "deberta"),
                   AutoModelForSequenceClassification.from_pretrained(tmp_path / "deberta", trust_remote_code=True)):
        # removed: nothing divides by its head count any more
        assert type(loaded.deberta.encoder.layer[0].attention.self).__name__ == "RemovedAttention"
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
