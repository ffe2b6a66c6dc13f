"""BlockPruningCallback with unmodified Trainer subclasses, its `pruning/*` logs in the `report_to` integrations, and
its misuse errors."""

import logging
import math

import pytest
import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainerCallback
from transformers.integrations import integration_utils

from hf_blockprune import BlockPruningCallback, BlockPruningTrainer
from hf_blockprune.pruning.losses import expected_density, mask_density
from hf_blockprune.training import callback as callback_module
from hf_blockprune.training import trainer_patches

from conftest import tiny_dataset, tiny_model, training_args
from helpers import make_trainer, preset_config, topk_density

PRUNING_LOGS = {"pruning/threshold", "pruning/lambda", "pruning/task_loss", "pruning/regularization",
                "pruning/density_attention", "pruning/density_ffn", "pruning/density"}


class QuestionAnsweringLikeTrainer(Trainer):
    """Shaped like run_qa.py's QuestionAnsweringTrainer: extra __init__ arguments, own evaluate and predict."""

    def __init__(self, *args, eval_examples=None, post_process_function=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_examples = eval_examples
        self.post_process_function = post_process_function

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        output = self.predict(eval_dataset or self.eval_dataset, ignore_keys=ignore_keys)
        metrics = self.post_process_function(self.eval_examples, output)
        self.log(metrics)
        return metrics


def test_callback_with_a_subclass_that_overrides_evaluate(tmp_path):
    config = preset_config("hybrid", pruning_method="topk", final_threshold=0.5, final_warmup=0.2)
    data = tiny_dataset("bert")
    trainer = make_trainer(
        "callback", "bert", config, tmp_path, trainer_class=QuestionAnsweringLikeTrainer, max_steps=30,
    )
    trainer.eval_dataset = data[:16]
    trainer.eval_examples = data[:16]
    trainer.post_process_function = lambda examples, output: {
        "eval_accuracy": float((output.predictions.argmax(-1) == output.label_ids).mean())
    }
    trainer.train()
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert mask_density(trainer.model).item() == pytest.approx(topk_density(trainer.model, 0.5))
    assert any("pruning/density" in entry for entry in trainer.state.log_history)


def test_callback_with_seq2seq_trainer_on_bart(tmp_path):
    config = preset_config("hybrid", final_lambda=200.0, mask_scores_learning_rate=0.1)
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=30, learning_rate=1e-3, logging_steps=10,
        report_to="none", disable_tqdm=True, use_cpu=True, save_strategy="no", predict_with_generate=True,
        generation_max_length=8, generation_num_beams=2, lr_scheduler_type="constant",
    )
    data = tiny_dataset("bart")
    trainer = Seq2SeqTrainer(model=tiny_model("bart"), args=args, train_dataset=data, eval_dataset=data[:8],
                             callbacks=[BlockPruningCallback(config)])
    trainer.train()
    assert mask_density(trainer.model).item() < 1.0
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    prediction = trainer.predict(data[:4])
    assert prediction.predictions.shape[0] == 4


def test_regularization_reaches_the_training_loss(tmp_path):
    config = preset_config("hybrid", final_lambda=7.0)
    trainer = make_trainer("callback", "bert", config, tmp_path, max_steps=10)
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BlockPruningCallback))
    batch = {k: torch.stack([row[k] for row in tiny_dataset("bert")[:4]]) if k != "labels"
             else torch.tensor([row[k] for row in tiny_dataset("bert")[:4]]) for k in ("input_ids", "labels")}
    model = trainer.model.train()
    callback.lifecycle.training = True
    callback.controller.update(10, 10)
    with_term = trainer.compute_loss(model, dict(batch))
    callback.controller.update(0, 10)
    without_term = trainer.compute_loss(model, dict(batch))
    assert (with_term - without_term).item() == pytest.approx(7.0 * expected_density(model).item(), rel=1e-5)


def test_callback_added_after_construction_is_an_error(tmp_path):
    trainer = make_trainer("callback", "bert", preset_config("hybrid"), tmp_path)
    late = Trainer(model=tiny_model("bert"), args=trainer.args, train_dataset=tiny_dataset("bert"))
    late.add_callback(BlockPruningCallback(preset_config("hybrid")))
    with pytest.raises(RuntimeError, match="callbacks=\\[BlockPruningCallback"):
        late.train()


def test_callback_with_label_smoothing_says_to_use_the_trainer(tmp_path):
    # the Trainer computes the smoothed loss outside the model: refused at construction, before any training
    with pytest.raises(ValueError, match="label_smoothing_factor.*BlockPruningTrainer"):
        make_trainer("callback", "bert", preset_config("hybrid"), tmp_path, label_smoothing_factor=0.1)


def test_callback_with_compute_loss_func_says_to_use_the_trainer(tmp_path):
    config = preset_config("hybrid", initial_warmup=0.0)
    with pytest.raises(ValueError, match="compute_loss_func.*BlockPruningTrainer"):
        Trainer(
            model=tiny_model("bert"), args=make_trainer("callback", "bert", config, tmp_path).args,
            train_dataset=tiny_dataset("bert"), callbacks=[BlockPruningCallback(config)],
            compute_loss_func=lambda outputs, labels, num_items_in_batch=None: torch.nn.functional.cross_entropy(
                outputs.logits, labels),
        )


def test_callback_with_label_smoothing_prunes_top_k_which_adds_nothing_to_the_loss(tmp_path):
    config = preset_config("hybrid", pruning_method="topk", final_threshold=0.5, initial_warmup=0.0,
                           final_warmup=0.0)
    trainer = make_trainer("callback", "bert", config, tmp_path, label_smoothing_factor=0.1, max_steps=6)
    trainer.train()
    assert mask_density(trainer.model).item() < 0.75
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


def test_trainer_handles_label_smoothing(tmp_path):
    config = preset_config("hybrid", final_lambda=200.0, mask_scores_learning_rate=0.1)
    trainer = make_trainer("trainer", "bert", config, tmp_path, label_smoothing_factor=0.1, max_steps=30)
    trainer.train()
    assert mask_density(trainer.model).item() < 1.0


def test_trainer_requires_a_pruning_config(tmp_path):
    with pytest.raises(ValueError, match="pruning_config"):
        BlockPruningTrainer(model=tiny_model("bert"), args=make_trainer("callback", "bert", preset_config("hybrid"),
                                                                         tmp_path).args)


def test_trainer_puts_scores_in_their_own_group(tmp_path):
    trainer = make_trainer("trainer", "bert", preset_config("hybrid"), tmp_path, weight_decay=0.1)
    optimizer = trainer.create_optimizer()
    score_group = optimizer.param_groups[-1]
    assert score_group["lr"] == 1e-2 and score_group["weight_decay"] == 0.0
    assert len(score_group["params"]) == sum(1 for n, _ in trainer.model.named_parameters() if n.endswith("scores"))
    others = {id(p) for g in optimizer.param_groups[:-1] for p in g["params"]}
    assert not others & {id(p) for p in score_group["params"]}


class LogRecorder(TrainerCallback):
    """Stands in for a `report_to` integration (TensorBoard is not installed here): keeps a copy of each `logs` dict
    as it is when its `on_log` runs, as TensorBoardCallback writes it out then."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def recorded_training_logs(trainer, recorder_class) -> list[dict]:
    recorder = next(cb for cb in trainer.callback_handler.callbacks if type(cb) is recorder_class)
    return [logs for logs in recorder.logs if "loss" in logs]


class UserLogger(LogRecorder):
    """A logger the user lists before BlockPruningCallback in `callbacks=`."""


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_pruning_logs_reach_report_to_integrations(route, tmp_path, monkeypatch):
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "tensorboard", LogRecorder)
    config = preset_config("hybrid", final_lambda=20.0)
    args = training_args(tmp_path, max_steps=20, report_to=["tensorboard"])
    common = dict(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert"))
    if route == "trainer":
        trainer = BlockPruningTrainer(**common, pruning_config=config, callbacks=[UserLogger()])
    else:
        trainer = Trainer(**common, callbacks=[UserLogger(), BlockPruningCallback(config)])
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(history) == 2 and all(PRUNING_LOGS <= entry.keys() for entry in history)
    for recorder_class in (LogRecorder, UserLogger):
        logs = recorded_training_logs(trainer, recorder_class)
        assert len(logs) == 2
        for seen, entry in zip(logs, history):
            assert {key for key in seen if key.startswith("pruning/")} == PRUNING_LOGS  # same names on both routes
            assert {key: seen[key] for key in PRUNING_LOGS} == {key: entry[key] for key in PRUNING_LOGS}


def test_callback_warns_when_report_to_misses_its_logs(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "tensorboard", LogRecorder)
    monkeypatch.setattr(callback_module, "trainer_being_built", lambda callback: None)
    config = preset_config("hybrid")
    trainer = make_trainer("callback", "bert", config, tmp_path, max_steps=10, report_to=["tensorboard"])
    with caplog.at_level(logging.WARNING, logger=callback_module.__name__):
        trainer.train()
    assert "tensorboard" in caplog.text and "BlockPruningTrainer" in caplog.text
    assert not any("pruning/density" in logs for logs in recorded_training_logs(trainer, LogRecorder))

    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BlockPruningCallback))
    assert trainer_patches.log_before_other_callbacks(trainer, callback)  # what the warning suggests
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=callback_module.__name__):
        trainer.train()
    assert "BlockPruningTrainer" not in caplog.text
    assert PRUNING_LOGS <= recorded_training_logs(trainer, LogRecorder)[-1].keys()
