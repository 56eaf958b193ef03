"""The GPU runner's switch: with BN_GPU_REQUIRE_GPU=1 (or --require-gpu) a GPU test fails where no
GPU is present, so a GPU job cannot pass by skipping everything."""
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
@pytest.mark.parametrize("how", ["env", "option"])
def test_gpu_tests_fail_instead_of_skipping_when_required(how):
    env = dict(os.environ)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "tests/test_gpu.py::test_training_step_captures_into_a_cuda_graph"]
    if how == "env":
        env["BN_GPU_REQUIRE_GPU"] = "1"
    else:
        args.append("--require-gpu")
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 1, result.stdout[-2000:]
    assert "a CUDA GPU is required" in result.stdout
    skipped = subprocess.run(args[:-1] if how == "option" else args, capture_output=True, text=True, timeout=600,
                             env={k: v for k, v in env.items() if k != "BN_GPU_REQUIRE_GPU"},
                             cwd=os.path.dirname(os.path.dirname(__file__)))
    assert skipped.returncode == 0 and "skipped" in skipped.stdout
