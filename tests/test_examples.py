"""examples/train_resnet.py runs as a user runs it (CPU, "cpu" backend, 2 steps) and both runs agree."""
from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_resnet.py"
SMALL = ["--device", "cpu", "--backend", "cpu", "--steps", "2", "--image-size", "16", "--batch-size", "4"]


def _run(*options) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLE), *SMALL, *options], capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _losses(output: str) -> list[tuple[float, float]]:
    rows = re.findall(r"^\s+\d+\s+(\S+)\s+(\S+)\s+\S+$", output, flags=re.MULTILINE)
    return [(float(a), float(b)) for a, b in rows]


@pytest.mark.parametrize("options, loss_tolerance, stat_tolerance", [
    ((), 1e-5, 1e-5),
    (("--channels-last", "--amp", "bf16"), 2e-2, 1e-2),  # bf16 convolutions: rounding differs per run
    (("--compile",), 1e-5, 1e-5),
], ids=["fp32", "channels-last-bf16", "compile"])
@pytest.mark.slow
def test_train_resnet_example_agrees_with_torch(options, loss_tolerance, stat_tolerance):
    output = _run("--model", "small", *options)
    losses = _losses(output)
    assert len(losses) == 2, output
    for torch_loss, bn_gpu_loss in losses:
        assert abs(torch_loss - bn_gpu_loss) <= loss_tolerance * max(1.0, abs(torch_loss)), output
    difference = float(re.search(r"largest running-statistics difference: (\S+)", output).group(1))
    assert difference <= stat_tolerance, output
    assert re.search(r"time per step: torch.nn [\d.]+ ms/step .*, bn_gpu [\d.]+ ms/step", output), output


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("options", [(), ("--empty-last-rank",)], ids=["equal-shares", "empty-last-rank"])
def test_ddp_syncbn_example_runs_with_torchrun_on_two_cpu_processes(options):
    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "ddp_syncbn.py"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script),
                             "--steps", "2", *options], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("2 ranks on cpu (gloo): running statistics identical on every rank: True (largest difference 0.0e+00), "
            "all finite: True") in result.stdout, result.stdout


@pytest.mark.parametrize("options, message", [
    (("--device", "cpu", "--backend", "triton"), "backend='triton' needs CUDA tensors"),
    (("--device", "cuda"), "no CUDA GPU is present"),
], ids=["triton-on-cpu", "cuda-without-gpu"])
def test_train_resnet_refuses_a_setup_that_cannot_run_before_any_training(options, message):
    import os

    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: both setups run")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(EXAMPLE), *options], capture_output=True, text=True, timeout=300,
                            env=env, check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert result.stdout == ""  # nothing trained, nothing printed


def test_ddp_syncbn_without_torchrun_says_how_to_launch_it():
    script = pathlib.Path(__file__).resolve().parents[1] / "examples" / "ddp_syncbn.py"
    import os
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                            check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "torchrun --nproc-per-node 2 examples/ddp_syncbn.py" in result.stderr
