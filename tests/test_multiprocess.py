"""`accelerate launch --multi_gpu --num_processes 2 -m spec_stream.finetune` on the CPU
(two gloo processes): the same loss curve as one process at the same global batch and
seed, one set of checkpoints written by the main process, and --resume across both."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import spec_stream.finetune as finetune_module
from spec_stream.checkpoints import list_checkpoints
from spec_stream.errors import UserError
from spec_stream.finetune import finetune
from spec_stream.training.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
# 17 examples in global batches of 8: steps of 8, 8 and 1 rows per epoch, 6 steps in all;
# in the 1-row step the second process has no row of its own (it steps on a row without targets).
RUN = dict(dataset="e2e_nlg", from_scratch="tiny", max_train_samples=17, max_eval_samples=4, epochs=2.0,
           max_length=128, save_every=2, seed=5,
           mixed_precision="no")  # fp32: one process and two agree to rounding (bf16 rounds each share apart)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two(output: Path, data_dir: Path, *extra) -> subprocess.CompletedProcess:
    """Two processes of the fine-tuning CLI on the CPU, each with batch 4 (global batch 8)."""
    argv = ["--dataset", RUN["dataset"], "--from-scratch", RUN["from_scratch"], "--output", str(output),
            "--data-dir", str(data_dir), "--batch-size", "4", *extra]
    argv += [f"--{name.replace('_', '-')}={RUN[name]}" for name in
             ("max_train_samples", "max_eval_samples", "epochs", "max_length", "save_every", "seed",
              "mixed_precision")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "spec_stream.finetune", *argv]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir) -> Path:
    output = tmp_path_factory.mktemp("one") / "run"
    finetune(FinetuneConfig(**RUN, output=str(output), data_dir=str(data_dir), batch_size=8))
    return output


def state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "state.pt", weights_only=True)


def test_two_processes_match_one_and_resume_across_both(one_process, tmp_path, data_dir):
    output = tmp_path / "run"
    stopped = launch_two(output, data_dir, "--max-steps", "3")
    assert "stopped at step 3/6" in stopped.stdout
    assert [step for step, _ in list_checkpoints(output)] == [3]
    resumed = launch_two(output, data_dir, "--resume")
    assert resumed.stdout.count(f"resuming from {output / 'checkpoint-3'} at step 3/6") == 1  # the main process
    assert [step for step, _ in list_checkpoints(output)] == [6]  # one set of checkpoints
    assert not [p.name for p in output.iterdir() if p.name.startswith(".")]  # no temporaries left
    two, one = state(output / "checkpoint-6"), state(one_process / "checkpoint-6")
    assert len(two["losses"]) == 6 and two["settings"]["batch_size"] == 4
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-5)
    for name, weights in one["model"].items():  # six Adam steps of float noise apart
        torch.testing.assert_close(two["model"][name], weights, rtol=0, atol=2e-3)
    summaries = [json.loads((folder / "training_args.json").read_text())["summary"] for folder in (output, one_process)]
    assert summaries[0]["steps"] == summaries[1]["steps"] == 6
    assert summaries[0]["eval_loss"] == pytest.approx(summaries[1]["eval_loss"], rel=1e-3)


def test_a_launch_that_started_one_process_is_refused(monkeypatch):
    """`accelerate launch --num_processes 2` without --multi_gpu starts one process on a CPU machine."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(UserError, match=r"started one process.*accelerate launch --multi_gpu --num_processes N"):
        finetune_module.check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    finetune_module.check_launch()  # torchrun's processes: fine
