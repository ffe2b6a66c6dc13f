"""Pruning without training (`prune_one_shot`): unit importance, the mask search, rescaling, targets and refusals."""

import copy
import itertools
import json
import re

import pytest
import torch
from huggingface_hub import ModelCard
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_blockprune
from hf_blockprune import apply_block_pruning, save_compacted
from hf_blockprune.compact.flops import model_flops, predicted_speedup
from hf_blockprune.compact.latency import LatencyTable
from hf_blockprune.compact.one_shot import PruningUnit, prune_one_shot, rescale, search_units
from hf_blockprune.pruning.importance import unit_fisher
from hf_blockprune.pruning.model import block_scores, set_threshold
from hf_blockprune.structure.discovery import prunable_layers

from conftest import tiny_dataset, tiny_model
from helpers import model_inputs, model_outputs, preset_config


def _batches(arch, count=4, size=8):
    rows = tiny_dataset(arch)
    return [{key: torch.stack([torch.as_tensor(row[key]) for row in rows[i * size:(i + 1) * size]])
             for key in rows[0]} for i in range(count)]


@pytest.mark.parametrize("arch", ["bert", "deberta-v2", "modernbert", "bart", "llama", "gpt2"])
@pytest.mark.parametrize("target", [1.5, 2.5])
def test_a_one_shot_cut_reaches_its_target_and_saves_loadable(arch, target, tmp_path):
    model = tiny_model(arch).eval()
    dense = copy.deepcopy(model)
    pruned = prune_one_shot(model, _batches(arch), target_speedup=target, seq_len=12)
    assert target <= predicted_speedup(dense, pruned, 12) < target * 1.35  # tiny models: few units to cut
    save_compacted(pruned, tmp_path)
    reloaded = hf_blockprune.from_pretrained(str(tmp_path)).eval()
    inputs = model_inputs(arch)
    for a, b in zip(model_outputs(pruned.eval(), inputs), model_outputs(reloaded, inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_unit_fisher_is_the_squared_gradient_of_output_column_masks():
    model = apply_block_pruning(tiny_model("bert"), preset_config("struct")).eval()
    layers = prunable_layers(model)
    batches = _batches("bert", count=2)
    importance = unit_fisher(model, layers, batches)
    output = layers[1].attentions[0].output
    expected = torch.zeros(4)
    for batch in batches:  # a mask m on the output projection's input columns, differentiated at m = 1
        m = torch.ones(32, requires_grad=True)
        handle = output.register_forward_pre_hook(lambda module, args, m=m: (args[0] * m,))
        loss = model(**batch).loss
        handle.remove()
        (grad,) = torch.autograd.grad(loss, m)
        expected += grad.view(4, 8).sum(1) ** 2
    torch.testing.assert_close(importance[(1, 0)], expected, atol=1e-7, rtol=1e-4)
    assert importance[(0, None)].shape == (37,)


@settings(max_examples=60, deadline=None)
@given(heads=st.lists(st.floats(0, 10), min_size=1, max_size=6), neurons=st.lists(st.floats(0, 10), max_size=8),
       head_cost=st.floats(1, 5), budget=st.floats(0, 30))
def test_the_search_keeps_the_most_importance_that_fits_the_budget(heads, neurons, head_cost, budget):
    head_units = [PruningUnit(0, 0, i, value, head_cost) for i, value in enumerate(heads)]
    neuron_units = [PruningUnit(0, None, i, value, 1.0) for i, value in enumerate(neurons)]
    kept_heads, kept_neurons = search_units(head_units, neuron_units, budget)
    assert len(kept_heads) * head_cost + len(kept_neurons) <= budget + 1e-9
    # brute force over every subset that fits (each kind's cost is uniform here)
    best = max(sum(hs) + sum(ns)
               for h in range(len(heads) + 1) for n in range(len(neurons) + 1) if h * head_cost + n <= budget
               for hs in itertools.combinations(heads, h) for ns in itertools.combinations(neurons, n))
    assert sum(u.importance for u in kept_heads + kept_neurons) == pytest.approx(best, abs=1e-9)


def _block_errors(student, teacher, batches):
    """Squared error of every output projection of `student` against `teacher`'s, summed over the batches."""
    errors = []
    for layer, dense_layer in zip(prunable_layers(student), prunable_layers(teacher)):
        for path in [a.spec.output for a in layer.attentions] + [layer.ffn_spec.output]:
            found = []
            hooks = [student.get_submodule(f"{layer.name}.{path}").register_forward_hook(
                         lambda m, a, out, found=found: found.append(("s", out))),
                     teacher.get_submodule(f"{dense_layer.name}.{path}").register_forward_hook(
                         lambda m, a, out, found=found: found.append(("t", out)))]
            total = 0.0
            with torch.no_grad():
                for batch in batches:
                    found.clear()
                    student(**batch)
                    teacher(**batch)
                    total += ((found[0][1] - found[1][1]) ** 2).sum().item()
            for hook in hooks:
                hook.remove()
            errors.append(total)
    return errors


def test_rescaling_brings_every_block_closer_to_the_dense_model():
    teacher = tiny_model("bert").eval()
    student = apply_block_pruning(copy.deepcopy(teacher), preset_config("struct")).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for scores in block_scores(student):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=gen))
    set_threshold(student, 0.5)
    batches = _batches("bert")
    before = _block_errors(student, teacher, batches)
    assert rescale(student, teacher, batches) > 0
    after = _block_errors(student, teacher, batches)
    assert after[0] < before[0]  # the first block sees the dense inputs: least squares can only help there
    assert sum(after) < sum(before)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_the_latency_model_cut_meets_the_tables_prediction(arch):
    model = tiny_model(arch).eval()
    table = LatencyTable(batch_size=1, seq_len=12, dense=1.0)
    for layer in prunable_layers(model):
        stack = layer.name.rpartition(".")[0]
        heads, neurons = layer.attentions[0].num_heads, layer.ffn_input.out_features
        table.attention[f"{stack}#0"] = [[0.0, -0.12], [1.0, -0.05], [float(heads), 0.0]]  # an offset per layer
        table.ffn[stack] = [[0.0, -0.2], [float(neurons), 0.0]]
    dense = copy.deepcopy(model)
    pruned = prune_one_shot(model, _batches(arch), target_speedup=1.6, cost_model="latency", latency_table=table)
    assert table.dense / table.predict(pruned) >= 1.6
    assert table.dense / table.predict(pruned) < 1.6 * 1.2
    assert table.predict(dense) == 1.0


def test_without_rescaling_the_kept_weights_are_the_dense_ones():
    model = tiny_model("bert").eval()
    dense = copy.deepcopy(model)
    pruned = prune_one_shot(model, _batches("bert"), target_speedup=1.5, seq_len=12, rescale_outputs=False)
    layout = pruned.config.blockprune_layout["layers"]["bert.encoder.layer.0"]
    kept = layout["attention"][0]["heads"]
    columns = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in kept])
    torch.testing.assert_close(pruned.bert.encoder.layer[0].attention.output.dense.weight,
                               dense.bert.encoder.layer[0].attention.output.dense.weight[:, columns])


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(target_speedup=1.0), "must be > 1"),
    (dict(target_speedup=2.0, cost_model="fast"), "cost_model"),
    (dict(target_speedup=500.0), "out of reach"),
])
def test_bad_requests_are_refused_before_anything_changes(kwargs, match):
    model = tiny_model("bert").eval()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        prune_one_shot(model, _batches("bert", count=1), seq_len=12, **kwargs)
    if "out of reach" not in match:
        assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


def test_a_masked_model_is_refused():
    model = apply_block_pruning(tiny_model("bert"), preset_config("struct"))
    with pytest.raises(ValueError, match="unmasked model"):
        prune_one_shot(model, _batches("bert", count=1), target_speedup=2.0)


def _card_settings(text: str) -> dict:
    return json.loads(re.search(r"```json\n(.*?)\n```", text, re.DOTALL).group(1))


@pytest.mark.parametrize("base", ["hub id", "local folder"])
def test_the_card_of_a_one_shot_model_says_what_one_shot_did(base, tmp_path):
    model = tiny_model("bert").eval()
    model.config._name_or_path = "owner/dense-bert" if base == "hub id" else str(tmp_path)
    dense_parameters, dense_flops = sum(p.numel() for p in model.parameters()), model_flops(model, 12).total
    pruned = prune_one_shot(model, _batches("bert", count=3), target_speedup=1.5, seq_len=12)
    save_compacted(pruned, tmp_path / "first")
    # the record travels in config.json: a reloaded model saved again has the same card
    save_compacted(hf_blockprune.from_pretrained(tmp_path / "first"), tmp_path / "again")
    for folder in ("first", "again"):
        card = ModelCard.load(tmp_path / folder / "README.md")
        assert card.data.base_model == ("owner/dense-bert" if base == "hub id" else None)
        assert str(tmp_path) not in card.content  # a local base model stays out, as before
        text = card.text
        assert "one-shot pruning, without training" in text and "movement pruning" not in text
        settings = _card_settings(text)
        assert {key: settings[key] for key in ("target_speedup", "importance", "calibration_examples")} == {
            "target_speedup": 1.5, "importance": "fisher", "calibration_examples": 24}
        assert not {"pruning_method", "initial_threshold", "final_threshold"} & set(settings)  # movement defaults
        assert f"| total parameters | {dense_parameters} | {sum(p.numel() for p in pruned.parameters())} |" in text
        assert f"| FLOPs per sequence of 12 tokens | {dense_flops:,} | {model_flops(pruned, 12).total:,} |" in text
        assert "n/a" not in text
