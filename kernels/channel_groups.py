"""A channels-first program's channel, or channel group (bn_gpu.backends.plan.channel_group): where a
row of S values cannot start on 16 bytes (S = 49 of a 7x7 plane), a program owns GROUP adjacent
channels, whose GROUP x S values are one run of each row that can. Each lane keeps its position in
the run, so it belongs to one channel throughout: per-channel values are spread to the lanes once
per program (to_lanes), and the lanes' sums are split by channel once, at the end (per_channel).
The CUDA C kernels' counterpart: kernels/cuda/channel_groups.cuh.
"""
import triton
import triton.language as tl

from .alignment import aligned


@triton.jit
def group_channels(group, S, BLOCK_S: tl.constexpr, GROUP: tl.constexpr):
    """(first channel c0, each lane's channel, the program's channels) of a channel group. One
    channel: all three are that scalar channel. GROUP > 1: the lanes' channels are a [1, BLOCK_S]
    row (lanes past the run take the last channel; they are masked wherever values are read) and
    the program's channels a [GROUP] vector."""
    c0 = group * GROUP
    if GROUP == 1:
        lanes = c0
        cols = c0
    else:
        lanes = (c0 + tl.minimum(tl.arange(0, BLOCK_S) // S, GROUP - 1))[None, :]
        cols = c0 + tl.arange(0, GROUP)
    return c0, lanes, cols


@triton.jit
def group_run(S, GROUP: tl.constexpr, ALIGN: tl.constexpr):
    """Values of each row a program reads: S, or GROUP x S; a multiple of ALIGN values where the plan
    found the run fills whole 16-byte words (it chose GROUP so, or S does)."""
    if GROUP > 1:
        run = tl.multiple_of(S * GROUP, ALIGN)
    else:
        run = aligned(S, ALIGN)
    return run


@triton.jit
def group_offset(c0, stride_c, ALIGN: tl.constexpr):
    """Offset of channel c0 in a tensor; a multiple of ALIGN values where ALIGN > 1 (the plan sets it
    only for channels laid out back to back, stride_c == S), which is what lets Triton load 16 bytes."""
    offset = c0 * stride_c
    if ALIGN > 1:
        offset = tl.multiple_of(offset, ALIGN)
    return offset


@triton.jit
def per_channel(lane_sums, run, BLOCK_S: tl.constexpr, GROUP: tl.constexpr):
    """The sum of a [ROWS, BLOCK_S] array of lane sums per channel of the program: a scalar, or a
    [GROUP] vector. The lanes' channels are found here, after the loops, rather than kept in
    registers through them."""
    if GROUP == 1:
        total = tl.sum(tl.sum(lane_sums, axis=1), axis=0)
    else:
        by_lane = tl.sum(lane_sums, axis=0)[None, :]
        lane_channel = tl.minimum(tl.arange(0, BLOCK_S) // (run // GROUP), GROUP - 1)[None, :]
        mine = lane_channel == tl.arange(0, GROUP)[:, None]
        total = tl.sum(tl.where(mine, by_lane, 0.0), axis=1)
    return total


@triton.jit
def to_lanes(values, lane_channel, GROUP: tl.constexpr):
    """Per-channel values (a scalar, or [GROUP]) spread to the lanes of their channels ([1, BLOCK_S])."""
    if GROUP == 1:
        spread = values
    else:
        mine = lane_channel == tl.arange(0, GROUP)[:, None]
        spread = tl.sum(tl.where(mine, values[:, None], 0.0), axis=0)[None, :]
    return spread


@triton.jit
def per_channel_zeros(ACC: tl.constexpr, GROUP: tl.constexpr):
    if GROUP == 1:
        zeros = tl.zeros([], ACC)
    else:
        zeros = tl.zeros([GROUP], ACC)
    return zeros
