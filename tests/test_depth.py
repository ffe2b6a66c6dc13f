"""Depth: a pre-norm layer left with nothing (every sublayer removed, no constant) is dropped at compaction; the config
has fewer layers, and the model computes and generates as the masked one (hf_blockprune.compact.depth)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_blockprune
from hf_blockprune import BlockPruningConfig, apply_block_pruning, compact_model, save_compacted
from hf_blockprune.compact.compaction import LAYOUT_ATTRIBUTE
from hf_blockprune.pruning.model import block_scores, set_threshold
from hf_blockprune.structure.discovery import prunable_layers, structure_of

from conftest import DECODERS, VOCAB, auto_class, tiny_config
from helpers import ALIVE, DEAD, biased_model, layer_map, model_outputs, without_dropped_layers

LAYERS = 4
GENERATE = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)


def deep_model(arch: str, biased: bool = False, **config_overrides):
    """A tiny model of `arch` with `LAYERS` layers (biases random and non-zero with `biased`, else zero)."""
    values = tiny_config(arch).to_dict()
    values.pop("layer_types", None)  # derived from the layer count
    values.update({"n_layer" if arch == "gpt2" else "num_hidden_layers": LAYERS}, **config_overrides)
    config = type(tiny_config(arch)).from_dict(values)
    torch.manual_seed(0)
    model = auto_class(arch).from_config(config).eval()
    if biased:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def empty_layers(model, emptied: list[int], prune_hidden: bool = False):
    """Mask `model` keeping every unit except those of the layers `emptied` (every head and every neuron)."""
    config = BlockPruningConfig.from_preset("struct", pruning_method="sigmoid_threshold", prune_hidden=prune_hidden)
    apply_block_pruning(model, config)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.fill_(ALIVE)
        if prune_hidden:
            next(s for s in block_scores(model) if s.kind == "hidden").scores[::3] = DEAD
        for index in emptied:
            layer = prunable_layers(model)[index]
            for attention in layer.attentions:
                attention.query.scores_module.scores.fill_(DEAD)
            layer.ffn_input.scores_module.scores.fill_(DEAD)
    set_threshold(model, 0.5)
    return model


def prompts() -> dict:
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])}  # left padding


def outputs_and_tokens(model, cache: str = "dynamic", num_beams: int = 1):
    inputs = {"input_ids": prompts()["input_ids"], "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    settings = dict(GENERATE, num_beams=num_beams)
    if cache == "static":
        settings["cache_implementation"] = "static"
    return model_outputs(model, inputs), model.generate(**prompts(), **settings)


def assert_same(actual_model, expected_outputs, expected_tokens, cache="dynamic", num_beams=1, before=None):
    outputs, tokens = outputs_and_tokens(actual_model, cache, num_beams)
    for got, want in zip(outputs, without_dropped_layers(expected_outputs, actual_model, before), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens.sequences, expected_tokens.sequences)
    for got, want in zip(tokens.scores, expected_tokens.scores, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", DECODERS)
@pytest.mark.parametrize("emptied", [[0], [1, 3], [3]], ids=["first", "two", "last"])
@pytest.mark.parametrize("cache, num_beams", [("dynamic", 1), ("dynamic", 3), ("static", 1)])
def test_a_layer_left_with_nothing_is_dropped_and_the_model_generates_the_same_tokens(arch, emptied, cache, num_beams):
    model = empty_layers(deep_model(arch), emptied)
    expected_outputs, expected_tokens = outputs_and_tokens(model, cache, num_beams)
    compact_model(model)
    kept = [index for index in range(LAYERS) if index not in emptied]
    stack = structure_of(model).layers[0].stack_name
    layout = getattr(model.config, LAYOUT_ATTRIBUTE)
    assert layout["layer_map"] == {stack: kept} and layout["dropped_layers"] == {stack: emptied}
    assert model.config.num_hidden_layers == len(model.get_submodule(stack)) == len(kept)
    assert [layer.name for layer in prunable_layers(model)] == [f"{stack}.{i}" for i in range(len(kept))]
    assert sorted(layout["layers"]) == [f"{stack}.{i}" for i in range(len(kept))]
    layer_indices = [module.layer_idx for module in model.modules() if type(module).__name__.endswith("Attention")]
    assert layer_indices == list(range(len(kept)))  # the cache is addressed by the new indices
    assert_same(model, expected_outputs, expected_tokens, cache, num_beams)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_model_with_dropped_layers_reloads_with_the_library_and_with_plain_transformers(arch, tmp_path):
    model = empty_layers(deep_model(arch), [0, 2])
    expected_outputs, expected_tokens = outputs_and_tokens(model)
    save_compacted(model, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["num_hidden_layers" if arch != "gpt2" else "n_layer"] == 2
    card = (tmp_path / "model" / "README.md").read_text()
    assert "Dropped layers" in card and "0, 2" in card
    assert_same(hf_blockprune.from_pretrained(tmp_path / "model").eval(), expected_outputs, expected_tokens)
    # a process where hf_blockprune cannot be imported, through trust_remote_code
    torch.save({"prompts": prompts()}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hf_blockprune"] = None
        import torch, transformers
        prompts = torch.load({str(tmp_path / "inputs.pt")!r})["prompts"]
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r},
                                                                  trust_remote_code=True).eval()
        tokens = model.generate(**prompts, max_new_tokens=6, do_sample=False, pad_token_id=0)
        torch.save(tokens, {str(tmp_path / "tokens.pt")!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "tokens.pt"), expected_tokens.sequences)


@pytest.mark.parametrize("emptied", [[1], [0, 1], [3], [0, 1, 2, 3]])
def test_the_constant_a_dropped_layer_adds_is_folded_into_the_writer_before_it(emptied):
    # GPT-2's removed sublayers keep their output biases: folded into the previous layer's `mlp.c_proj` bias, or
    # into the position table before the first layer kept
    model = empty_layers(deep_model("gpt2", biased=True), emptied)
    expected_outputs, expected_tokens = outputs_and_tokens(model)
    compact_model(model)
    layout = getattr(model.config, LAYOUT_ATTRIBUTE)
    assert model.config.n_layer == max(LAYERS - len(emptied), 1) == len(layout["layer_map"]["transformer.h"])
    assert_same(model, expected_outputs, expected_tokens)


def test_a_constant_with_nowhere_to_go_keeps_its_layer():
    # Llama with biased output projections: a first layer's constant has no position table to go to
    model = empty_layers(deep_model("llama", biased=True, attention_bias=True, mlp_bias=True), [0, 2])
    expected_outputs, expected_tokens = outputs_and_tokens(model)
    compact_model(model)
    assert getattr(model.config, LAYOUT_ATTRIBUTE)["layer_map"] == {"model.layers": [0, 1, 3]}  # 2 folds into 1
    assert_same(model, expected_outputs, expected_tokens)


def test_no_layer_is_dropped_where_the_code_reads_the_layer_index():
    model = empty_layers(deep_model("gpt2", scale_attn_by_inverse_layer_idx=True), [1])
    expected_outputs, expected_tokens = outputs_and_tokens(model)
    compact_model(model)
    assert model.config.n_layer == LAYERS  # renumbering would change every later layer's attention scale
    assert_same(model, expected_outputs, expected_tokens)


@pytest.mark.parametrize("arch", ["bert", "bart"])
def test_post_norm_layers_left_with_nothing_stay(arch):
    model = biased_model(arch)
    apply_block_pruning(model, BlockPruningConfig.from_preset("struct", pruning_method="sigmoid_threshold"))
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.fill_(DEAD)
    set_threshold(model, 0.5)
    compact_model(model)
    layout = getattr(model.config, LAYOUT_ATTRIBUTE)
    assert "layer_map" not in layout and len(layout["layers"]) == len(prunable_layers(model))


def test_a_stack_keeps_one_layer_and_two_rounds_compose_the_layer_map():
    model = empty_layers(deep_model("llama"), [1, 2])
    compact_model(model)
    assert getattr(model.config, LAYOUT_ATTRIBUTE)["layer_map"] == {"model.layers": [0, 3]}
    empty_layers(model, [0, 1])  # everything left: the last layer stays
    expected_outputs, expected_tokens = outputs_and_tokens(model)
    before = layer_map(model)
    compact_model(model)
    layout = getattr(model.config, LAYOUT_ATTRIBUTE)
    assert layout["layer_map"] == {"model.layers": [3]} and layout["dropped_layers"] == {"model.layers": [0, 1, 2]}
    assert model.config.num_hidden_layers == 1
    assert_same(model, expected_outputs, expected_tokens, before=before)


def test_qwen2_layer_types_follow_the_layers_left(tmp_path):
    model = deep_model("qwen2", use_sliding_window=True, sliding_window=3, max_window_layers=2,
                       layer_types=["full_attention", "full_attention", "sliding_attention", "sliding_attention"])
    model = empty_layers(model, [1, 2])
    expected_outputs, expected_tokens = outputs_and_tokens(model)
    save_compacted(model, tmp_path / "model", model_card=False)
    loaded = hf_blockprune.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.layer_types == ["full_attention", "sliding_attention"]
    assert_same(loaded, expected_outputs, expected_tokens)


def test_the_hidden_record_follows_the_layers_left():
    model = empty_layers(deep_model("llama"), [1], prune_hidden=True)
    expected_outputs, expected_tokens = outputs_and_tokens(model)
    kept = [index for index in range(32) if index % 3]
    expected_outputs = expected_outputs[:1] + [hidden[..., kept] for hidden in expected_outputs[1:]]
    compact_model(model)
    hidden = getattr(model.config, LAYOUT_ATTRIBUTE)["hidden"]
    paths = hidden["norms"] + hidden["readers"] + hidden["writers"]
    assert not any(path.startswith("model.layers.3") for path in paths)  # 3 layers left: 0, 1, 2
    assert all(model.get_submodule(path) is not None for path in paths)
    assert_same(model, expected_outputs, expected_tokens)
