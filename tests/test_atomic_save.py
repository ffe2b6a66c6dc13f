"""A save killed at any file operation leaves the old model or the new one, never a mix; recovery cleans up."""

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import hf_blockprune
from hf_blockprune.compact.atomic import MARKER_NAME, STAGING_PREFIX, recover_interrupted_save
from hf_blockprune.compact.card_figure import ffn_cell, heads_cell, layer_rows
from hf_blockprune.compact.saving import export_dense, save_compacted

from helpers import biased_model, model_inputs, random_masks

try:
    import fcntl
except ImportError:
    fcntl = None

TESTS_DIR = Path(__file__).parent
KILLED, FAILED = 1, 2  # exit codes of the forked children
# The calls at which a save or a recovery changes the folder: each is a place where a kill can land.
BOUNDARIES = ("replace", "rename", "remove", "unlink", "rmdir", "mkdir")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill test forks")


def model_a():
    """The old model: the first layer lost every head, the last every FFN neuron."""
    return random_masks(biased_model("bert", 0), "struct", "topk", 0, force_empty=True)


def model_b():
    """The new model: other weights and other masks, hence another layout."""
    return random_masks(biased_model("bert", 1), "struct", "topk", 1, force_empty=False)


def _with_trainer_files(folder: Path) -> Path:
    """Add what a Trainer `output_dir` holds besides the model, which a save must never touch."""
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"checkpoint weights")
    (folder / "checkpoint-5" / "config.json").write_text('{"checkpoint": true}')
    (folder / "trainer_state.json").write_text('{"global_step": 5}')
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (hidden ones included), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _outputs(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**model_inputs("bert")).logits


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Models A and B saved in clean folders: their files, layouts and outputs."""
    root = tmp_path_factory.mktemp("references")
    refs = {}
    for name, build in (("A", model_a), ("B", model_b)):
        save_compacted(build(), root / name)
        loaded = hf_blockprune.from_pretrained(root / name)
        refs[name] = {"files": _snapshot(root / name), "layout": loaded.config.blockprune_layout,
                      "outputs": _outputs(loaded)}
    assert refs["A"]["layout"] != refs["B"]["layout"]
    return refs


def _which(model, references) -> str:
    """"A" or "B": the reference whose layout `model` has, checked on its outputs; fails for anything else."""
    layout = getattr(model.config, "blockprune_layout", None)
    name = next((name for name, ref in references.items() if ref["layout"] == layout), None)
    assert name is not None, f"the loaded model has neither A's nor B's layout: {layout}"
    torch.testing.assert_close(_outputs(model), references[name]["outputs"])
    return name


def _plain_load(folder: Path, references) -> str:
    """What plain transformers sees: "A", "B", or "no config.json" (it then fails loudly).

    Any other failure is a mix of the two models that transformers happened to catch (a shape mismatch): an error.
    """
    if not (folder / "config.json").exists():
        with pytest.raises((OSError, ValueError), match="config.json"):
            AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
        return "no config.json"
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    _card_matches(folder, model)
    return _which(model, references)


def _card_matches(folder: Path, model) -> None:
    card = (folder / "README.md").read_text()
    for row in layer_rows(model):
        assert f"| `{row['layer']}` | {heads_cell(row)} | {ffn_cell(row)} |" in card


def _check_folder(folder: Path, references, extras: dict[str, bytes]) -> tuple[str, str]:
    """Check a folder a kill left: (what plain transformers loads, what hf_blockprune loads after recovery)."""
    plain = _plain_load(folder, references)
    model = hf_blockprune.from_pretrained(folder)
    loaded = _which(model, references)
    assert plain in ("no config.json", loaded) or (plain, loaded) == ("A", "B"), (plain, loaded)
    _card_matches(folder, model)
    files = _snapshot(folder)
    assert {k: v for k, v in files.items() if k in extras} == extras  # checkpoint-5/, trainer_state.json
    assert {k: v for k, v in files.items() if k not in extras} == references[loaded]["files"]
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no marker, no staging folder
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    return plain, loaded


_WORKER = textwrap.dedent("""
    import json, os, shutil, sys, traceback
    spec = json.loads(open(sys.argv[1]).read())
    sys.path.insert(0, spec["tests_dir"])
    import torch
    torch.set_num_threads(1)  # no worker threads in this process: its forked children stay safe
    from hf_blockprune.compact.atomic import MARKER_NAME, recover_interrupted_save
    from hf_blockprune.compact.saving import save_compacted
    from test_atomic_save import BOUNDARIES, FAILED, KILLED, model_b

    model = model_b()
    save_compacted(model, os.path.join(spec["runs"], "warm-up"))  # imports what a save needs before forking

    def run(action, folder, kill_at):
        # In a child: count the boundary calls, die at call number `kill_at` (before it happens).
        pid = os.fork()
        if pid:
            return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        calls = [0]

        def counted(original):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] == kill_at:
                    os._exit(KILLED)
                return original(*args, **kwargs)
            return call

        for name in BOUNDARIES:
            setattr(os, name, counted(getattr(os, name)))
        try:
            action(folder)
        except BaseException:
            traceback.print_exc()
            os._exit(FAILED)
        with open(os.path.join(spec["runs"], "calls.txt"), "w") as file:
            file.write(str(calls[0]))
        os._exit(0)

    def kill_everywhere(prefix, action, source):
        # A first run counts the boundaries, then one run per boundary dies there.
        shutil.copytree(source, os.path.join(spec["runs"], f"{prefix}-full"))
        codes = {"full": run(action, os.path.join(spec["runs"], f"{prefix}-full"), None)}
        count = int(open(os.path.join(spec["runs"], "calls.txt")).read())
        for n in range(1, count + 1):
            folder = os.path.join(spec["runs"], f"{prefix}-{n}")
            shutil.copytree(source, folder)
            codes[n] = run(action, folder, n)
        return {"count": count, "codes": codes}

    results = {"save": kill_everywhere("save", lambda folder: save_compacted(model, folder), spec["source"])}
    # The first folder a kill left committed (marker written) and untouched: kill its recovery everywhere too.
    committed = next(n for n in range(1, results["save"]["count"] + 1)
                     if os.path.exists(os.path.join(spec["runs"], f"save-{n}", MARKER_NAME)))
    results["committed"] = committed
    results["recover"] = kill_everywhere("recover", recover_interrupted_save,
                                         os.path.join(spec["runs"], f"save-{committed}"))
    with open(os.path.join(spec["runs"], "results.json"), "w") as file:
        json.dump(results, file)
""")


@needs_fork
def test_a_save_killed_at_any_boundary_leaves_the_old_or_the_new_model(references, tmp_path):
    source = tmp_path / "source"
    save_compacted(model_a(), source)
    _with_trainer_files(source)
    extras = {k: v for k, v in _snapshot(source).items() if k.startswith("checkpoint-5/") or k == "trainer_state.json"}
    runs = tmp_path / "runs"
    runs.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"tests_dir": str(TESTS_DIR), "source": str(source), "runs": str(runs)}))
    (tmp_path / "worker.py").write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(spec)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert worker.returncode == 0, worker.stderr[-5000:]
    results = json.loads((runs / "results.json").read_text())

    for phase in ("save", "recover"):
        count, codes = results[phase]["count"], results[phase]["codes"]
        assert codes == {"full": 0, **{str(n): KILLED for n in range(1, count + 1)}}, worker.stderr[-5000:]
        seen = {}
        for run in ["full", *range(1, count + 1)]:
            try:
                seen[run] = _check_folder(runs / f"{phase}-{run}", references, extras)
            except AssertionError as error:
                raise AssertionError(f"{phase} killed at boundary {run} of {count}: {error}") from error
        loaded = [seen[n][1] for n in range(1, count + 1)]
        if phase == "save":  # the old model up to the commit, the new one after it
            committed = results["committed"]
            assert loaded == ["A"] * (committed - 1) + ["B"] * (count - committed + 1)
            assert seen[committed][0] == "A"  # committed but untouched: plain transformers still loads the old one
            assert "no config.json" in {plain for plain, _ in seen.values()}  # removed first
        else:  # a committed save stays committed, however often its recovery is killed
            assert loaded == ["B"] * count
        assert seen["full"] == ("B", "B")


def _poison_weight(model):
    with torch.no_grad():
        model.bert.pooler.dense.weight[0, 0] = float("nan")
    return "bert.pooler.dense.weight"


def _poison_bias(model):
    with torch.no_grad():
        model.classifier.bias[1] = float("inf")
    return "classifier.bias"


def _poison_buffer(model):
    model.bert.embeddings.register_buffer("scale", torch.tensor([1.0, -float("inf")]))
    return "bert.embeddings.scale"


@pytest.mark.parametrize(
    "saver, poison",
    [
        (save_compacted, _poison_weight),
        (save_compacted, _poison_bias),
        (save_compacted, _poison_buffer),
        (export_dense, _poison_weight),
        (export_dense, _poison_bias),
    ],
)
def test_a_non_finite_model_is_refused_and_nothing_is_written(saver, poison, tmp_path):
    save_compacted(model_a(), tmp_path / "model")
    target = _with_trainer_files(tmp_path / "model")
    before = _snapshot(target)
    model = model_b()
    name = poison(model)
    with pytest.raises(ValueError, match=rf"`{name}` holds NaN or inf values: .*nothing was written"):
        saver(model, target)
    assert _snapshot(target) == before
    with pytest.raises(ValueError, match=name):
        saver(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_an_abandoned_staging_folder_is_dropped_by_the_next_save(references, tmp_path):
    save_compacted(model_a(), tmp_path / "model")
    target = _with_trainer_files(tmp_path / "model")
    extras = {k: v for k, v in _snapshot(target).items() if k.startswith("checkpoint-5/") or k == "trainer_state.json"}
    abandoned = target / f"{STAGING_PREFIX}killed12"  # a save killed before its commit
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"half a file")
    old_style = tmp_path / ".model.ab1_cd9z"  # what older versions staged next to the folder
    old_style.mkdir()
    (old_style / "config.json").write_text("{}")
    not_ours = [tmp_path / ".model.ab1_cd9y", tmp_path / ".model.backup", tmp_path / ".other.ab1_cd9z"]
    for folder in not_ours:
        (folder / "keep").mkdir(parents=True)
    save_compacted(model_b(), target)
    files = _snapshot(target)
    assert {k: v for k, v in files.items() if k not in extras} == references["B"]["files"]
    assert {k: v for k, v in files.items() if k in extras} == extras
    assert not old_style.exists()
    assert all((folder / "keep").is_dir() for folder in not_ours)


def test_a_committed_save_is_rolled_forward_by_from_pretrained(references, tmp_path, monkeypatch, caplog):
    target = tmp_path / "model"
    save_compacted(model_a(), target)

    def killed(*args, **kwargs):
        raise OSError("killed after the commit")

    monkeypatch.setattr("hf_blockprune.compact.atomic._move_into_place", killed)
    with pytest.raises(OSError, match="killed after the commit"):
        save_compacted(model_b(), target)
    monkeypatch.undo()
    assert (target / MARKER_NAME).is_file() and [p for p in target.iterdir() if p.name.startswith(STAGING_PREFIX)]
    with caplog.at_level(logging.WARNING, logger="hf_blockprune.compact.atomic"):
        model = hf_blockprune.from_pretrained(target)
    assert "Completed an interrupted save" in caplog.text
    assert _which(model, references) == "B"
    assert _snapshot(target) == references["B"]["files"]
    assert recover_interrupted_save(target) is False


@pytest.mark.skipif(fcntl is None, reason="advisory locks need fcntl")
def test_the_staging_folder_of_a_running_save_is_left_alone(tmp_path):
    target = tmp_path / "model"
    save_compacted(model_a(), target)
    staging = target / f"{STAGING_PREFIX}running1"
    staging.mkdir()
    (staging / "config.json").write_text("{}")
    before = _snapshot(target)
    descriptor = os.open(staging, os.O_RDONLY)  # what the running save holds
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert recover_interrupted_save(target) is False
        assert _snapshot(target) == before
        (target / MARKER_NAME).write_text(json.dumps({"staging": staging.name, "files": ["config.json"]}))
        with pytest.raises(RuntimeError, match="Another save into .* is in progress"):
            save_compacted(model_b(), target)  # committed by the running save: never mixed with it
        assert recover_interrupted_save(target) is False
    finally:
        os.close(descriptor)
    assert recover_interrupted_save(target) is True  # its process died: finish its save
    assert json.loads((target / "config.json").read_text()) == {}
    assert not [p for p in target.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "marker",
    ['{"staging": "../elsewhere", "files": []}', '{"staging": ".blockprune-staging-x", "files": ["../x"]}', "{"],
)
def test_a_marker_hf_blockprune_did_not_write_is_refused(marker, tmp_path):
    (tmp_path / MARKER_NAME).write_text(marker)
    (tmp_path / f"{STAGING_PREFIX}x").mkdir()
    with pytest.raises(ValueError, match="not a save marker written by hf_blockprune"):
        recover_interrupted_save(tmp_path)
    assert (tmp_path / f"{STAGING_PREFIX}x").is_dir()
