"""Ghost BatchNorm (Hoffer et al., 2017): statistics per virtual batch of the input's rows. Follows
bn_gpu/reference.py's float64 definition.

Two paths. On the GPU backends (Triton, CUDA C), the split path's kernels with a two-level channel
index (bn_gpu/backends/ghost.py, kernels/ghost.py, kernels/cuda/ghost.cuh) for the whole virtual
batches: three launches forward and three backward; a shorter last virtual batch is one BatchNorm
call after them, and the two outputs are concatenated. Elsewhere -- the CPU backend, torch.compile, forward-mode AD,
functorch transforms, tensor subclasses, and gradients of gradients -- one segmented reduction in
torch operations, which autograd and the compiler see through.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from .. import backends
from ..backends import ghost as ghost_kernels
from ..backends.layout import per_channel
from ..ops.autograd import PLAIN_TYPES
from ..dtypes import stat_dtype
from ..functional import batch_norm
from ..validation import check_batch_norm_args
from .batch_norm import BatchNormMixin


def _chunk_statistics(x, virtual_batch_size: int):
    """Per-chunk (mean, biased var) of shape (chunks, C) and the chunks' row counts: the full
    chunks over a (chunks, rows, C, S) view, the shorter last one apart. The mean is a plain mean, not
    var_mean's running one: a chunk holding an inf has an infinite mean, as BatchNorm's, where
    var_mean's is NaN."""
    stat = stat_dtype(x.dtype)
    N, C = x.shape[:2]
    full = N // virtual_batch_size
    flat = x.reshape(N, C, -1).to(stat)
    pieces, rows = [], []
    if full:
        grouped = flat[:full * virtual_batch_size].reshape(full, virtual_batch_size, C, -1)
        pieces.append((grouped.var(dim=(1, 3), correction=0), grouped.mean(dim=(1, 3))))
        rows += [virtual_batch_size] * full
    if N % virtual_batch_size:
        last = flat[full * virtual_batch_size:]
        var, mean = last.var(dim=(0, 2), correction=0), last.mean(dim=(0, 2))
        pieces.append((var[None], mean[None]))
        rows.append(N % virtual_batch_size)
    var = torch.cat([v for v, _ in pieces])
    mean = torch.cat([m for _, m in pieces])
    return mean, var, torch.tensor(rows, dtype=stat, device=x.device)


def _normalized(input, weight, bias, mean, var, eps, virtual_batch_size):
    """Each row normalized with its virtual batch's (mean, var) of shape (chunks, C), then the affine
    transform, in the statistics dtype."""
    N, C = input.shape[:2]
    invstd = torch.rsqrt(var + eps)
    chunk_of_row = torch.arange(N, device=input.device) // virtual_batch_size
    shape = (N, C, *([1] * (input.dim() - 2)))
    y = (input.to(mean.dtype) - mean[chunk_of_row].reshape(shape)) * invstd[chunk_of_row].reshape(shape)
    if weight is not None:
        y = y * per_channel(weight.to(mean.dtype), input)
    if bias is not None:
        y = y + per_channel(bias.to(mean.dtype), input)
    return y


def _kernels_of(input, running_mean, backend: str):
    """The backend module whose kernels run this call (bn_gpu/backends/ghost.py), or None for the
    torch operations: a backend without Ghost kernels, running statistics the kernels cannot update
    in place (strided views), or a call the kernels cannot be seen through (compiling, forward-mode
    AD, functorch transforms, tensor subclasses such as fake tensors)."""
    module = backends.implementation(backend, input.device)
    if not hasattr(module, "ghost_forward_train"):
        return None
    if running_mean is not None and not running_mean.is_contiguous():
        return None
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() \
            or _forward_ad._current_level >= 0 or type(input) not in PLAIN_TYPES:  # a subclass: FakeTensor, ...
        return None
    return module


class _GhostKernels(torch.autograd.Function):
    """Ghost BatchNorm on the kernels: first-order gradients from the backward kernels; with
    create_graph, from the torch operations' graph rebuilt on the saved input (differentiable)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, counter, momentum, eps, virtual_batch_size,
                module):
        chunks = input.shape[0] // virtual_batch_size
        y, mean, invstd = module.ghost_forward_train(input, weight, bias, running_mean, running_var, counter,
                                                     momentum, eps, chunks)
        ctx.save_for_backward(input, weight, bias, mean, invstd)
        ctx.constants = (eps, virtual_batch_size, module)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        input, weight, bias, mean, invstd = ctx.saved_tensors
        eps, virtual_batch_size, module = ctx.constants
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable in turn
            with torch.enable_grad():
                mean64, var, _ = _chunk_statistics(input, virtual_batch_size)
                y = _normalized(input, weight, bias, mean64, var, eps, virtual_batch_size).to(input.dtype)
                wanted = [t for t, need in zip((input, weight, bias), needs) if need]
                found = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True))
                return (*[next(found) if need else None for need in needs], *[None] * 7)
        if grad_y.stride() != input.stride():
            grad_y = torch.empty_like(input).copy_(grad_y)  # the kernels index dy with x's offsets
        param_dtype = weight.dtype if weight is not None else mean.dtype
        grad_x, grad_weight, grad_bias = module.ghost_backward(grad_y, input, weight, mean, invstd,
                                                               input.shape[0] // virtual_batch_size, param_dtype)
        return (grad_x if needs[0] else None, grad_weight if needs[1] else None, grad_bias if needs[2] else None,
                *[None] * 7)


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
    On the GPU backends' kernels, else torch operations (see this module's docstring)."""
    if virtual_batch_size < 1:
        raise ValueError(f"ghost_batch_norm: virtual_batch_size must be positive, got {virtual_batch_size}")
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps, backend=backend)
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked)
    backend = backends.resolve(backend, input.device)
    backends.implementation(backend, input.device)  # the same device checks
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
    module = _kernels_of(input, running_mean, backend)
    if module is not None:
        if not ghost_kernels.readable(input):
            input = input.contiguous()  # a strided view: the kernels read dense inputs
        whole = N - N % virtual_batch_size  # rows in whole virtual batches (a prefix: dense as input is)
        y = _GhostKernels.apply(input[:whole], weight, bias, running_mean, running_var, num_batches_tracked,
                                momentum, eps, virtual_batch_size, module)
        if whole == N:
            return y
        # The shorter last virtual batch, after the others: one BatchNorm call on the same buffers.
        last = batch_norm(input[whole:], running_mean, running_var, weight, bias, True, momentum, eps,
                          backend=backend, num_batches_tracked=num_batches_tracked)
        return torch.cat([y, last])
    mean, var, rows = _chunk_statistics(input, virtual_batch_size)
    y = _normalized(input, weight, bias, mean, var, eps, virtual_batch_size)
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


class GhostBatchNorm(BatchNormMixin, torch.nn.modules.batchnorm._BatchNorm):
    """Ghost BatchNorm (Hoffer et al., 2017): torch.nn.BatchNorm*'s constructor, buffers and
    state_dict plus virtual_batch_size; in training each chunk of virtual_batch_size rows is
    normalized with its own statistics, and the running statistics are updated once per chunk in
    order (num_batches_tracked counts chunks), as the chunked implementation that calls BatchNorm
    on each chunk. Runs on the Triton backend's kernels where it can (see this module's docstring)."""

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, backend=backend)
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be positive, got {virtual_batch_size}")
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        tracked = self.track_running_stats and self.running_mean is not None
        return ghost_batch_norm(input, self.running_mean if tracked else None, self.running_var if tracked else None,
                                self.weight, self.bias, True, self.momentum, self.eps,
                                virtual_batch_size=self.virtual_batch_size,
                                num_batches_tracked=self.num_batches_tracked if tracked else None,
                                backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(GhostBatchNorm, torch.nn.BatchNorm1d):
    """Ghost BatchNorm for (N, C) and (N, C, L) inputs (TabNet's)."""


class GhostBatchNorm2d(GhostBatchNorm, torch.nn.BatchNorm2d):
    """Ghost BatchNorm for (N, C, H, W) inputs."""
