"""Run the notebooks at full size and save them with their outputs, in place (needs `pip install -e ".[notebooks]"`).

    python notebooks/execute.py                       # every notebook in this folder
    python notebooks/execute.py quickstart.ipynb      # one

Each notebook runs in a fresh kernel whose working directory is a temporary folder; the committed outputs are the
ones this writes. The tests run the same code cells at a small size (`HF_BLOCKPRUNE_NOTEBOOK_QUICK=1`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def execute(path: Path, timeout: int) -> None:
    """Execute `path` in a fresh kernel and write it back with its outputs (only if every cell ran)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    os.environ.pop("HF_BLOCKPRUNE_NOTEBOOK_QUICK", None)
    with tempfile.TemporaryDirectory() as work:
        resources = {"metadata": {"path": work}}
        NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources=resources).execute()
    temporary = path.with_suffix(".ipynb.tmp")
    nbformat.write(notebook, temporary)
    os.replace(temporary, path)


def main() -> None:
    """Execute the notebooks given (default: all in this folder)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", help="notebook files (default: every *.ipynb here)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args()
    paths = [Path(p).resolve() if Path(p).exists() else HERE / p for p in args.notebooks]
    paths = paths or sorted(HERE.glob("*.ipynb"))
    for path in paths:
        start = time.perf_counter()
        execute(path, args.timeout)
        print(f"{path.name}: executed in {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
