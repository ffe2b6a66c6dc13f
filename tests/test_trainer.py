"""Real Trainer runs on tiny models, through the subclass and through the callback."""

import pytest
import torch

from hf_blockprune.pruning.layer import BlockScores
from hf_blockprune.pruning.losses import mask_density

from conftest import GROUPED
from helpers import effective_scores, make_trainer, masks, preset_config, schedule_values, topk_density

ROUTES = ["trainer", "callback"]


def _last_log(trainer, key):
    return [entry for entry in trainer.state.log_history if key in entry][-1][key]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("preset", ["hybrid", "struct", "block"])
def test_topk_reaches_the_final_density_exactly(arch, preset, route, tmp_path):
    config = preset_config(preset, arch, pruning_method="topk", final_threshold=0.3, final_warmup=0.2)
    trainer = make_trainer(route, arch, config, tmp_path, max_steps=50)
    trainer.train()
    model = trainer.model
    for scores in (m for m in model.modules() if isinstance(m, BlockScores)):
        assert int(scores.mask().sum()) == round(0.3 * scores.scores.numel())
    expected = topk_density(model, 0.3)
    if arch in GROUPED:  # a key/value head stays while any query head of its group does: it frees less
        assert mask_density(model).item() >= expected - 1e-6
        expected = mask_density(model).item()
    assert mask_density(model).item() == pytest.approx(expected)
    assert _last_log(trainer, "pruning/density") == pytest.approx(expected)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("preset", ["hybrid", "struct", "block"])
def test_sigmoid_threshold_density_falls_after_warmup(arch, preset, route, tmp_path):
    config = preset_config(preset, arch, final_lambda=200.0, mask_scores_learning_rate=0.1, initial_warmup=0.2)
    trainer = make_trainer(route, arch, config, tmp_path, max_steps=50, logging_steps=5)
    trainer.train()
    densities = {e["step"]: e["pruning/density"] for e in trainer.state.log_history if "pruning/density" in e}
    assert all(densities[step] == 1.0 for step in densities if step <= 10)  # initial warmup: threshold 0
    assert densities[50] < 0.9
    assert all(d2 <= d1 + 1e-9 for d1, d2 in zip(list(densities.values())[2:], list(densities.values())[3:]))
    for mask in masks(trainer.model):
        assert torch.all((mask == 0) | (mask == 1))


@pytest.mark.parametrize("route", ROUTES)
def test_logged_threshold_and_lambda_follow_the_cubic_formula(route, tmp_path):
    config = preset_config("hybrid", final_lambda=5.0, initial_warmup=0.1, final_warmup=0.3)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=40, logging_steps=1)
    trainer.train()
    logged = {e["step"]: e for e in trainer.state.log_history if "pruning/threshold" in e}
    for step in (3, 10, 17, 24, 35):
        # the values logged at step s are those used during that step, computed at global_step s - 1
        threshold, lam = schedule_values(step - 1, 40, config)
        p = min(max((step - 1 - 4) / (28 - 4), 0.0), 1.0)
        assert threshold == pytest.approx(0.1 + (0.0 - 0.1) * (1 - p) ** 3)
        assert logged[step]["pruning/threshold"] == pytest.approx(threshold)
        assert logged[step]["pruning/lambda"] == pytest.approx(lam)
    assert {"pruning/regularization", "pruning/density_attention", "pruning/density_ffn"} <= set(logged[35])
    assert logged[35]["pruning/regularization"] > 0


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("target", [None, 0.4], ids=["lambda", "target"])
def test_task_loss_and_regularization_are_logged_apart_and_add_up_to_the_loss(route, target, tmp_path):
    config = preset_config("hybrid", final_lambda=None if target else 50.0, target_density=target,
                           initial_warmup=0.0, final_warmup=0.2)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=24, logging_steps=4)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "pruning/task_loss" in entry]
    assert len(logged) == 6
    for entry in logged:  # the Trainer's loss is the window's mean total: task loss plus regularization
        assert entry["pruning/task_loss"] + entry["pruning/regularization"] == pytest.approx(entry["loss"], rel=1e-4)
        assert 0.0 < entry["pruning/task_loss"] < 5.0  # a 2-label cross-entropy, not the penalty
    assert logged[-1]["pruning/regularization"] > 0.0


@pytest.mark.parametrize("route", ROUTES)
def test_one_optimizer_step_moves_scores_by_the_mask_learning_rate(route, tmp_path):
    config = preset_config("hybrid", mask_scores_learning_rate=1e-2)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=1, learning_rate=1e-5, weight_decay=0.0)
    before = effective_scores(trainer.model)
    trainer.train()
    steps = torch.cat([(a - b).abs().flatten() for a, b in zip(effective_scores(trainer.model), before)])
    moved = steps[steps > 0]
    assert moved.numel() > 0.9 * steps.numel()
    assert moved.median().item() == pytest.approx(1e-2, rel=0.05)
    assert moved.max().item() <= 1e-2 * 1.001


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
def test_resume_equals_uninterrupted(route, method, tmp_path):
    overrides = dict(pruning_method=method, mask_scores_learning_rate=0.05, initial_warmup=0.1, final_warmup=0.1)
    if method == "topk":
        overrides["final_threshold"] = 0.3
    else:
        overrides["final_lambda"] = 50.0
    config = preset_config("hybrid", **overrides)
    args = dict(max_steps=20, save_strategy="steps", save_steps=10, logging_steps=5)
    full = make_trainer(route, "bert", config, tmp_path / "full", **args)
    full.train()
    resumed = make_trainer(route, "bert", preset_config("hybrid", **overrides), tmp_path / "resumed", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-10"))
    for a, b in zip(effective_scores(full.model), effective_scores(resumed.model)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(masks(full.model), masks(resumed.model)):
        assert torch.equal(a, b)
    for key in ("pruning/threshold", "pruning/lambda", "pruning/density"):
        assert _last_log(resumed, key) == pytest.approx(_last_log(full, key), abs=1e-6)


def test_gradient_accumulation_matches_the_double_batch(tmp_path):
    config = preset_config("hybrid", final_lambda=20.0, mask_scores_learning_rate=0.05)
    one = make_trainer("trainer", "bert", config, tmp_path / "a", per_device_train_batch_size=16, max_steps=8)
    two = make_trainer("trainer", "bert", preset_config("hybrid", final_lambda=20.0, mask_scores_learning_rate=0.05),
                       tmp_path / "b", per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=8)
    one.train()
    two.train()
    for a, b in zip(effective_scores(one.model), effective_scores(two.model)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for (name, a), (_, b) in zip(one.model.named_parameters(), two.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert _last_log(one, "train_loss") == pytest.approx(_last_log(two, "train_loss"), rel=1e-4)
