import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hf_blockprune import BlockPruningConfig, apply_block_pruning, is_block_pruned, remove_block_pruning
from hf_blockprune.layer import MaskedLinear
from hf_blockprune.model import block_scores, prunable_layers, set_threshold

from conftest import VOCAB, tiny_model

PRESETS = {
    "hybrid": dict(attention_block_size=[8, 8]),
    "struct": {},
    "block": dict(attention_block_size=[8, 8], ffn_block_size=[1, 1]),
}


def _inputs(arch):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "decoder_input_ids": ids[:, :5]} if arch == "bart" else {"input_ids": ids}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fully_kept_masks_change_nothing_and_remove_restores_plain_linears(arch, preset):
    model = tiny_model(arch).eval()
    inputs = _inputs(arch)
    reference = model(**inputs).logits
    apply_block_pruning(model, BlockPruningConfig.from_preset(preset, **PRESETS[preset]))
    assert is_block_pruned(model)
    torch.testing.assert_close(model(**inputs).logits, reference)
    remove_block_pruning(model)
    assert not is_block_pruned(model) and not any("scores" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(**inputs).logits, reference)


def test_every_prunable_linear_is_wrapped(arch):
    model = apply_block_pruning(tiny_model(arch), BlockPruningConfig(attention_block_size=[8, 8]))
    layers = prunable_layers(model)
    expected_attention = {"bart": 3}.get(arch, 1)
    assert sum(len(layer.attentions) for layer in layers) == 2 * expected_attention
    wrapped = sum(isinstance(m, MaskedLinear) for m in model.modules())
    assert wrapped == 4 * 2 * expected_attention + 2 * len(layers)


def test_masked_weight_zeroes_exactly_the_masked_blocks():
    model = apply_block_pruning(tiny_model("bert"), BlockPruningConfig(pruning_method="topk",
                                                                        attention_block_size=[8, 16]))
    query = model.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        query.scores_module.scores.copy_(torch.tensor([[4.0, 3.0], [2.0, 1.0], [0.0, -1.0], [-2.0, -3.0]]))
    set_threshold(model, 0.5)
    zero_blocks = (query.masked_weight() == 0).view(4, 8, 2, 16).all(dim=(1, 3))
    assert zero_blocks.tolist() == [[False, False], [False, False], [True, True], [True, True]]


def test_ffn_neuron_score_is_shared_by_row_and_column():
    model = apply_block_pruning(tiny_model("bert"), BlockPruningConfig(pruning_method="topk"))
    layer = model.bert.encoder.layer[0]
    assert layer.intermediate.dense.scores_module is layer.output.dense.scores_module
    with torch.no_grad():
        layer.intermediate.dense.scores_module.scores.copy_(torch.arange(37.0))
    set_threshold(model, 10 / 37)
    rows_kept = layer.intermediate.dense.masked_weight().abs().sum(1) > 0
    cols_kept = layer.output.dense.masked_weight().abs().sum(0) > 0
    assert torch.equal(rows_kept, cols_kept) and int(rows_kept.sum()) == 10


def test_scores_are_saved_once_per_shared_group():
    model = apply_block_pruning(tiny_model("bert"), BlockPruningConfig.from_preset("struct"))
    names = [n for n, _ in model.named_parameters() if n.endswith("scores")]
    assert len(names) == 2 * 2  # per layer: one head vector, one neuron vector
    assert len(list(block_scores(model))) == 4


def test_unknown_model_type_lists_supported_types_and_how_to_pass_patterns():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB))
    with pytest.raises(ValueError, match=r"supported: \['bart', 'bert'.*layers_pattern"):
        apply_block_pruning(model, BlockPruningConfig())


def test_user_patterns_override_the_map():
    model = tiny_model("bert")
    config = BlockPruningConfig(layers_pattern="encoder.layer", ffn_modules=["intermediate.dense", "output.dense"])
    apply_block_pruning(model, config)
    assert sum(isinstance(m, MaskedLinear) for m in model.modules()) == 4
    assert not isinstance(model.bert.encoder.layer[0].attention.self.query, MaskedLinear)


def test_block_size_that_does_not_divide_is_an_error():
    with pytest.raises(ValueError, match="does not divide"):
        apply_block_pruning(tiny_model("bert"), BlockPruningConfig(attention_block_size=[5, 8]))


def test_applying_twice_is_an_error():
    model = apply_block_pruning(tiny_model("bert"), BlockPruningConfig(attention_block_size=[8, 8]))
    with pytest.raises(ValueError, match="already"):
        apply_block_pruning(model, BlockPruningConfig(attention_block_size=[8, 8]))
