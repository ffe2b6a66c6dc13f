"""The model card (README.md) written next to a compacted model: its body, and its update after a Trainer run.

The card is a `huggingface_hub.ModelCard`: its Hub metadata (see `card_metadata`) above a body that says what was done
to the model (each recorded stage, with its settings), its size before and after, the structure each layer kept (with
the figure of `card_figure`), the run's last evaluation and how to load it. `update_model_card` merges a later run's
metadata and results into a card hf_blockprune wrote (it carries `CARD_MARKER`) and leaves any other README.md alone.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from torch import nn

from ..pruning.report import parameter_counts
from ..structure.model_structure import LAYOUT_ATTRIBUTE
from ..structure.modeling_blockprune import auto_class_name, base_model_type
from .card_figure import ffn_cell, heads_cell, layer_rows, original_sizes, write_figure
from .card_metadata import (
    CARD_DATA_ATTRIBUTE,
    apply_card_data,
    as_list,
    card_metadata,
    card_title,
    public_stages,
)
from .depth import DROPPED_KEY
from .flops import model_flops
from .stages import MOVEMENT_PRUNING, ONE_SHOT, ROLES, TITLES, stage_summary

logger = logging.getLogger(__name__)

CARD_MARKER = "<!-- hf_blockprune model card -->"
FIGURE_NAME = "pruning_layout.png"
_RESULTS_BEGIN = "<!-- hf_blockprune evaluation results -->"
_RESULTS_END = "<!-- /hf_blockprune evaluation results -->"


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
    datasets = as_list(card_data.get("datasets"))
    where = f" on `{card_data.get('dataset_name') or datasets[0]}`" if datasets else ""
    lines += [f"The last evaluation of the run that saved it{where}:", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4g} |" if isinstance(value, numbers.Real) else f"| {name} | {value} |"
              for name, value in results.items()]
    return lines + [_RESULTS_END]


def _method_lines(stages: list[dict], hidden: dict | None = None) -> list[str]:
    """The card's method line: one stage in a line, several as a numbered list."""
    removed = "pruned heads, FFN neurons and hidden channels removed" if hidden else \
        "pruned heads and FFN neurons removed"
    if len(stages) <= 1:
        done = stage_summary(stages[0]) if stages else TITLES[MOVEMENT_PRUNING]
        return [f"- **Method:** {done}; {removed}."]
    lines = [f"- **Method:** in {len(stages)} stages, {removed}:"]
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


def _hidden_lines(hidden: dict | None) -> list[str]:
    if not hidden:
        return []
    return [f"Hidden size (the residual stream every layer reads and writes): **{hidden['size']} of "
            f"{hidden['original_size']}** channels kept. The embeddings, norms and every projection that reads or "
            "writes the stream are narrower; the model's hidden states (`output_hidden_states`) have "
            f"{hidden['size']} features.", ""]


def _depth_lines(dropped: dict | None) -> list[str]:
    if not dropped:
        return []
    lists = "; ".join(f"`{path}` {', '.join(map(str, indices))}" for path, indices in dropped.items())
    return [f"Dropped layers (original indices): {lists}. They had lost every head and neuron and added nothing; the "
            "config has fewer layers, and the layers below are numbered as the model has them now.", ""]


def _structure_lines(rows: list[dict], sizes: tuple[int, int | None], hidden: dict | None = None,
                     dropped: dict | None = None) -> list[str]:
    num_heads, ffn_total = sizes
    header = f"| layer | heads kept (of {num_heads} per attention block) | FFN size (of {ffn_total}) |"
    lines = ["## Kept structure", "", *_hidden_lines(hidden), *_depth_lines(dropped), header, "|---|---|---|"]
    for row in rows:
        lines.append(f"| `{row['layer']}` | {heads_cell(row)} | {ffn_cell(row)} |")
    if any(any(row.get("removed", ())) or row.get("ffn_removed") for row in rows):
        lines += ["", "A *removed* sublayer lost every head or neuron and is gone from the model: what it still added "
                  "(its output bias, the constant output of its pruned units) is added in its place."]
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
    hidden = getattr(model.config, LAYOUT_ATTRIBUTE).get("hidden")
    dropped = getattr(model.config, LAYOUT_ATTRIBUTE).get(DROPPED_KEY)
    lines = [
        CARD_MARKER,
        f"# {card_title(model)}",
        "",
        f"- **Base model:** {base_link}",
        f"- **Task:** `{auto_class_name(type(model))}` ({base_model_type(model.config.model_type)})",
        *_method_lines(stages, hidden),
        "",
        *_size_lines(model, stages),
        "",
        *_structure_lines(rows, sizes, hidden, dropped),
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
        section = "\n".join(_results_section({**card_data, "datasets": as_list(card.data.datasets)})[2:])
        pattern = re.compile(re.escape(_RESULTS_BEGIN) + r".*?" + re.escape(_RESULTS_END), re.DOTALL)
        card.text = pattern.sub(lambda _: section, card.text, count=1)
    temporary = path.with_name(f".{path.name}.blockprune-tmp")
    card.save(temporary)
    os.replace(temporary, path)
    logger.info("Kept the hf_blockprune model card of %s, with the run's metadata added.", save_directory)
    return True
