"""Batch Renormalization (Ioffe, 2017): BatchNorm corrected by r, d towards the running statistics;
bn_gpu's kernel steps (moments, merge, normalize) with r and d computed on the device, no host
synchronization. Follows bn_gpu/reference.py's float64 definition."""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .. import backends
from ..dtypes import stat_dtype
from ..functional import batch_norm
from ..ops.kernels import dense, write_back
from ..validation import check_batch_norm_args, check_renorm_limits
from .batch_norm import BatchNormMixin


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
        dense_mean, dense_var = dense(running_mean), dense(running_var)
        mean, invstd = impl.merge_ranks(x, impl.local_moments(x).view(1, -1), dense_mean, dense_var,
                                        counter if momentum is None else None, momentum, eps)
        write_back(running_mean, dense_mean)
        write_back(running_var, dense_var)
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


class BatchRenorm(BatchNormMixin, torch.nn.modules.batchnorm._BatchNorm):
    """Batch Renormalization (Ioffe, 2017): torch.nn.BatchNorm*'s constructor, buffers and
    state_dict, plus r_max, d_max, warmup_steps (batches trained as plain BatchNorm first) and
    backend. momentum defaults to 0.01, the paper's; a module without running statistics
    (track_running_stats=False) is BatchNorm with batch statistics."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.01, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, r_max: float = 3.0,
                 d_max: float = 5.0, warmup_steps: int = 0, backend: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, backend=backend)
        if momentum is None:
            raise ValueError("BatchRenorm needs a momentum (the running statistics are its reference)")
        check_renorm_limits(r_max, d_max, warmup_steps)
        self.r_max, self.d_max, self.warmup_steps = r_max, d_max, warmup_steps

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.running_mean is not None):
            return super().forward(input)
        self._check_input_dim(input)
        return batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum,
                            self.eps, r_max=self.r_max, d_max=self.d_max, warmup_steps=self.warmup_steps,
                            num_batches_tracked=self.num_batches_tracked, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"


class BatchRenorm1d(BatchRenorm, torch.nn.BatchNorm1d):
    """Batch Renormalization for (N, C) and (N, C, L) inputs."""


class BatchRenorm2d(BatchRenorm, torch.nn.BatchNorm2d):
    """Batch Renormalization for (N, C, H, W) inputs."""


class BatchRenorm3d(BatchRenorm, torch.nn.BatchNorm3d):
    """Batch Renormalization for (N, C, D, H, W) inputs."""
