"""Test set-up: CPU machines run the Triton kernels in the interpreter; GPU machines run them compiled.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, hence here, before any test
module imports bn_gpu. GPU tests (marker `gpu`) skip without CUDA, unless --require-gpu or
BN_GPU_REQUIRE_GPU=1 asks for a GPU, in which case they fail instead.
"""
import os
import sys

import pytest
import torch
from hypothesis import settings

# CI replays the same hypothesis examples every run; elsewhere they are drawn afresh.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# support.py (shared helpers) is imported by tests in every subfolder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--require-gpu", action="store_true",
                     help="fail, rather than skip, the GPU tests when no CUDA device is present")


@pytest.hookimpl(tryfirst=True)  # before skipif marks: without a GPU one reason, reported once
def pytest_runtest_setup(item):
    if "gpu" not in item.keywords or HAS_CUDA:
        return
    if item.config.getoption("--require-gpu") or os.environ.get("BN_GPU_REQUIRE_GPU") == "1":
        pytest.fail("a CUDA GPU is required (--require-gpu / BN_GPU_REQUIRE_GPU=1) but none is present")
    pytest.skip("needs a CUDA GPU; none is present")


@pytest.fixture
def poisoned(monkeypatch):
    """Fill every buffer the backends allocate with NaN before the kernels write it."""
    import bn_gpu.backends.layout
    import bn_gpu.backends.orchestration

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    for module, name in ((bn_gpu.backends.layout, "empty_in_family"), (bn_gpu.backends.orchestration, "empty")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, real=real: poison(real(*args)))
    empty = bn_gpu.backends.orchestration.empty  # the workspaces too, fresh and poisoned every call
    monkeypatch.setattr(bn_gpu.backends.orchestration, "workspace",
                        lambda shape, dtype, device, slot=0: empty(shape, dtype, device))


# Input bytes an SM holds in the interpreter's "on-chip" kernel path: eight of its tiles
# (INTERPRETER_TUNING.tile_bytes), so that the tests' small shapes take the on-chip kernels, both the
# exchange (several programs per channel) and the walk (whole channels a program).
INTERPRETER_ON_CHIP_BYTES = 2048


@pytest.fixture(params=["split", pytest.param("single-pass", marks=pytest.mark.slow),
                        pytest.param("on-chip", marks=pytest.mark.slow)])
def kernel_path(request, monkeypatch):
    """Run a test on every kernel path: several programs per channel (statistics, finalize,
    normalize), one program per channel (the single-pass kernels) and x held on chip (the on-chip
    kernels, where the shape fits; the split path where not). make test-fast runs the first alone."""
    import dataclasses

    import bn_gpu.backends.plan

    programs_per_sm = 0 if request.param == "single-pass" else 64
    for name in ("INTERPRETER_TUNING", "GPU_TUNING"):
        tuning = dataclasses.replace(getattr(bn_gpu.backends.plan, name), programs_per_sm=programs_per_sm)
        if request.param != "on-chip":
            tuning = dataclasses.replace(tuning, on_chip_bytes=0)
        elif name == "INTERPRETER_TUNING":
            tuning = dataclasses.replace(tuning, on_chip_bytes=INTERPRETER_ON_CHIP_BYTES)
        monkeypatch.setattr(bn_gpu.backends.plan, name, tuning)
    return request.param
