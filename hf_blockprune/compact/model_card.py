"""The model card (README.md) and per-layer figure written next to a compacted model."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..pruning.model import LAYOUT_ATTRIBUTE, PRUNING_CONFIG_KEY
from ..pruning.report import parameter_counts
from ..structure.modeling_blockprune import auto_class_name, base_model_type

CARD_MARKER = "<!-- hf_blockprune model card -->"
FIGURE_NAME = "pruning_layout.png"


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
    """A per-layer picture: kept heads as filled cells (one row per attention block), FFN kept fraction as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['layer']}[{i}]" for row in rows for i in range(len(row["heads"]))]
    grid = [[1.0 if h in heads else 0.0 for h in range(num_heads)] for row in rows for heads in row["heads"]]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 0.35 * max(len(labels), 4) + 1.2),
                                         gridspec_kw={"width_ratios": [3, 2]})
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
    plt.close(figure)


def _card_text(model: nn.Module, rows: list[dict], num_heads: int, ffn_total: int | None) -> str:
    config = model.config
    layout = getattr(config, LAYOUT_ATTRIBUTE)
    method = getattr(config, PRUNING_CONFIG_KEY, None)
    before = layout.get("dense_parameters", {})
    after = parameter_counts(model)
    base_model = getattr(config, "_name_or_path", "") or "unknown"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [hf_blockprune, block-pruning, pruning]",
        "---",
        CARD_MARKER,
        f"# {type(model).__name__.removeprefix('BlockPruned')} pruned with hf_blockprune",
        "",
        f"- **Base model:** `{base_model}`",
        f"- **Task:** `{auto_class_name(type(model))}` ({base_model_type(config.model_type)})",
        "- **Method:** block movement pruning (Lagunas et al., 2021), pruned heads and FFN neurons removed.",
        "",
        "| parameters | before | after |",
        "|---|---|---|",
        f"| prunable linear weights | {before.get('prunable_linear', 'n/a')} | {after['prunable_linear']} |",
        f"| total | {before.get('total', 'n/a')} | {after['total']} |",
        "",
        "## Kept structure",
        "",
        f"| layer | heads kept (of {num_heads} per attention block) | FFN size (of {ffn_total}) |",
        "|---|---|---|",
    ]
    for row in rows:
        ffn = row["ffn_size"] if row["ffn_size"] is not None else "-"
        lines.append(f"| `{row['layer']}` | {heads_cell(row)} | {ffn} |")
    if any(any(row.get("placeholders", ())) for row in rows):
        lines += ["", "A *zero placeholder* is one all-zero head slot that a decoder self-attention which lost every "
                  "head keeps, so that generation's KV cache has a length; it adds nothing to the output."]
    if any(any(row.get("zero_slots", ())) and not any(row.get("placeholders", ())) for row in rows):
        lines += ["", "*Zero query slots* pad the query groups of a grouped-query attention to one size (each kept "
                  "key/value head serves as many query slots); they add nothing to the output."]
    lines += ["", f"![kept heads and FFN neurons per layer]({FIGURE_NAME})", "", "## Pruning hyperparameters", ""]
    lines += ["```json", json.dumps(method, indent=2) if method else "not recorded", "```", ""]
    lines += [
        "## Loading",
        "",
        "```python",
        "import hf_blockprune",
        "model = hf_blockprune.from_pretrained(PATH)",
        "# or, with plain transformers:",
        f"from transformers import {auto_class_name(type(model))}",
        f"model = {auto_class_name(type(model))}.from_pretrained(PATH, trust_remote_code=True)",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(save_directory: str | Path, model: nn.Module) -> Path:
    """Write `README.md` and `pruning_layout.png` for a compacted `model` into `save_directory`.

    The card gives the base model, the task, the method and its hyperparameters, the parameters before and after
    (prunable Linear weights and total), the kept heads and FFN size of each layer, and the per-layer figure.
    """
    save_directory = Path(save_directory)
    rows = layer_rows(model)
    num_heads, ffn_total = original_sizes(model)
    num_heads = num_heads or max((max(h, default=-1) + 1 for row in rows for h in row["heads"]), default=1)
    write_figure(save_directory / FIGURE_NAME, rows, num_heads, ffn_total)
    card = save_directory / "README.md"
    card.write_text(_card_text(model, rows, num_heads, ffn_total))
    return card
