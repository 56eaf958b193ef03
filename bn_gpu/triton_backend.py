"""Launch functions of the Triton backend: training forward (3 launches), eval forward (1 launch),
backward (3 launches in training; 1 in eval when only dx is needed).

Tensors reach here validated (bn_gpu.validation). CUDA tensors run compiled kernels; CPU tensors
run them in the Triton interpreter, which must be switched on with TRITON_INTERPRET=1 before
bn_gpu is imported.
"""
from __future__ import annotations

import torch
import triton.language as tl

from . import layout
from .dtypes import stat_dtype
from .kernels import channels_first as cf
from .kernels import channels_last as cl
from .kernels import finalize as fin
from .layout import CHANNELS_FIRST
from .plan import channels_first_plan, channels_last_plan, finalize_plan, interpreting, tuning_and_sms

_INT32_LIMIT = 2**31 - 1


def check_available(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors; got tensors on {device}. Move them to a GPU, use "
        "backend='cpu', or run the Triton kernels in the interpreter on CPU tensors by setting "
        "TRITON_INTERPRET=1 before importing bn_gpu (slow: for testing).")


def _needs_64bit_offsets(*tensors: torch.Tensor) -> bool:
    return any(sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) > _INT32_LIMIT
               for t in tensors)


class _Work:
    """The launch geometry of one input: layout family, plan and per-tensor strides."""

    def __init__(self, x: torch.Tensor, family: str):
        self.family = family
        self.device = x.device
        self.N, self.C = x.shape[0], x.shape[1]
        self.S = layout.spatial_size(x.shape)
        self.stat_dtype = stat_dtype(x.dtype)
        self.acc = tl.float64 if self.stat_dtype == torch.float64 else tl.float32
        tuning, sms = tuning_and_sms(x.device)
        if family == CHANNELS_FIRST:
            self.plan = channels_first_plan(self.N, self.C, self.S, tuning, sms)
        else:
            self.plan = channels_last_plan(self.N * self.S, self.C, tuning, sms)
        self.finalize = finalize_plan(self.plan.splits, self.C, tuning)

    @property
    def count(self) -> int:
        return self.N * self.S

    def geometry(self, *tensors: torch.Tensor) -> list:
        """Sizes, then each tensor's strides, as the kernels of the family take them."""
        if self.family == CHANNELS_FIRST:
            strides = []
            for t in tensors:
                view = layout.channels_first_view(t)
                strides += [view.stride_n, view.stride_c]
            return [self.N, self.C, self.S, *strides]
        return [self.N * self.S, self.C, *(layout.channels_last_view(t).stride_m for t in tensors)]

    def channel_stride(self, t: torch.Tensor) -> int:
        """Distance between the first values of consecutive channels."""
        return layout.channels_first_view(t).stride_c if self.family == CHANNELS_FIRST else 1

    def tiling(self) -> list:
        p = self.plan
        if self.family == CHANNELS_FIRST:
            return [p.s_blocks, p.total_tiles, p.tiles_per_program]
        return [p.rows_per_program]

    def meta(self, *tensors: torch.Tensor) -> dict:
        p = self.plan
        blocks = dict(ROWS=p.rows, BLOCK_S=p.block_s) if self.family == CHANNELS_FIRST else dict(
            BLOCK_M=p.block_m, BLOCK_C=p.block_c)
        return dict(ACC=self.acc, OFFSET_64=_needs_64bit_offsets(*tensors), num_warps=p.num_warps, **blocks)

    def kernel(self, channels_first_kernel, channels_last_kernel):
        kernel = channels_first_kernel if self.family == CHANNELS_FIRST else channels_last_kernel
        return kernel[self.plan.grid(self.C)]


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every statistics, workspace and parameter-gradient buffer comes from here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_stats(work: _Work, *shape: int) -> torch.Tensor:
    return _empty(shape, work.stat_dtype, work.device)


def _launch_stats(work: _Work, x: torch.Tensor, partials: torch.Tensor) -> None:
    count, mean, m2 = partials
    work.kernel(cf.channels_first_stats_kernel, cl.channels_last_stats_kernel)(
        x, count, mean, m2, *work.geometry(x), *work.tiling(), **work.meta(x))


def _launch_forward_finalize(work, x, partials, mean, invstd, running_mean, running_var,
                             num_batches_tracked, momentum, eps) -> None:
    count, part_mean, m2 = partials
    tracked = running_mean is not None
    cumulative = tracked and momentum is None and num_batches_tracked is not None
    fin.forward_finalize_kernel[work.finalize.grid(work.C)](
        count, part_mean, m2, x, mean, invstd,
        running_mean if tracked else mean, running_var if tracked else mean,
        num_batches_tracked if cumulative else mean,
        work.plan.splits, work.C, work.channel_stride(x), 0.0 if momentum is None else float(momentum), float(eps),
        HAS_RUNNING_STATS=tracked, CUMULATIVE=cumulative, ACC=work.acc,
        BLOCK_SPLITS=work.finalize.block_splits, BLOCK_C=work.finalize.block_c)


def _launch_normalize(work, x, y, mean, var_or_invstd, invstd_out, saved_mean, weight, bias, eps,
                      from_running_stats: bool, num_batches_tracked=None) -> None:
    dummy = invstd_out
    work.kernel(cf.channels_first_normalize_kernel, cl.channels_last_normalize_kernel)(
        x, y, mean, var_or_invstd if from_running_stats else dummy, invstd_out,
        saved_mean if from_running_stats else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        num_batches_tracked if num_batches_tracked is not None else dummy,
        *work.geometry(x, y), float(eps), *work.tiling(),
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, FROM_RUNNING_STATS=from_running_stats,
        COUNT_BATCH=num_batches_tracked is not None, **work.meta(x, y))


def forward_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    """(y, mean, invstd); updates running_mean/var in place and counts the batch in
    num_batches_tracked, when given."""
    family, x = layout.choose_layout(x)
    work = _Work(x, family)
    mean, invstd = _empty_stats(work, work.C), _empty_stats(work, work.C)
    partials = _empty_stats(work, 3, work.plan.splits, work.C)
    _launch_stats(work, x, partials)
    _launch_forward_finalize(work, x, partials, mean, invstd, running_mean, running_var,
                             num_batches_tracked, momentum, eps)
    y = layout.empty_in_family(x, family)
    _launch_normalize(work, x, y, mean, None, invstd, None, weight, bias, eps, from_running_stats=False,
                      num_batches_tracked=num_batches_tracked)
    return y, mean, invstd


def forward_eval(x, weight, bias, running_mean, running_var, eps):
    """(y, mean, invstd) with mean/invstd taken from the running statistics, for the backward."""
    family, x = layout.choose_layout(x)
    work = _Work(x, family)
    mean, invstd = _empty_stats(work, work.C), _empty_stats(work, work.C)
    y = layout.empty_in_family(x, family)
    _launch_normalize(work, x, y, running_mean, running_var, invstd, mean, weight, bias, eps,
                      from_running_stats=True)
    return y, mean, invstd


def _launch_backward_reduce(work, dy, x, mean, partials) -> None:
    sum_dy, sum_dy_xmu = partials
    work.kernel(cf.channels_first_backward_reduce_kernel, cl.channels_last_backward_reduce_kernel)(
        dy, x, mean, sum_dy, sum_dy_xmu, *work.geometry(dy, x), *work.tiling(), **work.meta(dy, x))


def _launch_backward_finalize(work, partials, invstd, totals, grad_weight, grad_bias) -> None:
    fin.backward_finalize_kernel[work.finalize.grid(work.C)](
        partials[0], partials[1], invstd, totals[0], totals[1], grad_weight, grad_bias,
        work.plan.splits, work.C, ACC=work.acc,
        BLOCK_SPLITS=work.finalize.block_splits, BLOCK_C=work.finalize.block_c)


def _launch_backward_dx(work, dy, x, dx, mean, invstd, weight, totals, training) -> None:
    work.kernel(cf.channels_first_backward_dx_kernel, cl.channels_last_backward_dx_kernel)(
        dy, x, dx, mean, invstd, weight if weight is not None else invstd, totals[0], totals[1],
        *work.geometry(dy, x, dx), 1.0 / work.count, *work.tiling(),
        HAS_WEIGHT=weight is not None, TRAINING=training, **work.meta(dy, x, dx))


def backward(grad_y, x, weight, mean, invstd, training, need_input_grad, need_weight_grad):
    """(grad_x, grad_weight, grad_bias); a gradient that is not needed comes back as an empty tensor."""
    family, x = layout.choose_layout(x)
    grad_y = layout.in_family(grad_y, family)
    work = _Work(x, family)
    param_dtype = weight.dtype if weight is not None else mean.dtype
    grad_x = x.new_empty(0)
    reduce = training or need_weight_grad
    if reduce:
        partials = _empty_stats(work, 2, work.plan.splits, work.C)
        totals = _empty_stats(work, 2, work.C)
        grad_weight = _empty(work.C, param_dtype, x.device)
        grad_bias = _empty(work.C, param_dtype, x.device)
        _launch_backward_reduce(work, grad_y, x, mean, partials)
        _launch_backward_finalize(work, partials, invstd, totals, grad_weight, grad_bias)
    else:
        totals = (invstd, invstd)  # not read in eval
    if need_input_grad:
        grad_x = layout.empty_in_family(x, family)
        _launch_backward_dx(work, grad_y, x, grad_x, mean, invstd, weight, totals, training)
    if not need_weight_grad:
        grad_weight, grad_bias = x.new_empty(0), x.new_empty(0)
    return grad_x, grad_weight, grad_bias
