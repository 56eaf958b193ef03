"""Ghost BatchNorm's control flow on a GPU backend's kernel table (kernels/ghost.py for Triton,
kernels/cuda/ghost.cuh for CUDA C).

An input of N rows in G virtual batches is, to the split path's kernels, an input of N / G rows and
G x C virtual channels (the GHOST two-level channel index): every per-channel array -- partials,
mean, invstd, weight, bias, totals -- has G x C entries, (G, C) row-major.

    forward_train  statistics -> finalize_ghost_statistics (each virtual batch's mean and invstd, the
                   running statistics updated once per virtual batch, in order) -> normalize
    backward       gradient sums -> finalize_ghost_gradients (each virtual batch's totals; dweight and
                   dbias summed over them, in order) -> input gradient

Three kernel launches each way (beside the weight's repeat), where the torch operations of
bn_gpu.nn.ghost's general path make many passes over x (profiling/ghost_traffic.py counts both).
The inputs reach here dense, in one layout (x and dy with the same strides), with N a multiple of
the virtual batch.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from ..dtypes import stat_dtype
from . import orchestration
from .orchestration import on_input_device
from .plan import (CHANNELS_FIRST, Geometry, Tuning, channel_group, channels_first_plan, channels_last_plan,
                   finalize_plan)
from .layout import channels_first_view, channels_last_view, choose_layout, spatial_size


def readable(x: torch.Tensor) -> bool:
    """Whether the kernels read x as it is: dense in one of the layouts (else a contiguous copy)."""
    return choose_layout(x)[1] is x


def geometry(x: torch.Tensor, chunks: int, tuning: Tuning, sms: int) -> Geometry:
    """The kernel table's ghost_geometry: x in `chunks` virtual batches, for this tuning and GPU."""
    return _cached_geometry(tuple(x.shape), x.stride(), x.dtype, chunks, tuning, sms)


@functools.lru_cache(maxsize=256)
def _cached_geometry(shape, strides, dtype, chunks: int, tuning: Tuning, sms: int) -> Geometry:
    """The Geometry of G = `chunks` virtual batches of x: N / G rows, G x C channels, x's strides."""
    x = torch.empty_strided(shape, strides, dtype=dtype, device="meta")
    family, _ = choose_layout(x)
    N, C, S = shape[0], shape[1], spatial_size(shape)
    rows, itemsize = N // chunks, x.element_size()
    if family == CHANNELS_FIRST:
        view = channels_first_view(x)
        # A channel group must not straddle two virtual batches: channels adjacent (grouped, or rows
        # aligned) only where C is a multiple of the group.
        group = channel_group(chunks * C, S, itemsize, tuning.tile_elements(itemsize), True)
        adjacent = view.stride_c == S and C % group == 0
        plan = channels_first_plan(rows, chunks * C, S, itemsize, tuning, sms, adjacent)
        extra = rows * view.stride_n - C * view.stride_c
        block_c = plan.group
    else:
        view = channels_last_view(x)
        # A program's channel block lies in one virtual batch: a power of two that divides C.
        narrow = dataclasses.replace(tuning, max_block_c=min(tuning.max_block_c, C & -C))
        plan = channels_last_plan(rows * S, chunks * C, itemsize, narrow, sms)
        extra = rows * S * view.stride_m - C
        block_c = plan.block_c
    return Geometry(
        family=family, N=rows, C=chunks * C, S=S, dtype=dtype, stat_dtype=stat_dtype(dtype), plan=plan,
        finalize=finalize_plan(plan.splits, C, tuning, sms, block_c), x=view, out=view, grad_y=view,
        out_strides=tuple(strides), read_strides=None, grad_read_strides=None,
        offset_64=x.numel() > 2**31 - 1, chunk_channels=C, chunk_extra=extra)


def chunk_index(g: Geometry) -> tuple:
    """The split kernels' two-level channel index (chunk_channels, chunk_extra): channel v's values
    start chunk_extra x (v // chunk_channels) past the plain index (kernels/ghost.py, chunk_offset);
    1 and 0 outside Ghost BatchNorm."""
    return (g.chunk_channels, g.chunk_extra) if g.chunk_channels else (1, 0)


def chunk_values(g: Geometry) -> int:
    """How far apart two consecutive virtual batches' values start: a channel's first value to its first
    value in the next virtual batch (the ghost finalizes' shifts)."""
    return g.chunk_extra + g.chunk_channels * g.shift_stride


def _repeated(t, chunks: int):
    """A per-channel parameter for each virtual batch: the kernels index it by virtual channel."""
    return None if t is None else t.repeat(chunks)


@on_input_device
def forward_train(kernels, x, weight, bias, running_mean, running_var, counter, momentum, eps, chunks: int):
    """(y, mean, invstd) of Ghost BatchNorm with `chunks` virtual batches; mean and invstd (G x C,)
    per virtual batch. Updates the running statistics once per virtual batch and counts each."""
    g = kernels.ghost_geometry(x, chunks)
    device = x.device
    y = orchestration.empty(x.shape, x.dtype, device, g.out_strides)
    mean, invstd = orchestration.empty(g.C, g.stat_dtype, device), orchestration.empty(g.C, g.stat_dtype, device)
    partials = orchestration.workspace((3, g.plan.splits, g.C), g.stat_dtype, device)
    kernels.statistics(g, x, partials)
    kernels.finalize_ghost_statistics(g, x, partials, mean, invstd, running_mean, running_var, counter, momentum, eps)
    if counter is not None:
        counter.add_(chunks)  # after the finalize, which read it
    kernels.normalize(g, x, y, mean, invstd, _repeated(weight, chunks), _repeated(bias, chunks), None, eps)
    return y, mean, invstd


@on_input_device
def backward(kernels, grad_y, x, weight, mean, invstd, chunks: int, param_dtype: torch.dtype):
    """(grad_x, grad_weight, grad_bias) of forward_train's output; grad_y has x's strides."""
    g = kernels.ghost_geometry(x, chunks)
    device = x.device
    partials = orchestration.workspace((2, g.plan.splits, g.C), g.stat_dtype, device)
    totals = orchestration.workspace((2, g.C), g.stat_dtype, device, 1)
    grad_weight = orchestration.empty(g.chunk_channels, param_dtype, device)
    grad_bias = orchestration.empty(g.chunk_channels, param_dtype, device)
    kernels.gradient_sums(g, grad_y, x, mean, partials)
    kernels.finalize_ghost_gradients(g, partials, invstd, totals, grad_weight, grad_bias)
    grad_x = orchestration.empty(x.shape, x.dtype, device, g.out_strides)
    kernels.input_gradient(g, grad_y, x, grad_x, mean, invstd, _repeated(weight, chunks), totals, training=True)
    return grad_x, grad_weight, grad_bias
