import json

import pytest
import torch
from test_model import LLAMA_ATTENTION, tiny_llama
from torch import nn

import hf_blockprune
from hf_blockprune import BlockPruningConfig, apply_block_pruning, is_block_pruned, save_compacted
from hf_blockprune.compact.compaction import LAYOUT_ATTRIBUTE, compact_model, compaction_plan
from hf_blockprune.pruning.layer import MaskedLinear
from hf_blockprune.pruning.model import block_scores, set_threshold
from hf_blockprune.structure.discovery import prunable_layers
from hf_blockprune.structure.modeling_blockprune import ConstantOutput, RemovedAttention, shrink_to_layout

from conftest import ARCHS, DECODERS, GENERATIVE, VOCAB, auto_class, tiny_model
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
    without_dropped_layers,
)

HEAD_DIM = 8

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
        assert plan[0].heads == [[] for _ in plan[0].heads] and plan[0].removed == [True for _ in plan[0].heads]
        assert plan[-1].neurons == [] and plan[-1].ffn_removed and not plan[-1].ffn_placeholder

    compacted = compact_model(model)
    assert not is_block_pruned(compacted)
    for actual, expected in zip(model_outputs(compacted, inputs), reference, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert plain_parameter_count(compacted) < base_parameters


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_runs_on_a_compacted_model_with_empty_layers(arch):
    model = compact_model(random_masks(biased_model(arch), "hybrid", "sigmoid_threshold", 0, force_empty=True))
    layers = prunable_layers(model)
    dropped = (getattr(model.config, LAYOUT_ATTRIBUTE).get("dropped_layers") or {})
    assert not layers[0].attentions and (not layers[-1].has_ffn or dropped)  # removed (or the last layer dropped)
    assert all(parameter.numel() for parameter in model.parameters())  # no projection with zero features is left
    model.train()
    model(**model_inputs(arch, labels=True)).loss.backward()
    # every parameter left is used (a pre-norm only a removed sublayer read, ModernBERT's `mlp_norm`, went with it)
    grads = {name: p.grad for name, p in model.named_parameters()}
    unused = [name for name, grad in grads.items() if grad is None]
    assert not unused and all(torch.isfinite(grad).all() for grad in grads.values()), unused
    pre_norms = {"llama": "input_layernorm", "qwen2": "input_layernorm", "mistral": "input_layernorm", "gpt2": "ln_1",
                 "modernbert": "attn_norm"}
    if arch in pre_norms:
        assert isinstance(model.get_submodule(f"{layers[0].name}.{pre_norms[arch]}"), nn.Identity)


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
    assert isinstance(model.model.decoder.layers[1].encoder_attn, RemovedAttention)
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
        assert [attention.get("removed", False) for attention in entry["attention"]] == plan.removed
        assert entry["ffn"]["size"] == len(plan.neurons) and entry["ffn"].get("removed", False) == plan.ffn_removed
        kept = [recorded for recorded in entry["attention"] if not recorded.get("removed")]
        for attention, recorded in zip(layer.attentions, kept, strict=True):
            slots = len(recorded["heads"])
            assert attention.num_heads == slots and attention.real_heads == len(recorded["heads"]) > 0
            assert recorded["head_dim"] == 8
            assert attention.query.out_features == attention.output.in_features == 8 * slots
        if plan.ffn_removed:
            assert not layer.has_ffn
        else:
            assert layer.ffn_input.out_features == layer.ffn_output.in_features == entry["ffn"]["size"]
    assert json.loads(json.dumps(model.config.to_dict()))[LAYOUT_ATTRIBUTE] == layout
    model.config.save_pretrained(tmp_path)
    assert getattr(type(model.config).from_pretrained(tmp_path), LAYOUT_ATTRIBUTE) == layout
    assert model.config.num_attention_heads == 4


def test_compacted_attention_modules_report_their_new_head_count():
    model = compact_model(mask_heads(biased_model("bert"), {0: [0, 2]}))
    attention = model.bert.encoder.layer[0].attention.self
    assert (attention.num_attention_heads, attention.all_head_size) == (2, 16)
    assert model.config.num_attention_heads == 4 and model.config.intermediate_size == 37


def test_compacting_a_plain_model_is_an_error():
    with pytest.raises(ValueError, match="apply_block_pruning"):
        compact_model(tiny_model("bert"))
    compacted = compact_model(random_masks(biased_model("bert"), "struct", "topk", 0, force_empty=False))
    with pytest.raises(ValueError, match="apply_block_pruning"):
        compact_model(compacted)


def test_compacted_model_has_only_plain_linears():
    model = compact_model(random_masks(biased_model("distilbert"), "block", "topk", 0, force_empty=True))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert all(type(m) is nn.Linear for m in linears) and not list(block_scores(model))


# Placeholder heads: an attention whose cached keys give generation's sequence length never ends with no head.

GENERATE = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_scores=True)


def assert_same_generation(actual, expected) -> None:
    assert torch.equal(actual.sequences, expected.sequences)
    for step_scores, expected_scores in zip(actual.scores, expected.scores, strict=True):
        torch.testing.assert_close(step_scores, expected_scores, atol=1e-5, rtol=1e-5)


def mask_heads(model, dead_slots: dict[int, list[int]], config=None):
    """Whole-head masks keeping every head except `dead_slots[layer index]` (slots of the current weights)."""
    apply_block_pruning(model, config or preset_config("struct", pruning_method="sigmoid_threshold"))
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.fill_(ALIVE)
        layers = prunable_layers(model)
        for index, slots in dead_slots.items():
            layers[index].attentions[0].value.scores_module.scores[slots] = DEAD
    set_threshold(model, 0.5)
    return model


@pytest.mark.parametrize("use_cache", [True, False])
def test_attentions_without_heads_are_removed_and_decoder_self_attentions_keep_the_cache_length(use_cache):
    model = random_masks(biased_model("bart"), "struct", "sigmoid_threshold", 0, force_empty=False)
    for layer in prunable_layers(model):
        for attention in layer.attentions:
            kill_scores(attention.value.scores_module)
    inputs = model_inputs("bart")
    reference = model_outputs(model, inputs)
    prompt = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    expected = model.generate(**prompt, **GENERATE, use_cache=use_cache)

    compact_model(model)
    layout = getattr(model.config, LAYOUT_ATTRIBUTE)
    assert layout["version"] == 6
    for name, entry in layout["layers"].items():
        for record in entry["attention"]:
            decoder_self = name.startswith("model.decoder") and record["query"] == "self_attn.q_proj"
            assert record["heads"] == [] and record["removed"] and record.get("caches", False) is decoder_self
            assert "placeholder" not in record
    for layer in [*model.model.encoder.layers, *model.model.decoder.layers]:
        for attention in (layer.self_attn, getattr(layer, "encoder_attn", None)):
            if attention is not None:
                assert isinstance(attention, RemovedAttention) and isinstance(attention.out_proj, ConstantOutput)
                assert attention.caches == (attention is layer.self_attn and layer in list(model.model.decoder.layers))
    for actual, expected_output in zip(model_outputs(model, inputs), reference, strict=True):
        torch.testing.assert_close(actual, expected_output, atol=1e-5, rtol=1e-5)
    assert_same_generation(model.generate(**prompt, **GENERATE, use_cache=use_cache), expected)


@pytest.mark.parametrize("attention_index", [0, 1], ids=["self_attn", "encoder_attn"])
@pytest.mark.parametrize("num_beams, use_cache", [(1, True), (3, True), (3, False)])
def test_bart_generates_the_same_tokens_when_the_first_decoder_layer_loses_an_attention(attention_index, num_beams,
                                                                                        use_cache):
    # The cache reads its length from decoder layer 0's self-attention keys: removed, it caches zero keys of size 1.
    # The cross-attention caches the encoder's keys too, but never gives the length.
    model = random_masks(biased_model("bart", 1), "hybrid", "sigmoid_threshold", 1, force_empty=False)
    kill_scores(prunable_layers(model)[2].attentions[attention_index].value.scores_module)
    inputs = model_inputs("bart")
    del inputs["decoder_input_ids"]
    settings = dict(GENERATE, num_beams=num_beams, use_cache=use_cache)
    expected = model.generate(**inputs, **settings)
    compact_model(model)
    first = model.model.decoder.layers[0]
    assert isinstance((first.self_attn, first.encoder_attn)[attention_index], RemovedAttention)
    assert_same_generation(model.generate(**inputs, **settings), expected)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_a_generating_model_described_by_patterns_keeps_a_placeholder_head(num_beams):
    # Any attention of a model that can generate may be cached: with module patterns, a head-less one keeps a
    # placeholder (Llama's cache reads its length from layer 0 too).
    model = tiny_llama(num_key_value_heads=4).eval()
    config = BlockPruningConfig.from_preset("struct", layers_pattern="layers", attention_modules=LLAMA_ATTENTION)
    model = mask_heads(model, {0: [0, 1, 2, 3], 1: [2]}, config)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    prompt = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])}  # left padding
    settings = dict(GENERATE, num_beams=num_beams, use_cache=True, pad_token_id=0)
    expected = model.generate(**prompt, **settings)
    compact_model(model)
    records = [entry["attention"][0] for entry in getattr(model.config, LAYOUT_ATTRIBUTE)["layers"].values()]
    assert records[0]["heads"] == [] and records[0]["placeholder"] and records[1]["heads"] == [0, 1, 3]
    assert model.model.layers[0].self_attn.q_proj.out_features == 8
    assert_same_generation(model.generate(**prompt, **settings), expected)


def _record(heads, **extra) -> dict:
    return {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
            "output": "self_attn.out_proj", "head_dim": 8, "heads": heads, **extra}


@pytest.mark.parametrize("version, record, slots", [(1, _record([1, 3]), 2), (2, _record([], placeholder=True), 1),
                                                    (2, _record([0, 2]), 2)])
def test_the_loader_reads_layouts_of_version_1_and_2(version, record, slots):
    model = tiny_model("bart")
    shrink_to_layout(model, {"version": version, "layers": {"model.decoder.layers.0": {"attention": [record]}}})
    attention = model.model.decoder.layers[0].self_attn
    assert attention.num_heads == slots and attention.q_proj.weight.shape == (8 * slots, 32)
    assert attention.out_proj.weight.shape == (32, 8 * slots)
    with pytest.raises(ValueError, match="version 7.*Upgrade hf_blockprune"):
        shrink_to_layout(tiny_model("bart"), {"version": 7, "layers": {}})


# Compacting again: a compacted model, masked anew, compacts to the composed layout.


def test_compacting_a_compacted_model_again_records_heads_by_original_index():
    model = compact_model(mask_heads(biased_model("bert"), {0: [0]}))
    layout = getattr(model.config, LAYOUT_ATTRIBUTE)
    assert layout["layers"]["bert.encoder.layer.0"]["attention"][0]["heads"] == [1, 2, 3]
    layout["dense_parameters"] = {"prunable_linear": 1, "total": 2}  # as save_compacted records it
    mask_heads(model, {0: [1], 1: [0, 3]})  # slot 1 of layer 0 is original head 2
    assert prunable_layers(model)[0].attentions[0].value.scores_module.scores.shape == (3,)
    inputs = model_inputs("bert")
    reference = model_outputs(model, inputs)

    compact_model(model)
    layout = getattr(model.config, LAYOUT_ATTRIBUTE)
    heads = [entry["attention"][0]["heads"] for entry in layout["layers"].values()]
    assert heads == [[1, 3], [1, 2]] and layout["version"] == 1
    assert layout["dense_parameters"] == {"prunable_linear": 1, "total": 2}
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 16
    for actual, expected in zip(model_outputs(model, inputs), reference, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_a_second_compaction_that_covers_only_the_ffn_keeps_the_recorded_heads(tmp_path):
    model = compact_model(mask_heads(biased_model("bert"), {0: [0, 2]}))
    ffn_only = BlockPruningConfig.from_preset("struct", pruning_method="topk", layers_pattern="encoder.layer",
                                              ffn_modules=["intermediate.dense", "output.dense"])
    apply_block_pruning(model, ffn_only)
    set_threshold(model, 0.5)
    inputs = model_inputs("bert")
    reference = model_outputs(model, inputs)
    save_compacted(model, tmp_path, model_card=False)
    layout = getattr(compact_model(model).config, LAYOUT_ATTRIBUTE)
    assert [entry["attention"][0]["heads"] for entry in layout["layers"].values()] == [[1, 3], [0, 1, 2, 3]]
    assert [entry["ffn"]["size"] for entry in layout["layers"].values()] == [round(0.5 * 37)] * 2
    for loaded in (model, hf_blockprune.from_pretrained(tmp_path)):
        for actual, expected in zip(model_outputs(loaded.eval(), inputs), reference, strict=True):
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def remask(model, seed):
    """Random block masks on a compacted model; the last layer loses every FFN neuron and, in its first attention
    that still has heads, every head (decoder layer 1's self-attention for BART, which then needs a placeholder)."""
    apply_block_pruning(model, preset_config("hybrid", pruning_method="sigmoid_threshold"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=generator))
    set_threshold(model, 0.5)
    last = prunable_layers(model)[-1]
    kill_scores(next(a for a in last.attentions if isinstance(a.value, MaskedLinear)).value.scores_module)
    if isinstance(last.ffn_input, MaskedLinear):
        kill_scores(last.ffn_input.scores_module)
    return model


AUTO_CLASSES = {arch: auto_class(arch) for arch in ARCHS}


def spec_caches(arch: str, layer: str, record: dict) -> bool:
    """Whether the attention of a layout record gives generation's cache its length (a decoder's self-attention)."""
    return arch in DECODERS or ("decoder" in layer and record["query"] == "self_attn.q_proj")


@pytest.mark.parametrize("arch", ARCHS)
def test_a_reloaded_compacted_model_pruned_again_saves_and_reloads_the_masked_function(arch, tmp_path):
    first = random_masks(biased_model(arch, 5), "struct", "sigmoid_threshold", 5, force_empty=True)
    if arch == "bart":
        kill_scores(prunable_layers(first)[2].attentions[0].value.scores_module)  # decoder layer 0: removed
    save_compacted(first, tmp_path / "once", model_card=False)
    once = getattr(hf_blockprune.from_pretrained(tmp_path / "once").config, LAYOUT_ATTRIBUTE)
    model = remask(hf_blockprune.from_pretrained(tmp_path / "once").eval(), seed=6)
    layers = prunable_layers(model)  # the first layer's attention and the last FFN were removed: nothing to score
    assert not layers[0].attentions and not layers[-1].has_ffn
    inputs = model_inputs(arch)
    reference = model_outputs(model, inputs)
    generation = dict(GENERATE, num_beams=3, use_cache=True)
    if arch in GENERATIVE:
        expected_tokens = model.generate(**{k: v for k, v in inputs.items() if k != "decoder_input_ids"}, **generation)

    save_compacted(model, tmp_path / "twice", model_card=False)
    compact_model(model)
    twice = getattr(model.config, LAYOUT_ATTRIBUTE)
    for name, entry in twice["layers"].items():
        for record, before in zip(entry["attention"], once["layers"][name]["attention"], strict=True):
            assert set(record["heads"]) <= set(before["heads"])
            assert record.get("removed", False) == (not record["heads"]) and "placeholder" not in record
            assert record.get("caches", False) == (record.get("removed", False) and spec_caches(arch, name, record))
    if arch == "bart":
        for layer in ("model.decoder.layers.0", "model.decoder.layers.1"):  # removed in the first round, the second
            assert twice["layers"][layer]["attention"][0] == {**twice["layers"][layer]["attention"][0], "heads": [],
                                                              "removed": True, "caches": True}
    reloaded = hf_blockprune.from_pretrained(tmp_path / "twice").eval()
    remote = AUTO_CLASSES[arch].from_pretrained(tmp_path / "twice", trust_remote_code=True).eval()
    assert getattr(reloaded.config, LAYOUT_ATTRIBUTE)["layers"] == twice["layers"]
    assert getattr(reloaded.config, LAYOUT_ATTRIBUTE)["dense_parameters"] == once["dense_parameters"]
    for candidate in (model, reloaded, remote):
        for actual, expected in zip(model_outputs(candidate, inputs), without_dropped_layers(reference, candidate),
                                    strict=True):
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
        if arch in GENERATIVE:
            prompt = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
            assert_same_generation(candidate.generate(**prompt, **generation), expected_tokens)
