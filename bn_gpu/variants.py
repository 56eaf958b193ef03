"""The BatchNorm family beyond BatchNorm: FrozenBatchNorm, Batch Renormalization, Ghost BatchNorm.

    frozen_batch_norm   fixed statistics and affine parameters: the eval op (one pass), nothing
                        saved for the backward but the per-channel scale
    batch_renorm        Ioffe (2017): BatchNorm corrected by r, d towards the running statistics;
                        bn_gpu's kernel steps (moments, merge, normalize) with r and d computed on
                        the device, no host synchronization
    ghost_batch_norm    Hoffer et al. (2017): statistics per virtual batch of the input's rows, in
                        one segmented reduction (torch operations: no bn_gpu kernel yet)

Each follows bn_gpu/reference.py's float64 definition.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import backends
from .dtypes import stat_dtype
from .functional import batch_norm
from .layout import per_channel
from .ops import _dense, _write_back
from .validation import check_batch_norm_args, check_renorm_limits


def frozen_batch_norm(input, weight, bias, running_mean, running_var, eps: float = 1e-5, *,
                      backend: str = "auto") -> torch.Tensor:
    """y = input * scale + shift with scale = weight / sqrt(running_var + eps) and
    shift = bias - running_mean * scale: torchvision's FrozenBatchNorm2d, on bn_gpu's eval op."""
    return batch_norm(input, running_mean, running_var, weight, bias, training=False, eps=eps, backend=backend)


# ---- Batch Renormalization ----------------------------------------------------------------------


def _renorm_correction(mean, invstd, running_mean, running_var, eps, r_max, d_max, warming_up):
    """(r, d) per channel, on the device: r = clip(sigma_B / sigma, 1/r_max, r_max),
    d = clip((mean_B - mean) / sigma, -d_max, d_max); 1 and 0 while warming_up (a 0-dim bool tensor)."""
    sigma = torch.sqrt(running_var.to(mean.dtype) + eps)
    r = (1.0 / (invstd * sigma)).clamp(1.0 / r_max, r_max)
    d = ((mean - running_mean.to(mean.dtype)) / sigma).clamp(-d_max, d_max)
    return torch.where(warming_up, torch.ones_like(r), r), torch.where(warming_up, torch.zeros_like(d), d)


class _BatchRenormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, counter, momentum, eps, r_max, d_max,
                warmup_steps, backend):
        impl = backends.implementation(backend, x.device)
        stat = stat_dtype(x.dtype)
        C = x.shape[1]
        weight_ = weight.to(stat) if weight is not None else torch.ones(C, dtype=stat, device=x.device)
        bias_ = bias.to(stat) if bias is not None else torch.zeros(C, dtype=stat, device=x.device)
        old_mean, old_var = running_mean.to(stat, copy=True), running_var.to(stat, copy=True)
        warming_up = counter < warmup_steps if counter is not None else torch.zeros((), dtype=torch.bool,
                                                                                   device=x.device)
        dense_mean, dense_var = _dense(running_mean), _dense(running_var)
        mean, invstd = impl.merge_ranks(x, impl.local_moments(x).view(1, -1), dense_mean, dense_var,
                                        counter if momentum is None else None, momentum, eps)
        _write_back(running_mean, dense_mean)
        _write_back(running_var, dense_var)
        r, d = _renorm_correction(mean, invstd, old_mean, old_var, eps, r_max, d_max, warming_up)
        # y = weight * ((x - mean_B) * invstd_B * r + d) + bias: the normalize pass with an effective affine.
        y = impl.normalize(x, mean, invstd, weight_ * r, weight_ * d + bias_, counter, eps)
        ctx.save_for_backward(x, weight_, mean, invstd, r, d)
        ctx.backend = backend
        ctx.param_dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)
        ctx.mark_non_differentiable(r, d)
        return y, r, d

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, _grad_r, _grad_d):
        x, weight, mean, invstd, r, d = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # r and d are constants: BatchNorm's backward with the weight scaled by r; then
        # dL/dweight = sum(dy * (x_hat * r + d)) and dL/dbias = sum(dy).
        grad_x, sum_dy_xhat, sum_dy = torch.ops.bn_gpu.backward(grad_y, x, weight * r, mean, invstd, True, needs[0],
                                                                True, ctx.backend)
        weight_dtype, bias_dtype = ctx.param_dtypes
        grad_weight = (sum_dy_xhat.to(r.dtype) * r + sum_dy.to(r.dtype) * d).to(weight_dtype) if needs[1] else None
        grad_bias = sum_dy.to(bias_dtype) if needs[2] else None
        return (grad_x if needs[0] else None, grad_weight, grad_bias) + (None,) * 9


def batch_renorm(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
                 momentum: float = 0.01, eps: float = 1e-5, *, r_max: float = 3.0, d_max: float = 5.0,
                 warmup_steps: int = 0, num_batches_tracked: torch.Tensor | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """Batch Renormalization (Ioffe, 2017). In training the batch is normalized with its own
    statistics, corrected by r and d towards the running ones (constants for the gradient), and
    the running statistics are updated as BatchNorm's; while num_batches_tracked < warmup_steps,
    r = 1 and d = 0 (BatchNorm). In eval: BatchNorm with the running statistics. r and d, the
    warm-up test and the counter stay on the device."""
    name = backends.resolve(backend, input.device)
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps, backend=name)
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm: training needs running_mean and running_var (r and d are taken against them)")
    check_renorm_limits(r_max, d_max, warmup_steps)
    if warmup_steps and num_batches_tracked is None:
        raise ValueError("batch_renorm: warmup_steps needs num_batches_tracked to count the steps")
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked)
    if input.numel() == 0:
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps, backend=name,
                          num_batches_tracked=num_batches_tracked)
    return _BatchRenormFunction.apply(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                      eps, float(r_max), float(d_max), int(warmup_steps), name)[0]


# ---- Ghost BatchNorm ----------------------------------------------------------------------------

def _chunk_statistics(x, virtual_batch_size: int):
    """Per-chunk (mean, biased var) of shape (chunks, C) and the chunks' row counts: the full
    chunks in one reduction over a (chunks, rows, C, S) view, the shorter last one in a second."""
    stat = stat_dtype(x.dtype)
    N, C = x.shape[:2]
    full = N // virtual_batch_size
    flat = x.reshape(N, C, -1).to(stat)
    pieces, rows = [], []
    if full:
        grouped = flat[:full * virtual_batch_size].reshape(full, virtual_batch_size, C, -1)
        pieces.append(torch.var_mean(grouped, dim=(1, 3), correction=0))
        rows += [virtual_batch_size] * full
    if N % virtual_batch_size:
        var, mean = torch.var_mean(flat[full * virtual_batch_size:], dim=(0, 2), correction=0)
        pieces.append((var[None], mean[None]))
        rows.append(N % virtual_batch_size)
    var = torch.cat([v for v, _ in pieces])
    mean = torch.cat([m for _, m in pieces])
    return mean, var, torch.tensor(rows, dtype=stat, device=x.device)


def _sequential_running_update(running, values, counter, momentum):
    """running after one update per chunk in order: with momentum m, (1-m)^G running +
    sum_g m (1-m)^(G-1-g) values_g; with momentum None (cumulative average over t earlier batches),
    (t * running + sum_g values_g) / (t + G)."""
    chunks = values.shape[0]
    if momentum is None:
        seen = counter.to(values.dtype)
        return (seen * running + values.sum(0)) / (seen + chunks)
    powers = torch.arange(chunks - 1, -1, -1, dtype=values.dtype, device=values.device)
    weights = momentum * (1 - momentum) ** powers
    return (1 - momentum) ** chunks * running + (weights[:, None] * values).sum(0)


def ghost_batch_norm(input, running_mean, running_var, weight=None, bias=None, training: bool = False,
                     momentum: float | None = 0.1, eps: float = 1e-5, *, virtual_batch_size: int,
                     num_batches_tracked: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Ghost BatchNorm (Hoffer et al., 2017). In training, each chunk of virtual_batch_size rows
    (the last may be shorter) is normalized with its own statistics and the same weight and bias;
    the running statistics are updated once per chunk, in order, and num_batches_tracked counts
    every chunk -- as the chunked implementation that calls BatchNorm per chunk. In eval: BatchNorm.
    Runs as torch operations on every backend (one segmented reduction; no bn_gpu kernel yet)."""
    if virtual_batch_size < 1:
        raise ValueError(f"ghost_batch_norm: virtual_batch_size must be positive, got {virtual_batch_size}")
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps, backend=backend)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked)
    backends.implementation(backends.resolve(backend, input.device), input.device)  # the same device checks
    if input.numel() == 0 or input.shape[0] <= virtual_batch_size:
        return batch_norm(input, running_mean, running_var, weight, bias, True, momentum, eps, backend=backend,
                          num_batches_tracked=num_batches_tracked)
    N, C = input.shape[:2]
    spatial = input.numel() // (N * C)
    if spatial == 1 and 1 in (virtual_batch_size, N % virtual_batch_size):
        # A virtual batch of one row of (N, C) values: one value per channel, a variance of 0/0.
        which = "every virtual batch has" if virtual_batch_size == 1 else "the last virtual batch has"
        raise ValueError(f"Expected more than 1 value per channel when training: {which} one value per channel "
                         f"(input size {tuple(input.shape)}, virtual_batch_size={virtual_batch_size})")
    mean, var, rows = _chunk_statistics(input, virtual_batch_size)
    invstd = torch.rsqrt(var + eps)
    chunk_of_row = torch.arange(N, device=input.device) // virtual_batch_size
    shape = (N, C, *([1] * (input.dim() - 2)))
    y = (input.to(mean.dtype) - mean[chunk_of_row].reshape(shape)) * invstd[chunk_of_row].reshape(shape)
    if weight is not None:
        y = y * per_channel(weight.to(mean.dtype), input)
    if bias is not None:
        y = y + per_channel(bias.to(mean.dtype), input)
    if running_mean is not None:
        with torch.no_grad():
            counts = rows * spatial
            unbiased = var * (counts / (counts - 1))[:, None]
            running_mean.copy_(_sequential_running_update(running_mean.to(mean.dtype), mean.detach(),
                                                          num_batches_tracked, momentum))
            running_var.copy_(_sequential_running_update(running_var.to(mean.dtype), unbiased.detach(),
                                                         num_batches_tracked, momentum))
    if num_batches_tracked is not None:
        num_batches_tracked.add_(mean.shape[0])
    return y.to(input.dtype).contiguous(memory_format=_memory_format(input))


def _memory_format(x):
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format
