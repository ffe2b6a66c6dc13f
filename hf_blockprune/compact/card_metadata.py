"""The Hub metadata of a compacted model's card, and the names a card may make public.

The metadata is a `huggingface_hub.ModelCardData`: library, tags, base model, pipeline tag, license, datasets and a
`model-index` with the run's evaluation results. Every field is optional: a field nothing tells is left out. What a
Trainer run knows (its last evaluation, its Hub id, what it trained) is gathered as `card_data` by `run_card_data`,
attached to the model with `attach_card_data` and merged by `apply_card_data`. No local path is ever written:
`base_model` is a Hub id or left out, and a local teacher or latency table is named as such (see `public_name`).
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from ..structure.model_structure import PRUNING_CONFIG_KEY
from ..structure.modeling_blockprune import auto_class_name
from .stages import recorded_stages

TAGS = ["hf_blockprune", "block-pruning", "pruning"]
# card data a Trainer attached to its model, read when the model is saved (see `attach_card_data`)
CARD_DATA_ATTRIBUTE = "_blockprune_card_data"
_PIPELINE_TAGS = {
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForQuestionAnswering": "question-answering",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForSeq2SeqLM": "text2text-generation",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForImageClassification": "image-classification",
    "AutoModelForAudioClassification": "audio-classification",
}
_SEQ2SEQ_TASKS = ("summarization", "translation")  # more precise pipeline tags of a seq2seq model
# keys of a Trainer's evaluation log that do not measure the model
_NOT_METRICS = ("runtime", "samples_per_second", "steps_per_second", "samples", "epoch", "step")
# what the card says of a model or file named by a local path (the path itself stays on this machine)
LOCAL_MODEL = "a local model (not on the Hub)"
LOCAL_FILE = "a local file (not on the Hub)"


def hub_id(candidate) -> str | None:
    """`candidate` if it names a Hub repository (`owner/name` or a bare name) and no existing local path, else `None`.

    Args:
        candidate (`str`, *optional*): a model's `_name_or_path`, a teacher, a `base_model` field, ...
    """
    if not isinstance(candidate, str) or not candidate or os.path.isabs(candidate) or os.path.exists(candidate):
        return None
    try:
        validate_repo_id(candidate)
    except HFValidationError:
        return None
    return candidate


def public_name(candidate) -> str | None:
    """What a card may say of the model `candidate` names: its Hub id, else `LOCAL_MODEL` (a local path never).

    Args:
        candidate (`str`, `os.PathLike` or `nn.Module`, *optional*): a path or Hub id, or a model (its
            `config._name_or_path` is read).

    Returns:
        `str`: the Hub id or `LOCAL_MODEL`; `None` when `candidate` names nothing.
    """
    if isinstance(candidate, nn.Module):
        candidate = getattr(getattr(candidate, "config", None), "_name_or_path", None)
    if not candidate:
        return None
    return hub_id(candidate) or LOCAL_MODEL


def public_settings(settings: dict | None) -> dict | None:
    """A pruning config dict as a card may show it: the teacher by `public_name`, a latency table file as
    `LOCAL_FILE` (the Hub holds no such file), so that no local path reaches the card."""
    if not isinstance(settings, dict):
        return settings
    public = dict(settings)
    if public.get("teacher_model") is not None:
        public["teacher_model"] = public_name(public["teacher_model"])
    if public.get("latency_table") is not None:
        public["latency_table"] = LOCAL_FILE
    return public


def make_record_public(config) -> None:
    """Replace the pruning config recorded in `config` (`blockprune_config`) by its `public_settings`, in place: what a
    saved `config.json` (pushed to the Hub as is) may hold. Call it after the card, which reads the local teacher's
    own card for the base model.

    Example:
        >>> from transformers import BertConfig
        >>> config = BertConfig(blockprune_config={"teacher_model": "/home/me/teacher", "pruning_method": "topk"})
        >>> make_record_public(config)
        >>> config.blockprune_config
        {'teacher_model': 'a local model (not on the Hub)', 'pruning_method': 'topk'}
    """
    record = getattr(config, PRUNING_CONFIG_KEY, None)
    if isinstance(record, dict):
        setattr(config, PRUNING_CONFIG_KEY, public_settings(record))


def public_stages(config, masked: bool = False) -> list[dict]:
    """`stages.recorded_stages(config, masked)` with each stage's settings as `public_settings` shows them."""
    return [{**stage, "settings": public_settings(stage.get("settings"))} if "settings" in stage else stage
            for stage in recorded_stages(config, masked)]


def _local_card_data(path_or_id) -> ModelCardData | None:
    """The metadata of a base model's card found on this machine: its folder's README.md, or the Hub cache's copy."""
    if isinstance(path_or_id, str) and os.path.isdir(path_or_id):
        readme = Path(path_or_id) / "README.md"
    elif hub_id(path_or_id):
        readme = try_to_load_from_cache(path_or_id, "README.md")  # never goes to the network
    else:
        return None
    if not isinstance(readme, (str, Path)) or not Path(readme).is_file():
        return None
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data
    except (OSError, ValueError, yaml.YAMLError):
        return None


def base_model_metadata(model: nn.Module) -> dict:
    """`base_model` (a Hub id, never a local path) and `license` of the model `model` was pruned from.

    The base is the one a stage recorded (`prune_one_shot` records the dense model's Hub id), else the model's
    `config._name_or_path`, else the pruning config's teacher. A Hub id is taken as it is; a local folder gives the
    `base_model` its own card names, if any. The license is the one in the base's card, when that card is on this
    machine (its folder, or the Hub cache).

    Args:
        model (`nn.Module`): a compacted (or masked) model.

    Returns:
        `dict`: `base_model` and `license`, each `None` when unknown.
    """
    config = model.config
    teacher = (getattr(config, PRUNING_CONFIG_KEY, None) or {}).get("teacher_model")
    recorded = [stage.get("base_model") for stage in recorded_stages(config) if stage.get("base_model")]
    for candidate in (*recorded, getattr(config, "_name_or_path", None), teacher):
        card = _local_card_data(candidate)
        base_model = hub_id(candidate) or hub_id(_first(card.base_model) if card is not None else None)
        if base_model or card is not None:
            return {"base_model": base_model, "license": card.license if card is not None else None}
    return {"base_model": None, "license": None}


def pipeline_tag(model: nn.Module, task: str | None = None) -> str | None:
    """The Hub pipeline tag of `model`'s class (`None` for a class without one); a seq2seq model takes `task` when it
    is `"summarization"` or `"translation"`."""
    return _refine_pipeline_tag(_PIPELINE_TAGS.get(auto_class_name(type(model))), task)


def _refine_pipeline_tag(tag: str | None, task: str | None) -> str | None:
    return task if tag == "text2text-generation" and task in _SEQ2SEQ_TASKS else tag


def last_eval_results(log_history: list[dict]) -> dict[str, float]:
    """The metrics of the last evaluation in a Trainer's `state.log_history` (`eval_` prefix and timings removed).

    Args:
        log_history (`list[dict]`): the Trainer's log entries, oldest first.

    Returns:
        `dict[str, float]`: e.g. `{"loss": 0.41, "accuracy": 0.87}`; empty when nothing was evaluated.
    """
    for entry in reversed(log_history or []):
        results = {
            key.removeprefix("eval_"): float(value)
            for key, value in entry.items()
            if key.startswith("eval_") and isinstance(value, numbers.Real) and not isinstance(value, bool)
        }
        results = {name: value for name, value in results.items() if name not in _NOT_METRICS}
        if results:
            return results
    return {}


def trained_steps(log_history: list[dict] | None) -> int | None:
    """The optimizer steps a Trainer run trained for, from its `state.log_history` (`None`: it did not train)."""
    steps = [entry.get("step", 0) for entry in log_history or [] if "loss" in entry or "train_loss" in entry]
    return max(steps) if steps and max(steps) > 0 else None


def run_card_data(log_history: list[dict] | None = None, hub_model_id: str | None = None, teacher=None,
                  **card_arguments) -> dict:
    """The `card_data` of a Trainer run: its last evaluation, its Hub id, what it trained (the stage it adds, see
    `hf_blockprune.compact.stages`) and the arguments of `create_model_card`.

    Args:
        log_history (`list[dict]`, *optional*): `trainer.state.log_history`.
        hub_model_id (`str`, *optional*): `args.hub_model_id`; its name becomes the model's name in `model-index`.
        teacher (`nn.Module` or `str`, *optional*): the distillation teacher (named by `public_name`).
        **card_arguments: arguments of `Trainer.create_model_card` (`language`, `license`, `tags`, `model_name`,
            `finetuned_from`, `tasks`, `dataset_tags`, `dataset`, `dataset_args`); `None` ones are ignored.

    Returns:
        `dict`: the card data (see `model_card.write_model_card`), holding only what is known.
    """
    given = {key: value for key, value in card_arguments.items() if value is not None}
    steps = trained_steps(log_history)
    training = {"steps": steps, "teacher": public_name(teacher)} if steps else {}
    data = {
        "eval_results": last_eval_results(log_history),
        "training": {key: value for key, value in training.items() if value},
        "model_name": given.get("model_name") or (hub_model_id or "").split("/")[-1],
        "base_model": given.get("finetuned_from"),
        "language": given.get("language"),
        "license": given.get("license"),
        "tags": as_list(given.get("tags")),
        "task": _first(given.get("tasks")),
        "datasets": as_list(given.get("dataset_tags") or given.get("dataset")),
        "dataset_name": _first(given.get("dataset")),
        "dataset_config": _first(given.get("dataset_args")),
    }
    return {key: value for key, value in data.items() if value}


def attach_card_data(model: nn.Module, card_data: dict) -> None:
    """Attach a Trainer run's `card_data` to `model`, for the card written the next time it is saved compacted.

    The Trainer saves through `model.save_pretrained`, which takes no card data: the trainer and the callback call
    this before a save can happen, and `model_card.write_model_card` reads it (explicit `card_data` takes precedence).
    """
    setattr(model, CARD_DATA_ATTRIBUTE, dict(card_data))


def as_list(value) -> list:
    """A card field as a list: `None` gives `[]`, a string `[string]`, any other iterable its items."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _first(value):
    return next(iter(as_list(value)), None)


def card_metadata(model: nn.Module, card_data: dict | None = None) -> ModelCardData:
    """The Hub metadata of a compacted `model`'s card: library, tags, base model, pipeline tag, license, and the run's
    datasets and results (see `model_card.write_model_card` for `card_data`)."""
    data = card_data or {}
    derived = base_model_metadata(model)
    metadata = ModelCardData(
        library_name="transformers",
        tags=TAGS,
        base_model=derived["base_model"],
        license=derived["license"],
        pipeline_tag=pipeline_tag(model),
    )
    apply_card_data(metadata, data, default_name=card_title(model))
    return metadata


def apply_card_data(metadata: ModelCardData, card_data: dict, default_name: str = "pruned model") -> ModelCardData:
    """Merge a run's `card_data` into card `metadata`, in place: given fields replace the old ones, tags are added.

    `model-index` gets one result per metric, only when the results, a dataset and a task are all known (the Hub
    rejects partial results).

    Args:
        metadata (`ModelCardData`): the card's metadata.
        card_data (`dict`): see `model_card.write_model_card`.
        default_name (`str`, *optional*, defaults to `"pruned model"`): the name in `model-index` if none is known.

    Returns:
        `ModelCardData`: `metadata`.
    """
    for key in ("license", "language"):
        if card_data.get(key):
            setattr(metadata, key, card_data[key])
    metadata.base_model = hub_id(card_data.get("base_model")) or metadata.base_model
    metadata.tags = list(dict.fromkeys(as_list(metadata.tags) + as_list(card_data.get("tags"))))
    metadata.pipeline_tag = _refine_pipeline_tag(metadata.pipeline_tag, card_data.get("task"))
    datasets = as_list(card_data.get("datasets"))
    if datasets:
        metadata.datasets = datasets
    datasets = as_list(metadata.datasets)
    task = card_data.get("task") or metadata.pipeline_tag
    results = card_data.get("eval_results") or {}
    if results and datasets and task:
        metadata.model_name = card_data.get("model_name") or metadata.model_name or default_name
        metadata.eval_results = [_eval_result(task, datasets[0], card_data, name, value)
                                 for name, value in results.items()]
    return metadata


def _eval_result(task: str, dataset: str, card_data: dict, metric: str, value: float) -> EvalResult:
    return EvalResult(
        task_type=task,
        dataset_type=dataset,
        dataset_name=card_data.get("dataset_name") or dataset,
        dataset_config=card_data.get("dataset_config"),
        dataset_split=card_data.get("dataset_split"),
        metric_type=metric,
        metric_value=value,
    )


def card_title(model: nn.Module) -> str:
    """The card's title of a compacted `model` (its class name without `BlockPruned`), also its default name in
    `model-index`."""
    return f"{type(model).__name__.removeprefix('BlockPruned')} pruned with hf_blockprune"
