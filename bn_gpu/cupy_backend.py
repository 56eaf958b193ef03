"""Launch functions of the CuPy backend: the CUDA C kernels of kernels/batch_norm.cu, compiled at
run time by NVRTC through cupy.RawModule, once per device and dtype combination (cached), and
launched on torch's current CUDA stream with pointers to torch-allocated memory -- no copies, no
CuPy allocations, no host synchronization.

Launches, as the Triton backend: training forward 3 (statistics, finalize, normalize), or 1 when
one block owns whole channels (the plan has one split); eval forward 1; backward 3 or 1 in
training, 1 in eval when only dx is needed. Import of this module never needs CuPy;
check_available says what is missing.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources

import numpy as np
import torch

from . import layout
from . import plan as plans

C_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float64: "double"}
THREADS = 256            # 1-D blocks: channels-first kernels and finalize kernels
ROW_THREADS = 8          # channels-last blocks are (32, ROW_THREADS), as ROW_THREADS in the source
VECTOR_BYTES = 16


@functools.lru_cache(maxsize=None)
def _channels_last_tuning(tuning: plans.Tuning) -> plans.Tuning:
    """The GPU tuning with channels-last blocks of 32 channels, as the CUDA kernels have them
    (max_block_c does not enter channels-first plans)."""
    return dataclasses.replace(tuning, max_block_c=32)

_INSTALL_HINT = "pip install -e .[cupy] (installs cupy-cuda12x; use the cupy wheel matching your CUDA)"


def _import_cupy():
    try:
        import cupy
    except ImportError as error:
        raise RuntimeError(f"backend='cupy' needs CuPy, which is not installed: {_INSTALL_HINT}") from error
    return cupy


def check_available(device: torch.device) -> None:
    _import_cupy()
    if device.type != "cuda":
        raise RuntimeError(f"backend='cupy' needs CUDA tensors and a GPU; got tensors on {device}. "
                           "Use backend='cpu' for CPU tensors.")


# ---- kernel names and compilation ------------------------------------------------------------

def type_combinations():
    """Every (input T, weight/bias W, running statistics R, accumulation A) the backend compiles."""
    combos = [("float", "float", "float", "float"), ("double", "double", "double", "double")]
    for half in ("__half", "__nv_bfloat16"):
        combos += [(half, w, r, "float") for w in (half, "float") for r in (half, "float")]
    return combos


def kernel_names(T: str, W: str, R: str, A: str) -> dict:
    """Name expressions of one type combination, by role (the CUDA source's templates)."""
    vec = VECTOR_BYTES // {"float": 4, "double": 8, "__half": 2, "__nv_bfloat16": 2}[T]
    return {
        "stats_first": f"stats_channels_first<{T}, {A}>",
        "stats_last": f"stats_channels_last<{T}, {A}>",
        "finalize_forward": f"finalize_forward<{T}, {A}, {R}>",
        "normalize_first_1": f"normalize_channels_first<{T}, {W}, {R}, {A}, 1>",
        f"normalize_first_{vec}": f"normalize_channels_first<{T}, {W}, {R}, {A}, {vec}>",
        "normalize_last": f"normalize_channels_last<{T}, {W}, {R}, {A}>",
        "reduce_first": f"backward_reduce_channels_first<{T}, {A}>",
        "reduce_last": f"backward_reduce_channels_last<{T}, {A}>",
        "finalize_backward": f"finalize_backward<{A}, {W}>",
        "dx_first_1": f"dx_channels_first<{T}, {W}, {A}, 1>",
        f"dx_first_{vec}": f"dx_channels_first<{T}, {W}, {A}, {vec}>",
        "dx_last": f"dx_channels_last<{T}, {W}, {A}>",
        "fused_forward_first_1": f"fused_forward_channels_first<{T}, {W}, {R}, {A}, 1>",
        f"fused_forward_first_{vec}": f"fused_forward_channels_first<{T}, {W}, {R}, {A}, {vec}>",
        "fused_forward_last": f"fused_forward_channels_last<{T}, {W}, {R}, {A}>",
        "fused_backward_first_1": f"fused_backward_channels_first<{T}, {W}, {A}, 1>",
        f"fused_backward_first_{vec}": f"fused_backward_channels_first<{T}, {W}, {A}, {vec}>",
        "fused_backward_last": f"fused_backward_channels_last<{T}, {W}, {A}>",
    }


def source() -> str:
    return importlib.resources.files("bn_gpu.kernels").joinpath("batch_norm.cu").read_text()


@functools.lru_cache(maxsize=None)
def _kernels(device_index: int, T: str, W: str, R: str, A: str) -> dict:
    cupy = _import_cupy()
    names = kernel_names(T, W, R, A)
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=source(), options=("-std=c++17",), name_expressions=tuple(names.values()))
        return {role: module.get_function(name) for role, name in names.items()}


# ---- arguments --------------------------------------------------------------------------------

def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _i64(*values) -> list:
    return [np.int64(v) for v in values]


class _Launcher:
    """The cached geometry of one input layout, with this call's kernels and stream."""

    def __init__(self, x: torch.Tensor, weight, running, *others: torch.Tensor):
        device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        sms = plans.multiprocessors(device_index)
        self.g = plans.Geometry.of(x, *others, tuning=_channels_last_tuning(plans.GPU_TUNING), sms=sms)
        T = C_TYPES[x.dtype]
        A = "double" if T == "double" else "float"
        # Absent weight or running statistics: their pointers are null, and the parameter gradients
        # are written in the accumulation dtype.
        W = C_TYPES[weight.dtype] if weight is not None else A
        R = C_TYPES[running.dtype] if running is not None else A
        self.device_index = device_index
        self.kernels = _kernels(device_index, T, W, R, A)
        self.vec = VECTOR_BYTES // x.element_size()
        self.accumulate = np.float64 if A == "double" else np.float32
        self.cupy = _import_cupy()
        self.stream = self.cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream, device_index)

    def grid(self):
        g = self.g
        if g.first:
            return (g.C, g.plan.splits), (THREADS,)
        return (g.plan.splits, -(-g.C // 32)), (32, ROW_THREADS)

    def geometry(self, *which: int) -> list:
        return _i64(*self.g.geometry(*which))

    def tiling(self, fused: bool = False) -> list:
        """The plan's tiling as the kernels take it; `fused`: for the single-pass kernels."""
        g = self.g
        tiles = _i64(*(g.fused_tiling if fused else g.tiling))
        return tiles + [np.int32(g.plan.rows), np.int32(g.plan.block_s)] if g.first else tiles

    def role(self, name: str, *tensors: torch.Tensor) -> str:
        """Kernel role: channels-first elementwise kernels get the widest vector all `tensors` allow."""
        return f"{name}_first_{self.vector_width(*tensors)}" if self.g.first else f"{name}_last"

    def vector_width(self, *tensors) -> int:
        """VEC for the channels-first elementwise kernels: 16-byte accesses where every row starts
        aligned (the kernels finish a row whose length is not a multiple of VEC value by value)."""
        if self.g.plan.block_s % self.vec:
            return 1
        for t in tensors:
            view = layout.channels_first_view(t)
            if t.data_ptr() % VECTOR_BYTES or view.stride_n % self.vec or view.stride_c % self.vec:
                return 1
        return self.vec

    def launch(self, role: str, grid, block, args) -> None:
        with self.cupy.cuda.Device(self.device_index), self.stream:
            self.kernels[role](grid, block, tuple(args))


def _empty(shape, dtype, device, strides=None) -> torch.Tensor:
    if strides is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, strides, dtype=dtype, device=device)


# ---- forward ---------------------------------------------------------------------------------

def _normalize(k: _Launcher, x, y, mean, invstd, running_mean, running_var, saved_mean, saved_invstd,
               weight, bias, num_batches_tracked, eps, from_running_stats: bool) -> None:
    grid, block = k.grid()
    k.launch(k.role("normalize", x, y), grid, block, [
        _ptr(x), _ptr(y), _ptr(mean), _ptr(invstd), _ptr(running_mean), _ptr(running_var), _ptr(saved_mean),
        _ptr(saved_invstd), _ptr(weight), _ptr(bias), _ptr(num_batches_tracked)]
        + k.geometry(0, -1) + [np.float32(eps)] + k.tiling() + [np.int32(from_running_stats)])


def _fused_forward(k: _Launcher, x, y, mean, invstd, weight, bias, running_mean, running_var,
                   num_batches_tracked, momentum, eps, tracked: bool, cumulative: bool) -> None:
    grid, block = k.grid()
    k.launch(k.role("fused_forward", x, y), grid, block, [
        _ptr(x), _ptr(y), _ptr(mean), _ptr(invstd), _ptr(running_mean), _ptr(running_var),
        _ptr(num_batches_tracked), _ptr(weight), _ptr(bias)]
        + k.geometry(0, -1) + [np.float32(0.0 if momentum is None else momentum), np.float32(eps)]
        + k.tiling(fused=True)
        + [np.int32(tracked), np.int32(cumulative), np.int32(num_batches_tracked is not None and not cumulative)])
    if cumulative and num_batches_tracked is not None:
        num_batches_tracked.add_(1)  # after the kernel read it (other blocks read it there)


def forward_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    k = _Launcher(x, weight, running_mean)
    g = k.g
    x = g.read(x)
    y = _empty(x.shape, x.dtype, x.device, g.out_strides)
    mean, invstd = _empty(g.C, g.stat_dtype, x.device), _empty(g.C, g.stat_dtype, x.device)
    tracked = running_mean is not None
    cumulative = tracked and momentum is None
    if g.fused:
        _fused_forward(k, x, y, mean, invstd, weight, bias, running_mean, running_var, num_batches_tracked,
                       momentum, eps, tracked, cumulative)
        return y, mean, invstd
    partials = _empty((3, g.plan.splits, g.C), g.stat_dtype, x.device)
    grid, block = k.grid()
    k.launch("stats_first" if g.first else "stats_last", grid, block,
             [_ptr(x), _ptr(partials[0]), _ptr(partials[1]), _ptr(partials[2])] + k.geometry(0) + k.tiling())
    k.launch("finalize_forward", (g.C,), (THREADS,), [
        _ptr(partials[0]), _ptr(partials[1]), _ptr(partials[2]), _ptr(x), np.int64(g.shift_stride),
        _ptr(mean), _ptr(invstd), _ptr(running_mean), _ptr(running_var),
        _ptr(num_batches_tracked if cumulative else None), np.int64(g.plan.splits), np.int64(g.C),
        np.float32(0.0 if momentum is None else momentum), np.float32(eps), np.int32(tracked), np.int32(cumulative)])
    _normalize(k, x, y, mean, invstd, None, None, None, None, weight, bias, num_batches_tracked, eps, False)
    return y, mean, invstd


def forward_eval(x, weight, bias, running_mean, running_var, eps):
    k = _Launcher(x, weight, running_mean)
    g = k.g
    x = g.read(x)
    y = _empty(x.shape, x.dtype, x.device, g.out_strides)
    mean, invstd = _empty(g.C, g.stat_dtype, x.device), _empty(g.C, g.stat_dtype, x.device)
    _normalize(k, x, y, None, None, running_mean, running_var, mean, invstd, weight, bias, None, eps, True)
    return y, mean, invstd


# ---- backward --------------------------------------------------------------------------------

def backward(grad_y, x, weight, mean, invstd, training, need_input_grad, need_weight_grad):
    k = _Launcher(x, weight, None, grad_y)
    g = k.g
    x = g.read(x)
    if g.copy_others[0]:
        grad_y = layout.in_family(grad_y, g.family)
    device = x.device
    param_dtype = weight.dtype if weight is not None else mean.dtype
    grid, block = k.grid()
    reduce = training or need_weight_grad
    if reduce:
        grad_weight, grad_bias = _empty(g.C, param_dtype, device), _empty(g.C, param_dtype, device)
    # Without dx, x stands in for it: its strides are dx's, and nothing is written there.
    grad_x = _empty(x.shape, x.dtype, device, g.out_strides) if need_input_grad else x.new_empty(0)
    dx = grad_x if need_input_grad else x
    inv_count = k.accumulate(1.0 / g.count)
    if reduce and g.fused:
        k.launch(k.role("fused_backward", grad_y, x, dx), grid, block, [
            _ptr(grad_y), _ptr(x), _ptr(grad_x if need_input_grad else None), _ptr(mean), _ptr(invstd),
            _ptr(weight), _ptr(grad_weight), _ptr(grad_bias)]
            + k.geometry(1, 0, -1) + [inv_count] + k.tiling(fused=True)
            + [np.int32(training), np.int32(need_input_grad)])
    else:
        totals = [None, None]  # not read in eval
        if reduce:
            partials = _empty((2, g.plan.splits, g.C), g.stat_dtype, device)
            totals = _empty((2, g.C), g.stat_dtype, device)
            k.launch("reduce_first" if g.first else "reduce_last", grid, block,
                     [_ptr(grad_y), _ptr(x), _ptr(mean), _ptr(partials[0]), _ptr(partials[1])]
                     + k.geometry(1, 0) + k.tiling())
            k.launch("finalize_backward", (g.C,), (THREADS,), [
                _ptr(partials[0]), _ptr(partials[1]), _ptr(invstd), _ptr(totals[0]), _ptr(totals[1]),
                _ptr(grad_weight), _ptr(grad_bias), np.int64(g.plan.splits), np.int64(g.C)])
        if need_input_grad:
            k.launch(k.role("dx", grad_y, x, grad_x), grid, block, [
                _ptr(grad_y), _ptr(x), _ptr(grad_x), _ptr(mean), _ptr(invstd), _ptr(weight),
                _ptr(totals[0]), _ptr(totals[1])]
                + k.geometry(1, 0, -1) + [inv_count] + k.tiling() + [np.int32(training)])
    if not need_weight_grad:
        return grad_x, x.new_empty(0), x.new_empty(0)
    return grad_x, grad_weight, grad_bias
