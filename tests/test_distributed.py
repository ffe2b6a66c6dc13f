"""Multi-process training (DDP over gloo on CPU, as `torchrun` / `accelerate launch` would run it on GPUs), and the
refusal of parameter sharding (FSDP, DeepSpeed ZeRO-3)."""

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DeepSpeedPlugin
from transformers import TrainingArguments

import hf_blockprune
from hf_blockprune import BlockPruningConfig
from hf_blockprune.training.arguments import check_training_arguments

from conftest import tiny_dataset

SCRIPT = Path(__file__).resolve().parent / "ddp_train.py"
REPO = SCRIPT.parent.parent


def run_two_processes(launcher: list[str], route: str, preset: str, out: Path) -> None:
    """Run `ddp_train.py` under `launcher`; check that two gloo processes ran and rank 0 alone wrote the model."""
    # the checkout first on the path, whatever is installed; no accelerate config of the user's (HF_HOME)
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path,
           "HF_HOME": str(out / "hf_home")}
    result = subprocess.run([*launcher, str(SCRIPT), route, preset, str(out)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "rank1.json").is_file(), f"only one process ran: {result.stdout[-2000:]}"
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (rank0["rank"], rank1["rank"]) == (0, 1) and rank0["world_size"] == rank1["world_size"] == 2
    assert rank0["pid"] != rank1["pid"] and rank0["backend"] == rank1["backend"] == "gloo"
    assert rank0["compacted_saves"] == [str(out)] and rank1["compacted_saves"] == []  # one model, from rank 0
    assert rank0["scores"] == rank1["scores"] and rank0["masks"] == rank1["masks"]  # every process prunes alike
    masks = [m for grid in rank0["masks"] for m in grid]
    assert 0 < sum(masks) < len(masks)
    compacted = hf_blockprune.from_pretrained(str(out)).eval()
    ids = torch.tensor([row["input_ids"].tolist() for row in tiny_dataset("bert")[:4]])
    with torch.no_grad():
        logits = compacted(input_ids=ids).logits
    torch.testing.assert_close(logits, torch.tensor(rank0["logits"]), atol=1e-5, rtol=1e-4)


def free_port() -> int:
    """A TCP port nobody listens on now, for accelerate's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("route", "preset"), [("trainer", "hybrid-filled"), ("callback", "struct")])
def test_two_processes_agree_and_save_the_compacted_model(route, preset, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_two_processes(torchrun, route, preset, tmp_path)


@pytest.mark.slow
def test_accelerate_launch_runs_two_processes(tmp_path):
    # `--multi_gpu` starts the torch.distributed processes (gloo on a CPU-only machine); `--cpu --num_processes 2`
    # would start ONE process (accelerate's CPU launcher), which `run_two_processes` reports. The trainer route only:
    # the callback route differs from it in the training script, not in how the processes are launched.
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port())]
    run_two_processes(accelerate, "trainer", "hybrid-filled", tmp_path)


def test_filled_stage_without_unused_parameter_detection_says_what_to_change():
    args = SimpleNamespace(world_size=2, ddp_find_unused_parameters=False)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters"):
        check_training_arguments(args, BlockPruningConfig.from_preset("hybrid-filled"))
    check_training_arguments(SimpleNamespace(world_size=2, ddp_find_unused_parameters=None),
                             BlockPruningConfig.from_preset("hybrid-filled"))
    check_training_arguments(args, BlockPruningConfig.from_preset("hybrid"))


def deepspeed_args(stage: int, **sections) -> SimpleNamespace:
    """Stand-in arguments with a DeepSpeed config (`TrainingArguments(deepspeed=...)` needs DeepSpeed installed)."""
    return SimpleNamespace(world_size=2, deepspeed={"zero_optimization": {"stage": stage}, **sections})


def deepspeed_file_args(folder: Path, stage: int) -> SimpleNamespace:
    path = folder / "ds_config.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    return SimpleNamespace(world_size=2, deepspeed=str(path))


@pytest.mark.parametrize(
    ("make_args", "env", "message"),
    [
        (lambda tmp: TrainingArguments(str(tmp), fsdp=True, use_cpu=True, report_to="none"), {}, "`fsdp` in the"),
        (lambda tmp: SimpleNamespace(world_size=2), {"ACCELERATE_USE_FSDP": "true"}, "accelerate launch --use_fsdp"),
        (lambda tmp: deepspeed_args(3), {}, "ZeRO stage 3"),
        (lambda tmp: deepspeed_file_args(tmp, 3), {}, "ZeRO stage 3"),
        # `accelerate launch --use_deepspeed --zero_stage 3`: TrainingArguments build this plugin from the environment
        (lambda tmp: SimpleNamespace(world_size=2, deepspeed_plugin=DeepSpeedPlugin()),
         {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ZeRO stage 3"),
    ],
    ids=["fsdp-argument", "accelerate-use-fsdp", "zero3-dict", "zero3-file", "accelerate-zero3-plugin"],
)
def test_parameter_sharding_is_refused_with_the_alternative(make_args, env, message, tmp_path, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message) as error:
        check_training_arguments(make_args(tmp_path), BlockPruningConfig.from_preset("hybrid"))
    assert "torchrun --nproc_per_node N" in str(error.value) and "accelerate launch --multi_gpu" in str(error.value)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_without_parameter_partitioning_is_accepted(stage, tmp_path, caplog):
    # ZeRO 1 and 2 partition the optimizer state and gradients only: every process keeps whole parameters
    config = BlockPruningConfig.from_preset("hybrid")
    with caplog.at_level(logging.WARNING, logger="hf_blockprune.training.arguments"):
        check_training_arguments(deepspeed_args(stage), config)
        check_training_arguments(deepspeed_file_args(tmp_path, stage), config)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="hf_blockprune.training.arguments"):
        check_training_arguments(deepspeed_args(stage, optimizer={"type": "AdamW"}), config)
    assert "mask_scores_learning_rate" in caplog.text  # DeepSpeed's own optimizer bypasses the trainer's score group
