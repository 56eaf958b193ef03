"""Launch functions of the Triton backend.

Training forward: one launch when each program owns whole channels (plan.splits == 1: many
channels, or a small input), else three (statistics, finalize, normalize). Eval forward: one.
Backward: one or three in training the same way; in eval, one when only dx is needed.

Everything about an input that does not change from call to call -- layout family, launch plan,
strides of the output, argument lists -- is worked out once per (shape, strides, dtype, device)
and cached, so that a call does little more than allocate and launch.

Tensors reach here validated (bn_gpu.validation). CUDA tensors run compiled kernels; CPU tensors
run them in the Triton interpreter, which must be switched on with TRITON_INTERPRET=1 before the
kernels are first used.
"""
from __future__ import annotations

import functools

import torch
import triton.language as tl

from . import layout
from .kernels import channels_first as cf
from .kernels import channels_last as cl
from .kernels import finalize as fin
from .plan import Geometry, Tuning, finalize_plan, interpreting, tuning_and_sms

# (channels-first kernel, channels-last kernel) of each job
_STATS = (cf.channels_first_stats_kernel, cl.channels_last_stats_kernel)
_NORMALIZE = (cf.channels_first_normalize_kernel, cl.channels_last_normalize_kernel)
_FUSED_FORWARD = (cf.channels_first_fused_forward_kernel, cl.channels_last_fused_forward_kernel)
_BACKWARD_REDUCE = (cf.channels_first_backward_reduce_kernel, cl.channels_last_backward_reduce_kernel)
_BACKWARD_DX = (cf.channels_first_backward_dx_kernel, cl.channels_last_backward_dx_kernel)
_FUSED_BACKWARD = (cf.channels_first_fused_backward_kernel, cl.channels_last_fused_backward_kernel)


def check_available(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors; got tensors on {device}. Move them to a GPU, use "
        "backend='cpu', or run the Triton kernels in the interpreter on CPU tensors by setting "
        "TRITON_INTERPRET=1 before importing bn_gpu (slow: for testing).")


def _on_device_of(position: int):
    """Run the decorated launch function with the GPU of its argument `position` current: Triton
    launches on the current device, and Python kernels of custom ops get no device guard."""
    def decorate(launch):
        @functools.wraps(launch)
        def guarded(*args):
            device = args[position].device
            if device.type == "cuda" and device.index != torch.cuda.current_device():
                with torch.cuda.device(device):
                    return launch(*args)
            return launch(*args)
        return guarded
    return decorate


def _empty(shape, dtype: torch.dtype, device: torch.device, strides=None) -> torch.Tensor:
    """Every buffer of this backend comes from here (tests poison it)."""
    if strides is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty_strided(shape, strides, dtype=dtype, device=device)


class _Recipe(Geometry):
    """The geometry of one input layout, plus what Triton launches take: constexprs and grids."""

    def __init__(self, x: torch.Tensor, family: str, tuning: Tuning, sms: int, others=()):
        super().__init__(x, family, tuning, sms, others)
        p = self.plan
        blocks = dict(ROWS=p.rows, BLOCK_S=p.block_s) if self.first else dict(BLOCK_M=p.block_m, BLOCK_C=p.block_c)
        acc = tl.float64 if self.stat_dtype == torch.float64 else tl.float32
        self.meta = dict(ACC=acc, OFFSET_64=self.offset_64, num_warps=p.num_warps, **blocks)
        self.grid = p.grid(self.C)
        self.finalize = finalize_plan(p.splits, self.C, tuning)
        self.finalize_grid = self.finalize.grid(self.C)

    def kernel(self, pair):
        return pair[0 if self.first else 1][self.grid]


def _recipe(x: torch.Tensor, *others: torch.Tensor) -> _Recipe:
    tuning, sms = tuning_and_sms(x.device)
    return _Recipe.of(x, *others, tuning=tuning, sms=sms)


# ---- forward ---------------------------------------------------------------------------------

@_on_device_of(0)
def forward_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    """(y, mean, invstd); updates running_mean/var in place and counts the batch in
    num_batches_tracked, when given."""
    r = _recipe(x)
    x = r.read(x)
    y = _empty(x.shape, x.dtype, x.device, r.out_strides)
    mean = _empty(r.C, r.stat_dtype, x.device)
    invstd = _empty(r.C, r.stat_dtype, x.device)
    tracked = running_mean is not None
    cumulative = tracked and momentum is None
    momentum = 0.0 if momentum is None else float(momentum)
    dummy = mean
    if r.fused:
        r.kernel(_FUSED_FORWARD)(
            x, y, mean, invstd, running_mean if tracked else dummy, running_var if tracked else dummy,
            num_batches_tracked if num_batches_tracked is not None else dummy,
            weight if weight is not None else dummy, bias if bias is not None else dummy,
            *r.geometry(0, -1), momentum, float(eps), *r.fused_tiling,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RUNNING_STATS=tracked,
            CUMULATIVE=cumulative, COUNT_BATCH=num_batches_tracked is not None and not cumulative, **r.meta)
        if cumulative and num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # after the kernel read it (see the kernel's COUNT_BATCH)
        return y, mean, invstd
    partials = _empty((3, r.plan.splits, r.C), r.stat_dtype, x.device)
    count, part_mean, m2 = partials
    r.kernel(_STATS)(x, count, part_mean, m2, *r.geometry(0), *r.tiling, **r.meta)
    fin.forward_finalize_kernel[r.finalize_grid](
        count, part_mean, m2, x, mean, invstd,
        running_mean if tracked else dummy, running_var if tracked else dummy,
        num_batches_tracked if cumulative else dummy,
        r.plan.splits, r.C, r.shift_stride, momentum, float(eps),
        HAS_RUNNING_STATS=tracked, CUMULATIVE=cumulative, ACC=r.meta["ACC"],
        BLOCK_SPLITS=r.finalize.block_splits, BLOCK_C=r.finalize.block_c)
    r.kernel(_NORMALIZE)(
        x, y, mean, dummy, invstd, dummy, weight if weight is not None else dummy,
        bias if bias is not None else dummy, num_batches_tracked if num_batches_tracked is not None else dummy,
        *r.geometry(0, -1), float(eps), *r.tiling,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, FROM_RUNNING_STATS=False,
        COUNT_BATCH=num_batches_tracked is not None, **r.meta)
    return y, mean, invstd


@_on_device_of(0)
def forward_eval(x, weight, bias, running_mean, running_var, eps):
    """(y, mean, invstd) with mean/invstd taken from the running statistics, for the backward."""
    r = _recipe(x)
    x = r.read(x)
    y = _empty(x.shape, x.dtype, x.device, r.out_strides)
    mean = _empty(r.C, r.stat_dtype, x.device)
    invstd = _empty(r.C, r.stat_dtype, x.device)
    r.kernel(_NORMALIZE)(
        x, y, running_mean, running_var, invstd, mean, weight if weight is not None else mean,
        bias if bias is not None else mean, mean, *r.geometry(0, -1), float(eps), *r.tiling,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, FROM_RUNNING_STATS=True,
        COUNT_BATCH=False, **r.meta)
    return y, mean, invstd


# ---- backward --------------------------------------------------------------------------------

@_on_device_of(1)
def backward(grad_y, x, weight, mean, invstd, training, need_input_grad, need_weight_grad):
    """(grad_x, grad_weight, grad_bias); a gradient that is not needed comes back as an empty tensor."""
    r = _recipe(x, grad_y)
    x = r.read(x)
    if r.copy_others[0]:
        grad_y = layout.in_family(grad_y, r.family)
    device = x.device
    param_dtype = weight.dtype if weight is not None else mean.dtype
    grad_x = _empty(x.shape, x.dtype, device, r.out_strides) if need_input_grad else x.new_empty(0)
    w = weight if weight is not None else invstd
    reduce = training or need_weight_grad
    if reduce:
        grad_weight = _empty(r.C, param_dtype, device)
        grad_bias = _empty(r.C, param_dtype, device)
    if reduce and r.fused:
        r.kernel(_FUSED_BACKWARD)(
            grad_y, x, grad_x if need_input_grad else invstd, mean, invstd, w, grad_weight, grad_bias,
            *r.geometry(1, 0, -1), 1.0 / r.count, *r.fused_tiling,
            HAS_WEIGHT=weight is not None, TRAINING=training, NEED_INPUT_GRAD=need_input_grad, **r.meta)
    else:
        totals = (invstd, invstd)  # not read in eval
        if reduce:
            partials = _empty((2, r.plan.splits, r.C), r.stat_dtype, device)
            totals = _empty((2, r.C), r.stat_dtype, device)
            r.kernel(_BACKWARD_REDUCE)(grad_y, x, mean, partials[0], partials[1], *r.geometry(1, 0), *r.tiling,
                                       **r.meta)
            fin.backward_finalize_kernel[r.finalize_grid](
                partials[0], partials[1], invstd, totals[0], totals[1], grad_weight, grad_bias,
                r.plan.splits, r.C, ACC=r.meta["ACC"],
                BLOCK_SPLITS=r.finalize.block_splits, BLOCK_C=r.finalize.block_c)
        if need_input_grad:
            r.kernel(_BACKWARD_DX)(
                grad_y, x, grad_x, mean, invstd, w, totals[0], totals[1], *r.geometry(1, 0, -1),
                1.0 / r.count, *r.tiling, HAS_WEIGHT=weight is not None, TRAINING=training, **r.meta)
    if not need_weight_grad:
        return grad_x, x.new_empty(0), x.new_empty(0)
    return grad_x, grad_weight, grad_bias
