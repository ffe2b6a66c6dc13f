"""Smoke runs of the benchmark scripts (`--quick`): they run end to end and write what they promise."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hf_blockprune.tasks.defaults import shared_data_dir

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                            env=OFFLINE, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shared_data_dir() is None, reason="needs ../shared/data")
def test_accuracy_speed_benchmark_quick(tmp_path):
    stdout = run("accuracy_speed_sst2.py", "--quick", "--work_dir", str(tmp_path / "work"),
                 "--output", str(tmp_path / "out" / "result"))
    results = json.loads((tmp_path / "out" / "result.json").read_text())
    kinds = [r["kind"] for r in results["runs"]]
    assert kinds == ["dense", "one-shot", "hybrid-filled", "struct", "truncated", "struct"]
    assert results["runs"][-1]["hidden_size"] < 384 == results["runs"][3]["hidden_size"]  # prune_hidden
    for record in results["runs"]:
        assert 0.0 <= record["dev_accuracy"] <= 1.0 and record["measured_speedup"] > 0
        assert record["measured_speedup_batch1"] > 0
    dense, *others = results["runs"]
    assert all(r["parameters"] < dense["parameters"] for r in others if r["kind"] != "hybrid-filled")
    assert (tmp_path / "out" / "result.png").stat().st_size > 0
    table = (tmp_path / "out" / "result.md").read_text()
    assert "| dense |" in table and "Targets:" in table and "one-shot" in table and table in stdout
    assert results["runs"][1]["flops_speedup"] >= 1.5  # the one-shot cut reaches its target
    assert sorted(p.name for p in (tmp_path / "out" / "result.records").glob("*.json")) == sorted(
        f"{re.sub(r'[^A-Za-z0-9.]+', '-', r['name']).strip('-')}.json" for r in results["runs"])  # as the script names

    # a second invocation (the dense model still in work_dir) reuses every record: nothing is trained again
    stdout = run("accuracy_speed_sst2.py", "--quick", "--work_dir", str(tmp_path / "work"),
                 "--output", str(tmp_path / "out" / "again"), "--records", str(tmp_path / "out" / "result.records"))
    again = json.loads((tmp_path / "out" / "again.json").read_text())
    assert stdout.count("reused the record") == len(results["runs"]) - 1
    assert [(r["name"], r["dev_accuracy"], r["measured_speedup"]) for r in again["runs"][1:]] == [
        (r["name"], r["dev_accuracy"], r["measured_speedup"]) for r in results["runs"][1:]]
    assert again["runs"][0]["dev_accuracy"] == dense["dev_accuracy"]

    # --report writes the tables from the records alone: without the models, nothing run
    run("accuracy_speed_sst2.py", "--quick", "--report", "--work_dir", str(tmp_path / "empty"),
        "--output", str(tmp_path / "out" / "report"), "--records", str(tmp_path / "out" / "result.records"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [(r["name"], r["dev_accuracy"]) for r in report["runs"]] == [
        (r["name"], r["dev_accuracy"]) for r in results["runs"]]
    assert not (tmp_path / "empty" / "dense").exists()


def test_speed_benchmark_quick(tmp_path):
    stdout = run("speed.py", "--quick", "--output", str(tmp_path / "speed.md"))
    table = (tmp_path / "speed.md").read_text()
    assert table.strip() in stdout
    header, _, *lines = table.strip().splitlines()
    assert "measured / predicted" in header
    rows = [[cell.strip().replace(",", "") for cell in line.strip("|").split("|")] for line in lines]
    assert [row[0] for row in rows] == ["1.00", "0.75", "0.50", "0.25"]
    parameters, gflops, predicted = ([float(row[i]) for row in rows] for i in (1, 2, 5))
    assert parameters == sorted(parameters, reverse=True) and len(set(parameters)) == 4  # each cut is smaller
    assert gflops == sorted(gflops, reverse=True)
    assert predicted[0] == 1.0 and predicted == sorted(predicted) and predicted[-1] > 3.0  # 1/4 of heads and neurons
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)  # latencies measured (no timing asserted)


@pytest.mark.slow
@pytest.mark.skipif(shared_data_dir() is None, reason="needs ../shared/data")
def test_decoder_pruning_benchmark_quick(tmp_path):
    stdout = run("decoder_pruning.py", "--quick", "--work_dir", str(tmp_path / "work"),
                 "--output", str(tmp_path / "out" / "result"))
    results = json.loads((tmp_path / "out" / "result.json").read_text())
    dense, continued, *pruned = results["records"]
    assert [r["kind"] for r in results["records"]] == ["dense", "dense-continued", "struct", "struct"]
    assert [r["target_speedup"] for r in pruned] == results["settings"]["speedups"] == [1.5, 2.0]
    for record in results["records"]:
        assert 1.0 < record["perplexity"] < float("inf")  # false for NaN too
        assert record["ms_per_token"] > 0 and record["measured_token_speedup"] > 0
        assert record["perplexity_vs_continued"] == pytest.approx(record["perplexity"] / continued["perplexity"] - 1)
    # the continued dense model: same architecture, trained for the pruning runs' steps
    assert continued["parameters"] == dense["parameters"] and continued["flops_speedup"] == pytest.approx(1.0)
    assert continued["perplexity"] != dense["perplexity"]
    for record in pruned:
        assert record["parameters"] < dense["parameters"] and record["flops_speedup"] > 1.0
    table = (tmp_path / "out" / "result.md").read_text()
    assert "| dense |" in table and "| dense-continued |" in table and "perplexity vs dense-continued" in table
    assert table in stdout
