import json

import pytest
import torch
from torch import nn

from hf_blockprune import apply_block_pruning, is_block_pruned
from hf_blockprune.compaction import LAYOUT_ATTRIBUTE, compact_model, compaction_plan
from hf_blockprune.model import block_scores, prunable_layers, set_threshold

from conftest import ARCHS, tiny_model
from helpers import (
    ALIVE,
    DEAD,
    biased_model,
    kill_scores,
    model_inputs,
    model_outputs,
    plain_parameter_count,
    preset_config,
    random_masks,
)

# (preset, pruning method, seed, force empty layers, attention implementation)
CASES = [
    ("hybrid", "sigmoid_threshold", 0, False, "sdpa"),
    ("hybrid", "topk", 1, True, "eager"),
    ("struct", "sigmoid_threshold", 2, True, "sdpa"),
    ("struct", "topk", 3, False, "sdpa"),
    ("block", "sigmoid_threshold", 4, True, "sdpa"),
]
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("preset, method, seed, force_empty, attn", CASES)
def test_compacted_model_computes_the_masked_function_with_fewer_parameters(arch, preset, method, seed, force_empty,
                                                                             attn):
    model = biased_model(arch, seed)
    model.set_attn_implementation(attn)
    random_masks(model, preset, method, seed, force_empty)
    inputs = model_inputs(arch)
    reference, base_parameters = model_outputs(model, inputs), plain_parameter_count(model)
    plan = compaction_plan(model)
    if force_empty:
        assert plan[0].heads == [[] for _ in plan[0].heads] and plan[-1].neurons == []

    compacted = compact_model(model)
    assert not is_block_pruned(compacted)
    for actual, expected in zip(model_outputs(compacted, inputs), reference, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert plain_parameter_count(compacted) < base_parameters


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_runs_on_a_compacted_model_with_empty_layers(arch):
    model = compact_model(random_masks(biased_model(arch), "hybrid", "sigmoid_threshold", 0, force_empty=True))
    layers = prunable_layers(model)
    assert layers[0].attentions[0].query.out_features == 0 and layers[-1].ffn_input.out_features == 0
    model.train()
    model(**model_inputs(arch, labels=True)).loss.backward()
    grads = [p.grad for p in model.parameters() if p.numel()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_removed_units_with_constant_output_are_folded_into_the_output_bias():
    model = apply_block_pruning(biased_model("bert"), preset_config("block", pruning_method="sigmoid_threshold"))
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
    inputs = model_inputs("bert")
    reference = model_outputs(model, inputs)

    plan = compaction_plan(model)[0]
    assert plan.heads == [[0, 2, 3]] and plan.constant_neurons == [5] and 5 not in plan.neurons
    compact_model(model)
    compacted = model.bert.encoder.layer[0]
    torch.testing.assert_close(compacted.attention.output.dense.bias, biases[0] + head_constant)
    torch.testing.assert_close(compacted.output.dense.bias, biases[1] + neuron_constant)
    for actual, expected in zip(model_outputs(model, inputs), reference, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_beams, use_cache", [(1, True), (1, False), (3, True)])
def test_bart_generate_gives_the_same_tokens_after_compaction(num_beams, use_cache):
    model = random_masks(biased_model("bart", 1), "hybrid", "sigmoid_threshold", 1, force_empty=True)
    # The cross-attention of the last decoder layer goes too, so the decoder has one layer with nothing to attend with.
    kill_scores(prunable_layers(model)[-1].attentions[1].value.scores_module)
    inputs = model_inputs("bart")
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
    model = random_masks(biased_model(arch, 2), "struct", "sigmoid_threshold", 2, force_empty=True)
    plans = compaction_plan(model)
    compact_model(model)
    layout = getattr(model.config, LAYOUT_ATTRIBUTE)
    assert list(layout["layers"]) == [plan.name for plan in plans]
    for layer, plan in zip(prunable_layers(model), plans):
        entry = layout["layers"][layer.name]
        assert [attention["heads"] for attention in entry["attention"]] == plan.heads
        assert entry["ffn"]["size"] == len(plan.neurons)
        for attention, recorded in zip(layer.attentions, entry["attention"]):
            assert attention.num_heads == len(recorded["heads"]) and recorded["head_dim"] == 8
            assert attention.query.out_features == attention.output.in_features == 8 * len(recorded["heads"])
        assert layer.ffn_input.out_features == layer.ffn_output.in_features == entry["ffn"]["size"]
    assert json.loads(json.dumps(model.config.to_dict()))[LAYOUT_ATTRIBUTE] == layout
    model.config.save_pretrained(tmp_path)
    assert getattr(type(model.config).from_pretrained(tmp_path), LAYOUT_ATTRIBUTE) == layout
    assert model.config.num_attention_heads == 4


def test_compacted_attention_modules_report_their_new_head_count():
    model = random_masks(biased_model("bert"), "struct", "sigmoid_threshold", 0, force_empty=True)
    compact_model(model)
    attention = model.bert.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size) == (0, 0)
    assert model.config.num_attention_heads == 4 and model.config.intermediate_size == 37


def test_compacting_a_plain_or_compacted_model_is_an_error():
    with pytest.raises(ValueError, match="apply_block_pruning"):
        compact_model(tiny_model("bert"))
    model = compact_model(random_masks(biased_model("bert"), "struct", "topk", 0, force_empty=False))
    apply_block_pruning(model, preset_config("hybrid"))
    with pytest.raises(ValueError, match="already compacted"):
        compact_model(model)


def test_compacted_model_has_only_plain_linears():
    model = compact_model(random_masks(biased_model("distilbert"), "block", "topk", 0, force_empty=True))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear for m in linears) and not list(block_scores(model))
