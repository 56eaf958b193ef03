"""SyncBatchNorm: one BatchNorm over the global batch of a data-parallel job, on torch.distributed.

Training forward, on every rank:
  1. local moments: this rank's (count, mean, M2) per channel, by the statistics kernels;
  2. one all_gather of the 2C + 1 values per rank;
  3. merge_ranks: Chan's formula over the ranks in rank order -- a rank with no rows has count 0 and
     weighs nothing, by construction (no masking, no host synchronization: the step captures into
     a CUDA graph) -- then the running statistics, on the device;
  4. normalize, as single-process training.
Backward: the local sums of dy and dy * (x - mean), one all_reduce of those 2C values, then dx with
the global count; dweight and dbias are the local ones, left to DDP's gradient reduction as
PyTorch's SyncBatchNorm leaves them. A rank with an empty batch takes part in every collective and
gets zero gradients. Eval never communicates; without an initialized process group, or with one
process, SyncBatchNorm is bn_gpu's BatchNorm.

The collectives are torch.distributed's (NCCL on GPUs, gloo on CPUs). Every backend, the CPU one
included, runs the same steps, so CPU data-parallel jobs and tests can use it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from .. import backends
from ..backends.layout import empty_output
from ..dtypes import stat_dtype
from ..functional import batch_norm
from ..ops.kernels import dense, write_back
from ..validation import check_batch_norm_args
from .batch_norm import BatchNormMixin


# torch >= 2.12 names it all_gather_single (all_gather_into_tensor is deprecated there).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, counter, momentum, eps, group, world_size, backend):
        impl = backends.implementation(backend, x.device)
        C, stat = x.shape[1], stat_dtype(x.dtype)
        moments = impl.local_moments(x) if x.numel() else torch.zeros(2 * C + 1, dtype=stat, device=x.device)
        gathered = moments.new_empty(world_size * (2 * C + 1))  # flat: gloo takes no stacked output
        _all_gather_single(gathered, moments, group=group)
        gathered = gathered.view(world_size, 2 * C + 1)
        if x.numel() <= C:
            _check_global_count(x, gathered)
        cumulative = running_mean is not None and momentum is None
        dense_mean, dense_var = dense(running_mean), dense(running_var)
        mean, invstd = impl.merge_ranks(x, gathered, dense_mean, dense_var, counter if cumulative else None,
                                        momentum, eps)
        write_back(running_mean, dense_mean)
        write_back(running_var, dense_var)
        if x.numel():
            y = impl.normalize(x, mean, invstd, dense(weight), dense(bias), counter, eps)
        else:
            y = empty_output(x)
            if counter is not None:
                counter.add_(1)
        ctx.save_for_backward(x, weight, mean, invstd, gathered[:, 0].sum())
        ctx.impl, ctx.group = impl, group
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, mean, invstd, global_count = ctx.saved_tensors
        C = x.shape[1]
        param_dtype = weight.dtype if weight is not None else mean.dtype
        if x.numel():
            totals, grad_weight, grad_bias = ctx.impl.gradient_totals(grad_y, x, mean, invstd, param_dtype)
        else:
            totals = mean.new_zeros(2, C)
            grad_weight, grad_bias = mean.new_zeros(C, dtype=param_dtype), mean.new_zeros(C, dtype=param_dtype)
        dist.all_reduce(totals, group=ctx.group)  # every rank, an empty one too, takes part
        grad_x = None
        if ctx.needs_input_grad[0]:
            if x.numel():
                # The dx kernels divide by this process's count: scaled sums give the global mean.
                scaled = totals * ((x.numel() // C) / global_count)
                grad_x = ctx.impl.input_gradient(grad_y, x, mean, invstd, dense(weight), scaled)
            else:
                grad_x = torch.zeros_like(x)
        if ctx.bias_dtype is not None and grad_bias.dtype != ctx.bias_dtype:
            grad_bias = grad_bias.to(ctx.bias_dtype)
        return (grad_x, grad_weight if ctx.needs_input_grad[1] else None,
                grad_bias if ctx.needs_input_grad[2] else None) + (None,) * 8


def _check_global_count(x, gathered) -> None:
    """Refuse a global batch of one value per channel, before any buffer is written. Only a rank
    with at most one value per channel can be part of one, and only such a rank reads the global
    count back (a host synchronization); every rank of such a batch does, so all of them raise.
    Inside CUDA-graph capture nothing can be read back, and the check is left out."""
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if int(gathered[:, 0].sum()) == 1:
        raise ValueError("Expected more than 1 value per channel when training: the global batch of every rank "
                         f"has one value per channel (this rank's input size {tuple(x.shape)})")


def world(process_group) -> tuple:
    """(group, world size), or (None, 1) where nothing is to be synchronized."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group)


def sync_batch_norm(input: torch.Tensor, running_mean, running_var, weight=None, bias=None, training: bool = False,
                    momentum: float | None = 0.1, eps: float = 1e-5, *, process_group=None, backend: str = "auto",
                    num_batches_tracked: torch.Tensor | None = None) -> torch.Tensor:
    """bn_gpu.batch_norm with the batch statistics taken over every rank of `process_group`
    (default: the world) in training. Every rank of the group must call it (an empty batch too)."""
    group, world_size = world(process_group) if training else (None, 1)
    if world_size == 1:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, backend=backend,
                          num_batches_tracked=num_batches_tracked)
    name = backends.resolve(backend, input.device)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked,
                          synchronized=True)
    return _SyncBatchNormFunction.apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                        momentum, eps, group, world_size, name)


class SyncBatchNorm(BatchNormMixin, torch.nn.modules.batchnorm._BatchNorm):
    """torch.nn.SyncBatchNorm on bn_gpu kernels: same constructor and state_dict, plus backend="auto".

    Beyond PyTorch's: runs on CPU tensors (gloo), a rank with an empty batch gives no NaN, no step
    synchronizes with the host (CUDA-graph safe, momentum=None included) -- but on a rank with at
    most one value per channel, which reads the global count back to refuse a global batch of one
    value per channel, as PyTorch does -- and channels_last is read natively. Not a subclass of
    torch.nn.SyncBatchNorm: DDP refuses those on CPU, and torch's converters would rebuild it as
    torch's.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, **kwargs):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: torch.Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if not self.training:  # eval never communicates
            return super().forward(input)
        group, world_size = world(self.process_group)
        if world_size == 1:
            return super().forward(input)
        tracked = self.track_running_stats and self.running_mean is not None
        return sync_batch_norm(
            input, self.running_mean if tracked else None, self.running_var if tracked else None, self.weight,
            self.bias, True, self.momentum, self.eps, process_group=group, backend=self.backend,
            num_batches_tracked=self.num_batches_tracked if tracked else None)
