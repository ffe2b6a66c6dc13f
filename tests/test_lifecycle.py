"""The one lifecycle both routes call, and the faults found by probing it: `torch_compile`, resuming from a checkpoint
without scores or from an incomplete one, and saving after a run stopped on NaN."""

import ast
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_controller import _Poison
from transformers import Trainer

import hf_blockprune
from hf_blockprune import BlockPruningCallback
from hf_blockprune.pruning.model import block_scores
from hf_blockprune.training.lifecycle import PruningLifecycle

from conftest import tiny_dataset, tiny_model, training_args
from helpers import make_trainer, preset_config

ROUTES = ["trainer", "callback"]
TRAINING = Path(hf_blockprune.__file__).parent / "training"


def lifecycle_of(trainer):
    if hasattr(trainer, "lifecycle"):
        return trainer.lifecycle
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BlockPruningCallback)).lifecycle


def scores_of(model) -> list[torch.Tensor]:
    return [scores.scores.detach().clone() for scores in block_scores(model)]


@pytest.mark.parametrize("route", ROUTES)
def test_both_routes_hold_one_lifecycle(route, tmp_path):
    trainer = make_trainer(route, "bert", preset_config("hybrid"), tmp_path)
    lifecycle = lifecycle_of(trainer)
    assert isinstance(lifecycle, PruningLifecycle) and lifecycle.model is trainer.model


# The steps of a run that only the lifecycle may take: a route that took one itself could miss a feature added there.
LIFECYCLE_STEPS = {"PruningController", "Distiller", "Snapshots", "apply_block_pruning", "check_training_arguments",
                   "checkpoint_on_save", "compact_on_save", "warn_if_stacks_emptied", "resolve_resume_checkpoint"}


@pytest.mark.parametrize("route", ["trainer.py", "callback.py"])
def test_the_routes_take_no_step_of_the_lifecycle_themselves(route):
    tree = ast.parse((TRAINING / route).read_text())
    called = {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
              for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not called & LIFECYCLE_STEPS, sorted(called & LIFECYCLE_STEPS)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
def test_torch_compile_trains_as_the_eager_model_does(route, method, tmp_path):
    # sigmoid_threshold with a target tracks the task gradient with a hook on the mask; top-k's mask is a pure function
    overrides = dict(pruning_method="topk", final_threshold=0.5) if method == "topk" else dict(target_density=0.5)
    config = preset_config("hybrid", attention_block_size=[4, 4], **overrides)
    runs = {}
    for compiled in (False, True):
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = make_trainer(route, "bert", config, tmp_path / str(compiled), max_steps=3, logging_steps=1, **extra)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[compiled] = (losses, scores_of(trainer.model))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-4)
    for eager, compiled in zip(runs[False][1], runs[True][1], strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)


def _train_with_checkpoints(route, config, output_dir, **overrides):
    trainer = make_trainer(route, "bert", config, output_dir, max_steps=10, save_strategy="steps", save_steps=5,
                           **overrides)
    trainer.train()
    return trainer


@pytest.mark.parametrize("route", ROUTES)
def test_resuming_from_a_checkpoint_without_scores_is_refused(route, tmp_path):
    config = preset_config("hybrid", target_density=0.5)
    _train_with_checkpoints(route, config, tmp_path / "run")
    weights = tmp_path / "run" / "checkpoint-5" / "model.safetensors"
    state = load_file(weights)
    save_file({key: value for key, value in state.items() if not key.endswith("block_scores.scores")}, weights,
              metadata={"format": "pt"})
    resumed = make_trainer(route, "bert", config, tmp_path / "run", max_steps=10)
    with pytest.raises(ValueError, match=r"checkpoint-5 lacks \d+ of this model's \d+ mask-score tensors"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-5"))


@pytest.mark.parametrize("route", ROUTES)
def test_resuming_from_a_dense_checkpoint_is_refused(route, tmp_path):
    plain = Trainer(model=tiny_model("bert"), train_dataset=tiny_dataset("bert"),
                    args=training_args(tmp_path / "dense", max_steps=5, save_strategy="steps", save_steps=5))
    plain.train()
    resumed = make_trainer(route, "bert", preset_config("hybrid"), tmp_path / "pruned", max_steps=10)
    with pytest.raises(ValueError, match="mask-score tensors.*a dense checkpoint"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "dense" / "checkpoint-5"))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("how", ["true", "last-checkpoint-path"])
def test_an_incomplete_checkpoint_is_skipped_with_a_warning(route, how, tmp_path, caplog):
    config = preset_config("hybrid", target_density=0.5)
    full = _train_with_checkpoints(route, config, tmp_path / "full")
    # a kill while the Trainer wrote checkpoint-10: the weights are there, trainer_state.json (written last) is not
    _train_with_checkpoints(route, config, tmp_path / "killed")
    (tmp_path / "killed" / "checkpoint-10" / "trainer_state.json").unlink()
    resumed = make_trainer(route, "bert", config, tmp_path / "killed", max_steps=10, save_strategy="steps",
                           save_steps=5)
    # transformers' example scripts pass the newest checkpoint folder, whatever its state
    resume = True if how == "true" else str(tmp_path / "killed" / "checkpoint-10")
    with caplog.at_level(logging.WARNING, logger="hf_blockprune.compact.checkpoints"):
        resumed.train(resume_from_checkpoint=resume)
    assert "checkpoint-10 skipped" in caplog.text and "Resuming from" in caplog.text
    assert "checkpoint-5" in caplog.text.split("skipped")[0]
    for a, b in zip(scores_of(full.model), scores_of(resumed.model), strict=True):
        torch.testing.assert_close(b, a)  # the resumed run redid steps 6-10 exactly
    assert json.loads((tmp_path / "killed" / "checkpoint-10" / "trainer_state.json").read_text())["global_step"] == 10


def test_no_complete_checkpoint_says_so(tmp_path):
    config = preset_config("hybrid")
    _train_with_checkpoints("trainer", config, tmp_path / "run")
    for step in (5, 10):
        (tmp_path / "run" / f"checkpoint-{step}" / "trainer_state.json").write_text('{"global_st')  # cut short
    resumed = make_trainer("trainer", "bert", config, tmp_path / "run", max_steps=10)
    with pytest.raises(ValueError, match=r"No complete checkpoint.*checkpoint-10: its trainer_state.json is cut"):
        resumed.train(resume_from_checkpoint=True)


@pytest.mark.parametrize("route", ROUTES)
def test_save_model_after_a_run_stopped_on_nan_writes_nothing(route, tmp_path):
    trainer = make_trainer(route, "bert", preset_config("hybrid", target_density=0.5), tmp_path / "run",
                           max_steps=10)
    trainer.add_callback(_Poison(trainer.model, at=3, where="scores"))
    with pytest.raises(FloatingPointError, match="Nothing was saved"):
        trainer.train()
    with pytest.raises(ValueError, match="holds NaN or inf values: the model was not saved"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists() or not any((tmp_path / "saved").iterdir())


@pytest.mark.parametrize("route", ROUTES)
def test_a_checkpoint_with_the_former_controller_key_resumes_exactly(route, tmp_path):
    # written before 0.1.0: the density controller's state under `block_pruning_targets.*`
    config = preset_config("hybrid", target_density=0.5)
    full = _train_with_checkpoints(route, config, tmp_path / "full")
    weights = tmp_path / "full" / "checkpoint-5" / "model.safetensors"
    state = load_file(weights)
    assert any(key.startswith("blockprune_targets.") for key in state)
    save_file({key.replace("blockprune_targets.", "block_pruning_targets.", 1): value for key, value in state.items()},
              weights, metadata={"format": "pt"})
    resumed = make_trainer(route, "bert", config, tmp_path / "resumed", max_steps=10)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))
    torch.testing.assert_close(resumed.model.blockprune_targets.log_lambda, full.model.blockprune_targets.log_lambda)
    for a, b in zip(scores_of(full.model), scores_of(resumed.model), strict=True):
        torch.testing.assert_close(b, a)
