"""Gradient accumulation equals the larger batch, and a resumed run equals the uninterrupted one, for every
combination of route (trainer, callback), method (top-k, soft movement) and regularization (fixed, target; and a
target speedup cut on heads, soft movement only)."""

import itertools

import pytest
import torch

from hf_blockprune.pruning.losses import mask_density
from hf_blockprune.training.accumulation import labelled_items, micro_batch_weight

from helpers import effective_scores, make_trainer, masks, preset_config

COMBINATIONS = list(itertools.product(["trainer", "callback"], ["topk", "sigmoid_threshold"], ["fixed", "target"]))
# a target speedup with blocks inside heads: the cut is placed on the heads, and the kept heads keep every block
COMBINATIONS += [(route, "sigmoid_threshold", "speedup") for route in ("trainer", "callback")]


def _config(method, regularization):
    overrides = dict(pruning_method=method, mask_scores_learning_rate=0.05, initial_warmup=0.1, final_warmup=0.1)
    if regularization == "target":
        overrides["target_density"] = 0.4
    elif regularization == "speedup":
        overrides.update(target_speedup=2.0, speedup_sequence_length=12)
    elif method == "topk":
        overrides["final_threshold"] = 0.3
    else:
        overrides["final_lambda"] = 20.0
    return preset_config("hybrid", **overrides)


def _assert_same_run(a, b, atol):
    for x, y in zip(effective_scores(a.model), effective_scores(b.model)):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)
    for x, y in zip(masks(a.model), masks(b.model)):
        assert torch.equal(x, y)
    for (name, x), (_, y) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4, msg=name)


def _last(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry][-1]


@pytest.mark.parametrize("route,method,regularization", COMBINATIONS)
def test_gradient_accumulation_equals_the_larger_batch(route, method, regularization, tmp_path):
    one = make_trainer(route, "bert", _config(method, regularization), tmp_path / "one",
                       per_device_train_batch_size=16, max_steps=10, logging_steps=5, max_grad_norm=1.0)
    two = make_trainer(route, "bert", _config(method, regularization), tmp_path / "two",
                       per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=10, logging_steps=5,
                       max_grad_norm=1.0)
    one.train()
    two.train()
    _assert_same_run(one, two, atol=1e-5)
    assert _last(one, "train_loss") == pytest.approx(_last(two, "train_loss"), rel=1e-4)
    assert _last(one, "pruning/density") == pytest.approx(_last(two, "pruning/density"), abs=1e-6)
    if regularization == "target":
        # every micro-batch trains at the target's cut, not at a reset one
        assert mask_density(two.model).item() == pytest.approx(0.4, abs=0.03)


@pytest.mark.parametrize("route,method,regularization", COMBINATIONS)
def test_resume_equals_uninterrupted_with_accumulation(route, method, regularization, tmp_path):
    args = dict(max_steps=12, save_strategy="steps", save_steps=6, logging_steps=3, gradient_accumulation_steps=2,
                per_device_train_batch_size=4)
    full = make_trainer(route, "bert", _config(method, regularization), tmp_path / "full", **args)
    full.train()
    resumed = make_trainer(route, "bert", _config(method, regularization), tmp_path / "resumed", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    _assert_same_run(full, resumed, atol=1e-6)
    for key in ("pruning/threshold", "pruning/lambda", "pruning/density"):
        assert _last(resumed, key) == pytest.approx(_last(full, key), abs=1e-6)
    if regularization in ("target", "speedup") and method == "sigmoid_threshold":
        torch.testing.assert_close(full.model.blockprune_targets.log_lambda,
                                   resumed.model.blockprune_targets.log_lambda, atol=1e-6, rtol=0)


def test_micro_batch_weight_counts_labelled_items_like_the_trainer():
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    assert labelled_items({"labels": labels}, shift=False).item() == 3
    assert labelled_items({"labels": labels}, shift=True).item() == 1  # labels[..., 1:]
    assert labelled_items({"input_ids": labels}, shift=False) is None
    assert micro_batch_weight({"labels": labels}, torch.tensor(12), shift=False).item() == pytest.approx(0.25)
    assert micro_batch_weight({"labels": labels}, None, shift=False) is None
