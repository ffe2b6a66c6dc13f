"""What a compacted model keeps, per layer, read from its structure: the rows of the card's table and its figure.

`layer_rows` reads, per prunable layer, the original heads each attention block kept and the FFN
size; `heads_cell` writes a row's heads as the card's table shows them, and `write_figure` draws the rows as the
`pruning_layout.png` saved beside the card. `original_sizes` gives the dense head count and FFN size they are measured
against. The model card and the `hf-blockprune` command both read them.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..structure.discovery import structure_of


def layer_rows(model: nn.Module) -> list[dict]:
    """Per prunable layer of a compacted model (`structure_of(model)`): kept heads per attention block and the FFN
    size.

    Each row has `layer`, `heads` (kept original query heads per attention block of the layer's stack, `[]` for one
    removed at compaction), `removed` (whether each block was removed), `placeholders` (whether the block keeps only a
    zero placeholder head), `kv_heads` (kept original key/value heads of a grouped-query attention, else `None`),
    `zero_slots` (zero query slots that pad the query groups, or the placeholder), `ffn_size` (0 for a removed FFN)
    and `ffn_removed`.
    """
    structure = structure_of(model)
    rows = []
    for layer, bound in zip(structure.layers, structure.bind(model), strict=True):
        present = {attention.spec.query: attention for attention in layer.attentions}
        attentions = [present.get(spec.query) for spec in layer.stack.attentions]  # None: removed
        heads = [[head for head in (attention.slots if attention else ()) if head is not None]
                 for attention in attentions]
        rows.append({
            "layer": layer.name,
            "heads": heads,
            "removed": [attention is None for attention in attentions],
            "placeholders": [bool(attention and attention.slots) and not kept
                             for attention, kept in zip(attentions, heads)],
            "kv_heads": [[head for head in attention.kv_slots if head is not None]
                         if attention and attention.spec.grouped else None for attention in attentions],
            "zero_slots": [attention.slots.count(None) if attention else 0 for attention in attentions],
            "ffn_size": bound.ffn_input.out_features if bound.has_ffn else (0 if layer.ffn_removed else None),
            "ffn_removed": layer.ffn_removed,
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
        if (row.get("removed") or [False] * len(row["heads"]))[index]:
            cell += " (removed)"
        elif row.get("placeholders", [False] * len(row["heads"]))[index]:
            cell += " + zero placeholder"
        elif (row.get("zero_slots") or [0] * len(row["heads"]))[index]:
            cell += f" + {row['zero_slots'][index]} zero query slot(s)"
        cells.append(cell)
    return "; ".join(cells) or "-"


def ffn_cell(row: dict) -> str:
    """The card's "FFN size" cell of a `layer_rows` row: the kept neurons, "(removed)" for a removed FFN, "-" for a
    layer without FFN."""
    if row["ffn_size"] is None:
        return "-"
    return f"{row['ffn_size']} (removed)" if row.get("ffn_removed") else str(row["ffn_size"])


def original_sizes(model: nn.Module) -> tuple[int, int | None]:
    """The dense head count (of the first attention's spec) and FFN size of the model's config (before pruning)."""
    config = model.config
    attentions = [attention for layer in structure_of(model).layers for attention in layer.attentions]
    heads = getattr(config, attentions[0].spec.num_heads, None) if attentions else None
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
