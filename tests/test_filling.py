"""Hybrid-filled: surviving heads made dense again, within one run and as a second run from a saved model."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback

import hf_blockprune
from hf_blockprune.pruning.layer import MaskedLinear
from hf_blockprune.structure.discovery import prunable_layers

from conftest import tiny_dataset, training_args
from helpers import effective_scores, make_trainer, model_inputs, model_outputs, preset_config, random_masks

FILLED = dict(attention_block_size=[8, 8], final_lambda=0.2, mask_scores_learning_rate=0.1, initial_warmup=0.1,
              final_warmup=0.3, fill_after=0.8)


class Snapshot(TrainerCallback):
    """Keeps the effective scores and attention density seen at the start of a given step."""

    def __init__(self, step):
        self.step, self.scores = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            self.scores = effective_scores(model)


def _per_head_all_or_nothing(model) -> bool:
    for layer in prunable_layers(model):
        for attention in layer.attentions:
            rows = attention.value.full_mask().view(attention.num_heads, -1)
            cols = attention.output.full_mask().view(attention.output.out_features, attention.num_heads, -1)
            heads = list(rows) + list(cols.unbind(1))
            if not all(head.all() or not head.any() for head in heads):
                return False
    return True


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_filled_stage_within_one_run(route, tmp_path):
    config = hf_blockprune.BlockPruningConfig.from_preset("hybrid-filled", **FILLED)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=60, logging_steps=4)
    snapshot = Snapshot(step=52)
    trainer.add_callback(snapshot)
    trainer.train()
    logs = {e["step"]: e for e in trainer.state.log_history if "pruning/density_attention" in e}
    assert logs[44]["pruning/density_attention"] < 1.0  # pruned before the switch at step 48
    assert logs[52]["pruning/density_attention"] > logs[44]["pruning/density_attention"]  # heads made dense
    assert logs[52]["pruning/lambda"] == 0.0 and logs[60]["pruning/regularization"] == 0.0
    assert _per_head_all_or_nothing(trainer.model)
    for before, after in zip(snapshot.scores, effective_scores(trainer.model)):
        assert torch.equal(before, after)  # scores frozen in the filled stage
    inputs = model_inputs("bert")
    expected = model_outputs(trainer.model.eval(), inputs)
    compacted = hf_blockprune.compact_model(trainer.model)
    for got, want in zip(model_outputs(compacted, inputs), expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("route", "fill_learning_rate"), [("trainer", None), ("callback", 1e-4)])
def test_resume_after_the_switch_equals_uninterrupted(route, fill_learning_rate, tmp_path):
    filled = {**FILLED, "fill_learning_rate": fill_learning_rate}
    args = dict(max_steps=60, save_strategy="steps", save_steps=52, logging_steps=10, lr_scheduler_type="linear")
    full = make_trainer(route, "bert", hf_blockprune.BlockPruningConfig.from_preset("hybrid-filled", **filled),
                        tmp_path / "full", **args)
    full.train()
    resumed = make_trainer(route, "bert", hf_blockprune.BlockPruningConfig.from_preset("hybrid-filled", **filled),
                           tmp_path / "resumed", **args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-52"))
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    for a, b in zip(full.model.modules(), resumed.model.modules()):
        if isinstance(a, MaskedLinear):
            assert torch.equal(a.full_mask(), b.full_mask())


def test_filled_stage_as_a_second_run_from_a_saved_compacted_model(tmp_path):
    masked = random_masks(tiny_model_with_biases(), "hybrid", "topk", seed=3, force_empty=False)
    hf_blockprune.save_compacted(masked, tmp_path / "pruned")
    model = hf_blockprune.from_pretrained(tmp_path / "pruned")
    zero_blocks = model.bert.encoder.layer[0].attention.self.query.weight == 0
    assert zero_blocks.any()
    trainer = Trainer(model=model, args=training_args(tmp_path / "filled", max_steps=10),
                      train_dataset=tiny_dataset("bert"))
    trainer.train()
    trainer.save_model()
    assert (model.bert.encoder.layer[0].attention.self.query.weight[zero_blocks] != 0).any()  # filled blocks train
    saved = json.loads((tmp_path / "filled" / "config.json").read_text())
    assert saved["blockprune_layout"] == json.loads((tmp_path / "pruned" / "config.json").read_text())[
        "blockprune_layout"]
    inputs = model_inputs("bert")
    expected = model_outputs(model.eval(), inputs)[0]
    remote = AutoModelForSequenceClassification.from_pretrained(tmp_path / "filled", trust_remote_code=True).eval()
    torch.testing.assert_close(model_outputs(remote, inputs)[0], expected, atol=1e-5, rtol=1e-5)


def tiny_model_with_biases():
    """A tiny BERT whose biases are non-zero."""
    from helpers import biased_model

    return biased_model("bert", seed=3)


def test_hybrid_filled_preset():
    config = hf_blockprune.BlockPruningConfig.from_preset("hybrid-filled")
    assert config.fill_after == 0.8 and config.attention_block_size == [32, 32]
    assert preset_config("hybrid").fill_after is None


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_fill_learning_rate_starts_the_filled_stage_and_the_schedule_goes_on_from_it(route, tmp_path):
    config = hf_blockprune.BlockPruningConfig.from_preset("hybrid-filled", **FILLED, fill_learning_rate=1e-4)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=60, logging_steps=1, learning_rate=1e-3,
                           lr_scheduler_type="linear")
    trainer.train()
    # the rate logged after s steps is the one step s used: linear, 1e-3 * (60 - (s - 1)) / 60
    rates = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    assert rates[48] == pytest.approx(1e-3 * 13 / 60)  # the switch comes with step 49 (after 0.8 * 60 steps)
    for step in range(49, 61):  # from 1e-4 at the switch, decaying linearly towards 0 at the end
        assert rates[step] == pytest.approx(1e-4 * (61 - step) / 12, abs=1e-12), step


def test_fill_learning_rate_without_a_filled_stage_is_refused():
    with pytest.raises(ValueError, match="has none"):
        hf_blockprune.BlockPruningConfig.from_preset("hybrid", fill_learning_rate=3e-5)


def test_fill_after_one_switches_the_filled_stage_off_on_the_preset(tmp_path):
    config = hf_blockprune.BlockPruningConfig.from_preset("hybrid-filled", **{**FILLED, "fill_after": 1.0})
    assert config.fill_after == 1.0 and not config.fills
    again = hf_blockprune.BlockPruningConfig(**json.loads(json.dumps(config.to_dict())))
    assert not again.fills  # a round trip through the saved config keeps it off
    trainer = make_trainer("trainer", "bert", config, tmp_path, max_steps=60, logging_steps=4)
    trainer.train()
    logs = {e["step"]: e for e in trainer.state.log_history if "pruning/density_attention" in e}
    assert logs[60]["pruning/lambda"] > 0.0  # no switch: the regularization runs to the end
    assert not _per_head_all_or_nothing(trainer.model)  # blocks, not whole heads, as with 'hybrid'


def test_fill_after_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="or 1.0 for no filled stage"):
        hf_blockprune.BlockPruningConfig.from_preset("hybrid-filled", fill_after=1.5)
