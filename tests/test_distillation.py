"""Distillation: the loss maths on fixed logits, teacher checks, and the trainer and callback paths."""

import math

import pytest
import torch
from transformers import BartForConditionalGeneration, BertForQuestionAnswering, BertForSequenceClassification, Trainer

from hf_blockprune import BlockPruningCallback, BlockPruningTrainer
from hf_blockprune.training.distillation import (
    Distiller,
    check_teacher,
    distillation_term,
    kd_loss,
    layer_distillation_loss,
    load_teacher,
)

from conftest import tiny_config, tiny_dataset, tiny_model, training_args
from helpers import make_trainer, preset_config


def _hand_kd(student: list[float], teacher: list[float], t: float) -> float:
    def softmax(values):
        exps = [math.exp(v / t) for v in values]
        return [e / sum(exps) for e in exps]

    p_s, p_t = softmax(student), softmax(teacher)
    return t * t * sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))


def test_sequence_classification_kd_matches_a_hand_computation():
    student, teacher = [[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]], [[0.5, 1.0, 2.0], [2.0, 0.0, 0.0]]
    expected = (_hand_kd(student[0], teacher[0], 2.0) + _hand_kd(student[1], teacher[1], 2.0)) / 2
    got = distillation_term({"logits": torch.tensor(student)}, {"logits": torch.tensor(teacher)}, None, 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_question_answering_kd_averages_start_and_end():
    s_start, t_start, s_end, t_end = [0.0, 1.0, 2.0], [2.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 3.0, 0.0]
    expected = (_hand_kd(s_start, t_start, 2.0) + _hand_kd(s_end, t_end, 2.0)) / 2
    student = {"start_logits": torch.tensor([s_start]), "end_logits": torch.tensor([s_end])}
    teacher = {"start_logits": torch.tensor([t_start]), "end_logits": torch.tensor([t_end])}
    assert distillation_term(student, teacher, None, 2.0).item() == pytest.approx(expected, rel=1e-6)


def test_seq2seq_kd_leaves_padding_positions_out():
    s = [[[1.0, 0.0], [0.0, 2.0], [5.0, -5.0]]]
    t = [[[0.0, 1.0], [1.0, 1.0], [-5.0, 5.0]]]
    labels = torch.tensor([[4, 7, -100]])
    expected = (_hand_kd(s[0][0], t[0][0], 2.0) + _hand_kd(s[0][1], t[0][1], 2.0)) / 2
    got = distillation_term({"logits": torch.tensor(s)}, {"logits": torch.tensor(t)}, labels, 2.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_kd_is_zero_for_identical_logits():
    logits = torch.randn(4, 5)
    assert kd_loss(logits, logits, 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_teacher_with_other_label_count_is_an_error():
    teacher = BertForSequenceClassification(tiny_config("bert").__class__(**{**tiny_config("bert").to_dict(),
                                                                               "num_labels": 3}))
    with pytest.raises(ValueError, match="3 labels and the student 2"):
        check_teacher(tiny_model("bert"), teacher)


def test_teacher_with_other_vocabulary_is_an_error():
    config = tiny_config("bart")
    config.vocab_size = 120
    with pytest.raises(ValueError, match="vocabulary has 120 tokens"):
        check_teacher(tiny_model("bart"), BartForConditionalGeneration(config))


def test_teacher_with_other_output_kind_is_an_error():
    with pytest.raises(ValueError, match="output kind"):
        check_teacher(tiny_model("bert"), BertForQuestionAnswering(tiny_config("bert")))


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_training_loss_mixes_task_and_distillation(route, tmp_path):
    teacher = tiny_model("bert", seed=5).eval()
    config = preset_config("hybrid", distillation_alpha=0.9, distillation_temperature=2.0)
    student = tiny_model("bert", seed=0).train()
    rows = tiny_dataset("bert")[:4]
    batch = {"input_ids": torch.stack([r["input_ids"] for r in rows]),
             "labels": torch.tensor([r["labels"] for r in rows])}
    with torch.no_grad():  # before any pruning hook exists (the masks keep everything at the start)
        plain = student(**batch)
        expected = 0.9 * distillation_term(plain, teacher(**batch), batch["labels"], 2.0) + 0.1 * plain.loss
    if route == "trainer":
        trainer = BlockPruningTrainer(model=student, args=make_trainer("trainer", "bert", config, tmp_path).args,
                                      train_dataset=tiny_dataset("bert"), pruning_config=config, teacher_model=teacher)
    else:
        trainer = make_trainer("callback", "bert", config, tmp_path, model=student)
        callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BlockPruningCallback))
        callback.lifecycle.distiller = Distiller(load_teacher(teacher, student), 0.9, 2.0)
        callback.lifecycle.training = True
    loss = trainer.compute_loss(student.train(), dict(batch))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - plain.loss.item()) > 1e-3  # the teacher term changes the loss
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_run_with_a_teacher_path(tmp_path):
    teacher = tiny_model("bert", seed=5)
    teacher.save_pretrained(tmp_path / "teacher")
    config = preset_config("hybrid", teacher_model=str(tmp_path / "teacher"), pruning_method="topk",
                           final_threshold=0.5)
    trainer = make_trainer("callback", "bert", config, tmp_path / "run", max_steps=10)
    trainer.train()
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BlockPruningCallback))
    assert callback.distiller is not None and not callback.distiller.teacher.training


def test_regression_head_distils_by_mean_squared_error():
    student, teacher = torch.tensor([[0.5], [2.0]], requires_grad=True), torch.tensor([[1.0], [1.0]])
    term = distillation_term({"logits": student}, {"logits": teacher}, torch.tensor([0.7, 1.5]), 2.0)
    assert term.item() == pytest.approx((0.25 + 1.0) / 2)
    term.backward()
    assert student.grad.abs().sum() > 0  # a softmax over one logit would give exactly 0 here


def test_multi_label_head_distils_per_label():
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    same = distillation_term({"logits": logits}, {"logits": logits}, None, 2.0, "multi_label_classification")
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    other = distillation_term({"logits": logits}, {"logits": -logits}, None, 2.0, "multi_label_classification")
    assert other.item() > 0.1


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_regression_student_follows_its_teacher(route, tmp_path):
    """STS-B-like: one output. The KD term must pull the student towards the teacher (it was identically 0)."""
    def regression_model(seed):
        config = tiny_config("bert")
        config.num_labels = 1
        torch.manual_seed(seed)
        return BertForSequenceClassification(config)

    teacher = regression_model(5).eval()
    rows = [{**row, "labels": float(row["labels"])} for row in tiny_dataset("bert")]
    config = preset_config("hybrid", pruning_method="topk", final_threshold=1.0, distillation_alpha=1.0)
    trainer = make_trainer(route, "bert", config, tmp_path, model=regression_model(0), max_steps=30)
    trainer.train_dataset = rows
    if route == "trainer":
        trainer.lifecycle.distiller = Distiller(load_teacher(teacher, trainer.model), 1.0, 2.0, trainer.model.config)
    else:
        callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BlockPruningCallback))
        callback.lifecycle.distiller = Distiller(load_teacher(teacher, trainer.model), 1.0, 2.0, trainer.model.config)

    def gap():
        batch = {"input_ids": torch.stack([r["input_ids"] for r in rows[:32]])}
        with torch.no_grad():
            return (trainer.model.eval()(**batch).logits - teacher(**batch).logits).pow(2).mean().item()

    before = gap()
    trainer.train()
    assert gap() < 0.5 * before


def test_layer_distillation_is_the_mean_relative_distance_over_layers_and_non_padding_positions():
    gen = torch.Generator().manual_seed(0)
    teacher = tuple(torch.randn(2, 4, 3, generator=gen) for _ in range(3))
    student = tuple(t + 0.1 * torch.randn(2, 4, 3, generator=gen) for t in teacher)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    keep = mask.bool()
    expected = sum(((s[keep] - t[keep]) ** 2).sum() / (t[keep] ** 2).sum()
                   for s, t in zip(student[1:], teacher[1:])) / 2  # the embeddings (index 0) are left out
    got = layer_distillation_loss({"hidden_states": student}, {"hidden_states": teacher}, {"attention_mask": mask})
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    scaled = layer_distillation_loss({"hidden_states": tuple(3 * s for s in student)},
                                     {"hidden_states": tuple(3 * t for t in teacher)}, {"attention_mask": mask})
    assert scaled.item() == pytest.approx(got.item(), rel=1e-5)  # independent of the hidden states' scale
    same = layer_distillation_loss({"hidden_states": teacher}, {"hidden_states": teacher}, {})
    assert same.item() == 0.0


@pytest.mark.parametrize("route", ["trainer", "callback"])
@pytest.mark.parametrize("arch", ["bert", "bart", "llama"])
def test_training_loss_adds_the_layer_distillation_term(route, arch, tmp_path):
    teacher = tiny_model(arch, seed=5).eval()
    config = preset_config("struct", arch, pruning_method="topk", distillation_alpha=0.5,
                           layer_distillation_weight=2.0)
    student = tiny_model(arch, seed=0)
    rows = tiny_dataset(arch)[:4]
    batch = {key: torch.stack([torch.as_tensor(r[key]) for r in rows]) for key in rows[0]}
    with torch.no_grad():
        plain = student.train()(**batch, output_hidden_states=True)
        reference = teacher(**batch, output_hidden_states=True)
        kd = distillation_term(plain, reference, batch["labels"], 2.0, shifted_labels=arch == "llama")
        layers = layer_distillation_loss(plain, reference, batch)
        expected = 0.5 * kd + 0.5 * plain.loss + 2.0 * layers
    args = training_args(tmp_path)
    if route == "trainer":
        trainer = BlockPruningTrainer(model=student, args=args, train_dataset=tiny_dataset(arch),
                                      pruning_config=config, teacher_model=teacher)
    else:
        trainer = Trainer(model=student, args=args, train_dataset=tiny_dataset(arch),
                          callbacks=[BlockPruningCallback(config, teacher_model=teacher)])
        callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, BlockPruningCallback))
        callback.lifecycle.training = True
    loss = trainer.compute_loss(student.train(), dict(batch))
    assert layers.item() > 1e-3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_layer_distillation_brings_the_hidden_states_closer_to_the_teacher(route, tmp_path):
    teacher = tiny_model("bert", seed=5).eval()
    rows = tiny_dataset("bert")[:16]
    batch = {key: torch.stack([torch.as_tensor(r[key]) for r in rows]) for key in ("input_ids", "attention_mask")}

    def distance(weight):
        config = preset_config("struct", pruning_method="topk", final_threshold=0.75, layer_distillation_weight=weight)
        args = training_args(tmp_path / str(weight), max_steps=30)
        if route == "trainer":
            trainer = BlockPruningTrainer(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert"),
                                          pruning_config=config, teacher_model=teacher)
        else:
            trainer = Trainer(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert"),
                              callbacks=[BlockPruningCallback(config, teacher_model=teacher)])
        trainer.train()
        with torch.no_grad():
            student = trainer.model.eval()(**batch, output_hidden_states=True)
            return layer_distillation_loss(student, teacher(**batch, output_hidden_states=True), batch).item()

    assert distance(5.0) < 0.5 * distance(0.0)


@pytest.mark.parametrize("route", ["trainer", "callback"])
def test_layer_distillation_needs_a_teacher_of_the_students_shape(route, tmp_path):
    config = preset_config("struct", pruning_method="topk", layer_distillation_weight=1.0)
    with pytest.raises(ValueError, match="no teacher is given"):
        if route == "trainer":
            make_trainer("trainer", "bert", config, tmp_path)
        else:
            BlockPruningCallback(config)
    shape = tiny_config("bert")
    shape.num_hidden_layers = 3
    wider = BertForSequenceClassification(shape)
    args = training_args(tmp_path)
    with pytest.raises(ValueError, match="`num_hidden_layers` is 3"):
        if route == "trainer":
            BlockPruningTrainer(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert"),
                                pruning_config=config, teacher_model=wider)
        else:
            Trainer(model=tiny_model("bert"), args=args, train_dataset=tiny_dataset("bert"),
                    callbacks=[BlockPruningCallback(config, teacher_model=wider)])
