"""Higher-order derivatives of batch_norm, written in torch operations.

The kernels give first-order gradients. Two things need more, and take these formulas instead:
  - double backward (gradient penalties, Hessian-vector products): when a backward runs with
    create_graph=True, the gradients are composed from torch operations that autograd can
    differentiate again -- including through the batch statistics, which are recomputed from the
    input so that their dependence on it is recorded;
  - forward-mode AD (torch.autograd.forward_ad, torch.func.jvp): the tangent of the output.

Both follow torch's own formulas for native_batch_norm (tools/autograd/derivatives.yaml): the
statistics are biased mean/variance over every dim but the channel one, computed in fp32 (fp64 for
fp64 inputs) as the kernels do.
"""
from __future__ import annotations

import torch

from ..dtypes import stat_dtype
from ..backends.layout import per_channel, reduce_dims


def _scale(invstd: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return invstd if weight is None else invstd * weight.to(invstd.dtype)


def differentiable_gradients(grad_output, x, weight, mean, invstd, training: bool, eps: float):
    """(grad_input, grad_weight, grad_bias), differentiable w.r.t. grad_output, x and weight.

    In training the statistics are recomputed from x (not taken from the saved mean/invstd, which
    carry no history), so the second derivative includes their dependence on x. grad_weight and
    grad_bias are in the statistics dtype; the caller casts them.
    """
    if x.dim() < 2:  # the empty 1-D input (0,): no channel, nothing to differentiate
        empty = x.new_zeros(0, dtype=stat_dtype(x.dtype))
        return torch.zeros_like(x), empty, empty
    dims = reduce_dims(x)
    xf = x.to(stat_dtype(x.dtype))
    if training:
        var, mean = torch.var_mean(xf, dim=dims, correction=0)
        invstd = torch.rsqrt(var + eps)
    xhat = (xf - per_channel(mean, x)) * per_channel(invstd, x)
    dy = grad_output.to(xf.dtype)
    sum_dy = dy.sum(dim=dims)
    sum_dy_xhat = (dy * xhat).sum(dim=dims)
    scale = per_channel(_scale(invstd, weight), x)
    if training:
        count = x.numel() // x.shape[1]
        grad_input = scale * (dy - per_channel(sum_dy / count, x) - xhat * per_channel(sum_dy_xhat / count, x))
    else:
        grad_input = scale * dy
    return grad_input.to(x.dtype), sum_dy_xhat, sum_dy


def through_relu(grad_output, x, weight, bias, mean, invstd):
    """grad_output, zero where the forward's (x - mean) * invstd * weight + bias was <= 0: the
    gradient through a ReLU that followed the BatchNorm, its mask a constant (a NaN passes it on,
    as torch's ReLU)."""
    pre = (x.to(mean.dtype) - per_channel(mean, x)) * per_channel(_scale(invstd, weight), x)
    if bias is not None:
        pre = pre + per_channel(bias.to(mean.dtype), x)
    return torch.where(pre.detach() <= 0, torch.zeros((), dtype=grad_output.dtype, device=grad_output.device),
                       grad_output)


def output_tangent(x, weight, mean, invstd, training: bool, x_tangent, weight_tangent, bias_tangent):
    """The forward-mode derivative of the output, given the tangents of x, weight and bias (None: zero)."""
    if x.dim() < 2:  # the empty 1-D input (0,): an empty tangent
        return torch.zeros_like(x)
    dims = reduce_dims(x)
    xhat = (x.to(mean.dtype) - per_channel(mean, x)) * per_channel(invstd, x)
    tangent = torch.zeros_like(xhat)
    if x_tangent is not None:
        t = x_tangent.to(mean.dtype)
        if training:  # through the batch mean and variance
            t = t - t.mean(dim=dims, keepdim=True) - xhat * (xhat * t).mean(dim=dims, keepdim=True)
        tangent = tangent + per_channel(_scale(invstd, weight), x) * t
    if weight_tangent is not None:
        tangent = tangent + xhat * per_channel(weight_tangent.to(mean.dtype), x)
    if bias_tangent is not None:
        tangent = tangent + per_channel(bias_tangent.to(mean.dtype), x)
    return tangent.to(x.dtype)
