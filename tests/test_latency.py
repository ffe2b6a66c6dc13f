"""The latency cost model (a table measured on this machine) and targets on what compaction keeps."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_blockprune import apply_block_pruning, compact_model, load_masked_checkpoint
from hf_blockprune.compact import latency as latency_module
from hf_blockprune.compact.flops import predicted_speedup
from hf_blockprune.compact.latency import (
    TABLE_VERSION,
    LatencyTable,
    densities_for_latency,
    measure_latency_table,
    monotone_fit,
    timing_inputs,
)
from hf_blockprune.pruning.layer import BlockScores
from hf_blockprune.pruning.model import block_scores, set_threshold
from hf_blockprune.pruning.report import dead_heads, ffn_neurons_alive, weight_mask
from hf_blockprune.pruning.targets import head_alive_scores, neuron_alive_scores
from hf_blockprune.structure.discovery import prunable_layers
from hf_blockprune.training import controller as controller_module
from hf_blockprune.training.controller import PruningController

from conftest import tiny_model
from helpers import make_trainer, masks, model_inputs, model_outputs, preset_config


def _linear_table(model, dense=1.0, per_head=0.01, per_neuron=0.001) -> LatencyTable:
    """A table whose changes are exactly linear in the kept heads and neurons."""
    table = LatencyTable(batch_size=1, seq_len=8, dense=dense)
    for layer in prunable_layers(model):
        stack = layer.name.rpartition(".")[0]
        for index, attention in enumerate(layer.attentions):
            heads = attention.num_heads
            table.attention[f"{stack}#{index}"] = [[0.0, -per_head * heads], [float(heads), 0.0]]
        neurons = layer.ffn_input.out_features
        table.ffn[stack] = [[0.0, -per_neuron * neurons], [float(neurons), 0.0]]
    return table


def test_timing_inputs_are_token_ids_of_the_asked_shape():
    model = tiny_model("bart")
    inputs = timing_inputs(model.config, 3, 7)
    assert inputs["input_ids"].shape == (3, 7) and inputs["decoder_input_ids"].shape == (3, 7)
    assert int(inputs["input_ids"].max()) < model.config.vocab_size
    with pytest.raises(ValueError, match="max_position_embeddings"):
        timing_inputs(model.config, 1, 10_000)


def test_a_measured_table_covers_every_stack_and_reads_back(tmp_path):
    model = tiny_model("bart")
    table = measure_latency_table(model, batch_size=2, seq_len=8, rounds=2, warmup=1)
    assert set(table.attention) == {"model.encoder.layers#0", "model.decoder.layers#0", "model.decoder.layers#1"}
    assert set(table.ffn) == {"model.encoder.layers", "model.decoder.layers"}
    for points in [*table.attention.values(), *table.ffn.values()]:
        assert [p[0] for p in points] == sorted(p[0] for p in points) and points[-1][1] == 0.0
        assert points[0][0] == 0.0
    # timing a tiny model is noise: `joint` may keep none of its uniform models (their sums not below dense)
    assert table.version == TABLE_VERSION and table.joint[-1] == [1.0, 1.0]
    assert table.joint == sorted(table.joint)
    assert all(a[1] <= b[1] for a, b in zip(table.joint, table.joint[1:]))
    assert table.predict(model) == pytest.approx(table.dense)
    table.save(tmp_path / "table.json")
    assert LatencyTable.load(tmp_path / "table.json") == table
    assert json.loads((tmp_path / "table.json").read_text())["batch_size"] == 2


def test_the_prediction_counts_what_compaction_keeps():
    model = tiny_model("bert")
    table = _linear_table(model)
    apply_block_pruning(model, preset_config("struct"))
    layers = prunable_layers(model)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.fill_(1.0)
        layers[0].attentions[0].query.scores_module.scores.copy_(torch.tensor([1.0, -1.0, -1.0, 1.0]))
        layers[1].ffn_input.scores_module.scores[:20] = -1.0
    set_threshold(model, 0.5)
    assert table.predict(model) == pytest.approx(1.0 - 2 * 0.01 - 20 * 0.001)
    assert table.predict(compact_model(copy.deepcopy(model))) == pytest.approx(table.predict(model))


def test_densities_for_latency_meet_the_target_on_the_table():
    model = tiny_model("bert")
    table = _linear_table(model, dense=1.0, per_head=0.05, per_neuron=0.005)
    # shrinkable: 2 layers x (4 heads x 0.05 + 37 neurons x 0.005) = 0.77 of 1.0
    density = densities_for_latency(table, model, 2.0)
    assert density["attention"] == density["ffn"] == pytest.approx((0.5 - 0.23) / 0.77, abs=1e-9)
    with pytest.raises(ValueError, match="caps the speedup at 4.35x"):
        densities_for_latency(table, model, 5.0)


def test_interpolation_is_linear_between_points_and_beyond_the_ends():
    points = [[0.0, -1.0], [2.0, -0.4], [4.0, 0.0]]
    assert LatencyTable._interpolate(points, 1.0) == pytest.approx(-0.7)
    assert LatencyTable._interpolate(points, 3.0) == pytest.approx(-0.2)
    assert LatencyTable._interpolate(points, 4.0) == 0.0


def test_a_compacted_model_is_refused_by_the_measurement():
    model = apply_block_pruning(tiny_model("bert"), preset_config("struct"))
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.fill_(1.0)
        prunable_layers(model)[0].ffn_input.scores_module.scores[:5] = -1.0
    set_threshold(model, 0.5)
    with pytest.raises(ValueError, match="differ in size"):
        measure_latency_table(compact_model(model), 1, 8, rounds=1)


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_latency_targets_are_measured_once_at_the_start_and_kept_on_resume(route, tmp_path, monkeypatch):
    calls = []

    def fake_measure(model, batch_size, seq_len, **kwargs):
        calls.append((batch_size, seq_len))
        return _linear_table(model, dense=1.0, per_head=0.05, per_neuron=0.005)

    monkeypatch.setattr(controller_module, "measure_latency_table", fake_measure)  # where the controller calls it

    def config():
        return preset_config("struct", target_speedup=2.0, speedup_cost_model="latency", speedup_batch_size=4,
                             speedup_sequence_length=8)

    args = dict(max_steps=20, save_strategy="steps", save_steps=10)
    full = make_trainer(route, "bert", config(), tmp_path / "full", **args)
    full.train()
    assert calls == [(4, 8)]
    saved = LatencyTable.load(tmp_path / "full" / "latency_table.json")
    want = densities_for_latency(saved, tiny_model("bert"), 2.0)
    assert full.model.blockprune_targets.targets == pytest.approx(want)
    resumed = make_trainer(route, "bert", config(), tmp_path / "resumed", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-10"))
    assert calls == [(4, 8)]  # not measured again: the densities come from the checkpoint
    assert resumed.model.blockprune_targets.targets == pytest.approx(want)
    assert saved.predict(resumed.model) == pytest.approx(0.5, abs=0.05)


def test_a_saved_table_is_used_instead_of_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr(controller_module, "measure_latency_table", lambda *a, **k: pytest.fail("measured"))
    _linear_table(tiny_model("bert"), per_head=0.05, per_neuron=0.005).save(tmp_path / "table.json")
    config = preset_config("struct", target_speedup=1.5, speedup_cost_model="latency",
                           latency_table=str(tmp_path / "table.json"))
    trainer = make_trainer("trainer", "bert", config, tmp_path / "run", max_steps=2)
    trainer.train()
    assert trainer.model.blockprune_targets.targets["ffn"] < 1.0


def test_a_latency_table_needs_the_latency_cost_model():
    with pytest.raises(ValueError, match="speedup_cost_model='latency'"):
        preset_config("struct", target_speedup=2.0, latency_table="table.json")


def _random_block_masks(arch, seed, preset):
    model = apply_block_pruning(tiny_model(arch), preset_config(preset, arch))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=gen))
    return model


@settings(max_examples=25, deadline=None)
@given(arch=st.sampled_from(["bert", "llama", "bart"]), seed=st.integers(0, 10_000),
       cut=st.floats(-1.5, 1.5), preset=st.sampled_from(["hybrid", "struct", "block"]))
def test_alive_scores_above_the_cut_are_what_compaction_keeps(arch, seed, cut, preset):
    model = _random_block_masks(arch, seed, preset)
    for module in model.modules():
        if isinstance(module, BlockScores):
            module.set_score_cut(torch.tensor(cut))
    for layer in prunable_layers(model):
        for attention in layer.attentions:
            alive = head_alive_scores(attention) > cut
            assert set(dead_heads(attention)) == {slot for slot in range(attention.num_heads) if not alive[slot]}
        if len(layer.ffn_inputs) == 1 or preset != "block":
            assert torch.equal(neuron_alive_scores(layer) > cut, ffn_neurons_alive(layer))


@pytest.mark.parametrize("route", ["trainer", "callback"])
@pytest.mark.parametrize("preset", ["hybrid", "block"])
def test_a_target_speedup_with_blocks_is_met_by_what_compaction_keeps(route, preset, tmp_path):
    config = preset_config(preset, target_speedup=2.0, speedup_sequence_length=12)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=60, logging_steps=10, save_strategy="steps",
                           save_steps=60)
    trainer.train()
    _assert_kept_units_are_whole(trainer.model)
    # the checkpoint holds the floors: the masked model rebuilt from it has the trained masks
    rebuilt = load_masked_checkpoint(tmp_path / "checkpoint-60")
    for a, b in zip(masks(trainer.model), masks(rebuilt)):
        assert torch.equal(a, b)
    last = [entry for entry in trainer.state.log_history if "pruning/kept_cost_attention" in entry][-1]
    targets = trainer.model.blockprune_targets.targets
    # the cut keeps the most units whose cost fits: below the target by less than one unit (a head of 8, a neuron)
    assert targets["attention"] - 1 / 8 < last["pruning/kept_cost_attention"] <= targets["attention"]
    if preset == "block":
        assert targets["ffn"] - 1 / 74 < last["pruning/kept_cost_ffn"] <= targets["ffn"]
    assert predicted_speedup(trainer.model, trainer.model, 12) >= 2.0 * 0.995


def _assert_kept_units_are_whole(model) -> None:
    """Every head and FFN neuron compaction keeps has all of its blocks (none is a zero inside a kept unit)."""
    for layer in prunable_layers(model):
        for attention in layer.attentions:
            d, dead = attention.head_dim, set(dead_heads(attention))
            query, key, value, output = (weight_mask(linear) for linear in (attention.query, attention.key,
                                                                           attention.value, attention.output))
            for slot in (s for s in range(attention.num_heads) if s not in dead):
                kv = slot // attention.group
                assert query[slot * d:(slot + 1) * d].all() and output[:, slot * d:(slot + 1) * d].all()
                assert key[kv * d:(kv + 1) * d].all() and value[kv * d:(kv + 1) * d].all()
        alive = ffn_neurons_alive(layer)
        for linear in layer.ffn_inputs:
            assert weight_mask(linear)[alive].all()
        assert weight_mask(layer.ffn_output)[:, alive].all()


@settings(max_examples=20, deadline=None)
@given(arch=st.sampled_from(["bert", "llama", "bart"]), seed=st.integers(0, 10_000), progress=st.floats(0.0, 1.0),
       preset=st.sampled_from(["hybrid", "block"]))
def test_the_units_a_speedup_cut_keeps_keep_every_block_and_compact_exactly(arch, seed, progress, preset):
    config = preset_config(preset, arch, target_speedup=2.5, speedup_sequence_length=12)
    model = apply_block_pruning(tiny_model(arch), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.copy_(torch.randn(scores.scores.shape, generator=gen))
    targets = PruningController(model, config).targets
    targets.set_cuts(model, progress)
    _assert_kept_units_are_whole(model)
    # the kept cost is still what the cut asked for: the floor only refills blocks of units it counted as kept
    for group in targets.units:
        assert targets.unit_density(group) <= targets.scheduled(progress)[group] + 1e-6
    model.eval()
    inputs = model_inputs(arch)
    expected = model_outputs(model, inputs)
    for a, b in zip(expected, model_outputs(compact_model(copy.deepcopy(model)), inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_topk_with_a_target_speedup_and_blocks_is_refused():
    with pytest.raises(ValueError, match="pruning_method='sigmoid_threshold'"):
        preset_config("hybrid", pruning_method="topk", target_speedup=2.0)
    preset_config("struct", pruning_method="topk", target_speedup=2.0)  # whole heads and neurons: fine


def test_joint_maps_the_summed_prediction_onto_what_uniform_models_measured():
    model = tiny_model("bert")
    table = _linear_table(model, dense=1.0, per_head=0.05, per_neuron=0.005)
    # shrinkable: 2 layers x (4 heads x 0.05 + 37 neurons x 0.005) = 0.77 of 1.0; the sum says 0.23 when all is gone
    apply_block_pruning(model, preset_config("struct"))
    with torch.no_grad():
        for scores in block_scores(model):
            scores.scores.fill_(1.0)
        prunable_layers(model)[0].ffn_input.scores_module.scores[:20] = -1.0
    set_threshold(model, 0.5)
    summed = 1.0 - 20 * 0.005
    assert table.predict(model) == pytest.approx(summed)  # no joint: the sum as it is
    table.joint = [[0.23, 0.4], [0.6, 0.7], [1.0, 1.0]]  # measured slower than the sum, less so near dense
    assert table.summed(model) == pytest.approx(summed)
    assert table.predict(model) == pytest.approx(0.7 + (summed - 0.6) / 0.4 * 0.3)
    density = densities_for_latency(table, tiny_model("bert"), 2.0)["ffn"]  # calibrated 0.5 <- summed 0.6 - 2/3 * 0.37
    assert density == pytest.approx((0.6 - 0.2 / 0.3 * 0.37 - 0.23) / 0.77, abs=1e-9)
    with pytest.raises(ValueError, match="caps the speedup at 2.50x"):
        densities_for_latency(table, tiny_model("bert"), 3.0)


def test_a_table_saved_before_joint_reads_and_predicts_the_sum(tmp_path):
    model = tiny_model("bert")
    values = _linear_table(model).to_dict()
    del values["joint"], values["version"]
    (tmp_path / "old.json").write_text(json.dumps(values))
    table = LatencyTable.load(tmp_path / "old.json")
    assert table.version == 1 and table.joint == []
    assert table.predict(model) == pytest.approx(1.0)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.floats(-0.5, 1.5), st.floats(0.0, 2.0)), max_size=12))
def test_joint_is_a_non_decreasing_fit_ending_at_the_dense_model(pairs):
    out = monotone_fit([list(p) for p in pairs])
    assert out[-1] == [1.0, 1.0]
    assert [x for x, _ in out[:-1]] == sorted({x for x, _ in pairs if x < 1.0})
    assert all(a[1] <= b[1] for a, b in zip(out, out[1:]))
    below = sorted((x, y) for x, y in pairs if x < 1.0)
    if all(a[1] <= b[1] for a, b in zip(below, below[1:])) and all(y <= 1.0 for _, y in below) \
            and len({x for x, _ in below}) == len(below):
        assert out[:-1] == [list(p) for p in below]  # already a non-decreasing fit: kept as measured


def _latency_by_size(models, inputs, rounds, warmup, progress=None):
    """A noiseless stand-in for the timer: runs each model once, and its "latency" is its parameter count."""
    with torch.inference_mode():
        for model in models.values():
            model(**inputs)
    return {name: 1e-9 * sum(p.numel() for p in model.parameters()) for name, model in models.items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama", "deberta-v2", "bart"])
def test_uniform_variants_down_to_nothing_compact_and_run(arch, monkeypatch):
    monkeypatch.setattr(latency_module, "median_latencies", _latency_by_size)
    model = tiny_model(arch).eval()
    table = measure_latency_table(model, batch_size=1, seq_len=8, rounds=1, warmup=0, head_points=2,
                                  neuron_points=2, joint_points=2)
    assert [x for x, _ in table.joint] == sorted(x for x, _ in table.joint) and table.joint[-1] == [1.0, 1.0]
    assert len(table.joint) == 3  # the models keeping nothing and half, and the dense one
    assert all(y <= 1.0 for _, y in table.joint) and table.joint[0][0] < table.joint[1][0] < 1.0
    assert table.predict(model) == pytest.approx(table.dense)


def test_a_compacted_model_with_dropped_layers_is_predicted_as_its_masked_model(monkeypatch):
    # the layers compaction dropped count as keeping nothing, as they did while masked
    from test_depth import deep_model, empty_layers

    monkeypatch.setattr(latency_module, "median_latencies", _latency_by_size)
    model = deep_model("llama")
    table = measure_latency_table(model, batch_size=1, seq_len=8, rounds=1, warmup=0, head_points=2,
                                  neuron_points=2, joint_points=0)
    masked = empty_layers(model, [1, 2])
    expected = table.summed(masked)
    compacted = compact_model(masked)
    assert compacted.config.num_hidden_layers == 2
    assert table.summed(compacted) == pytest.approx(expected) and expected < table.dense
