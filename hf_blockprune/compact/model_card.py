"""The model card (README.md) and per-layer figure written next to a compacted model.

The card is a `huggingface_hub.ModelCard`: Hub metadata (library, tags, base model, pipeline tag, license, datasets
and a `model-index` with the run's evaluation results) above a body that says what was pruned and how to load it.
Every metadata field is optional: a field nothing tells is left out. No local path is ever written: `base_model` is a
Hub id or left out, and a local teacher or latency table is named as such in the hyperparameters (see `public_name`).
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from torch import nn

from ..pruning.model import LAYOUT_ATTRIBUTE, PRUNING_CONFIG_KEY
from ..pruning.report import parameter_counts
from ..structure.modeling_blockprune import auto_class_name, base_model_type
from .flops import model_flops
from .stages import MOVEMENT_PRUNING, ONE_SHOT, ROLES, TITLES, recorded_stages, stage_summary

logger = logging.getLogger(__name__)

CARD_MARKER = "<!-- hf_blockprune model card -->"
FIGURE_NAME = "pruning_layout.png"
TAGS = ["hf_blockprune", "block-pruning", "pruning"]
# card data a Trainer attached to its model, read when the model is saved (see `attach_card_data`)
CARD_DATA_ATTRIBUTE = "_blockprune_card_data"
_RESULTS_BEGIN = "<!-- hf_blockprune evaluation results -->"
_RESULTS_END = "<!-- /hf_blockprune evaluation results -->"
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


def layer_rows(model: nn.Module) -> list[dict]:
    """Per layer of the layout: kept heads per attention block (of how many) and the FFN size (of how many).

    Each row has `layer`, `heads` (kept original query heads per attention block), `placeholders` (whether the block
    keeps only a zero placeholder head), `kv_heads` (kept original key/value heads of a grouped-query attention, else
    `None`), `zero_slots` (zero query slots that pad the query groups, or the placeholder) and `ffn_size`.
    """
    config = model.config
    rows = []
    for path, entry in getattr(config, LAYOUT_ATTRIBUTE)["layers"].items():
        records = entry.get("attention", [])
        rows.append({
            "layer": path,
            "heads": [record["heads"] for record in records],
            "placeholders": [bool(record.get("placeholder", False)) for record in records],
            "kv_heads": [
                [h for h in record["kv_heads"] if h is not None] if "kv_heads" in record else None
                for record in records
            ],
            "zero_slots": [
                sum(slot is None for slot in record["slots"]) if "slots" in record else int("placeholder" in record)
                for record in records
            ],
            "ffn_size": entry.get("ffn", {}).get("size"),
        })
    return rows


def heads_cell(row: dict) -> str:
    """The card's "heads kept" cell of a `layer_rows` row: per attention block, the count and the original indices
    (and the key/value heads of a grouped-query attention)."""
    cells = []
    for index, heads in enumerate(row["heads"]):
        cell = f"{len(heads)}: {heads}"
        kv_heads = (row.get("kv_heads") or [None] * len(row["heads"]))[index]
        if kv_heads is not None:
            cell += f", KV {len(kv_heads)}: {kv_heads}"
        if row.get("placeholders", [False] * len(row["heads"]))[index]:
            cell += " + zero placeholder"
        elif (row.get("zero_slots") or [0] * len(row["heads"]))[index]:
            cell += f" + {row['zero_slots'][index]} zero query slot(s)"
        cells.append(cell)
    return "; ".join(cells) or "-"


def original_sizes(model: nn.Module) -> tuple[int, int | None]:
    """The dense head count and FFN size of the model's config (before pruning)."""
    config = model.config
    heads = getattr(config, "num_attention_heads", None)
    ffn = next((getattr(config, name) for name in ("intermediate_size", "hidden_dim", "encoder_ffn_dim")
                if isinstance(getattr(config, name, None), int)), None)
    return heads, ffn


def write_figure(path: Path, rows: list[dict], num_heads: int, ffn_total: int | None) -> None:
    """A per-layer picture: kept heads as filled cells (one row per attention block), FFN kept fraction as a bar.

    Drawn on a standalone `Figure` (not `pyplot`), so the user's matplotlib backend and open figures are left alone:
    a save inside a notebook does not switch its inline plots off.
    """
    from matplotlib.figure import Figure

    labels = [f"{row['layer']}[{i}]" for row in rows for i in range(len(row["heads"]))]
    grid = [[1.0 if h in heads else 0.0 for h in range(num_heads)] for row in rows for heads in row["heads"]]
    figure = Figure(figsize=(10, 0.35 * max(len(labels), 4) + 1.2))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    left.imshow(grid or [[0.0]], cmap="Greens", vmin=0, vmax=1, aspect="auto")
    left.set_yticks(range(len(labels)), labels, fontsize=7)
    left.set_xlabel("head")
    left.set_title("attention heads kept")
    ffn_rows = [row for row in rows if row["ffn_size"] is not None]
    fractions = [row["ffn_size"] / ffn_total if ffn_total else 0.0 for row in ffn_rows]
    right.barh(range(len(ffn_rows)), fractions, color="tab:green")
    right.set_yticks(range(len(ffn_rows)), [row["layer"] for row in ffn_rows], fontsize=7)
    right.invert_yaxis()
    right.set_xlim(0, 1)
    right.set_title("FFN neurons kept (fraction)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


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
        `dict`: the card data (see `write_model_card`), holding only what is known.
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
        "tags": _listify(given.get("tags")),
        "task": _first(given.get("tasks")),
        "datasets": _listify(given.get("dataset_tags") or given.get("dataset")),
        "dataset_name": _first(given.get("dataset")),
        "dataset_config": _first(given.get("dataset_args")),
    }
    return {key: value for key, value in data.items() if value}


def attach_card_data(model: nn.Module, card_data: dict) -> None:
    """Attach a Trainer run's `card_data` to `model`, for the card written the next time it is saved compacted.

    The Trainer saves through `model.save_pretrained`, which takes no card data: the trainer and the callback call
    this before a save can happen, and `write_model_card` reads it (explicit `card_data` takes precedence).
    """
    setattr(model, CARD_DATA_ATTRIBUTE, dict(card_data))


def _listify(value) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _first(value):
    return next(iter(_listify(value)), None)


def card_metadata(model: nn.Module, card_data: dict | None = None) -> ModelCardData:
    """The Hub metadata of a compacted `model`'s card: library, tags, base model, pipeline tag, license, and the run's
    datasets and results (see `write_model_card` for `card_data`)."""
    data = card_data or {}
    derived = base_model_metadata(model)
    metadata = ModelCardData(
        library_name="transformers",
        tags=TAGS,
        base_model=derived["base_model"],
        license=derived["license"],
        pipeline_tag=pipeline_tag(model),
    )
    apply_card_data(metadata, data, default_name=_title(model))
    return metadata


def apply_card_data(metadata: ModelCardData, card_data: dict, default_name: str = "pruned model") -> ModelCardData:
    """Merge a run's `card_data` into card `metadata`, in place: given fields replace the old ones, tags are added.

    `model-index` gets one result per metric, only when the results, a dataset and a task are all known (the Hub
    rejects partial results).

    Args:
        metadata (`ModelCardData`): the card's metadata.
        card_data (`dict`): see `write_model_card`.
        default_name (`str`, *optional*, defaults to `"pruned model"`): the name in `model-index` if none is known.

    Returns:
        `ModelCardData`: `metadata`.
    """
    for key in ("license", "language"):
        if card_data.get(key):
            setattr(metadata, key, card_data[key])
    metadata.base_model = hub_id(card_data.get("base_model")) or metadata.base_model
    metadata.tags = list(dict.fromkeys(_listify(metadata.tags) + _listify(card_data.get("tags"))))
    metadata.pipeline_tag = _refine_pipeline_tag(metadata.pipeline_tag, card_data.get("task"))
    datasets = _listify(card_data.get("datasets"))
    if datasets:
        metadata.datasets = datasets
    datasets = _listify(metadata.datasets)
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


def _title(model: nn.Module) -> str:
    return f"{type(model).__name__.removeprefix('BlockPruned')} pruned with hf_blockprune"


def _results_section(card_data: dict, stages: list[dict] | None = None) -> list[str]:
    """The body's evaluation section: which stage its results belong to (the last), then the results between markers
    so that `update_model_card` can replace them."""
    results = card_data.get("eval_results") or {}
    lines = ["## Evaluation", ""]
    if stages:
        role = ROLES.get(stages[-1].get("method"), "the last stage")
        after = f"stage {len(stages)} ({role})" if len(stages) > 1 else role
        lines += [f"Results of the model as saved here, after {after}.", ""]
    lines += [_RESULTS_BEGIN]
    if not results:
        return lines + ["No evaluation was recorded with this model.", _RESULTS_END]
    datasets = _listify(card_data.get("datasets"))
    where = f" on `{card_data.get('dataset_name') or datasets[0]}`" if datasets else ""
    lines += [f"The last evaluation of the run that saved it{where}:", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4g} |" if isinstance(value, numbers.Real) else f"| {name} | {value} |"
              for name, value in results.items()]
    return lines + [_RESULTS_END]


def _method_lines(stages: list[dict]) -> list[str]:
    """The card's method line: one stage in a line, several as a numbered list."""
    if len(stages) <= 1:
        done = stage_summary(stages[0]) if stages else TITLES[MOVEMENT_PRUNING]
        return [f"- **Method:** {done}; pruned heads and FFN neurons removed."]
    lines = [f"- **Method:** in {len(stages)} stages, pruned heads and FFN neurons removed:"]
    return lines + [f"  {index}. {stage_summary(stage)}" for index, stage in enumerate(stages, 1)]


def _size_lines(model: nn.Module, stages: list[dict]) -> list[str]:
    """Parameters (and FLOPs, when the first stage measured the dense model's) before and after pruning."""
    before = getattr(model.config, LAYOUT_ATTRIBUTE).get("dense_parameters", {})
    after = parameter_counts(model)
    lines = [
        "| size | before | after |",
        "|---|---|---|",
        f"| prunable linear weights | {before.get('prunable_linear', 'n/a')} | {after['prunable_linear']} |",
        f"| total parameters | {before.get('total', 'n/a')} | {after['total']} |",
    ]
    flops = stages[0].get("flops") if stages else None
    if flops:  # the model as it is now: a later stage may have pruned it further
        length = flops["sequence_length"]
        lines.append(f"| FLOPs per sequence of {length} tokens | {flops['before']:,} | "
                     f"{model_flops(model, length).total:,} |")
    return lines


def _structure_lines(rows: list[dict], sizes: tuple[int, int | None]) -> list[str]:
    num_heads, ffn_total = sizes
    lines = ["## Kept structure", "", f"| layer | heads kept (of {num_heads} per attention block) | FFN size (of "
             f"{ffn_total}) |", "|---|---|---|"]
    for row in rows:
        ffn = row["ffn_size"] if row["ffn_size"] is not None else "-"
        lines.append(f"| `{row['layer']}` | {heads_cell(row)} | {ffn} |")
    if any(any(row.get("placeholders", ())) for row in rows):
        lines += ["", "A *zero placeholder* is one all-zero head slot that a decoder self-attention which lost every "
                  "head keeps, so that generation's KV cache has a length; it adds nothing to the output."]
    if any(any(row.get("zero_slots", ())) and not any(row.get("placeholders", ())) for row in rows):
        lines += ["", "*Zero query slots* pad the query groups of a grouped-query attention to one size (each kept "
                  "key/value head serves as many query slots); they add nothing to the output."]
    return lines


def _stage_json(stage: dict) -> list[str]:
    """A stage's settings, and what else it records (result, FLOPs, teacher, steps), as a JSON block."""
    shown = {**(stage.get("settings") or {}), **{key: value for key, value in stage.items()
                                                   if key not in ("method", "settings")}}
    return ["```json", json.dumps(shown, indent=2) if shown else "not recorded", "```"]


def _stages_section(stages: list[dict]) -> list[str]:
    """One stage: its hyperparameters; several: each stage under its own heading, oldest first."""
    if len(stages) <= 1:
        heading = "## One-shot pruning settings" if stages and stages[0].get("method") == ONE_SHOT \
            else "## Pruning hyperparameters"
        return [heading, ""] + (_stage_json(stages[0]) if stages else ["```json", "not recorded", "```"])
    lines = ["## Stages"]
    for index, stage in enumerate(stages, 1):
        lines += ["", f"### Stage {index}: {ROLES.get(stage.get('method'), 'stage')}", "",
                  f"{_capitalized(stage_summary(stage))}.", ""] + _stage_json(stage)
    return lines


def _capitalized(text: str) -> str:
    return text[:1].upper() + text[1:]


def _loading_lines(model: nn.Module) -> list[str]:
    auto = auto_class_name(type(model))
    return ["## Loading", "", "```python", "import hf_blockprune", "model = hf_blockprune.from_pretrained(PATH)",
            "# or, with plain transformers:", f"from transformers import {auto}",
            f"model = {auto}.from_pretrained(PATH, trust_remote_code=True)",
            "# its tokenizer, if saved with it: AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
            "# (transformers reads config.json first: without the flag it asks [y/N] to run the loader, then warns)",
            "```"]


def _card_body(model: nn.Module, rows: list[dict], sizes: tuple[int, int | None], metadata: ModelCardData,
               card_data: dict) -> str:
    base_model = metadata.base_model
    base_link = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "not recorded"
    stages = public_stages(model.config)
    lines = [
        CARD_MARKER,
        f"# {_title(model)}",
        "",
        f"- **Base model:** {base_link}",
        f"- **Task:** `{auto_class_name(type(model))}` ({base_model_type(model.config.model_type)})",
        *_method_lines(stages),
        "",
        *_size_lines(model, stages),
        "",
        *_structure_lines(rows, sizes),
        "",
        f"![kept heads and FFN neurons per layer]({FIGURE_NAME})",
        "",
        *_results_section(card_data, stages),
        "",
        *_stages_section(stages),
        "",
        *_loading_lines(model),
        "",
    ]
    return "\n".join(lines)


def write_model_card(save_directory: str | Path, model: nn.Module, *, card_data: dict | None = None) -> Path:
    """Write `README.md` and `pruning_layout.png` for a compacted `model` into `save_directory`.

    The card (a `huggingface_hub.ModelCard`) gives the base model, the task, what was done to the model (each stage
    `config.blockprune_stages` records, with its settings; see `hf_blockprune.compact.stages`), the parameters before
    and after (prunable Linear weights and total; FLOPs when the first stage measured the dense model's), the kept
    heads and FFN size of each layer, the per-layer figure and the run's last evaluation, with the stage it follows.
    Its metadata: `library_name`, `tags`, and when known `base_model` (a Hub id, never a local path), `pipeline_tag`,
    `license` (from the base model's card, if it is on this machine), `datasets` and `model-index`.

    Args:
        save_directory (`str` or `Path`): the folder to write into.
        model (`nn.Module`): the compacted model.
        card_data (`dict`, *optional*): what the run knows, every key optional (`run_card_data` builds it from a
            Trainer; data attached with `attach_card_data` is used under it):
            `eval_results` (`dict[str, float]`, metric name -> value), `datasets` (Hub dataset ids), `dataset_name`,
            `dataset_config` and `dataset_split` (of the evaluation set), `task` (task id of the results, defaults
            to the pipeline tag), `model_name` (its name in `model-index`), `tags` (more tags), `training` (`steps`
            and `teacher` of the run, which `save_compacted` records as a stage), and `base_model`, `license`,
            `language` (replace what is derived from the model).

    Returns:
        `Path`: the card's path.
    """
    save_directory = Path(save_directory)
    card_data = {**getattr(model, CARD_DATA_ATTRIBUTE, {}), **(card_data or {})}
    rows = layer_rows(model)
    num_heads, ffn_total = original_sizes(model)
    num_heads = num_heads or max((max(h, default=-1) + 1 for row in rows for h in row["heads"]), default=1)
    write_figure(save_directory / FIGURE_NAME, rows, num_heads, ffn_total)
    metadata = card_metadata(model, card_data)
    body = _card_body(model, rows, (num_heads, ffn_total), metadata, card_data)
    path = save_directory / "README.md"
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}").save(path)
    return path


def is_pruning_card(path: str | Path) -> bool:
    """Whether the file `path` is a model card hf_blockprune wrote (it carries `CARD_MARKER`)."""
    try:
        return CARD_MARKER in Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


def update_model_card(save_directory: str | Path, card_data: dict) -> bool:
    """Merge a run's `card_data` into the hf_blockprune card of `save_directory`, if its README.md is one.

    The metadata gets the given fields (see `apply_card_data`) and the body's evaluation section the new results;
    the rest of the card is kept. The file is replaced in one `os.replace`.

    Args:
        save_directory (`str` or `Path`): a folder a compacted model was saved into.
        card_data (`dict`): see `write_model_card`.

    Returns:
        `bool`: whether the folder holds an hf_blockprune card (updated); `False` leaves the folder untouched.
    """
    path = Path(save_directory) / "README.md"
    if not path.is_file() or not is_pruning_card(path):
        return False
    card = ModelCard.load(path, ignore_metadata_errors=True)
    heading = re.search(r"^# (.+)$", card.text, re.MULTILINE)
    apply_card_data(card.data, card_data, default_name=heading.group(1).strip() if heading else "pruned model")
    if card_data.get("eval_results"):
        section = "\n".join(_results_section({**card_data, "datasets": _listify(card.data.datasets)})[2:])
        pattern = re.compile(re.escape(_RESULTS_BEGIN) + r".*?" + re.escape(_RESULTS_END), re.DOTALL)
        card.text = pattern.sub(lambda _: section, card.text, count=1)
    temporary = path.with_name(f".{path.name}.blockprune-tmp")
    card.save(temporary)
    os.replace(temporary, path)
    logger.info("Kept the hf_blockprune model card of %s, with the run's metadata added.", save_directory)
    return True
