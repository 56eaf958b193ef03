"""The control flow of every op on the GPU backends, written once.

    forward_train  one on-chip kernel where x fits on chip (read once), else statistics, finalized
                   by its last programs -> normalize (split plan), or one single-pass kernel
    forward_eval   one normalize pass with the running statistics
    backward       in training, one on-chip kernel where x and dy fit on chip, else gradient sums,
                   finalized by its last programs -> input gradient (split plan), or one
                   single-pass kernel; in eval with only dx needed, the input-gradient pass alone
    SyncBatchNorm's steps, with bn_gpu.sync_batch_norm running the collectives between them:
                   local_moments (statistics -> finalize_moments), merge_ranks, normalize,
                   gradient_totals (gradient sums -> finalize), input_gradient

A GPU backend supplies a kernel table (`KernelTable`): its geometry for an input, and one method
per kernel, taking tensors by name. The table marshals arguments for its kernels (Triton or CUDA C)
and launches them on torch's current stream; this module owns allocation, the choice of path and
the order of launches. Every buffer comes from `empty` (tests poison it), or from `workspace` where
its values die within the call.

Tensors reach here validated and dense where per-channel (bn_gpu.ops).
"""
from __future__ import annotations

import functools
from typing import Protocol

import torch

from .plan import Geometry


class KernelTable(Protocol):
    """What a GPU backend provides. A `counter` is num_batches_tracked (0-dim int64) or None."""

    def geometry(self, x: torch.Tensor, grad_y: torch.Tensor | None = None) -> Geometry: ...

    def statistics(self, g: Geometry, x, partials) -> None:
        """partials (3, splits or more, C): per (split, channel) count, mean less the channel's shift, M2."""

    def finalize_statistics(self, g: Geometry, x, partials, mean, invstd, running_mean, running_var,
                            counter, momentum: float | None, eps: float) -> None:
        """Merge partials into mean, invstd; update the running statistics (when given) with factor
        momentum, or 1 / (counter + 1) when momentum is None (counter read, not written)."""

    def statistics_finalized(self, g: Geometry, x, partials, counters, mean, invstd, running_mean, running_var,
                             counter, momentum: float | None, eps: float) -> None:
        """statistics, then finalize_statistics, in one launch where the backend can: the last
        programs to finish merge the partials in two levels. partials has g.partial_rows rows: one
        per split, then the second level's. counters: int32 zeros, g.finalize_counters of them
        (finalize_counters), left at zero."""

    def normalize(self, g: Geometry, x, y, mean, invstd, weight, bias, counter, eps: float,
                  running_mean=None, running_var=None, residual=None, relu: bool = False) -> None:
        """y = (x - mean) * invstd * weight + bias, + residual (y's strides) when given, then ReLU
        when relu; counter += 1 when given. With running statistics (eval), mean and invstd are
        taken from them and written out for the backward."""

    def on_chip_forward(self, g: Geometry, x, y, mean, invstd, weight, bias, running_mean, running_var, counter,
                        momentum: float | None, eps: float, partials, counters, residual=None,
                        relu: bool = False) -> None:
        """single_pass_forward's results from the on-chip kernel (g.on_chip): x read once. partials
        (3, splits, C) when g.on_chip.exchange, else None; counters: int32 zeros, on_chip_counters(g)
        of them, left at zero (or None when that is 0)."""

    def single_pass_forward(self, g: Geometry, x, y, mean, invstd, weight, bias, running_mean, running_var,
                            counter, momentum: float | None, eps: float, count_batch: bool, residual=None,
                            relu: bool = False, counters=None) -> None:
        """statistics + finalize + normalize (with normalize's epilogue) in one launch (one
        program per channel block); counter += 1 when count_batch. With a cumulative average every
        program reads the counter first, so the last program to finish counts the batch, found with
        a ticket on counters (int32 zeros, finalize_counters, left at zero)."""

    def gradient_sums(self, g: Geometry, grad_y, x, mean, partials, invstd=None, weight=None, bias=None,
                      relu: bool = False) -> None:
        """partials (2, splits, C): sum of dy and of dy * (x - mean) per (split, channel); with relu,
        dy masked where the forward's (x - mean) * invstd * weight + bias was not positive."""

    def finalize_gradients(self, g: Geometry, partials, invstd, totals, grad_weight, grad_bias) -> None:
        """totals (2, C) for the input-gradient pass; grad_weight and grad_bias."""

    def gradient_sums_finalized(self, g: Geometry, grad_y, x, mean, partials, counters, invstd, totals, grad_weight,
                                grad_bias, weight=None, bias=None, relu: bool = False) -> None:
        """gradient_sums, then finalize_gradients, in one launch where the backend can (as
        statistics_finalized)."""

    def input_gradient(self, g: Geometry, grad_y, x, grad_x, mean, invstd, weight, totals,
                       training: bool, bias=None, relu: bool = False) -> None:
        """dx; in training from the totals, in eval dy * weight * invstd (totals is None); dy masked
        as in gradient_sums with relu."""

    def single_pass_backward(self, g: Geometry, grad_y, x, grad_x, mean, invstd, weight, grad_weight,
                             grad_bias, training: bool, bias=None, relu: bool = False) -> None:
        """gradient sums, grad_weight, grad_bias and (grad_x given) dx in one launch (relu: as above)."""

    def on_chip_backward(self, g: Geometry, grad_y, x, grad_x, mean, invstd, weight, grad_weight, grad_bias,
                         partials, counters, bias=None, relu: bool = False) -> None:
        """single_pass_backward's in training from the on-chip kernel (g.on_chip_backward): dy and x
        read once. partials (2, splits, C) when g.on_chip_backward.exchange, else None; counters as
        on_chip_forward's."""

    def finalize_moments(self, g: Geometry, x, partials, moments) -> None:
        """moments (2C + 1,): this process's count, C means, C M2s, from the statistics' partials."""

    def merge_ranks(self, dtype: torch.dtype, moments, mean, invstd, running_mean, running_var, counter,
                    momentum: float | None, eps: float) -> None:
        """moments (ranks, 2C + 1) of inputs of `dtype` merged in rank order into mean, invstd;
        running statistics as finalize_statistics."""


def empty(shape, dtype: torch.dtype, device: torch.device, strides=None) -> torch.Tensor:
    """Every buffer of the GPU backends comes from here (tests poison it)."""
    if strides is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, strides, dtype=dtype, device=device)


_COUNTERS: dict = {}
_WORKSPACES: dict = {}


def _stream_key(device: torch.device):
    return (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None)


def workspace(shape: tuple, dtype: torch.dtype, device: torch.device, slot: int = 0) -> torch.Tensor:
    """A contiguous buffer of `shape` for values that die within one op call: the partials of a
    split reduction (written and merged in one launch) and the backward's totals (read by the next
    launch). One per device, stream, dtype and slot (what one call needs at once), grown as needed
    and taken again by the next call: launches on one stream run in order, so a step allocates what
    its outputs need and no more. A CUDA graph being captured gets a buffer of its own (tests
    replace this function, as `empty`, to poison every buffer)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return empty(shape, dtype, device)
    key = (*_stream_key(device), dtype, slot)
    numel = 1
    for size in shape:
        numel *= size
    buffer = _WORKSPACES.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _WORKSPACES[key] = torch.empty(max(numel, 4096), dtype=dtype, device=device)
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return buffer.as_strided(shape, strides)


def finalize_counters(device: torch.device, groups: int) -> torch.Tensor:
    """int32 zeros, at least `groups` of them, for a fused finalize: every launch leaves them at zero
    again. One buffer per device and stream (launches on one stream run in order; two streams
    could overlap). A CUDA graph being captured gets a buffer of its own, zeroed inside the graph."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.zeros(groups, dtype=torch.int32, device=device)
    key = _stream_key(device)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < groups:
        counters = _COUNTERS[key] = torch.zeros(max(groups, 4096), dtype=torch.int32, device=device)
    return counters


def copy_into(buffer: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """buffer.copy_(t): every copy the GPU backends make goes through here (a replay repeats it)."""
    return buffer.copy_(t)


def _copied(t: torch.Tensor, strides: tuple) -> torch.Tensor:
    """t in a buffer of these strides: the layout the kernels read."""
    return copy_into(empty(t.shape, t.dtype, t.device, strides), t)


def _read(g: Geometry, x: torch.Tensor) -> torch.Tensor:
    """x, or its copy in the layout the kernels read."""
    return x if g.read_strides is None else _copied(x, g.read_strides)


def _read_grad(g: Geometry, grad_y: torch.Tensor) -> torch.Tensor:
    """dy, or its copy in the family of x (another layout, or expanded as y.sum()'s gradient is)."""
    return grad_y if g.grad_read_strides is None else _copied(grad_y, g.grad_read_strides)


def on_input_device(op):
    """Run `op` with the input's GPU current: kernels launch on the current device, and Python
    kernels of custom ops get no device guard."""
    @functools.wraps(op)
    def guarded(kernels, tensor, *args, **kwargs):
        device = tensor.device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return op(kernels, tensor, *args, **kwargs)
        return op(kernels, tensor, *args, **kwargs)
    return guarded


def _laid_out_as(residual, y):
    """residual with y's strides: the kernels index both with one set of offsets."""
    return residual if residual.stride() == y.stride() else _copied(residual, y.stride())


def on_chip_counters(g: Geometry, plan, counting: bool) -> int:
    """Counters of an on-chip kernel: a barrier per channel group (block) when its programs exchange,
    then one ticket when `counting` (a cumulative average's batch counted after every read)."""
    return (g.finalize_groups if plan.exchange else 0) + (1 if counting else 0)


def _on_chip_buffers(g: Geometry, plan, rows: int, device, counting: bool = False) -> tuple:
    """(partials, counters) of an on-chip kernel: the exchange's partials, (rows, splits, C)."""
    partials = workspace((rows, plan.splits, g.C), g.stat_dtype, device) if plan.exchange else None
    count = on_chip_counters(g, plan, counting)
    return partials, finalize_counters(device, count) if count else None


@on_input_device
def forward_train(kernels: KernelTable, x, weight, bias, running_mean, running_var, counter, momentum, eps,
                  residual=None, relu=False):
    """(y, mean, invstd) with y = relu?(bn(x) + residual?); updates running_mean/var in place and
    counts the batch in counter."""
    g = kernels.geometry(x)
    x = _read(g, x)
    device = x.device
    y = empty(x.shape, x.dtype, device, g.out_strides)
    if residual is not None:
        residual = _laid_out_as(residual, y)
    mean, invstd = empty(g.C, g.stat_dtype, device), empty(g.C, g.stat_dtype, device)
    cumulative = running_mean is not None and momentum is None
    if g.on_chip is not None:
        partials, counters = _on_chip_buffers(g, g.on_chip, 3, device, cumulative and counter is not None)
        kernels.on_chip_forward(g, x, y, mean, invstd, weight, bias, running_mean, running_var, counter, momentum, eps,
                                partials, counters, residual, relu)
        return y, mean, invstd
    if g.single_pass:
        counting_last = cumulative and counter is not None
        kernels.single_pass_forward(g, x, y, mean, invstd, weight, bias, running_mean, running_var, counter,
                                    momentum, eps, counter is not None, residual, relu,
                                    finalize_counters(device, 1) if counting_last else None)
        return y, mean, invstd
    partials = workspace((3, g.partial_rows, g.C), g.stat_dtype, device)
    kernels.statistics_finalized(g, x, partials, finalize_counters(device, g.finalize_counters), mean, invstd,
                                 running_mean, running_var, counter, momentum, eps)
    # The batch is counted by the last kernel: every finalizing program has read the counter by then.
    kernels.normalize(g, x, y, mean, invstd, weight, bias, counter, eps, residual=residual, relu=relu)
    return y, mean, invstd


@on_input_device
def forward_eval(kernels: KernelTable, x, weight, bias, running_mean, running_var, eps, residual=None, relu=False):
    """(y, mean, invstd) with mean/invstd taken from the running statistics, for the backward."""
    g = kernels.geometry(x)
    x = _read(g, x)
    device = x.device
    y = empty(x.shape, x.dtype, device, g.out_strides)
    if residual is not None:
        residual = _laid_out_as(residual, y)
    mean, invstd = empty(g.C, g.stat_dtype, device), empty(g.C, g.stat_dtype, device)
    kernels.normalize(g, x, y, mean, invstd, weight, bias, None, eps, running_mean, running_var, residual, relu)
    return y, mean, invstd


def _gradient_totals(kernels: KernelTable, g: Geometry, grad_y, x, mean, invstd, param_dtype, weight=None, bias=None,
                     relu=False, returned=False):
    """(totals (2, C): sums of dy and dy * (x - mean), in the statistics dtype; grad_weight;
    grad_bias), by the gradient-sums and finalize kernels of the split plan. The totals are a
    workspace unless `returned` (they leave the op)."""
    partials = workspace((2, g.partial_rows, g.C), g.stat_dtype, x.device)
    totals = empty((2, g.C), g.stat_dtype, x.device) if returned else workspace((2, g.C), g.stat_dtype, x.device, 1)
    grad_weight, grad_bias = empty(g.C, param_dtype, x.device), empty(g.C, param_dtype, x.device)
    kernels.gradient_sums_finalized(g, grad_y, x, mean, partials, finalize_counters(x.device, g.finalize_counters),
                                    invstd, totals, grad_weight, grad_bias, weight=weight, bias=bias, relu=relu)
    return totals, grad_weight, grad_bias


@on_input_device
def backward(kernels: KernelTable, grad_y, x, weight, mean, invstd, training, need_input_grad, need_weight_grad,
             bias=None, relu=False):
    """(grad_x, grad_weight, grad_bias); a gradient that is not needed comes back empty. relu: the
    forward ended in a ReLU (no residual): dy goes through its mask, recomputed from x with the
    forward's mean, invstd, weight and bias."""
    g = kernels.geometry(x, grad_y)
    x, grad_y = _read(g, x), _read_grad(g, grad_y)
    device = x.device
    param_dtype = weight.dtype if weight is not None else mean.dtype
    grad_x = empty(x.shape, x.dtype, device, g.out_strides) if need_input_grad else None
    if not (training or need_weight_grad):  # eval, dx alone: elementwise
        if grad_x is None:
            return x.new_empty(0), x.new_empty(0), x.new_empty(0)
        kernels.input_gradient(g, grad_y, x, grad_x, mean, invstd, weight, None, training=False, bias=bias, relu=relu)
        return grad_x, x.new_empty(0), x.new_empty(0)
    if training and g.on_chip_backward is not None:
        grad_weight, grad_bias = empty(g.C, param_dtype, device), empty(g.C, param_dtype, device)
        partials, counters = _on_chip_buffers(g, g.on_chip_backward, 2, device)
        kernels.on_chip_backward(g, grad_y, x, grad_x, mean, invstd, weight, grad_weight, grad_bias, partials, counters,
                                 bias=bias, relu=relu)
    elif g.single_pass:
        grad_weight, grad_bias = empty(g.C, param_dtype, device), empty(g.C, param_dtype, device)
        kernels.single_pass_backward(g, grad_y, x, grad_x, mean, invstd, weight, grad_weight, grad_bias, training,
                                     bias=bias, relu=relu)
    else:
        totals, grad_weight, grad_bias = _gradient_totals(kernels, g, grad_y, x, mean, invstd, param_dtype,
                                                          weight, bias, relu)
        if need_input_grad:
            kernels.input_gradient(g, grad_y, x, grad_x, mean, invstd, weight, totals, training, bias=bias,
                                   relu=relu)
    if grad_x is None:
        grad_x = x.new_empty(0)
    if not need_weight_grad:
        return grad_x, x.new_empty(0), x.new_empty(0)
    return grad_x, grad_weight, grad_bias


# ---- SyncBatchNorm's steps ------------------------------------------------------------------------
# bn_gpu.sync_batch_norm gathers local_moments from every rank, merges them, normalizes; in the
# backward it all-reduces gradient_totals and runs input_gradient. Local inputs are never empty here.

@on_input_device
def local_moments(kernels: KernelTable, x):
    """(2C + 1,) in the statistics dtype: this process's count, then each channel's mean and M2."""
    g = kernels.geometry(x)
    x = _read(g, x)
    partials = workspace((3, g.plan.splits, g.C), g.stat_dtype, x.device)
    moments = empty(2 * g.C + 1, g.stat_dtype, x.device)
    kernels.statistics(g, x, partials)
    kernels.finalize_moments(g, x, partials, moments)
    return moments


@on_input_device
def merge_ranks(kernels: KernelTable, x, moments, running_mean, running_var, counter, momentum, eps):
    """(mean, invstd) of the global batch from every rank's moments (ranks, 2C + 1); updates the
    running statistics (counter read for a cumulative average, not written). x: this process's
    input (possibly empty), for its device and dtype."""
    C = (moments.shape[1] - 1) // 2
    mean, invstd = empty(C, moments.dtype, moments.device), empty(C, moments.dtype, moments.device)
    kernels.merge_ranks(x.dtype, moments, mean, invstd, running_mean, running_var, counter, momentum, eps)
    return mean, invstd


@on_input_device
def normalize(kernels: KernelTable, x, mean, invstd, weight, bias, counter, eps):
    """y = (x - mean) * invstd * weight + bias with given statistics; counter += 1 when given."""
    g = kernels.geometry(x)
    x = _read(g, x)
    y = empty(x.shape, x.dtype, x.device, g.out_strides)
    kernels.normalize(g, x, y, mean, invstd, weight, bias, counter, eps)
    return y


@on_input_device
def gradient_totals(kernels: KernelTable, grad_y, x, mean, invstd, param_dtype):
    """(totals (2, C): local sums of dy and dy * (x - mean); grad_weight; grad_bias) -- the
    parameter gradients from the local sums, as DDP expects them."""
    g = kernels.geometry(x, grad_y)
    return _gradient_totals(kernels, g, _read_grad(g, grad_y), _read(g, x), mean, invstd, param_dtype, returned=True)


@on_input_device
def input_gradient(kernels: KernelTable, grad_y, x, mean, invstd, weight, totals):
    """Training dx from totals already scaled to this process's count (sums * local / global count)."""
    g = kernels.geometry(x, grad_y)
    x, grad_y = _read(g, x), _read_grad(g, grad_y)
    grad_x = empty(x.shape, x.dtype, x.device, g.out_strides)
    kernels.input_gradient(g, grad_y, x, grad_x, mean, invstd, weight, totals, training=True)
    return grad_x
