"""All-or-nothing saves into a folder that may hold other things (a Trainer's `output_dir`).

A save stages its files in a hidden folder inside the target, commits by writing one marker file, then moves the files
in with `config.json` removed first and moved last; `recover_interrupted_save` finishes a committed save or drops an
uncommitted one. See `atomic_directory` for the states a killed save can leave.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from .model_card import CARD_MARKER

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so a save in progress in another process is not detected
    fcntl = None

logger = logging.getLogger(__name__)

logger = logging.getLogger(__name__)

# A save stages its files in `<target>/.blockprune-staging-<random>/` and commits by writing the marker.
STAGING_PREFIX = ".blockprune-staging-"
MARKER_NAME = ".blockprune-save.json"
_MARKER_DRAFT = ".marker.json"  # written inside the staging folder, then moved onto MARKER_NAME
# Older versions staged in `tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent)`, holding only files.
_OLD_STAGING_RANDOM = r"[a-z0-9_]{8}"
_OLD_STAGING_SUFFIXES = {".json", ".safetensors", ".py", ".md", ".png", ".txt", ".model", ".jinja", ".bin"}


@contextlib.contextmanager
def atomic_directory(save_directory: str | os.PathLike):
    """Yield a hidden staging folder inside `save_directory`; on success move its files in, on failure drop it.

    Every state a killed save can leave is the old model or the new one, or a folder without `config.json` that fails
    to load (it never mixes the two):

    1) what an interrupted earlier save left is finished or dropped (`recover_interrupted_save`);
    2) the caller writes the new files into the staging folder, which are then flushed to disk;
    3) a marker (`.blockprune-save.json`) naming the staging folder and its files is written in one `os.replace`:
       the save is committed, and from here on `recover_interrupted_save` finishes it;
    4) the old `config.json` is removed, every other new file replaces its old version, the old model's files that
       would describe another model (see `stale_files`) are removed, and `config.json` comes last;
    5) the marker, then the staging folder, are removed.

    Other entries of `save_directory` (checkpoints, logs, the user's own files) are left alone.

    Args:
        save_directory (`str` or `os.PathLike`): the folder to save into; created if missing.
    """
    target = Path(save_directory)
    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    recover_interrupted_save(target)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
    committed = False
    try:
        with _exclusive_lock(staging) as locked:
            if not locked:
                raise RuntimeError(f"Another process took the staging folder {staging}: save again.")
            yield staging
            marker = _commit(target, staging)
            committed = True
            _move_into_place(target, staging, marker["files"], marker["stale"])
            _finish(target, staging)
    finally:
        if not committed:
            shutil.rmtree(staging, ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):
                    target.rmdir()


def recover_interrupted_save(path: str | os.PathLike) -> bool:
    """Finish or discard what an interrupted `save_compacted` or `export_dense` left in the folder `path`.

    A save is committed once its marker (`.blockprune-save.json`) exists: its staging folder then holds the complete
    new model, whose remaining files are moved in now (roll forward; a file already moved is simply absent from the
    staging folder). Staging folders without a marker belong to saves killed before their commit: they are incomplete
    and deleted (the folder still holds the model saved before them), as are the staging folders that older versions
    of hf_blockprune left next to `path`. Staging folders that a save still running in another process holds are left
    alone (on systems with `fcntl`). Saves and `from_pretrained` call this first.

    Args:
        path (`str` or `os.PathLike`): a folder a model was saved into; anything else is ignored.

    Returns:
        `bool`: whether an interrupted save was completed.

    Raises:
        `ValueError`: the marker is not one that hf_blockprune wrote.
    """
    target = Path(path)
    if not target.is_dir():
        return False
    completed = _finish_committed_save(target)
    _drop_abandoned_staging(target)
    _drop_old_style_staging(target)
    return completed


def _finish_committed_save(target: Path) -> bool:
    marker = _read_marker(target)
    if marker is None:
        return False
    staging = target / marker["staging"]
    with _exclusive_lock(staging) as locked:
        if not locked:
            logger.warning("A save into %s is still running in another process: leaving it to finish.", target)
            return False
        if _read_marker(target) != marker:  # its own process finished it meanwhile
            return False
        if not staging.is_dir():
            logger.warning("The staging folder %s of a committed save is missing: %s may be incomplete.",
                           staging, target)
        _move_into_place(target, staging, marker["files"], marker.get("stale", []))
        _finish(target, staging)
    logger.warning("Completed an interrupted save into %s: it now holds the model that save was writing.", target)
    return True


def _drop_abandoned_staging(target: Path) -> None:
    marker = _read_marker(target)  # still there only if its save is running elsewhere
    for staging in target.iterdir():
        if not staging.name.startswith(STAGING_PREFIX) or staging.is_symlink() or not staging.is_dir():
            continue
        if marker is not None and staging.name == marker["staging"]:
            continue
        with _exclusive_lock(staging) as locked:
            if locked:
                shutil.rmtree(staging, ignore_errors=True)
            if locked and not staging.exists():
                logger.warning("Removed %s, left by a save interrupted before it completed: %s holds the model "
                               "saved before it.", staging, target)


def _drop_old_style_staging(target: Path) -> None:
    if target.name in ("", ".", ".."):
        return
    pattern = re.compile(re.escape(f".{target.name}.") + _OLD_STAGING_RANDOM)
    with contextlib.suppress(OSError):
        for candidate in target.parent.iterdir():
            if pattern.fullmatch(candidate.name) and _looks_like_old_staging(candidate):
                shutil.rmtree(candidate, ignore_errors=True)
                logger.warning("Removed %s, left by an interrupted save of an older hf_blockprune.", candidate)


def _looks_like_old_staging(folder: Path) -> bool:
    """A real folder holding only files a save writes (weights, configs, code, card, tokenizer)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    with os.scandir(folder) as entries:
        return all(
            entry.is_file(follow_symlinks=False) and Path(entry.name).suffix in _OLD_STAGING_SUFFIXES
            for entry in entries
        )


# Weight files: a new save's weights replace every old weight file (sharded over single-file, or fewer shards).
_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")
# Files only hf_blockprune writes next to a compacted model (the model card is recognised by its marker).
_OWN_FILES = ("modeling_blockprune.py", "pruning_layout.png")


def stale_files(target: Path, new_files: list[str]) -> list[str]:
    """Files of the model saved before in `target` that the new save does not replace and that would describe or load
    another model: old weight files (shards, index), and hf_blockprune's loader, figure and model card."""
    stale = []
    for entry in sorted(target.iterdir()) if target.is_dir() else []:
        name = entry.name
        if name in new_files or not entry.is_file() or entry.is_symlink():
            continue
        ours = name in _OWN_FILES or (name == "README.md" and CARD_MARKER in _read_text(entry))
        if ours or _WEIGHT_FILE.fullmatch(name):
            stale.append(name)
    return stale


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _commit(target: Path, staging: Path) -> dict:
    """Flush the staged files, then write the marker that names them (and the stale files) in one `os.replace`."""
    files = sorted(path.relative_to(staging).as_posix() for path in staging.rglob("*") if path.is_file())
    for name in files:
        _fsync(staging / name)
    for folder in {(staging / name).parent for name in files}:
        _fsync(folder)
    if (target / MARKER_NAME).exists():  # committed by a save still running in another process
        raise RuntimeError(f"Another save into {target} is in progress: not mixing this one into it.")
    draft = staging / _MARKER_DRAFT
    marker = {"staging": staging.name, "files": files, "stale": stale_files(target, files)}
    draft.write_text(json.dumps(marker))
    _fsync(draft)
    os.replace(draft, target / MARKER_NAME)
    _fsync(target)
    return marker


def _move_into_place(target: Path, staging: Path, files: list[str], stale: list[str]) -> None:
    """Move the staged `files` into `target` and remove the `stale` ones, `config.json` last; safe to run again after
    an interruption."""
    if (staging / "config.json").exists():  # removed first: without config.json no loader can mix old and new
        _remove_if_present(target / "config.json")
    last = [name for name in files if name == "config.json"]
    for name in [name for name in files if name != "config.json"]:
        _move_one(staging / name, target / name)
    for name in stale:
        _remove_if_present(target / name)
    for name in last:
        _move_one(staging / name, target / name)
    _fsync(target)


def _move_one(source: Path, destination: Path) -> None:
    if not source.exists():  # moved by an earlier, interrupted attempt
        return
    if not destination.parent.is_dir():
        destination.parent.mkdir(parents=True)
    os.replace(source, destination)


def _finish(target: Path, staging: Path) -> None:
    _remove_if_present(target / MARKER_NAME)
    shutil.rmtree(staging, ignore_errors=True)


def _read_marker(target: Path) -> dict | None:
    """The marker of a committed save in `target`, or `None`; `ValueError` if it is not one hf_blockprune wrote."""
    path = target / MARKER_NAME
    try:
        marker = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        marker = None
    if not _is_valid_marker(marker):
        raise ValueError(f"{path} is not a save marker written by hf_blockprune: inspect the folder and remove it.")
    return marker


def _is_valid_marker(marker) -> bool:
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        return False
    staging = marker.get("staging")
    if not isinstance(staging, str) or not staging.startswith(STAGING_PREFIX) or not _is_relative_file(staging):
        return False
    names = marker["files"] + marker.get("stale", [])
    return all(isinstance(name, str) and _is_relative_file(name) for name in names)


def _is_relative_file(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and "\\" not in name and not path.is_absolute() and ".." not in path.parts


def _remove_if_present(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (POSIX only), to disk."""
    is_dir = path.is_dir()
    if is_dir and os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY if is_dir else os.O_RDWR)  # Windows flushes only writable files
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def _exclusive_lock(directory: Path):
    """Yield whether this process now holds `directory`'s advisory lock (a running save holds its staging folder's).

    The lock dies with its process, so a killed save never blocks recovery. A missing folder, or a system without
    `fcntl`, counts as locked.
    """
    if fcntl is None:
        yield True
        return
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except FileNotFoundError:
        yield True
        return
    try:
        yield _try_lock(descriptor)
    finally:
        os.close(descriptor)


def _try_lock(descriptor: int) -> bool:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
