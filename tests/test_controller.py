"""The controller stops a run on non-finite values before anything is saved from them."""

import pytest
import torch
from transformers import TrainerCallback

from hf_blockprune.pruning.model import block_scores

from helpers import make_trainer, preset_config


class _Poison(TrainerCallback):
    """Puts NaN into one weight at the start of step `at` (as a diverging optimizer would)."""

    def __init__(self, model, at, where="weight"):
        self.model, self.at, self.where = model, at, where

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step != self.at:
            return
        with torch.no_grad():
            if self.where == "weight":
                self.model.bert.embeddings.word_embeddings.weight[:, 0] = float("nan")
            else:
                next(iter(block_scores(self.model))).scores[0] = float("inf")


@pytest.mark.parametrize("route", ["trainer", "callback"])
@pytest.mark.parametrize("where", ["weight", "scores"])
def test_non_finite_values_stop_the_run_and_name_the_last_good_checkpoint(route, where, tmp_path):
    config = preset_config("hybrid", target_density=0.5)
    trainer = make_trainer(route, "bert", config, tmp_path, max_steps=20, save_strategy="steps", save_steps=4)
    trainer.add_callback(_Poison(trainer.model, at=6, where=where))
    with pytest.raises(FloatingPointError, match=r"optimizer step 7.*checkpoint-4") as error:
        trainer.train()
    assert ("loss" if where == "weight" else "mask scores") in str(error.value)
    saved = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert saved == ["checkpoint-4"]  # nothing was written from the non-finite state


def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path):
    trainer = make_trainer("trainer", "bert", preset_config("hybrid"), tmp_path, max_steps=5)
    trainer.add_callback(_Poison(trainer.model, at=0))
    with pytest.raises(FloatingPointError, match="optimizer step 1.*No checkpoint was written"):
        trainer.train()


def test_callback_refuses_a_zero_learning_rate(tmp_path):
    with pytest.raises(ValueError, match="`learning_rate` > 0"):
        make_trainer("callback", "bert", preset_config("hybrid"), tmp_path, learning_rate=0.0)


def test_trainer_trains_scores_alone_with_a_zero_learning_rate(tmp_path):
    trainer = make_trainer("trainer", "bert", preset_config("hybrid", final_lambda=10.0), tmp_path,
                           learning_rate=0.0, max_steps=3)
    weight = trainer.model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    scores = [s.scores.detach().clone() for s in block_scores(trainer.model)]
    trainer.train()
    torch.testing.assert_close(trainer.model.bert.encoder.layer[0].attention.self.query.weight, weight)
    assert any(not torch.equal(a, s.scores) for a, s in zip(scores, block_scores(trainer.model)))
