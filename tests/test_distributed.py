"""Multi-process training (DDP over gloo on CPU, as `torchrun` / `accelerate launch` would run it on GPUs)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hf_blockprune
from hf_blockprune import BlockPruningConfig
from hf_blockprune.pruning.controller import check_training_arguments

from conftest import tiny_dataset

SCRIPT = Path(__file__).resolve().parent / "ddp_train.py"


@pytest.mark.parametrize(("route", "preset"), [("trainer", "hybrid-filled"), ("callback", "struct")])
def test_two_processes_agree_and_save_the_compacted_model(route, preset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
         route, preset, str(tmp_path)], capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == 2
    assert rank0["scores"] == rank1["scores"] and rank0["masks"] == rank1["masks"]  # every process prunes alike
    masks = [m for grid in rank0["masks"] for m in grid]
    assert 0 < sum(masks) < len(masks)
    compacted = hf_blockprune.from_pretrained(str(tmp_path)).eval()
    ids = torch.tensor([row["input_ids"].tolist() for row in tiny_dataset("bert")[:4]])
    with torch.no_grad():
        logits = compacted(input_ids=ids).logits
    torch.testing.assert_close(logits, torch.tensor(rank0["logits"]), atol=1e-5, rtol=1e-4)


def test_filled_stage_without_unused_parameter_detection_says_what_to_change():
    args = SimpleNamespace(world_size=2, ddp_find_unused_parameters=False)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters"):
        check_training_arguments(args, BlockPruningConfig.from_preset("hybrid-filled"))
    check_training_arguments(SimpleNamespace(world_size=2, ddp_find_unused_parameters=None),
                             BlockPruningConfig.from_preset("hybrid-filled"))
    check_training_arguments(args, BlockPruningConfig.from_preset("hybrid"))
