"""Writing a benchmark's results: `<output>.json` (every figure) and `<output>.md` (the table), printed too."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(output: str | Path, results: dict, table: str) -> Path:
    """Print `table`, then write `results` to `<output>.json` and `table` to `<output>.md` (folders made as needed).

    Returns:
        `Path`: `output` as a path, for writing more files beside it.
    """
    print(table)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(results, indent=2))
    output.with_suffix(".md").write_text(table)
    print(f"written: {output.with_suffix('.json')}, {output.with_suffix('.md')}")
    return output
