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
from .dtypes import stat_dtype
from .layout import CHANNELS_FIRST

C_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float64: "double"}
THREADS = 256            # 1-D blocks: channels-first kernels and finalize kernels
ROW_THREADS = 8          # channels-last blocks are (32, ROW_THREADS), as ROW_THREADS in the source
VECTOR_BYTES = 16


@functools.lru_cache(maxsize=None)
def _channels_last_tuning(tuning: plans.Tuning) -> plans.Tuning:
    return dataclasses.replace(tuning, max_block_c=32)  # channels-last blocks own 32 channels

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
    """Kernels, geometry and stream of one call."""

    def __init__(self, x: torch.Tensor, weight, running):
        self.x = x
        self.family, self.x_read = layout.choose_layout(x)
        self.first = self.family == CHANNELS_FIRST
        self.N, self.C = x.shape[0], x.shape[1]
        self.S = layout.spatial_size(x.shape)
        self.count = self.N * self.S
        self.stat_dtype = stat_dtype(x.dtype)
        T = C_TYPES[x.dtype]
        A = "double" if T == "double" else "float"
        # Absent weight or running statistics: their pointers are null, and the parameter gradients
        # are written in the accumulation dtype.
        W = C_TYPES[weight.dtype] if weight is not None else A
        R = C_TYPES[running.dtype] if running is not None else A
        device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        self.device_index = device_index
        self.kernels = _kernels(device_index, T, W, R, A)
        self.vec = VECTOR_BYTES // x.element_size()
        sms = plans.multiprocessors(device_index)
        if self.first:
            self.plan = plans.channels_first_plan(self.N, self.C, self.S, plans.GPU_TUNING, sms)
        else:
            self.plan = plans.channels_last_plan(self.count, self.C, _channels_last_tuning(plans.GPU_TUNING), sms)
        self.fused = self.plan.splits == 1
        self.cupy = _import_cupy()
        self.stream = self.cupy.cuda.ExternalStream(torch.cuda.current_stream(x.device).cuda_stream, device_index)
        self.accumulate = np.float64 if A == "double" else np.float32

    @property
    def splits(self) -> int:
        return self.plan.splits

    def grid(self):
        if self.first:
            return (self.C, self.splits), (THREADS,)
        return (self.splits, -(-self.C // 32)), (32, ROW_THREADS)

    def geometry(self, *tensors) -> list:
        if self.first:
            strides = []
            for t in tensors:
                view = layout.channels_first_view(t)
                strides += [view.stride_n, view.stride_c]
            return _i64(self.N, self.C, self.S, *strides)
        return _i64(self.count, self.C, *(layout.channels_last_view(t).stride_m for t in tensors))

    def tiling(self) -> list:
        p = self.plan
        if self.first:
            return _i64(p.s_blocks, p.total_tiles, p.tiles_per_program) + [np.int32(p.rows), np.int32(p.block_s)]
        return _i64(p.rows_per_program)

    def fused_tiling(self) -> list:
        p = self.plan
        return _i64(p.s_blocks, p.total_tiles) + [np.int32(p.rows), np.int32(p.block_s)] if self.first else []

    def vector_width(self, *tensors) -> int:
        """VEC for the channels-first elementwise kernels: 16-byte accesses where every row starts
        aligned (the kernels finish a row whose length is not a multiple of VEC value by value)."""
        if self.plan.block_s % self.vec:
            return 1
        for t in tensors:
            view = layout.channels_first_view(t)
            if t.data_ptr() % VECTOR_BYTES or view.stride_n % self.vec or view.stride_c % self.vec:
                return 1
        return self.vec

    def launch(self, role: str, grid, block, args) -> None:
        with self.cupy.cuda.Device(self.device_index), self.stream:
            self.kernels[role](grid, block, tuple(args))


def _empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


# ---- forward ---------------------------------------------------------------------------------

def _normalize(k: _Launcher, x, y, mean, invstd, running_mean, running_var, saved_mean, saved_invstd,
               weight, bias, num_batches_tracked, eps, from_running_stats: bool) -> None:
    common = [_ptr(x), _ptr(y), _ptr(mean), _ptr(invstd), _ptr(running_mean), _ptr(running_var),
              _ptr(saved_mean), _ptr(saved_invstd), _ptr(weight), _ptr(bias), _ptr(num_batches_tracked)]
    grid, block = k.grid()
    if k.first:
        vec = k.vector_width(x, y)
        k.launch(f"normalize_first_{vec}", grid, block,
                 common + k.geometry(x, y) + [np.float32(eps)] + k.tiling() + [np.int32(from_running_stats)])
    else:
        k.launch("normalize_last", grid, block,
                 common + k.geometry(x, y) + [np.float32(eps)] + k.tiling() + [np.int32(from_running_stats)])


def _fused_forward(k: _Launcher, x, y, mean, invstd, weight, bias, running_mean, running_var,
                   num_batches_tracked, momentum, eps, tracked: bool, cumulative: bool) -> None:
    grid, block = k.grid()
    args = [_ptr(x), _ptr(y), _ptr(mean), _ptr(invstd), _ptr(running_mean), _ptr(running_var),
            _ptr(num_batches_tracked), _ptr(weight), _ptr(bias)] + k.geometry(x, y) + [
            np.float32(0.0 if momentum is None else momentum), np.float32(eps)] + k.fused_tiling() + [
            np.int32(tracked), np.int32(cumulative), np.int32(num_batches_tracked is not None and not cumulative)]
    role = f"fused_forward_first_{k.vector_width(x, y)}" if k.first else "fused_forward_last"
    k.launch(role, grid, block, args)
    if cumulative and num_batches_tracked is not None:
        num_batches_tracked.add_(1)  # after the kernel read it (other blocks read it there)


def forward_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    k = _Launcher(x, weight, running_mean)
    x = k.x_read
    y = layout.empty_in_family(x, k.family)
    mean, invstd = _empty(k.C, k.stat_dtype, x.device), _empty(k.C, k.stat_dtype, x.device)
    tracked = running_mean is not None
    cumulative = tracked and momentum is None
    if k.fused:
        _fused_forward(k, x, y, mean, invstd, weight, bias, running_mean, running_var, num_batches_tracked,
                       momentum, eps, tracked, cumulative)
        return y, mean, invstd
    partials = _empty((3, k.splits, k.C), k.stat_dtype, x.device)
    grid, block = k.grid()
    stats_args = [_ptr(x), _ptr(partials[0]), _ptr(partials[1]), _ptr(partials[2])] + k.geometry(x) + k.tiling()
    k.launch("stats_first" if k.first else "stats_last", grid, block, stats_args)
    shift_stride = layout.channels_first_view(x).stride_c if k.first else 1
    k.launch("finalize_forward", (k.C,), (THREADS,), [
        _ptr(partials[0]), _ptr(partials[1]), _ptr(partials[2]), _ptr(x), np.int64(shift_stride),
        _ptr(mean), _ptr(invstd), _ptr(running_mean), _ptr(running_var),
        _ptr(num_batches_tracked if cumulative else None), np.int64(k.splits), np.int64(k.C),
        np.float32(0.0 if momentum is None else momentum), np.float32(eps), np.int32(tracked), np.int32(cumulative)])
    _normalize(k, x, y, mean, invstd, None, None, None, None, weight, bias, num_batches_tracked, eps, False)
    return y, mean, invstd


def forward_eval(x, weight, bias, running_mean, running_var, eps):
    k = _Launcher(x, weight, running_mean)
    x = k.x_read
    y = layout.empty_in_family(x, k.family)
    mean, invstd = _empty(k.C, k.stat_dtype, x.device), _empty(k.C, k.stat_dtype, x.device)
    _normalize(k, x, y, None, None, running_mean, running_var, mean, invstd, weight, bias, None, eps, True)
    return y, mean, invstd


# ---- backward --------------------------------------------------------------------------------

def backward(grad_y, x, weight, mean, invstd, training, need_input_grad, need_weight_grad):
    k = _Launcher(x, weight, None)
    x = k.x_read
    grad_y = layout.in_family(grad_y, k.family)
    device = x.device
    param_dtype = weight.dtype if weight is not None else mean.dtype
    grid, block = k.grid()
    totals = [None, None]
    grad_weight, grad_bias = x.new_empty(0), x.new_empty(0)
    reduce = training or need_weight_grad
    if reduce:
        grad_weight, grad_bias = _empty(k.C, param_dtype, device), _empty(k.C, param_dtype, device)
    grad_x = layout.empty_in_family(x, k.family) if need_input_grad else x.new_empty(0)
    if reduce and k.fused:
        dx_strides = grad_x if need_input_grad else x  # x stands in for a dx that is not written
        args = ([_ptr(grad_y), _ptr(x), _ptr(grad_x if need_input_grad else None), _ptr(mean), _ptr(invstd),
                 _ptr(weight), _ptr(grad_weight), _ptr(grad_bias)]
                + k.geometry(grad_y, x, dx_strides) + [k.accumulate(1.0 / k.count)] + k.fused_tiling()
                + [np.int32(training), np.int32(need_input_grad)])
        role = f"fused_backward_first_{k.vector_width(grad_y, x, dx_strides)}" if k.first else "fused_backward_last"
        k.launch(role, grid, block, args)
    elif reduce:
        partials = _empty((2, k.splits, k.C), k.stat_dtype, device)
        totals = _empty((2, k.C), k.stat_dtype, device)
        k.launch("reduce_first" if k.first else "reduce_last", grid, block,
                 [_ptr(grad_y), _ptr(x), _ptr(mean), _ptr(partials[0]), _ptr(partials[1])]
                 + k.geometry(grad_y, x) + k.tiling())
        k.launch("finalize_backward", (k.C,), (THREADS,), [
            _ptr(partials[0]), _ptr(partials[1]), _ptr(invstd), _ptr(totals[0]), _ptr(totals[1]),
            _ptr(grad_weight), _ptr(grad_bias), np.int64(k.splits), np.int64(k.C)])
    if need_input_grad and not (reduce and k.fused):
        args = [_ptr(grad_y), _ptr(x), _ptr(grad_x), _ptr(mean), _ptr(invstd), _ptr(weight),
                _ptr(totals[0]), _ptr(totals[1])] + k.geometry(grad_y, x, grad_x) + [k.accumulate(1.0 / k.count)]
        role = f"dx_first_{k.vector_width(grad_y, x, grad_x)}" if k.first else "dx_last"
        k.launch(role, grid, block, args + k.tiling() + [np.int32(training)])
    if not need_weight_grad:
        return grad_x, x.new_empty(0), x.new_empty(0)
    return grad_x, grad_weight, grad_bias
