import json

import pytest
import torch
from torch import nn

from hf_blockprune import apply_block_pruning, is_block_pruned
from hf_blockprune.compaction import LAYOUT_ATTRIBUTE, compact_model, compaction_plan
from hf_blockprune.layer import BlockScores
from hf_blockprune.model import block_scores, prunable_layers, set_threshold

from conftest import ARCHS, VOCAB, tiny_model
from helpers import preset_config

# (preset, pruning method, seed, force empty layers, attention implementation)
CASES = [
    ("hybrid", "sigmoid_threshold", 0, False, "sdpa"),
    ("hybrid", "topk", 1, True, "eager"),
    ("struct", "sigmoid_threshold", 2, True, "sdpa"),
    ("struct", "topk", 3, False, "sdpa"),
    ("block", "sigmoid_threshold", 4, True, "sdpa"),
]
DEAD, ALIVE = -1e4, 1e4


def _inputs(arch, labels=False):
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": attention_mask}
    if arch == "bart":
        inputs["decoder_input_ids" if not labels else "labels"] = ids[:, :5].clone()
    elif labels:
        inputs["labels"] = torch.tensor([0, 1])
    return inputs


def _outputs(model, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    names = ("logits", "hidden_states", "encoder_hidden_states", "decoder_hidden_states")
    tensors = []
    for name in names:
        value = getattr(out, name, None)
        tensors += list(value) if isinstance(value, tuple) else [] if value is None else [value]
    return tensors


def _plain_parameter_count(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith("scores"))


def _biased_model(arch, seed=0):
    """A tiny model whose biases are all non-zero (transformers initialises them to zero)."""
    model = tiny_model(arch, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return model.eval()


def _kill(scores: BlockScores) -> None:
    """Mask every block of `scores`, whatever the method (top-k keeps a fraction of each grid)."""
    with torch.no_grad():
        scores.scores.fill_(DEAD)
    if scores.method == "topk":
        scores.set_threshold(0.0)


def _random_masks(model, preset, method, seed, force_empty):
    """Random scores; with `force_empty`, the first layer loses every head and the last every FFN neuron."""
    apply_block_pruning(model, preset_config(preset, pruning_method=method))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=gen))
    set_threshold(model, 0.5)
    if force_empty:
        layers = prunable_layers(model)
        for attention in layers[0].attentions:
            _kill(attention.value.scores_module)
        _kill(layers[-1].ffn_input.scores_module)
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset, method, seed, force_empty, attn", CASES)
def test_compacted_model_computes_the_masked_function_with_fewer_parameters(arch, preset, method, seed, force_empty,
                                                                             attn):
    model = _biased_model(arch, seed)
    model.set_attn_implementation(attn)
    _random_masks(model, preset, method, seed, force_empty)
    inputs = _inputs(arch)
    reference, base_parameters = _outputs(model, inputs), _plain_parameter_count(model)
    plan = compaction_plan(model)
    if force_empty:
        assert plan[0].heads == [[] for _ in plan[0].heads] and plan[-1].neurons == []

    compacted = compact_model(model)
    assert not is_block_pruned(compacted)
    for actual, expected in zip(_outputs(compacted, inputs), reference, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert _plain_parameter_count(compacted) < base_parameters


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_runs_on_a_compacted_model_with_empty_layers(arch):
    model = compact_model(_random_masks(_biased_model(arch), "hybrid", "sigmoid_threshold", 0, force_empty=True))
    layers = prunable_layers(model)
    assert layers[0].attentions[0].query.out_features == 0 and layers[-1].ffn_input.out_features == 0
    model.train()
    model(**_inputs(arch, labels=True)).loss.backward()
    grads = [p.grad for p in model.parameters() if p.numel()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_removed_units_with_constant_output_are_folded_into_the_output_bias():
    model = apply_block_pruning(_biased_model("bert"), preset_config("block", pruning_method="sigmoid_threshold"))
    layer = prunable_layers(model)[0]
    value, output = layer.attentions[0].value, layer.attentions[0].output
    ffn_in, ffn_out = layer.ffn_input, layer.ffn_output
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.fill_(ALIVE)
        value.scores_module.scores[1].fill_(DEAD)  # head 1: value rows 8..15 masked, value bias still live
        ffn_in.scores_module.scores[5].fill_(DEAD)  # neuron 5: input row masked, output column live
    set_threshold(model, 0.5)
    head_constant = output.weight[:, 8:16] @ value.bias[8:16]
    activation = model.bert.encoder.layer[0].intermediate.intermediate_act_fn
    neuron_constant = activation(ffn_in.bias[5]) * ffn_out.weight[:, 5]
    biases = output.bias.detach().clone(), ffn_out.bias.detach().clone()
    assert head_constant.abs().max() > 1e-3 and neuron_constant.abs().max() > 1e-3
    inputs = _inputs("bert")
    reference = _outputs(model, inputs)

    plan = compaction_plan(model)[0]
    assert plan.heads == [[0, 2, 3]] and plan.constant_neurons == [5] and 5 not in plan.neurons
    compact_model(model)
    compacted = model.bert.encoder.layer[0]
    torch.testing.assert_close(compacted.attention.output.dense.bias, biases[0] + head_constant)
    torch.testing.assert_close(compacted.output.dense.bias, biases[1] + neuron_constant)
    for actual, expected in zip(_outputs(model, inputs), reference, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_beams, use_cache", [(1, True), (1, False), (3, True)])
def test_bart_generate_gives_the_same_tokens_after_compaction(num_beams, use_cache):
    model = _random_masks(_biased_model("bart", 1), "hybrid", "sigmoid_threshold", 1, force_empty=True)
    # The cross-attention of the last decoder layer goes too, so the decoder has one layer with nothing to attend with.
    _kill(prunable_layers(model)[-1].attentions[1].value.scores_module)
    inputs = _inputs("bart")
    del inputs["decoder_input_ids"]
    settings = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False, use_cache=use_cache,
                    return_dict_in_generate=True, output_scores=True)
    expected = model.generate(**inputs, **settings)
    compact_model(model)
    assert model.model.decoder.layers[1].encoder_attn.q_proj.out_features == 0
    actual = model.generate(**inputs, **settings)
    assert torch.equal(actual.sequences, expected.sequences)
    for step_scores, expected_scores in zip(actual.scores, expected.scores, strict=True):
        torch.testing.assert_close(step_scores, expected_scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_in_config_matches_the_layers_and_survives_json(arch, tmp_path):
    model = _random_masks(_biased_model(arch, 2), "struct", "sigmoid_threshold", 2, force_empty=True)
    plans = compaction_plan(model)
    compact_model(model)
    layout = getattr(model.config, LAYOUT_ATTRIBUTE)
    assert list(layout["layers"]) == [plan.name for plan in plans]
    for layer, plan in zip(prunable_layers(model), plans):
        entry = layout["layers"][layer.name]
        assert entry["heads"] == plan.heads and entry["ffn_size"] == len(plan.neurons)
        for attention, heads in zip(layer.attentions, entry["heads"]):
            assert attention.query.out_features == attention.output.in_features == 8 * len(heads)
        assert layer.ffn_input.out_features == layer.ffn_output.in_features == entry["ffn_size"]
    assert json.loads(json.dumps(model.config.to_dict()))[LAYOUT_ATTRIBUTE] == layout
    model.config.save_pretrained(tmp_path)
    assert getattr(type(model.config).from_pretrained(tmp_path), LAYOUT_ATTRIBUTE) == layout
    assert model.config.num_attention_heads == 4


def test_compacted_attention_modules_report_their_new_head_count():
    model = _random_masks(_biased_model("bert"), "struct", "sigmoid_threshold", 0, force_empty=True)
    compact_model(model)
    attention = model.bert.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size) == (0, 0)
    assert model.config.num_attention_heads == 4 and model.config.intermediate_size == 37


def test_compacting_a_plain_or_compacted_model_is_an_error():
    with pytest.raises(ValueError, match="apply_block_pruning"):
        compact_model(tiny_model("bert"))
    model = compact_model(_random_masks(_biased_model("bert"), "struct", "topk", 0, force_empty=False))
    apply_block_pruning(model, preset_config("hybrid"))
    with pytest.raises(ValueError, match="already compacted"):
        compact_model(model)


def test_compacted_model_has_only_plain_linears():
    model = compact_model(_random_masks(_biased_model("distilbert"), "block", "topk", 0, force_empty=True))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear for m in linears) and not list(block_scores(model))
