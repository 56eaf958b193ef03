"""Ghost BatchNorm (Hoffer et al., 2017): statistics per virtual batch of the input's rows, in one
segmented reduction (torch operations: no bn_gpu kernel yet). Follows bn_gpu/reference.py's float64
definition."""
from __future__ import annotations

import torch

from .. import backends
from ..backends.layout import per_channel
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


class GhostBatchNorm(BatchNormMixin, torch.nn.modules.batchnorm._BatchNorm):
    """Ghost BatchNorm (Hoffer et al., 2017): torch.nn.BatchNorm*'s constructor, buffers and
    state_dict plus virtual_batch_size; in training each chunk of virtual_batch_size rows is
    normalized with its own statistics, and the running statistics are updated once per chunk in
    order (num_batches_tracked counts chunks), as the chunked implementation that calls BatchNorm
    on each chunk. Runs as torch operations (one segmented reduction), not on bn_gpu's kernels."""

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
