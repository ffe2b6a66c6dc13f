"""Compacted snapshots at several sparsity levels from one run (`snapshot_densities`, `snapshot_speedups`)."""

import json

import pytest
import torch
from transformers import TrainerCallback

import hf_blockprune
from hf_blockprune.compact.flops import predicted_speedup
from hf_blockprune.training import snapshots as snapshots_module

from conftest import tiny_model
from helpers import make_trainer, model_inputs, model_outputs, preset_config


class OutputsAtEveryStep(TrainerCallback):
    """The masked model's outputs on fixed inputs after every optimizer step (after the pruning callbacks)."""

    def __init__(self, arch):
        self.inputs = model_inputs(arch)
        self.outputs = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        was_training = model.training
        self.outputs[state.global_step] = model_outputs(model.eval(), self.inputs)
        model.train(was_training)


@pytest.mark.parametrize("route", ["trainer", "callback"])
@pytest.mark.parametrize(("arch", "preset"), [("bert", "struct"), ("llama", "hybrid"), ("bart", "struct")])
def test_snapshots_are_the_masked_model_when_the_schedule_passes_them(route, arch, preset, tmp_path):
    config = preset_config(preset, arch, target_density=0.3, snapshot_densities=[0.8, 0.5])
    trainer = make_trainer(route, arch, config, tmp_path, max_steps=30)
    recorder = OutputsAtEveryStep(arch)
    trainer.add_callback(recorder)
    trainer.train()
    steps = []
    for value in (0.8, 0.5):
        folder = tmp_path / f"snapshot-density-{value:g}"
        info = json.loads((folder / "snapshot.json").read_text())
        assert info["scheduled_density"] <= value + 1e-9
        # the cut keeps whole blocks up to the scheduled density: a head is 8% of the tiny models' weights
        assert info["scheduled_density"] - 0.1 < info["realized_density"] <= info["scheduled_density"] + 1e-6
        snapshot = hf_blockprune.from_pretrained(str(folder)).eval()
        for a, b in zip(model_outputs(snapshot, recorder.inputs), recorder.outputs[info["step"]]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        steps.append(info["step"])
    assert steps[0] < steps[1]


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_speedup_snapshots_have_the_asked_cost(route, tmp_path):
    config = preset_config("hybrid", target_speedup=2.5, speedup_sequence_length=12, snapshot_speedups=[1.5, 2.0])
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=40)
    trainer.train()
    dense = tiny_model("bert")
    for value in (1.5, 2.0):
        folder = tmp_path / f"snapshot-speedup-{value:g}x"
        snapshot = hf_blockprune.from_pretrained(str(folder))
        assert predicted_speedup(dense, snapshot, 12) >= value * 0.995
        assert json.loads((folder / "snapshot.json").read_text())["flops_speedup"] >= value * 0.995


def test_a_resumed_run_takes_only_the_snapshots_still_due(tmp_path, monkeypatch):
    def config():
        return preset_config("struct", target_density=0.3, snapshot_densities=[0.9, 0.4])

    args = dict(max_steps=30, save_strategy="steps", save_steps=10)
    make_trainer("trainer", "bert", config(), tmp_path / "full", **args).train()
    first = json.loads((tmp_path / "full" / "snapshot-density-0.9" / "snapshot.json").read_text())["step"]
    assert first <= 10  # taken before the checkpoint the run resumes from
    taken = []
    save = snapshots_module.Snapshots._save
    monkeypatch.setattr(snapshots_module.Snapshots, "_save",
                        lambda self, model, folder, *a: (taken.append(folder.name), save(self, model, folder, *a)))
    (tmp_path / "full" / "snapshot-density-0.4").rename(tmp_path / "later")  # as if the run had stopped before it
    resumed = make_trainer("trainer", "bert", config(), tmp_path / "full", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-10"))
    assert taken == ["snapshot-density-0.4"]


@pytest.mark.parametrize(("overrides", "match"), [
    (dict(final_lambda=10.0, snapshot_densities=[0.5]), "set `target_density` or `target_speedup`"),
    (dict(target_density_attention=0.3, target_density_ffn=0.5, snapshot_densities=[0.6]), "one target density"),
    (dict(target_density=0.3, snapshot_densities=[0.2]), r"\[0.3, 1\)"),
    (dict(target_density=0.3, snapshot_speedups=[1.5]), "need `target_speedup`"),
    (dict(target_speedup=2.0, snapshot_speedups=[2.5]), r"\(1, 2\]"),
])
def test_snapshots_the_schedule_cannot_reach_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        preset_config("struct", **overrides)


def test_a_density_snapshot_below_a_speedup_targets_density_is_refused_at_train_begin(tmp_path):
    config = preset_config("struct", target_speedup=1.5, speedup_sequence_length=12, snapshot_densities=[0.1])
    trainer = make_trainer("trainer", "bert", config, tmp_path, max_steps=5)
    with pytest.raises(ValueError, match="never reaches it"):
        trainer.train()
