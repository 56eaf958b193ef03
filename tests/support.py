"""Inputs, layouts and tolerances shared by the tests."""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_broken() -> str | None:
    """Why the Triton interpreter cannot run here, if it cannot: Triton 3.6's interpreter calls
    int() on 1-element numpy arrays, which numpy 2.4 and later refuse."""
    try:
        import numpy
        import triton
    except ImportError as error:
        return f"Triton interpreter unavailable: {error}"
    version = lambda text: tuple(int(part) for part in text.split(".")[:2] if part.isdigit())  # noqa: E731
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter fails with numpy {numpy.__version__} "
                "(numpy >= 2.4 refuses int() on 1-element arrays): use Triton >= 3.7 or numpy < 2.4")
    return None


INTERPRETER_BROKEN = _interpreter_broken() if INTERPRETING else None
_TRITON_MARKS = [pytest.mark.skip(reason=INTERPRETER_BROKEN)] if INTERPRETER_BROKEN else []

# (dtype, atol, rtol) for outputs and gradients of O(1) magnitude, against the float64 reference.
# float64 inputs accumulate in float64, momentum and eps included (fp64 kernel parameters).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 2e-2),
}
# Per-channel statistics (mean, invstd, running stats) are kept in fp32 for every input dtype.
STAT_TOLERANCE = {torch.float64: (1e-12, 1e-12)}
DEFAULT_STAT_TOLERANCE = (1e-5, 1e-5)


# 9-value rows, which cannot start on 16 bytes: programs own 2-8 adjacent channels (channel groups).
CHANNEL_GROUP_CASE = ((5, 8, 3, 3), "contiguous")
LAYOUT_CASES = [
    ((6, 3), "contiguous"),
    ((6, 3), "transposed"),       # column-major (N, C): read natively, channel by channel
    ((6, 5), "channel_slice"),
    ((4, 3, 7), "contiguous"),
    ((4, 3, 7), "channels_last"),
    ((4, 3, 7), "channel_slice"),
    ((3, 5, 6, 7), "contiguous"),
    ((3, 5, 6, 7), "channels_last"),
    ((3, 5, 6, 7), "channel_slice"),
    ((3, 5, 6, 7), "transposed"),  # needs one contiguous copy
    ((2, 3, 3, 4, 5), "contiguous"),
    ((2, 3, 3, 4, 5), "channels_last"),
    ((9, 70, 2, 3), "channels_last"),  # C over one channel block, N * S over several splits
    ((3, 24, 5, 6), "channels_last"),  # C a multiple of 16 bytes of values: CUDA C's vector accesses; not of
                                       # 16 values: the Triton kernels' ALIGN (kernels/alignment.py)
    CHANNEL_GROUP_CASE,
    ((2, 2, 33, 35), "contiguous"),   # spatial extent not a multiple of any block
    ((3, 2, 8, 8), "contiguous"),     # rows of whole 16-byte groups: 16-bit Triton reductions sum pairs (PAIRS)
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def case_id(case):
    shape, layout = case
    return "x".join(map(str, shape)) + "-" + layout


def stat_tolerance(dtype):
    return STAT_TOLERANCE.get(dtype, DEFAULT_STAT_TOLERANCE)


def backends_for_cpu_tensors():
    """Backends that can run on CPU tensors in this process."""
    return ["cpu", pytest.param("triton", marks=_TRITON_MARKS)] if INTERPRETING else ["cpu"]


def has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


requires_cupy = pytest.mark.skipif(not has_cupy(), reason="CuPy is not installed (pip install -e .[cupy-cuda13] or .[cupy-cuda12])")


def backend_devices():
    """(backend, device) pairs for parametrize: the CPU ones that run here, and the GPU backends
    marked `gpu` (skipped without CUDA, or failed under --require-gpu)."""
    pairs = [pytest.param("cpu", "cpu", id="cpu")]
    if INTERPRETING:
        pairs.append(pytest.param("triton", "cpu", id="triton-interpreter", marks=_TRITON_MARKS))
    pairs.append(pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu))
    pairs.append(pytest.param("cupy", "cuda", id="cupy-cuda", marks=[pytest.mark.gpu, requires_cupy]))
    return pairs


def gpu_backends():
    """GPU backend names for parametrize, CuPy skipped where it is not installed."""
    return [pytest.param("triton"), pytest.param("cupy", marks=requires_cupy)]


def make_input(shape, dtype=torch.float32, layout="contiguous", device="cpu", mean=3.0, std=2.0, seed=0):
    """Random normal(mean, std) values (never zeros), in the given dtype and memory layout."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    return arrange(x.to(device), layout)


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
    """weight in [0.5, 1.5), bias ~ N(0, 1), running_mean ~ N(0, 1), running_var in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
    bias = torch.randn(C, generator=g, dtype=torch.float64).to(dtype).to(device)
    running_mean = torch.randn(C, generator=g, dtype=torch.float64).to(dtype).to(device)
    running_var = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device)
    return weight, bias, running_mean, running_var


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def assert_stats_close(actual, expected, dtype, what=""):
    atol, rtol = stat_tolerance(dtype)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def assert_parameter_grads_close(grad_w, grad_b, grad_w_ref, grad_b_ref, grad_y, dtype):
    """dweight and dbias against the reference, relative to the sums' own size (sum |dy| a channel):
    their rounding scales with it."""
    scale = grad_y.double().abs().sum() / grad_y.shape[1]
    assert_close(grad_w / scale, grad_w_ref / scale, dtype, "grad_weight")
    assert_close(grad_b / scale, grad_b_ref / scale, dtype, "grad_bias")


def fp32_spacing(values: torch.Tensor) -> torch.Tensor:
    """Distance between neighbouring fp32 numbers at |values|, as float64."""
    exponent = torch.frexp(values.abs().double())[1]
    return torch.ldexp(torch.ones_like(values, dtype=torch.float64), exponent - 24)


def rounding_at_mean(mean_ref: torch.Tensor, invstd_ref: torch.Tensor, weight, x: torch.Tensor) -> torch.Tensor:
    """Per-channel error that the fp32 saved mean alone brings into y = (x - mean) * invstd * weight:
    |weight| * invstd * spacing(|mean|), shaped to broadcast against x. Large when |mean| >> std,
    and when a channel of few values has a small spread."""
    scale = invstd_ref.double() * (1.0 if weight is None else weight.double().abs())
    bound = scale * fp32_spacing(mean_ref)
    return bound.reshape(1, -1, *[1] * (x.dim() - 2)).cpu()


def assert_close_with_slack(actual, expected, dtype, slack: torch.Tensor, what=""):
    """assert_close with the dtype's tolerance plus a per-element (broadcast) slack."""
    atol, rtol = TOLERANCES[dtype]
    actual, expected = actual.double().cpu(), expected.double().cpu()
    error = (actual - expected).abs()
    allowed = atol + rtol * expected.abs() + slack
    assert bool((error <= allowed).all()), (
        f"{what}: {int((error > allowed).sum())} of {error.numel()} values off; worst excess "
        f"{float((error - allowed).max()):.3e}, largest error {float(error.max()):.3e}")


class TorchvisionFrozenBatchNorm2d(torch.nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d as torchvision writes it (buffers, eps, state_dict, forward),
    for tests on machines without torchvision."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                            ("running_var", torch.ones)):
            self.register_buffer(name, value(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class Allocations(TorchDispatchMode):
    """`with Allocations() as seen:` records in `seen.shapes` the shape of every tensor a factory call
    (torch.empty and alike) allocates below the dispatcher."""
    FACTORIES = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                 torch.ops.aten.empty_like.default, torch.ops.aten.new_empty.default, torch.ops.aten.zeros.default}

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.FACTORIES:
            self.shapes.append(tuple(out.shape))
        return out
