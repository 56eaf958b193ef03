"""How a BatchNorm input lies in memory, as the kernels see it.

Two families, both read natively (no transposing copy):

* channels-first: the tensor viewed as (N, C, S) with S = prod(spatial) contiguous values per
  (n, c) pair -- contiguous N,C,(D,)(H,)W, and also channel slices of it. Any stride for n and c.
* channels-last: the tensor viewed as a row-major (M, C) matrix, M = N * S rows with unit stride
  along C -- channels_last, channels_last_3d and (N, C).

Anything else takes one ``.contiguous()`` copy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"


@dataclass(frozen=True)
class ChannelsFirstView:
    """A tensor seen as (N, C, S) with unit stride along S."""
    stride_n: int
    stride_c: int

    @property
    def strides(self) -> tuple:
        """The stride arguments of the channels-first kernels, in their order."""
        return (self.stride_n, self.stride_c)


@dataclass(frozen=True)
class ChannelsLastView:
    """A tensor seen as a (M, C) matrix with unit stride along C."""
    stride_m: int

    @property
    def strides(self) -> tuple:
        """The stride arguments of the channels-last kernels."""
        return (self.stride_m,)


def spatial_size(shape) -> int:
    return math.prod(shape[2:])


def _collapsible(sizes, strides, inner_stride: int) -> bool:
    """Whether dims of these sizes/strides form one run with the given innermost stride."""
    expected = inner_stride
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def channels_first_view(t: torch.Tensor) -> ChannelsFirstView | None:
    if not _collapsible(t.shape[2:], t.stride()[2:], 1):
        return None
    return ChannelsFirstView(stride_n=t.stride(0), stride_c=t.stride(1))


def channels_last_view(t: torch.Tensor) -> ChannelsLastView | None:
    C = t.shape[1]
    if C != 1 and t.stride(1) != 1:
        return None
    S = spatial_size(t.shape)
    if t.dim() == 2 or S == 1:
        stride_m = t.stride(0)
    else:
        stride_m = _innermost_spatial_stride(t)
        if not _collapsible(t.shape[2:], t.stride()[2:], stride_m):
            return None
        if t.shape[0] != 1 and t.stride(0) != stride_m * S:
            return None
    if t.shape[0] * S > 1 and stride_m < C:
        return None  # overlapping rows
    return ChannelsLastView(stride_m=stride_m)


def _innermost_spatial_stride(t: torch.Tensor) -> int:
    """Stride of the innermost spatial dim of more than one element (there is one: S > 1)."""
    return next(stride for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])) if size != 1)


def choose_layout(x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The family the kernels read x in, and x itself (or one contiguous copy of it)."""
    S = spatial_size(x.shape)
    if S > 1 and channels_first_view(x) is not None:
        return CHANNELS_FIRST, x
    if channels_last_view(x) is not None:
        return CHANNELS_LAST, x
    if channels_first_view(x) is not None:
        return CHANNELS_FIRST, x
    x = x.contiguous()
    return (CHANNELS_FIRST if S > 1 else CHANNELS_LAST), x


def arranged(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x with the same values, "contiguous" or "channels_last" in memory (channels dim innermost:
    channels_last / channels_last_3d for 4-D / 5-D tensors)."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1) if layout == "channels_last" else x.contiguous()


def view_of(t: torch.Tensor, family: str):
    return channels_first_view(t) if family == CHANNELS_FIRST else channels_last_view(t)


def in_family(t: torch.Tensor, family: str) -> torch.Tensor:
    """t itself when the kernels can read it in `family`, else one copy that they can."""
    if view_of(t, family) is not None:
        return t
    if family == CHANNELS_FIRST:
        return t.contiguous()
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def empty_in_family(x: torch.Tensor, family: str) -> torch.Tensor:
    """An output shaped and strided like x where possible (as PyTorch does), readable in `family`."""
    out = torch.empty_like(x)
    if view_of(out, family) is not None:
        return out
    if family == CHANNELS_FIRST:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return torch.empty((x.shape[0], *x.shape[2:], x.shape[1]), dtype=x.dtype, device=x.device).movedim(-1, 1)


def empty_output(x: torch.Tensor) -> torch.Tensor:
    """The output every backend returns for input x: x's shape and dtype, and x's strides when the
    kernels read x natively (as PyTorch's empty_like), else those of the copy they read."""
    if x.dim() < 2:  # the empty (0,) input PyTorch accepts
        return torch.empty_like(x)
    family, x = choose_layout(x)
    return empty_in_family(x, family)


def reduce_dims(x: torch.Tensor) -> list[int]:
    """The dims a per-channel statistic reduces over: every one but the channel dim 1."""
    return [0, *range(2, x.dim())]


def per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) vector shaped to broadcast against x along dim 1."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))
