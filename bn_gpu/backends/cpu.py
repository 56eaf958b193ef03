"""The CPU backend: the same ops written with torch operations, so a model built with bn_gpu
modules runs on CPU tensors too. Statistics in fp32 (fp64 for fp64 inputs), like the GPU kernels.
"""
from __future__ import annotations

import torch

from ..dtypes import stat_dtype
from .layout import empty_output, per_channel, reduce_dims


def check_available(device: torch.device) -> None:
    if device.type != "cpu":
        raise RuntimeError(f"backend='cpu' needs CPU tensors; got tensors on {device}. "
                           "Use backend='auto' (or 'triton') for CUDA tensors.")


def _like_gpu_output(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value in x's dtype, strided as the GPU backends write their outputs."""
    return empty_output(x).copy_(value)


def _affine(x, mean, invstd, weight, bias, residual=None, relu=False):
    """(x - mean) * invstd * weight + bias (+ residual, then ReLU) in the statistics dtype,
    returned in x's dtype."""
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    y = (x.to(mean.dtype) - per_channel(mean, x)) * per_channel(scale, x)
    if bias is not None:
        y = y + per_channel(bias.to(mean.dtype), x)
    if residual is not None:
        y = y + residual.to(mean.dtype)
    if relu:
        y = torch.relu(y)
    return _like_gpu_output(x, y)


def _var_mean(x):
    """(biased variance, mean) per channel in the statistics dtype. torch.var_mean's mean is NaN for
    a channel holding an inf; the plain mean is that inf, as torch's batch_norm gives it."""
    dims = reduce_dims(x)
    xs = x.to(stat_dtype(x.dtype))
    var, mean = torch.var_mean(xs, dim=dims, correction=0)
    if not torch.isfinite(mean).all():
        mean = torch.where(torch.isnan(mean), xs.mean(dim=dims), mean)
    return var, mean


def forward_train(x, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, residual=None,
                  relu=False):
    var, mean = _var_mean(x)
    invstd = torch.rsqrt(var + eps)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if running_mean is not None:
        factor = 1.0 / float(num_batches_tracked) if momentum is None else momentum
        count = x.numel() // x.shape[1]
        unbiased_var = var * (count / (count - 1))
        running_mean.copy_(running_mean.to(mean.dtype) * (1 - factor) + mean * factor)
        running_var.copy_(running_var.to(var.dtype) * (1 - factor) + unbiased_var * factor)
    return _affine(x, mean, invstd, weight, bias, residual, relu), mean, invstd


def forward_eval(x, weight, bias, running_mean, running_var, eps, residual=None, relu=False):
    stat = stat_dtype(x.dtype)
    mean = running_mean.to(stat, copy=True)  # an output must not alias an input
    invstd = torch.rsqrt(running_var.to(stat) + eps)
    return _affine(x, mean, invstd, weight, bias, residual, relu), mean, invstd


def backward(grad_y, x, weight, mean, invstd, training, need_input_grad, need_weight_grad, bias=None, relu=False):
    dims = reduce_dims(x)
    dy = grad_y.to(mean.dtype)
    xmu = x.to(mean.dtype) - per_channel(mean, x)
    grad_x, grad_weight, grad_bias = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    if relu:  # through the forward's ReLU, its mask recomputed as the forward computed its input
        pre = xmu * per_channel(scale, x) + (per_channel(bias.to(mean.dtype), x) if bias is not None else 0)
        dy = torch.where(pre <= 0, torch.zeros((), dtype=dy.dtype), dy)  # NaN passes dy on, as torch's ReLU
    if training or need_weight_grad:
        sum_dy = dy.sum(dim=dims)
        sum_dy_xmu = (dy * xmu).sum(dim=dims)
    if need_weight_grad:
        param_dtype = weight.dtype if weight is not None else mean.dtype
        grad_weight = (sum_dy_xmu * invstd).to(param_dtype)
        grad_bias = sum_dy.to(param_dtype)
    if need_input_grad:
        if training:
            inv_count = 1.0 / (x.numel() // x.shape[1])
            projection = sum_dy_xmu * invstd * invstd * inv_count
            dx = per_channel(scale, x) * (dy - per_channel(sum_dy * inv_count, x)
                                          - xmu * per_channel(projection, x))
        else:
            dx = per_channel(scale, x) * dy
        grad_x = _like_gpu_output(x, dx)
    return grad_x, grad_weight, grad_bias


# ---- SyncBatchNorm's steps (see bn_gpu.backends.orchestration for the GPU backends') --------------------

def local_moments(x):
    """(2C + 1,): this process's count, then each channel's mean and M2."""
    var, mean = _var_mean(x)
    count = x.numel() // x.shape[1]
    return torch.cat([mean.new_full((1,), count), mean, var * count])


def merge_ranks(x, moments, running_mean, running_var, counter, momentum, eps):
    """(mean, invstd) of every rank's moments merged in rank order (Chan); running statistics updated."""
    C = (moments.shape[1] - 1) // 2
    count, mean, m2 = moments.new_zeros(()), moments.new_zeros(C), moments.new_zeros(C)
    for row in moments:  # an empty rank has count 0 and weighs 0
        rank_count, rank_mean, rank_m2 = row[0], row[1:C + 1], row[C + 1:]
        total = count + rank_count
        weight = rank_count / total.clamp(min=1)
        delta = rank_mean - mean
        # Chan's update; where delta is not finite (an inf among the values), the weighted mean (see
        # kernels/moments.py: merged_mean).
        mean = torch.where(torch.isfinite(delta), mean + delta * weight, mean * (1 - weight) + rank_mean * weight)
        m2 = m2 + rank_m2 + delta * delta * count * weight
        count = total
    if count == 0:  # a global batch with no values: as one process's empty batch
        return mean, torch.zeros_like(mean)
    invstd = torch.rsqrt(m2 / count + eps)
    if running_mean is not None:
        factor = 1.0 / (counter.to(mean.dtype) + 1) if momentum is None else momentum
        running_mean.copy_(running_mean.to(mean.dtype) * (1 - factor) + mean * factor)
        running_var.copy_(running_var.to(mean.dtype) * (1 - factor) + m2 / (count - 1) * factor)
    return mean, invstd


def normalize(x, mean, invstd, weight, bias, counter, eps):
    if counter is not None:
        counter.add_(1)
    return _affine(x, mean, invstd, weight, bias)


def gradient_totals(grad_y, x, mean, invstd, param_dtype):
    """(totals (2, C) of local sums of dy and dy * (x - mean), grad_weight, grad_bias)."""
    dims = reduce_dims(x)
    dy = grad_y.to(mean.dtype)
    sum_dy = dy.sum(dim=dims)
    sum_dy_xmu = (dy * (x.to(mean.dtype) - per_channel(mean, x))).sum(dim=dims)
    return torch.stack([sum_dy, sum_dy_xmu]), (sum_dy_xmu * invstd).to(param_dtype), sum_dy.to(param_dtype)


def input_gradient(grad_y, x, mean, invstd, weight, totals):
    """Training dx from totals scaled to this process's count."""
    sum_dy, sum_dy_xmu = totals
    inv_count = 1.0 / (x.numel() // x.shape[1])
    dy = grad_y.to(mean.dtype)
    xmu = x.to(mean.dtype) - per_channel(mean, x)
    scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
    projection = sum_dy_xmu * invstd * invstd * inv_count
    dx = per_channel(scale, x) * (dy - per_channel(sum_dy * inv_count, x) - xmu * per_channel(projection, x))
    return _like_gpu_output(x, dx)
