"""The CuPy backend's kernel table for bn_gpu.backends.orchestration, which owns the control flow.

Each method marshals one CUDA C kernel's arguments (pointers to torch-allocated memory, numpy
scalars) in the kernel's parameter order and launches it on torch's current CUDA stream -- no
copies, no CuPy allocations, no host synchronization.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from .. import ghost, layout
from .. import plan as plans
from ..ghost import chunk_index, chunk_values
from . import launcher
from .compilation import (C_TYPES, CHANNEL_THREADS, ON_CHIP_RESERVED_SHARED, THREADS, VECTOR_BYTES, compiled_kernels,
                          ring_bytes, shared_memory_per_sm)


@functools.lru_cache(maxsize=None)
def tuning_for(tuning: plans.Tuning, itemsize: int, shared_memory_per_sm: int = 0) -> plans.Tuning:
    """The GPU tuning with channels-last blocks of at most CHANNEL_THREADS threads of 16 bytes of
    channels each, as the CUDA kernels have them (max_block_c does not enter channels-first plans),
    and channels-first tile rows of at most one turn of a block (THREADS groups of 16 bytes): a
    thread then walks down the tile and loads all its groups of it at once (kernels/cuda/channels_first.cuh,
    tile_walk), where along rows of 1-3 groups it would load them one by one. The on-chip kernels
    hold the input in shared memory (on_chip_shared): an SM's shared memory less what each of its
    on_chip_programs_per_sm blocks keeps beside the slice (ON_CHIP_RESERVED_SHARED), where the tuning
    has on-chip kernels at all (on_chip_bytes 0 keeps the two-pass plans)."""
    vector = VECTOR_BYTES // itemsize
    programs = tuning.on_chip_programs_per_sm
    held = max(0, shared_memory_per_sm // programs - ON_CHIP_RESERVED_SHARED) * programs
    return dataclasses.replace(tuning, max_block_c=CHANNEL_THREADS * vector, max_block_s=THREADS * vector,
                               on_chip_bytes=held if tuning.on_chip_bytes else 0, on_chip_shared=True)


# ---- arguments --------------------------------------------------------------------------------

def _ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def _i64(*values) -> list:
    return [np.int64(v) for v in values]


def c_types(dtype: torch.dtype, weight_dtype, running_dtype) -> tuple:
    """(T, W, R, A) of a call. Absent weight or running statistics (None): their pointers are null,
    and the parameter gradients are written in the accumulation dtype."""
    T = C_TYPES[dtype]
    A = "double" if T == "double" else "float"
    W = C_TYPES[weight_dtype] if weight_dtype is not None else A
    R = C_TYPES[running_dtype] if running_dtype is not None else A
    return T, W, R, A


def _dtype(t: torch.Tensor | None):
    return None if t is None else t.dtype


def _param_dtype(weight, bias):
    """W of a kernel reading weight and bias: the weight's dtype, else the bias's."""
    return _dtype(weight if weight is not None else bias)


def _as_w(t: torch.Tensor | None, w_dtype) -> torch.Tensor | None:
    """t in the kernel's W: a bias whose dtype differs from the weight's (fp32 and 16-bit may be
    mixed) is read through a per-channel copy, kept alive by the caller until the launch is queued."""
    return t if t is None or w_dtype is None or t.dtype == w_dtype else t.to(w_dtype)


def _shape(g: plans.Geometry, vec: int):
    """(grid, block) of a streaming kernel: channels-first (channels or channel groups, splits) of
    1-D blocks; channels-last (splits, channel blocks) of blocks with block_c / vec threads across channels."""
    if g.channels_first:
        return g.plan.grid(g.C), (THREADS,)
    channel_threads = g.plan.block_c // vec
    return (g.plan.splits, g.plan.c_blocks), (channel_threads, THREADS // channel_threads)


def _tiling(g: plans.Geometry, single_pass: bool = False) -> list:
    tiles = _i64(*(g.single_pass_tiling if single_pass else g.tiling))
    return tiles + [np.int32(g.plan.rows), np.int32(g.plan.block_s)] if g.channels_first else tiles


def _vector_width_for(g: plans.Geometry, *tensors) -> int:
    """16-byte accesses where every tensor's pointer and strides allow them, else 1. Channels-first
    along each row of S values, so S must be a multiple of the width too (the kernels have no
    value-by-value tail: a sliced view whose rows end mid-group is read value by value); with channel
    groups along each row's run of the group's channels, whose start the plan made a multiple of the
    width (stride_c = S, group x S a multiple), so only the row stride counts; channels-last across
    consecutive channels, so C must be a multiple of the width."""
    vec = VECTOR_BYTES // tensors[0].element_size()
    if (g.plan.block_s if g.channels_first else g.C) % vec:
        return 1
    if g.channels_first and not g.channel_groups and g.S % vec:
        return 1
    if g.chunk_extra % vec or not g.channels_first and g.chunk_channels % vec:
        return 1  # Ghost BatchNorm: each virtual batch starts on 16 bytes, a thread's channels lie in one
    for t in tensors:
        if t is None:
            continue
        if t.data_ptr() % VECTOR_BYTES:
            return 1
        strides = layout.channels_first_view(t).strides if g.channels_first else layout.channels_last_view(t).strides
        if g.channel_groups:
            strides = strides[:1]  # stride_n
        if any(stride % vec for stride in strides):
            return 1
    return vec


def launch(g: plans.Geometry, weight_dtype, running_dtype, role: str, grid, block, args, shared_mem: int = 0) -> None:
    """Launch on the current device (bn_gpu.backends.orchestration made it the input's) and stream,
    with shared_mem bytes of dynamic shared memory."""
    launch_types(g.dtype, weight_dtype, running_dtype, role, grid, block, args, shared_mem)


def launch_types(dtype, weight_dtype, running_dtype, role: str, grid, block, args, shared_mem: int = 0) -> None:
    kernel = compiled_kernels(torch.cuda.current_device(), *c_types(dtype, weight_dtype, running_dtype))[role]
    launcher.launch(launcher.with_shared_memory(kernel, shared_mem) if shared_mem else kernel, grid, block, args)


def launch_on_chip(g: plans.Geometry, weight_dtype, running_dtype, role: str, grid, block, shared_mem: int,
                   args) -> None:
    """An on-chip kernel's cooperative launch with shared_mem bytes of dynamic shared memory."""
    device_index = torch.cuda.current_device()
    kernels = compiled_kernels(device_index, *c_types(g.dtype, weight_dtype, running_dtype))
    kernel = launcher.cooperative(kernels[role], role, shared_mem, THREADS, grid[0] * grid[1],
                                  plans.multiprocessors(device_index))
    launcher.launch(kernel, grid, block, args)


def _accumulate(g: plans.Geometry, value: float):
    return np.float64(value) if g.stat_dtype == torch.float64 else np.float32(value)


class CudaKernels:
    """The kernel table of bn_gpu.backends.orchestration for the CUDA C kernels."""

    def geometry(self, x: torch.Tensor, grad_y: torch.Tensor | None = None) -> plans.Geometry:
        device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        shared = shared_memory_per_sm(device_index) if plans.GPU_TUNING.on_chip_bytes else 0
        return plans.geometry(x, grad_y, tuning_for(plans.GPU_TUNING, x.element_size(), shared),
                              plans.multiprocessors(device_index))

    def ghost_geometry(self, x: torch.Tensor, chunks: int) -> plans.Geometry:
        """Ghost BatchNorm's geometry: x in `chunks` virtual batches (bn_gpu/backends/ghost.py), on
        the split plans alone."""
        device_index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return ghost.geometry(x, chunks, tuning_for(plans.GPU_TUNING, x.element_size()),
                              plans.multiprocessors(device_index))

    @staticmethod
    def _on_chip(g, on_chip: plans.OnChipPlan, name: str, streams: int, *tensors, fused: bool):
        """(role, grid, block, tiling arguments, dynamic shared memory) of the on-chip kernel `name`:
        the split reductions' grid and blocks with the on-chip plan's splits, each block holding
        `held rows` rows of S values (channels-first) or of its block_c channels (channels-last) of
        each of the `streams` inputs; or the walk's (channels-first): the plan's blocks, each with
        load_stages buffers of a channel group's N rows of group x S values of each input."""
        vec = _vector_width_for(g, *tensors)
        family = "first" if g.channels_first else "last"
        role = f"{name}_channels_{family}_{vec}" + ("_fused" if fused else "")
        if not on_chip.exchange:
            run = g.plan.group * g.S
            tiling = [np.int64(0), np.int64(on_chip.load_stages), np.int32(g.plan.group),
                      np.int32(plans.next_power_of_2(run))]
            return (role + "_walk", (on_chip.programs, 1), (THREADS,), tiling,
                    on_chip.load_stages * streams * g.N * run * g.dtype.itemsize)
        if g.channels_first:
            held_rows, row_values = on_chip.held * g.plan.rows, g.S
            grid, block = (g.C, on_chip.splits), (THREADS,)
            tiling = [np.int64(g.plan.s_blocks), np.int64(held_rows), np.int32(g.plan.rows), np.int32(g.plan.block_s)]
        else:
            held_rows, row_values = on_chip.held, g.plan.block_c
            channel_threads = g.plan.block_c // vec
            grid, block = (on_chip.splits, g.plan.c_blocks), (channel_threads, THREADS // channel_threads)
            tiling = [np.int64(held_rows)]
        return role, grid, block, tiling, held_rows * row_values * streams * g.dtype.itemsize

    @staticmethod
    def _streaming(g, name: str, *tensors, fused: bool = False, finalized: bool = False):
        """(role, grid, block) of the streaming kernel `name` on the tensors it reads and writes."""
        vec = _vector_width_for(g, *tensors)
        suffix = (("_fused" if fused else "") + ("_finalized" if finalized else "")
                  + ("_grouped" if g.channel_groups else "") + ("_ghost" if g.chunk_channels else ""))
        family = "first" if g.channels_first else "last"
        return (f"{name}_channels_{family}_{vec}{suffix}", *_shape(g, vec))

    def statistics(self, g, x, partials):
        self._statistics(g, x, partials)

    def _statistics(self, g, x, partials, counters=None, mean=None, invstd=None, running_mean=None,
                    running_var=None, counter=None, momentum=None, eps=0.0):
        """The statistics kernel; with counters, its finalizing instantiation."""
        count, part_mean, m2 = partials
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        shape = self._streaming(g, "statistics", x, finalized=counters is not None)
        launch(g, None, _dtype(running_mean), *shape,
               [_ptr(x), _ptr(count), _ptr(part_mean), _ptr(m2), _ptr(counters), _ptr(mean), _ptr(invstd),
                _ptr(running_mean), _ptr(running_var), _ptr(counter if cumulative else None)]
               + _i64(*g.sizes, *chunk_index(g), *g.x.strides) + _tiling(g)
               + [np.int64(g.finalize.group_splits), np.float64(0.0 if momentum is None else momentum),
                   np.float64(eps), np.int32(tracked), np.int32(cumulative)])

    def finalize_statistics(self, g, x, partials, mean, invstd, running_mean, running_var, counter, momentum, eps):
        count, part_mean, m2 = partials
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launch(g, None, _dtype(running_mean), "finalize_statistics", (g.C,), (THREADS,), [
            _ptr(count), _ptr(part_mean), _ptr(m2), _ptr(x), np.int64(g.shift_stride), _ptr(mean), _ptr(invstd),
            _ptr(running_mean), _ptr(running_var), _ptr(counter if cumulative else None), np.int64(g.plan.splits),
            np.int64(g.C), np.float64(0.0 if momentum is None else momentum), np.float64(eps), np.int32(tracked),
            np.int32(cumulative)])

    def statistics_finalized(self, g, x, partials, counters, mean, invstd, running_mean, running_var, counter,
                             momentum, eps):
        self._statistics(g, x, partials, counters, mean, invstd, running_mean, running_var, counter, momentum, eps)

    def normalize(self, g, x, y, mean, invstd, weight, bias, counter, eps, running_mean=None, running_var=None,
                  residual=None, relu=False):
        from_running = running_mean is not None
        # Eval reads the running statistics and writes mean and invstd for the backward.
        statistics = [None, None, running_mean, running_var, mean, invstd] if from_running else \
            [mean, invstd, None, None, None, None]
        bias = _as_w(bias, _param_dtype(weight, bias))
        shape = self._streaming(g, "normalize", x, y, residual, fused=residual is not None or relu)
        launch(g, _param_dtype(weight, bias), _dtype(running_mean), *shape,
               [_ptr(x), _ptr(y), _ptr(residual), *map(_ptr, statistics), _ptr(weight), _ptr(bias), _ptr(counter)]
               + _i64(*g.sizes, *chunk_index(g), *g.x.strides, *g.out.strides) + [np.float64(eps)] + _tiling(g)
               + [np.int32(from_running), np.int32(relu)])

    def single_pass_forward(self, g, x, y, mean, invstd, weight, bias, running_mean, running_var, counter,
                            momentum, eps, count_batch, residual=None, relu=False, counters=None):
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        bias = _as_w(bias, _param_dtype(weight, bias))
        shape = self._streaming(g, "single_pass_forward", x, y, residual, fused=residual is not None or relu)
        launch(g, _param_dtype(weight, bias), _dtype(running_mean), *shape, [
            _ptr(x), _ptr(y), _ptr(residual), _ptr(mean), _ptr(invstd), _ptr(running_mean), _ptr(running_var),
            _ptr(counter if cumulative or count_batch else None),
            _ptr(counters if cumulative and count_batch else None), _ptr(weight), _ptr(bias)]
            + _i64(*g.sizes, *g.x.strides, *g.out.strides)
            + [np.float64(0.0 if momentum is None else momentum), np.float64(eps)] + _tiling(g, single_pass=True)
            + [np.int32(tracked), np.int32(cumulative), np.int32(count_batch), np.int32(relu)])

    def on_chip_forward(self, g, x, y, mean, invstd, weight, bias, running_mean, running_var, counter, momentum, eps,
                        partials, counters, residual=None, relu=False):
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        count, part_mean, m2 = partials if partials is not None else (None, None, None)  # none in the walk
        bias = _as_w(bias, _param_dtype(weight, bias))
        role, grid, block, tiling, shared = self._on_chip(g, g.on_chip, "on_chip_forward", 1, x, y, residual,
                                                          fused=residual is not None or relu)
        launch_on_chip(g, _param_dtype(weight, bias), _dtype(running_mean), role, grid, block, shared, [
            _ptr(x), _ptr(y), _ptr(residual), _ptr(count), _ptr(part_mean), _ptr(m2), _ptr(mean), _ptr(invstd),
            _ptr(running_mean), _ptr(running_var), _ptr(counter), _ptr(counters), _ptr(weight), _ptr(bias)]
            + _i64(*g.sizes, *g.x.strides, *g.out.strides)
            + [np.float64(0.0 if momentum is None else momentum), np.float64(eps)] + tiling
            + [np.int32(tracked), np.int32(cumulative), np.int32(counter is not None), np.int32(relu)])

    def on_chip_backward(self, g, grad_y, x, grad_x, mean, invstd, weight, grad_weight, grad_bias, partials, counters,
                         bias=None, relu=False):
        # The gradients are written in W: the weight's dtype (the accumulation dtype without one).
        sum_dy, sum_dy_xmu = partials if partials is not None else (None, None)  # none in the walk
        bias = _as_w(bias, grad_weight.dtype) if relu else None
        role, grid, block, tiling, shared = self._on_chip(g, g.on_chip_backward, "on_chip_backward", 2, grad_y, x,
                                                          grad_x, fused=relu)
        launch_on_chip(g, grad_weight.dtype, None, role, grid, block, shared, [
            _ptr(grad_y), _ptr(x), _ptr(grad_x), _ptr(mean), _ptr(invstd), _ptr(weight), _ptr(bias),
            _ptr(grad_weight), _ptr(grad_bias), _ptr(sum_dy), _ptr(sum_dy_xmu), _ptr(counters)]
            + _i64(*g.sizes, *g.grad_y.strides, *g.x.strides, *g.out.strides) + [_accumulate(g, 1.0 / g.count)]
            + tiling + [np.int32(grad_x is not None), np.int32(relu)])

    def gradient_sums(self, g, grad_y, x, mean, partials, invstd=None, weight=None, bias=None, relu=False):
        self._gradient_sums(g, grad_y, x, mean, partials, invstd, weight, bias, relu)

    def gradient_sums_finalized(self, g, grad_y, x, mean, partials, counters, invstd, totals, grad_weight, grad_bias,
                                weight=None, bias=None, relu=False):
        self._gradient_sums(g, grad_y, x, mean, partials, invstd, weight, bias, relu, counters, totals, grad_weight,
                            grad_bias)

    def _gradient_sums(self, g, grad_y, x, mean, partials, invstd, weight, bias, relu, counters=None,
                       totals=(None, None), grad_weight=None, grad_bias=None):
        """The gradient-sums kernel; with counters, its finalizing instantiation, which writes the
        parameter gradients in W (so W is their dtype: the weight's, or the accumulation dtype)."""
        sum_dy, sum_dy_xmu = partials
        w_dtype = grad_weight.dtype if grad_weight is not None else _param_dtype(weight, bias) if relu else None
        masking = [weight, _as_w(bias, w_dtype)] if relu else [None, None]
        shape = self._streaming(g, "gradient_sums", grad_y, x, fused=relu, finalized=counters is not None)
        launch(g, w_dtype, None, *shape,
               [_ptr(grad_y), _ptr(x), _ptr(mean), _ptr(invstd if relu or counters is not None else None),
                *map(_ptr, masking), _ptr(sum_dy), _ptr(sum_dy_xmu), _ptr(counters), *map(_ptr, totals),
                _ptr(grad_weight), _ptr(grad_bias)]
               + _i64(*g.sizes, *chunk_index(g), *g.grad_y.strides, *g.x.strides) + _tiling(g)
               + [np.int64(g.finalize.group_splits), np.int32(relu)], ring_bytes(shape[0]))

    def finalize_gradients(self, g, partials, invstd, totals, grad_weight, grad_bias):
        sum_dy, sum_dy_xmu = partials
        total_dy, total_dy_xmu = totals
        # The gradients are written in the weight's dtype (the accumulation dtype without a weight): W.
        launch(g, grad_weight.dtype, None, "finalize_gradients", (g.C,), (THREADS,), [
            _ptr(sum_dy), _ptr(sum_dy_xmu), _ptr(invstd), _ptr(total_dy), _ptr(total_dy_xmu), _ptr(grad_weight),
            _ptr(grad_bias), np.int64(g.plan.splits), np.int64(g.C)])

    def input_gradient(self, g, grad_y, x, grad_x, mean, invstd, weight, totals, training, bias=None, relu=False):
        total_dy, total_dy_xmu = totals if training else (None, None)
        bias = _as_w(bias, _param_dtype(weight, bias)) if relu else None
        shape = self._streaming(g, "input_gradient", grad_y, x, grad_x, fused=relu)
        launch(g, _param_dtype(weight, bias), None, *shape, [
            _ptr(grad_y), _ptr(x), _ptr(grad_x), _ptr(mean), _ptr(invstd), _ptr(weight), _ptr(bias), _ptr(total_dy),
            _ptr(total_dy_xmu)] + _i64(*g.sizes, *chunk_index(g), *g.grad_y.strides, *g.x.strides, *g.out.strides)
            + [_accumulate(g, 1.0 / g.count)] + _tiling(g) + [np.int32(training), np.int32(relu)])

    def single_pass_backward(self, g, grad_y, x, grad_x, mean, invstd, weight, grad_weight, grad_bias, training,
                             bias=None, relu=False):
        # The gradients are written in W: the weight's dtype (the accumulation dtype without one).
        bias = _as_w(bias, grad_weight.dtype) if relu else None
        shape = self._streaming(g, "single_pass_backward", grad_y, x, grad_x, fused=relu)
        launch(g, grad_weight.dtype, None, *shape, [
            _ptr(grad_y), _ptr(x), _ptr(grad_x), _ptr(mean), _ptr(invstd), _ptr(weight), _ptr(bias),
            _ptr(grad_weight), _ptr(grad_bias)] + _i64(*g.sizes, *g.grad_y.strides, *g.x.strides, *g.out.strides)
            + [_accumulate(g, 1.0 / g.count)] + _tiling(g, single_pass=True)
            + [np.int32(training), np.int32(grad_x is not None), np.int32(relu)])

    def finalize_ghost_statistics(self, g, x, partials, mean, invstd, running_mean, running_var, counter, momentum,
                                  eps):
        """Ghost BatchNorm (g.chunk_channels): each virtual batch's mean and invstd; the running
        statistics updated once per virtual batch, in order (counter read, not written)."""
        count, part_mean, m2 = partials
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launch(g, None, _dtype(running_mean), "finalize_ghost_statistics", (g.chunk_channels,), (THREADS,), [
            _ptr(count), _ptr(part_mean), _ptr(m2), _ptr(x), np.int64(chunk_values(g)), np.int64(g.shift_stride),
            _ptr(mean), _ptr(invstd), _ptr(running_mean), _ptr(running_var), _ptr(counter if cumulative else None),
            *_i64(g.plan.splits, g.chunk_channels, g.C // g.chunk_channels),
            np.float64(0.0 if momentum is None else momentum), np.float64(eps), np.int32(tracked),
            np.int32(cumulative)])

    def finalize_ghost_gradients(self, g, partials, invstd, totals, grad_weight, grad_bias):
        """Ghost BatchNorm: each virtual batch's totals; dweight and dbias summed over them."""
        sum_dy, sum_dy_xmu = partials
        total_dy, total_dy_xmu = totals
        launch(g, grad_weight.dtype, None, "finalize_ghost_gradients", (g.chunk_channels,), (THREADS,), [
            _ptr(sum_dy), _ptr(sum_dy_xmu), _ptr(invstd), _ptr(total_dy), _ptr(total_dy_xmu), _ptr(grad_weight),
            _ptr(grad_bias), *_i64(g.plan.splits, g.chunk_channels, g.C // g.chunk_channels)])

    def finalize_moments(self, g, x, partials, moments):
        count, part_mean, m2 = partials
        launch(g, None, None, "finalize_moments", (g.C,), (THREADS,), [
            _ptr(count), _ptr(part_mean), _ptr(m2), _ptr(x), np.int64(g.shift_stride), _ptr(moments),
            np.int64(g.plan.splits), np.int64(g.C)])

    def merge_ranks(self, dtype, moments, mean, invstd, running_mean, running_var, counter, momentum, eps):
        ranks, C = moments.shape[0], (moments.shape[1] - 1) // 2
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launch_types(dtype, None, _dtype(running_mean), "merge_ranks", (-(-C // THREADS),), (THREADS,), [
            _ptr(moments), _ptr(mean), _ptr(invstd), _ptr(running_mean), _ptr(running_var),
            _ptr(counter if cumulative else None), np.int64(ranks), np.int64(C),
            np.float64(0.0 if momentum is None else momentum), np.float64(eps), np.int32(tracked),
            np.int32(cumulative)])


KERNELS = CudaKernels()
