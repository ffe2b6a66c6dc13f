"""Target densities: top-k and soft movement pruning end at the asked density."""

import pytest
import torch
from transformers import Trainer

import hf_blockprune
from hf_blockprune import BlockPruningCallback, BlockPruningTrainer
from hf_blockprune.pruning.layer import BlockScores
from hf_blockprune.pruning.losses import mask_density
from hf_blockprune.pruning.targets import weighted_score_cut

from conftest import tiny_dataset, tiny_model, training_args
from helpers import effective_scores, make_trainer, masks, preset_config


@pytest.mark.parametrize("arch", ["bert", "bart"])
@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
@pytest.mark.parametrize("target", [0.5, 0.2])
def test_run_ends_at_the_target_density(arch, method, target, tmp_path):
    config = preset_config("hybrid", pruning_method=method, target_density=target)
    trainer = make_trainer("trainer", arch, config, tmp_path, max_steps=200, logging_steps=50)
    trainer.train()
    assert mask_density(trainer.model).item() == pytest.approx(target, abs=0.02)
    last = [entry for entry in trainer.state.log_history if "pruning/target_density_all" in entry][-1]
    assert last["pruning/target_density_all"] == pytest.approx(target)
    assert last["pruning/realized_density_all"] == pytest.approx(target, abs=0.02)
    assert 0.0 < last["pruning/expected_density_all"] < 1.0


@pytest.mark.parametrize("method", ["topk", "sigmoid_threshold"])
def test_attention_and_ffn_targets_separately(method, tmp_path):
    config = preset_config("hybrid", pruning_method=method, target_density_attention=0.3, target_density_ffn=0.6)
    trainer = make_trainer("callback", "bert", config, tmp_path, max_steps=200, logging_steps=50)
    trainer.train()
    assert mask_density(trainer.model, "attention").item() == pytest.approx(0.3, abs=0.02)
    assert mask_density(trainer.model, "ffn").item() == pytest.approx(0.6, abs=0.02)


def test_soft_targets_let_layers_keep_different_amounts(tmp_path):
    """The cut is shared by the group, so (unlike top-k) matrices end at different densities."""
    config = preset_config("hybrid", target_density=0.3)
    trainer = make_trainer("trainer", "bert", config, tmp_path, max_steps=200)
    trainer.train()
    per_matrix = [m.float().mean().item() for m in masks(trainer.model)]
    assert max(per_matrix) - min(per_matrix) > 0.1


def test_resume_with_soft_targets_equals_uninterrupted(tmp_path):
    def config():
        return preset_config("hybrid", target_density=0.4)

    args = dict(max_steps=40, save_strategy="steps", save_steps=20, logging_steps=10)
    full = make_trainer("trainer", "bert", config(), tmp_path / "full", **args)
    full.train()
    resumed = make_trainer("trainer", "bert", config(), tmp_path / "resumed", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-20"))
    for a, b in zip(effective_scores(full.model), effective_scores(resumed.model)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(full.model.blockprune_targets.log_lambda,
                               resumed.model.blockprune_targets.log_lambda, atol=1e-6, rtol=0)


def test_weighted_score_cut_keeps_the_heaviest_prefix_within_the_target():
    a = BlockScores((4,), "sigmoid_threshold", "attention", 0.0, 0.5)
    b = BlockScores((2,), "sigmoid_threshold", "ffn", 0.0, 0.5)
    a.weights_per_block, b.weights_per_block = 1.0, 3.0
    with torch.no_grad():
        a.scores.copy_(torch.tensor([4.0, 3.0, 1.0, 0.0]))
        b.scores.copy_(torch.tensor([2.0, -1.0]))
    # total weight 10: 4 (w1), 3 (w1), 2 (w3) -> 5 = half; the next block (1.0, w1) would pass 0.5
    cut = weighted_score_cut([a, b], 0.5)
    assert 1.0 < cut.item() < 2.0


def test_targets_are_removed_with_the_masks(tmp_path):
    trainer = make_trainer("trainer", "bert", preset_config("hybrid", target_density=0.5), tmp_path, max_steps=2)
    assert hasattr(trainer.model, "blockprune_targets")
    hf_blockprune.remove_block_pruning(trainer.model)
    assert not hasattr(trainer.model, "blockprune_targets")


def test_target_speedup_sets_the_densities_from_the_cost_model(tmp_path):
    from hf_blockprune.compact.flops import model_flops

    config = preset_config("struct", pruning_method="topk", target_speedup=2.0, speedup_sequence_length=12)
    trainer = make_trainer("trainer", "bert", config, tmp_path, max_steps=60)
    dense = model_flops(trainer.model, 12)
    trainer.train()
    pruned = model_flops(trainer.model, 12, kept_only=True)
    assert dense.total / pruned.total == pytest.approx(2.0, rel=0.1)


def test_unreachable_target_speedup_says_why(tmp_path):
    from hf_blockprune.compact.flops import densities_for_speedup

    model = make_trainer("trainer", "bert", preset_config("hybrid"), tmp_path).model
    with pytest.raises(ValueError, match="out of reach"):
        densities_for_speedup(model, 1e6, 12)


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_filled_stage_keeps_the_target_masks(route, tmp_path):
    """The switch to the filled stage freezes the masks the target cut realized, not `score > threshold`."""
    config = preset_config("hybrid", target_density_attention=0.3, target_density_ffn=0.3, fill_after=0.8)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=60, logging_steps=10)
    trainer.train()
    assert mask_density(trainer.model, "ffn").item() == pytest.approx(0.3, abs=0.03)  # frozen at the switch


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_masks_between_steps_realize_the_scheduled_density(route, tmp_path):
    """Logs, evaluation and the final masks see the scheduled density, not a cut the optimizer step left behind.

    A teacher unrelated to the student moves every score down at about the same pace; a cut placed before the
    optimizer step then sits above (nearly) all the moved scores, which would drop (nearly) every block.
    """
    config = preset_config("hybrid", target_density=0.4)
    model, teacher = tiny_model("bert"), tiny_model("bert", seed=1)
    args = training_args(tmp_path, max_steps=30, logging_steps=5)
    data = tiny_dataset("bert")
    if route == "trainer":
        trainer = BlockPruningTrainer(model=model, args=args, train_dataset=data, pruning_config=config,
                                      teacher_model=teacher)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          callbacks=[BlockPruningCallback(config, teacher_model=teacher)])
    trainer.train()
    logged = [e for e in trainer.state.log_history if "pruning/realized_density_all" in e]
    assert len(logged) == 6
    for entry in logged:  # early on, Adam's equal steps leave exact ties among scores, which the cut keeps together
        target = entry["pruning/target_density_all"]
        assert target - 0.1 <= entry["pruning/realized_density_all"] <= target + 1e-6
    assert mask_density(trainer.model).item() == pytest.approx(0.4, abs=0.02)


def _emptied_bart_run(tmp_path, per_stack):
    config = preset_config("struct", target_density=0.5, target_per_stack=per_stack, initial_warmup=0.0,
                           final_warmup=0.2)
    trainer = make_trainer("trainer", "bart", config, tmp_path, max_steps=60)
    # a stack whose scores all sit below the other's: one shared cut would drop every one of its blocks
    with torch.no_grad():
        for name, module in trainer.model.named_modules():
            if isinstance(module, BlockScores) and ".encoder." in name:
                module.scores.sub_(5.0)
    trainer.train()
    return trainer


def test_a_target_cannot_empty_a_stack(tmp_path, caplog):
    from hf_blockprune.training.controller import emptied_stacks

    trainer = _emptied_bart_run(tmp_path, per_stack=True)
    assert emptied_stacks(trainer.model) == []
    for stack in ("encoder", "decoder"):  # each stack meets the target on its own
        scores = [m for n, m in trainer.model.named_modules() if isinstance(m, BlockScores) and f".{stack}." in n]
        kept = sum(m.mask().sum().item() * m.weights_per_block for m in scores)
        total = sum(m.scores.numel() * m.weights_per_block for m in scores)
        assert kept / total == pytest.approx(0.5, abs=0.05)


def test_a_shared_cut_that_empties_a_stack_is_reported_loudly(tmp_path, caplog):
    from hf_blockprune.training.controller import emptied_stacks

    with caplog.at_level("WARNING", logger="hf_blockprune.training.controller"):
        trainer = _emptied_bart_run(tmp_path, per_stack=False)
    assert any("model.encoder.layers" in entry for entry in emptied_stacks(trainer.model))
    assert "Pruning removed ALL of model.encoder.layers" in caplog.text


def _bounded_targets(model, ratio=1.0):
    from hf_blockprune.pruning.targets import DensityTargets

    targets = DensityTargets({"attention": 0.3, "ffn": 0.3}, rate=0.05, initial_lambda=1e-2, penalty_ratio=ratio)
    model.add_module("blockprune_targets", targets)
    targets.track_task_gradients(model)
    return targets


def test_the_tracked_task_gradient_is_the_scores_gradient_without_the_penalty():
    model = hf_blockprune.apply_block_pruning(tiny_model("bert"), preset_config("hybrid", target_density=0.3)).train()
    targets = _bounded_targets(model)
    targets.log_lambda.fill_(2.0)
    rows = tiny_dataset("bert")[:8]
    batch = {"input_ids": torch.stack([r["input_ids"] for r in rows]),
             "labels": torch.tensor([r["labels"] for r in rows])}
    for _ in range(2):  # two micro-batches: the task gradient sums like the scores' gradient
        (model(**batch).loss * 0.5 + targets.penalty(model)).backward()
    scores = [m for m in model.modules() if isinstance(m, BlockScores)]
    params = [m.scores for m in scores]
    penalty = torch.autograd.grad(targets.penalty(model), params)
    for module, extra in zip(scores, penalty):
        torch.testing.assert_close(module.task_gradient, module.scores.grad - 2 * extra, atol=1e-6, rtol=1e-4)


def test_the_penalty_gradient_norm_is_the_expected_densitys_gradient():
    from hf_blockprune.pruning.losses import expected_density

    model = hf_blockprune.apply_block_pruning(tiny_model("bert"), preset_config("hybrid", target_density=0.3))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BlockScores):
                module.scores.normal_()
    targets = _bounded_targets(model)
    for group in ("attention", "ffn"):
        params = [m.scores for m in model.modules() if isinstance(m, BlockScores) and m.kind == group]
        grads = torch.autograd.grad(expected_density(model, group), params)
        want = torch.cat([g.flatten() for g in grads]).norm()
        torch.testing.assert_close(targets._penalty_gradient_norm(model, group), want, atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_the_multiplier_stays_bounded_on_a_run_whose_target_is_reached_late(route, tmp_path):
    """Slow scores cannot follow the schedule: dual ascent alone runs the multiplier up to its clip; the bound holds
    the penalty's pull to the task's, and the cut still realizes the target."""
    def run(ratio, folder):
        config = preset_config("struct", target_density_attention=0.25, target_density_ffn=0.1,
                               target_penalty_ratio=ratio, mask_scores_learning_rate=1e-3, initial_warmup=0.0,
                               final_warmup=0.2)
        trainer = make_trainer(route, "bert", config, tmp_path / folder, max_steps=150, logging_steps=5)
        trainer.train()
        logs = [e for e in trainer.state.log_history if "pruning/lambda_attention" in e]
        return trainer, logs

    free, free_logs = run(0.0, "free")
    bounded, logs = run(1.0, "bounded")
    assert all("pruning/lambda_bound_attention" not in entry for entry in free_logs)
    for entry in logs:  # the logged bound already holds the step's new task gradient, the multiplier the previous one
        for group in ("attention", "ffn"):
            assert entry[f"pruning/lambda_{group}"] <= entry[f"pruning/lambda_bound_{group}"] * 1.25
    worst_free = max(max(e["pruning/lambda_attention"], e["pruning/lambda_ffn"]) for e in free_logs)
    worst = max(max(e["pruning/lambda_attention"], e["pruning/lambda_ffn"]) for e in logs)
    assert worst_free > 100 * worst
    for trainer in (free, bounded):
        assert mask_density(trainer.model, "attention").item() == pytest.approx(0.25, abs=0.01)
        assert mask_density(trainer.model, "ffn").item() == pytest.approx(0.1, abs=0.02)


def test_resume_keeps_the_running_task_gradient_norm(tmp_path):
    args = dict(max_steps=40, save_strategy="steps", save_steps=20, logging_steps=10)
    full = make_trainer("callback", "bert", preset_config("struct", target_density=0.3), tmp_path / "full", **args)
    full.train()
    resumed = make_trainer("callback", "bert", preset_config("struct", target_density=0.3), tmp_path / "r", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-20"))
    a, b = full.model.blockprune_targets, resumed.model.blockprune_targets
    assert torch.all(a.task_gradient_norm > 0)
    torch.testing.assert_close(a.task_gradient_norm, b.task_gradient_norm, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(a.log_lambda, b.log_lambda, atol=1e-6, rtol=0)
    for x, y in zip(masks(full.model), masks(resumed.model)):
        assert torch.equal(x, y)
