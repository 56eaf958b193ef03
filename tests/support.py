"""Inputs, layouts and tolerances shared by the tests."""
from __future__ import annotations

import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()

# (dtype, atol, rtol) for outputs and gradients of O(1) magnitude, against the float64 reference.
# float64 inputs accumulate in float64, but momentum and eps reach the Triton kernels as fp32
# scalars (Triton passes Python floats as fp32): about 1e-8 relative.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 2e-2),
}
# Per-channel statistics (mean, invstd, running stats) are kept in fp32 for every input dtype.
STAT_TOLERANCE = {torch.float64: (1e-7, 1e-7)}
DEFAULT_STAT_TOLERANCE = (1e-5, 1e-5)


def stat_tolerance(dtype):
    return STAT_TOLERANCE.get(dtype, DEFAULT_STAT_TOLERANCE)


def backends_for_cpu_tensors():
    """Backends that can run on CPU tensors in this process."""
    return ["cpu", "triton"] if INTERPRETING else ["cpu"]


def gpu_backends():
    names = ["triton"]
    try:
        import cupy  # noqa: F401
        names.append("cupy")
    except ImportError:
        pass
    return names


def make_input(shape, dtype=torch.float32, layout="contiguous", device="cpu", mean=3.0, std=2.0, seed=0):
    """Random normal(mean, std) values (never zeros), in the given dtype and memory layout."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    return arrange(x, layout).to(device)


def arrange(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x with the same values in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":  # channels_last / channels_last_3d / (N, C) and (N, C, L) as (N, L, C)
        return x.movedim(1, -1).contiguous().movedim(-1, 1)
    if layout == "channel_slice":  # every other channel of a wider tensor: non-dense, read natively
        wide = torch.stack([x, x + 1], dim=2).flatten(1, 2)
        return wide[:, ::2]
    if layout == "transposed":  # spatial dims reversed in memory: needs one copy
        dims = list(range(x.dim()))
        perm = dims[:2] + dims[2:][::-1]
        return x.permute(perm).contiguous().permute(perm) if x.dim() > 3 else x.transpose(0, -1).contiguous().transpose(0, -1)
    raise ValueError(layout)


def make_params(C, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
    bias = torch.randn(C, generator=g, dtype=torch.float64).to(dtype).to(device)
    running_mean = torch.randn(C, generator=g, dtype=torch.float64).to(dtype).to(device)
    running_var = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
    return weight, bias, running_mean, running_var


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def assert_stats_close(actual, expected, dtype, what=""):
    atol, rtol = stat_tolerance(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


needs_interpreter = pytest.mark.skipif(
    not INTERPRETING, reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set by conftest without CUDA)")
