"""Knowledge distillation from a dense teacher (Hinton et al. 2015), as the paper uses it while pruning."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..structure.wrappers import model_wrapper

IGNORE_INDEX = -100


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """`T^2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over positions.

    Args:
        student (`torch.Tensor`): `(..., C)` student logits.
        teacher (`torch.Tensor`): `(..., C)` teacher logits, same shape.
        temperature (`float`): `T`.
        mask (`torch.Tensor`, *optional*): `(...)` bool, the positions to average over (e.g. not padding).

    Returns:
        `torch.Tensor`: a 0-dim loss.
    """
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (...)
    if mask is not None:
        per_position = per_position[mask]
        if per_position.numel() == 0:  # no labelled position in the batch: nothing to distil
            return log_p_student.sum() * 0.0
    return per_position.mean() * temperature**2


def regression_kd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`mean((student - teacher) ** 2)`: distillation into a regression head (no softmax, no temperature).

    Args:
        student (`torch.Tensor`): `(B, K)` student predictions (`K = num_labels`, 1 for STS-B).
        teacher (`torch.Tensor`): `(B, K)` teacher predictions.
    """
    return F.mse_loss(student.float(), teacher.float())


def multi_label_kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 * mean_k KL(Bernoulli(sigmoid(t_k / T)) || Bernoulli(sigmoid(s_k / T)))`: independent labels.

    Args:
        student (`torch.Tensor`): `(B, K)` student logits.
        teacher (`torch.Tensor`): `(B, K)` teacher logits.
        temperature (`float`): `T`.
    """
    target = torch.sigmoid(teacher.float() / temperature)
    cross = F.binary_cross_entropy_with_logits(student.float() / temperature, target)
    entropy = F.binary_cross_entropy_with_logits(teacher.float() / temperature, target)
    return (cross - entropy) * temperature**2


def output_kind(outputs, problem_type: str | None = None) -> str:
    """What the outputs are, for distillation.

    `"question_answering"` (start/end logits), `"token"` (3-D logits), `"regression"` (a sequence head with
    `problem_type="regression"`, or a single output when the problem type is unknown, as transformers decides),
    `"multi_label"` (`problem_type="multi_label_classification"`) or `"sequence"` (2-D logits, one label per example).
    """
    if outputs.get("start_logits") is not None:
        return "question_answering"
    logits = outputs.get("logits")
    if logits is None:
        raise ValueError("Distillation needs `logits` or `start_logits`/`end_logits` in the model outputs.")
    if logits.dim() == 3:
        return "token"
    if problem_type == "regression" or (problem_type is None and logits.shape[-1] == 1):
        return "regression"
    if problem_type == "multi_label_classification":
        return "multi_label"
    return "sequence"


def distillation_term(student_outputs, teacher_outputs, labels: torch.Tensor | None, temperature: float,
                      problem_type: str | None = None, shifted_labels: bool = False):
    """The KD loss for the output kind of `student_outputs` (QA: mean of the start and end losses; per-token logits:
    positions whose label is -100, i.e. padding, are left out; regression heads: mean squared error to the teacher;
    multi-label heads: per-label binary KL). `problem_type` is the student's `config.problem_type`.

    With `shifted_labels` (a causal LM, whose logits at position `t` predict the label at `t + 1`), the logits at `t`
    count when the label at `t + 1` is not -100, and the last position never does."""
    kind = output_kind(student_outputs, problem_type)
    if kind == "regression":
        return regression_kd_loss(student_outputs["logits"], teacher_outputs["logits"])
    if kind == "multi_label":
        return multi_label_kd_loss(student_outputs["logits"], teacher_outputs["logits"], temperature)
    if kind == "question_answering":
        start = kd_loss(student_outputs["start_logits"], teacher_outputs["start_logits"], temperature)
        end = kd_loss(student_outputs["end_logits"], teacher_outputs["end_logits"], temperature)
        return (start + end) / 2
    mask = None
    if kind == "token" and labels is not None and labels.shape == student_outputs["logits"].shape[:2]:
        mask = labels != IGNORE_INDEX
        if shifted_labels:
            mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    return kd_loss(student_outputs["logits"], teacher_outputs["logits"], temperature, mask)


# Output fields holding the hidden states after every layer (index 0: the embeddings), and the input field giving their
# non-padding positions.
HIDDEN_STATE_FIELDS = {
    "hidden_states": "attention_mask",
    "encoder_hidden_states": "attention_mask",
    "decoder_hidden_states": "decoder_attention_mask",
}


def layer_distillation_loss(student_outputs, teacher_outputs, inputs: dict) -> torch.Tensor:
    """Mean over layers of `||h_s - h_t||^2 / ||h_t||^2`, the relative squared distance between the student's and
    the teacher's hidden states after each layer (`(B, T, D)` each; the embeddings are left out), over the positions
    the attention mask keeps (all positions without one). An encoder-decoder contributes both stacks.

    The ratio makes the term independent of the hidden states' scale (a pre-LayerNorm decoder's residual stream
    grows with depth; a post-LayerNorm encoder's does not).

    Raises:
        `ValueError`: the outputs hold no hidden states, or the teacher's do not match the student's in number or
            shape (layer-wise distillation needs a teacher with the student's layers and hidden size).
    """
    terms = []
    for name, mask_name in HIDDEN_STATE_FIELDS.items():
        student, teacher = student_outputs.get(name), teacher_outputs.get(name)
        if student is None or teacher is None:
            continue
        if len(student) != len(teacher) or any(s.shape != t.shape for s, t in zip(student, teacher)):
            raise ValueError(
                f"Layer-wise distillation compares the hidden states layer by layer, but the teacher's {name} "
                f"({len(teacher)} x {tuple(teacher[-1].shape)}) do not match the student's ({len(student)} x "
                f"{tuple(student[-1].shape)}): use a teacher with the student's layers and hidden size, or "
                "`layer_distillation_weight=0`."
            )
        mask = inputs.get(mask_name)
        keep = mask.bool() if torch.is_tensor(mask) and mask.shape == student[-1].shape[:2] else None
        for s, t in zip(student[1:], teacher[1:]):
            s, t = s.float(), t.float()
            if keep is not None:
                s, t = s[keep], t[keep]  # (positions, D)
            terms.append((s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12))
    if not terms:
        raise ValueError("Layer-wise distillation needs the hidden states in the outputs (`output_hidden_states`).")
    return torch.stack(terms).mean()


def _head_kind(model: nn.Module) -> str:
    name = type(model).__name__
    for suffix in ("ForQuestionAnswering", "ForSequenceClassification", "ForTokenClassification",
                   "ForConditionalGeneration", "ForCausalLM", "ForMaskedLM"):
        if suffix in name:
            return suffix
    return name


def _refuse_models_without_logits(student: nn.Module) -> None:
    wrapper = model_wrapper(student)
    if wrapper is not None and not wrapper.returns_loss:
        raise ValueError(
            f"Distillation compares the teacher's logits with the student's, and a {type(student).__name__} returns "
            "embeddings (its loss module computes the loss): prune it without a teacher (leave out `teacher_model`), "
            f"or {wrapper.distillation_hint}."
        )


def check_teacher(student: nn.Module, teacher: nn.Module) -> None:
    """Raise `ValueError` when the teacher's outputs cannot be compared with the student's.

    Checks the output kind (the task head), the label count of classification heads and the vocabulary of
    generation heads. Sentence-transformers models are refused: they return embeddings, whose loss the Trainer's loss
    module computes, and distillation compares logits.
    """
    _refuse_models_without_logits(student)
    student_kind, teacher_kind = _head_kind(student), _head_kind(teacher)
    if student_kind != teacher_kind:
        raise ValueError(
            f"The teacher's output kind ({type(teacher).__name__}) does not match the student's "
            f"({type(student).__name__}): distil from a teacher fine-tuned for the same task."
        )
    s_config, t_config = student.config, teacher.config
    if student_kind in ("ForSequenceClassification", "ForTokenClassification") and \
            s_config.num_labels != t_config.num_labels:
        raise ValueError(
            f"The teacher predicts {t_config.num_labels} labels and the student {s_config.num_labels}: use a teacher "
            "fine-tuned on the same label set."
        )
    if student_kind in ("ForConditionalGeneration", "ForCausalLM", "ForMaskedLM") and \
            s_config.vocab_size != t_config.vocab_size:
        raise ValueError(
            f"The teacher's vocabulary has {t_config.vocab_size} tokens and the student's {s_config.vocab_size}: "
            "teacher and student must share a tokenizer."
        )


def check_layer_distillation(student: nn.Module, teacher: nn.Module) -> None:
    """Refuse layer-wise distillation from a teacher whose layer count or hidden size differs from the student's."""
    for name in ("num_hidden_layers", "hidden_size"):
        s_value = getattr(student.config, name, None)
        t_value = getattr(teacher.config, name, None)
        if s_value is not None and t_value is not None and s_value != t_value:
            raise ValueError(
                f"Layer-wise distillation (`layer_distillation_weight` > 0) matches hidden states layer by layer, but "
                f"the teacher's `{name}` is {t_value} and the student's {s_value}: use a teacher with the student's "
                "layers and hidden size (e.g. the dense model the student was pruned from), or set "
                "`layer_distillation_weight=0`."
            )


def load_teacher(teacher: nn.Module | str | os.PathLike, student: nn.Module) -> nn.Module:
    """The teacher as a frozen model in eval mode on the student's device, checked against the student.

    Args:
        teacher (`nn.Module` or path): a model, or a path / Hub id loaded with the student's auto class.
        student (`nn.Module`): the model being pruned.
    """
    if not isinstance(teacher, nn.Module):
        import transformers

        from ..structure.modeling_blockprune import auto_class_name

        _refuse_models_without_logits(student)
        auto = getattr(transformers, auto_class_name(type(student)))
        teacher = auto.from_pretrained(teacher)
    check_teacher(student, teacher)
    teacher = teacher.to(next(student.parameters()).device).eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


class Distiller:
    """Mixes the task loss with the teacher's: `alpha * KD + (1 - alpha) * task (+ beta * layer-wise term)`.

    Args:
        teacher (`nn.Module`): a frozen teacher (see `load_teacher`).
        alpha (`float`): weight of the distillation term.
        temperature (`float`): softmax temperature.
        student_config (*optional*): the student's config, whose `problem_type` (set by transformers on the first
            forward with labels) selects the regression or multi-label losses.
        layer_weight (`float`, *optional*, defaults to 0.0): `beta`, the weight of `layer_distillation_loss`; the
            student's forward must then return its hidden states (`needs_hidden_states`).

    A causal-LM teacher (and so student) is distilled per token, on the positions whose next token is a label.
    """

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float, student_config=None,
                 layer_weight: float = 0.0):
        self.teacher = teacher
        self.alpha = alpha
        self.temperature = temperature
        self.student_config = student_config
        self.layer_weight = layer_weight
        self.shifted_labels = _head_kind(teacher) == "ForCausalLM"

    @classmethod
    def from_config(cls, teacher: nn.Module | str | os.PathLike, student: nn.Module, config) -> Distiller:
        """The distiller a `BlockPruningConfig` asks for, with its teacher loaded and checked against `student`."""
        teacher = load_teacher(teacher, student)
        if config.layer_distillation_weight > 0:
            check_layer_distillation(student, teacher)
        return cls(teacher, config.distillation_alpha, config.distillation_temperature, student.config,
                   config.layer_distillation_weight)

    @property
    def needs_hidden_states(self) -> bool:
        """Whether the student's training forward must return its hidden states (layer-wise distillation)."""
        return self.layer_weight > 0

    def loss(self, task_loss: torch.Tensor, student_outputs, inputs: dict) -> torch.Tensor:
        """Run the teacher on `inputs` (no gradients) and return the mixed loss."""
        inputs = {key: value for key, value in inputs.items() if key != "output_hidden_states"}
        self.teacher.eval()
        with torch.no_grad():
            teacher_outputs = self.teacher(**inputs, **({"output_hidden_states": True} if self.layer_weight else {}))
        problem_type = getattr(self.student_config, "problem_type", None)
        term = distillation_term(student_outputs, teacher_outputs, inputs.get("labels"), self.temperature,
                                 problem_type, self.shifted_labels)
        loss = self.alpha * term + (1.0 - self.alpha) * task_loss
        if self.layer_weight:
            loss = loss + self.layer_weight * layer_distillation_loss(student_outputs, teacher_outputs, inputs)
        return loss


def check_teacher_given(config, teacher) -> None:
    """Refuse a config that distils layer by layer without a teacher."""
    if teacher is None and config.layer_distillation_weight > 0:
        raise ValueError(
            "`layer_distillation_weight` > 0 distils the teacher's hidden states, but no teacher is given: pass "
            "`teacher_model=` (or `pruning_config.teacher_model`), or set `layer_distillation_weight=0`."
        )
