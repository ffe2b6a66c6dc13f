"""Fisher importance of the block masks, and scores that start from it (`mask_init="fisher"`)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import Trainer, TrainerCallback

from hf_blockprune import apply_block_pruning
from hf_blockprune.pruning.importance import (
    calibration_batches,
    centered_ranks,
    initialize_scores,
    model_loss,
    score_fisher,
)

from conftest import tiny_dataset, tiny_model, training_args
from helpers import effective_scores, make_trainer, masks, preset_config


def _batches(arch="bert", count=3, size=8):
    rows = tiny_dataset(arch)
    return [{key: torch.stack([torch.as_tensor(row[key]) for row in rows[i * size:(i + 1) * size]])
             for key in rows[0]} for i in range(count)]


@pytest.mark.parametrize("preset", ["hybrid", "struct", "block"])
def test_score_fisher_is_the_sum_of_squared_mask_gradients_and_changes_nothing(preset):
    model = apply_block_pruning(tiny_model("bert"), preset_config(preset)).train()
    batches = _batches()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    importance = score_fisher(model, batches)
    assert model.training and all(p.grad is None for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name
    parameters = [module.scores for module, _ in importance]
    expected = [torch.zeros_like(p) for p in parameters]
    model.eval()
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, parameters)
        expected = [e + g ** 2 for e, g in zip(expected, grads)]
    for (_, value), want in zip(importance, expected):
        torch.testing.assert_close(value, want)
    assert all(value.sum() > 0 for _, value in importance)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=40))
def test_centered_ranks_keep_the_order_span_minus_one_to_one_and_share_ties(values):
    values = torch.tensor(values, dtype=torch.float)
    ranks = centered_ranks(values)
    assert ranks.min() >= -1 and ranks.max() <= 1
    for i in range(len(values)):
        for j in range(len(values)):
            if values[i] < values[j]:
                assert ranks[i] < ranks[j]
            if values[i] == values[j]:
                assert ranks[i] == ranks[j]
    if len(set(values.tolist())) > 1:
        assert ranks.min() < 0 < ranks.max()


@pytest.mark.parametrize("scale", [1.0, 7.0])
def test_initialized_scores_follow_the_fisher_ranking_within_each_kind(scale):
    model = apply_block_pruning(tiny_model("bert"), preset_config("struct", target_density=0.5), score_scale=scale)
    importance = score_fisher(model, _batches())
    initialize_scores(importance, init_value=0.5)
    for kind in ("attention", "ffn"):
        fisher = torch.cat([v.flatten() for m, v in importance if m.kind == kind])
        scores = torch.cat([m.effective_scores().detach().flatten() for m, _ in importance if m.kind == kind])
        assert scores.min().item() == pytest.approx(-0.5) and scores.max().item() == pytest.approx(1.5)
        assert torch.equal(torch.argsort(fisher, stable=True), torch.argsort(scores, stable=True))


def test_calibration_batches_are_a_seeded_subset_collated_in_training_batches():
    data = tiny_dataset("bert")
    trainer = Trainer(model=tiny_model("bert"), args=training_args("/tmp/unused", per_device_train_batch_size=5),
                      train_dataset=data)
    loader = trainer.get_train_dataloader()
    first, again = calibration_batches(loader, 12, seed=3), calibration_batches(loader, 12, seed=3)
    assert [len(b["input_ids"]) for b in first] == [5, 5, 2]
    for a, b in zip(first, again):
        assert torch.equal(a["input_ids"], b["input_ids"])
    other = calibration_batches(loader, 12, seed=4)
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])


@pytest.mark.parametrize("route", ["trainer", "callback"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_both_routes_start_from_the_fisher_ranking(route, arch, tmp_path):
    config = preset_config("struct", arch, target_density=0.5, mask_init="fisher", calibration_examples=16)
    trainer = make_trainer(route, arch, config, tmp_path, max_steps=1, per_device_train_batch_size=8)
    started = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if not started:
                started.append(effective_scores(model))

    trainer.add_callback(Record())
    reference = apply_block_pruning(tiny_model(arch), preset_config("struct", arch, target_density=0.5))
    batches = calibration_batches(trainer.get_train_dataloader(), 16, seed=0)
    initialize_scores(score_fisher(reference, batches), init_value=0.5)
    trainer.train()
    for got, want in zip(started[0], effective_scores(reference)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_a_resumed_run_keeps_its_scores_and_ends_equal_to_the_uninterrupted_one(route, tmp_path):
    def config():
        return preset_config("hybrid", target_density=0.4, mask_init="fisher", calibration_examples=16,
                             mask_scores_learning_rate=0.05, initial_warmup=0.1, final_warmup=0.1)

    args = dict(max_steps=20, save_strategy="steps", save_steps=10, logging_steps=5)
    full = make_trainer(route, "bert", config(), tmp_path / "full", **args)
    full.train()
    resumed = make_trainer(route, "bert", config(), tmp_path / "resumed", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-10"))
    for a, b in zip(effective_scores(full.model), effective_scores(resumed.model)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for a, b in zip(masks(full.model), masks(resumed.model)):
        assert torch.equal(a, b)


def test_a_model_without_its_own_loss_is_refused_with_the_reason():
    model = apply_block_pruning(tiny_model("bert"), preset_config("struct"))
    batch = {key: value for key, value in _batches(count=1)[0].items() if key != "labels"}
    with pytest.raises(ValueError, match="returned no loss"):
        model_loss(model, batch)


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_a_constant_init_starts_every_score_at_mask_init_value_and_is_the_default(route, tmp_path):
    config = preset_config("struct", target_density=0.5, mask_init="constant")
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=1)
    started = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            started.append(effective_scores(model))

    trainer.add_callback(Record())
    trainer.train()
    assert all(torch.all(scores == 0.5) for scores in started[0])
    assert preset_config("struct").mask_init == "constant"


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_with_a_fixed_lambda_every_block_starts_kept_and_ranked(route, tmp_path):
    # soft movement with a fixed lambda: the cut stays at the constant start, so no Fisher-ranked score goes below it
    config = preset_config("hybrid", final_lambda=10.0, mask_init="fisher", calibration_examples=16)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=1)
    started = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            started.append((effective_scores(model), masks(model)))

    trainer.add_callback(Record())
    trainer.train()
    scores, kept = started[0]
    assert all(torch.all(mask == 1) for mask in kept)
    values = torch.cat([s.flatten() for s in scores])
    assert values.min().item() >= config.mask_init_value - 1e-6 and values.max().item() > config.mask_init_value + 1


def test_fisher_with_accumulation_groups_equals_the_fisher_of_the_larger_batches():
    # the importance depends on the optimizer step's batch, not on how gradient accumulation splits it
    model = apply_block_pruning(tiny_model("bert"), preset_config("hybrid"))
    small, large = _batches(count=4, size=8), _batches(count=2, size=16)
    for (_, a), (_, b) in zip(score_fisher(model, small, group=2), score_fisher(model, large)):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    ungrouped = score_fisher(model, small)
    assert any(not torch.allclose(a, b) for (_, a), (_, b) in zip(ungrouped, score_fisher(model, large)))
    with pytest.raises(ValueError, match="at least 1"):
        score_fisher(model, small, group=0)
