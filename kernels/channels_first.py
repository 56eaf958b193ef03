"""Triton kernels for contiguous N,C,(D,)(H,)W inputs, viewed as (N, C, S) with unit stride along S.

Each channel is N runs of S contiguous values. A program owns one channel (grid axis 0) and a
contiguous range of tiles of that channel's (N, S) plane (grid axis 1: the split). A tile is ROWS
batch rows by BLOCK_S spatial positions, so a channel with a 7x7 plane still fills a tile
(ROWS > 1) while a 112x112 plane is split across many programs: the grid fills the GPU for C = 3
and C = 2048 alike. Every kernel of this file walks the same tiles, so one launch plan serves all.

Channel groups (GROUP > 1): where a row of S values cannot start on 16 bytes (S = 49 of a 7x7
plane), a program owns GROUP adjacent channels instead, whose GROUP x S values are one run of each
row that can (196 fp32 or 392 bf16 values: 16-byte loads and stores). Grid axis 0 then counts
channel groups, and a tile covers the whole run (the plan makes the run fit BLOCK_S). Each lane
keeps its position across tiles, so it belongs to one channel throughout: per-channel values are
gathered per lane once per program, and a lane's sums are split by channel once, at the end.

Split path (several programs per channel), in the order a training step runs them:
    statistics_channels_first           partial (count, mean, M2) per (split, channel)
    normalize_channels_first            y = (x - mean) * invstd * weight + bias (train and eval)
    gradient_sums_channels_first        partial sums of dy and dy * (x - mean)
    input_gradient_channels_first       dx from dy, x and the per-channel totals
Single-pass path (one program per channel, when that fills the GPU or the input is small):
    single_pass_forward_channels_first  statistics, running stats and normalize in one launch
    single_pass_backward_channels_first dweight, dbias and dx in one launch
On-chip path (the input held in registers: read once; see the section at the end of this file):
    on_chip_forward_channels_first      statistics, running stats and normalize in one launch
    on_chip_backward_channels_first     dweight, dbias and dx in one launch
The partials are merged by the last programs of each channel to finish (FINALIZE, in two levels:
finalize.finalize_statistics_of_group), or by the finalize kernels of finalize.py in a launch of
their own (SyncBatchNorm's local moments).
"""
import triton
import triton.language as tl

from .batch_counter import count_batch, count_batch_after_every_read, count_batch_once
from .finalize import (finalize_gradients_of_group, finalize_statistics_of_group, in_dtype, merged_shifted,
                       store_gradients, store_statistics, summed_partials)
from .channel_groups import group_channels, group_offset, group_run, per_channel, per_channel_zeros, to_lanes
from .alignment import aligned
from .ghost import chunk_offset
from .group_barrier import leave_group, wait_for_group
from .moments import finite_shift, merge_moments


@triton.jit
def _tile(tile, s_blocks, N, S, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr):
    """Batch rows n, spatial columns s, validity mask and number of valid values of one tile."""
    n_block = tile // s_blocks
    s_block = tile - n_block * s_blocks
    n = n_block * ROWS + tl.arange(0, ROWS)
    s = s_block * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (n < N)[:, None] & (s < S)[None, :]
    count = tl.minimum(N - n_block * ROWS, ROWS) * tl.minimum(S - s_block * BLOCK_S, BLOCK_S)
    if OFFSET_64:
        n = n.to(tl.int64)
    return n, s, mask, count


@triton.jit
def _offsets(n, s, stride_n):
    return n[:, None] * stride_n + s[None, :]


@triton.jit
def _program_tiles(split, tiles_per_program, total_tiles):
    first_tile = split * tiles_per_program
    return first_tile, tl.minimum(first_tile + tiles_per_program, total_tiles)


@triton.jit
def _group(OFFSET_64: tl.constexpr):
    """This program's channel (channel group when GROUP > 1)."""
    group = tl.program_id(0)
    if OFFSET_64:
        group = group.to(tl.int64)
    return group


@triton.jit
def _reversed_program(OFFSET_64: tl.constexpr):
    """(channel group, split) of this program, counted from the end of the grid: GPUs start programs
    roughly in launch order, so a second pass over x starts with what the first pass read last --
    the part still in L2."""
    group = tl.num_programs(0) - 1 - tl.program_id(0)
    if OFFSET_64:
        group = group.to(tl.int64)
    return group, tl.num_programs(1) - 1 - tl.program_id(1)


@triton.jit
def _add_sums(total, products, a, b, PAIRS: tl.constexpr, ROWS: tl.constexpr, LANES: tl.constexpr):
    """total + a and products + a * b, lane by lane; with PAIRS, a lane's two neighbouring values
    of a row go into one sum (LANES = half the tile's width)."""
    if PAIRS:
        a_even, a_odd = tl.split(tl.reshape(a, [ROWS, LANES, 2]))
        b_even, b_odd = tl.split(tl.reshape(b, [ROWS, LANES, 2]))
        total += a_even
        total += a_odd
        products += a_even * b_even
        products += a_odd * b_odd
    else:
        total += a
        products += a * b
    return total, products


@triton.jit
def _add_tile_moments(x_ptr, stride_n, shift, masked_value, tile, s_blocks, N, S, total, squares, chunk_count,
                      ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr,
                      GROUP: tl.constexpr, PAIRS: tl.constexpr, LANES: tl.constexpr):
    """A lane's sums of x - shift and of its square, and the chunk's count, with one tile added."""
    n, s, mask, tile_count = _tile(tile, s_blocks, N, S, ROWS, BLOCK_S, OFFSET_64)
    x = tl.load(x_ptr + _offsets(n, s, stride_n), mask=mask, other=masked_value).to(ACC)
    if GROUP == 1:
        shifted = x - shift
    else:
        shifted = tl.where(mask, x - shift, 0.0)
    total, squares = _add_sums(total, squares, shifted, shifted, PAIRS, ROWS, LANES)
    return total, squares, chunk_count + tile_count.to(ACC)


@triton.jit
def _moments(x_ptr, stride_n, shift, first_tile, last_tile, s_blocks, N, S,
             ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr,
             CHUNK: tl.constexpr, GROUP: tl.constexpr, PAIRS: tl.constexpr, STAGES: tl.constexpr):
    """(count, mean - shift, M2) of one channel (of each of GROUP channels: S is then their run and
    shift is per lane) over tiles [first_tile, last_tile).

    Moments are taken of x - shift, a value of the channel, which lies near the mean: the
    subtraction keeps the low bits when |mean| >> std, and the squares of x - shift do not cancel.
    Each lane sums x - shift and its square over CHUNK tiles without talking to the other lanes;
    only then is the chunk reduced across the block (one reduction per chunk, not per tile) and
    merged into the running moments with Chan's formula, so no sum runs over more than CHUNK values
    of a lane.

    STAGES > 1 software-pipelines the tile loop (tl.range(num_stages=STAGES)): Triton copies the
    next STAGES - 1 tiles into shared memory (cp.async) while the lanes add this one, so a program
    keeps that many tiles of loads in flight without registers to hold them (the plain loop: one
    tile's; the static model's figures: profiling/MODEL.md).
    """
    count = per_channel_zeros(ACC, GROUP)
    mean = per_channel_zeros(ACC, GROUP)
    m2 = per_channel_zeros(ACC, GROUP)
    # One channel: masked lanes load the shift itself (a value of x, so exact in x's dtype), and
    # x - shift is then 0 there without a select per value. (Channel groups keep the select: their
    # per-lane shifts held in x's dtype as well made the bf16 single pass spill under its cap.)
    masked_value = shift.to(x_ptr.dtype.element_ty) if GROUP == 1 else 0.0
    # PAIRS: a lane sums its values two at a time, so its sums take half the registers of one per
    # value (see pairs_of_values in bn_gpu/backends/triton/sites.py).
    LANES: tl.constexpr = BLOCK_S // 2 if PAIRS else BLOCK_S
    for chunk in range(first_tile, last_tile, CHUNK):
        chunk_end = tl.minimum(chunk + CHUNK, last_tile)
        total = tl.zeros([ROWS, LANES], ACC)
        squares = tl.zeros([ROWS, LANES], ACC)
        chunk_count = tl.zeros([], ACC)
        if STAGES > 1:
            for tile in tl.range(chunk, chunk_end, num_stages=STAGES):
                total, squares, chunk_count = _add_tile_moments(x_ptr, stride_n, shift, masked_value, tile, s_blocks,
                                                                N, S, total, squares, chunk_count, ACC, ROWS, BLOCK_S,
                                                                OFFSET_64, GROUP, PAIRS, LANES)
        else:
            for tile in range(chunk, chunk_end):
                total, squares, chunk_count = _add_tile_moments(x_ptr, stride_n, shift, masked_value, tile, s_blocks,
                                                                N, S, total, squares, chunk_count, ACC, ROWS, BLOCK_S,
                                                                OFFSET_64, GROUP, PAIRS, LANES)
        if GROUP > 1:
            chunk_count = chunk_count / GROUP  # exact (a power of two): each channel has S of the run's values
        chunk_sum = per_channel(total, S, LANES, GROUP)
        chunk_mean = chunk_sum / chunk_count
        chunk_m2 = per_channel(squares, S, LANES, GROUP) - chunk_sum * chunk_mean
        count, mean, m2 = merge_moments(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
    return count, mean, m2


@triton.jit
def _affine(c, invstd, weight_ptr, bias_ptr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """Per-channel (scale, bias) of y = (x - mean) * scale + bias."""
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + c).to(ACC)
    bias = tl.zeros([], ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c).to(ACC)
    return scale, bias


@triton.jit
def _normalize(x_ptr, y_ptr, residual_ptr, x_stride_n, y_stride_n, mean, scale, bias, first_tile, last_tile,
               s_blocks, N, S, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
               ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr):
    # (x - mean) * scale + bias rather than x * scale + shift: the latter cancels when |mean| >> std.
    # Tiles in reverse (the last read first: still in L2), and x and y marked first to evict: this
    # is their last use, and the cache is better spent on the tiles not yet re-read. The epilogue
    # (+ residual, ReLU) costs the residual's read and nothing else: the separate ops would each
    # read and write the activation once more.
    for i in range(first_tile, last_tile):
        tile = first_tile + last_tile - 1 - i
        n, s, mask, _ = _tile(tile, s_blocks, N, S, ROWS, BLOCK_S, OFFSET_64)
        x = tl.load(x_ptr + _offsets(n, s, x_stride_n), mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
        y = (x - mean) * scale + bias
        if HAS_RESIDUAL:  # laid out as the output
            y += tl.load(residual_ptr + _offsets(n, s, y_stride_n), mask=mask, other=0.0,
                         eviction_policy="evict_first").to(ACC)
        if RELU:
            y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN kept, as torch.relu keeps it
        tl.store(y_ptr + _offsets(n, s, y_stride_n), y.to(y_ptr.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")


@triton.jit
def _add_tile_gradient_sums(dy_ptr, x_ptr, dy_stride_n, x_stride_n, mean, scale, shift, tile, s_blocks, N, S,
                            sum_dy, sum_dy_xmu, RELU: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr,
                            BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr, PAIRS: tl.constexpr,
                            LANES: tl.constexpr, FOLD_ROWS: tl.constexpr):
    """A lane's sums of dy and dy * (x - mean) with one tile added; FOLD_ROWS: the tile's rows summed
    into one row of lane sums first (see _gradient_sums)."""
    n, s, mask, _ = _tile(tile, s_blocks, N, S, ROWS, BLOCK_S, OFFSET_64)
    dy = tl.load(dy_ptr + _offsets(n, s, dy_stride_n), mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + _offsets(n, s, x_stride_n), mask=mask, other=0.0).to(ACC)
    if RELU:
        dy = tl.where((x - mean) * scale + shift <= 0.0, 0.0, dy)
    if FOLD_ROWS:
        tile_dy, tile_dy_xmu = _add_sums(tl.zeros([ROWS, LANES], ACC), tl.zeros([ROWS, LANES], ACC), dy, x - mean,
                                         PAIRS, ROWS, LANES)
        sum_dy += tl.sum(tile_dy, axis=0, keep_dims=True)
        sum_dy_xmu += tl.sum(tile_dy_xmu, axis=0, keep_dims=True)
    else:
        sum_dy, sum_dy_xmu = _add_sums(sum_dy, sum_dy_xmu, dy, x - mean, PAIRS, ROWS, LANES)
    return sum_dy, sum_dy_xmu


@triton.jit
def _gradient_sums(dy_ptr, x_ptr, dy_stride_n, x_stride_n, mean, scale, shift, first_tile, last_tile,
                   s_blocks, N, S, RELU: tl.constexpr,
                   ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr,
                   GROUP: tl.constexpr, PAIRS: tl.constexpr, STAGES: tl.constexpr, FOLD_ROWS: tl.constexpr):
    """(sum of dy, sum of dy * (x - mean)) over tiles [first_tile, last_tile). RELU: dy through the
    forward's ReLU, its mask recomputed from x (zero where (x - mean) * scale + shift <= 0, as the forward
    computed it) rather than read from memory: as torch's ReLU, a NaN input passes its gradient on.
    STAGES > 1: the tile loop software-pipelined, as in _moments. FOLD_ROWS: one row of lane sums, each
    tile's rows added into it, rather than one a row of the tile -- where a thread holds the same lanes
    of every row (a row spans the program's threads), its own adds and half the registers at 2 rows."""
    # Lane-wise sums across tiles, one tree reduction at the end; two values at a time with PAIRS,
    # as _moments.
    LANES: tl.constexpr = BLOCK_S // 2 if PAIRS else BLOCK_S
    SUM_ROWS: tl.constexpr = 1 if FOLD_ROWS else ROWS
    sum_dy = tl.zeros([SUM_ROWS, LANES], ACC)
    sum_dy_xmu = tl.zeros([SUM_ROWS, LANES], ACC)
    if STAGES > 1:
        for tile in tl.range(first_tile, last_tile, num_stages=STAGES):
            sum_dy, sum_dy_xmu = _add_tile_gradient_sums(dy_ptr, x_ptr, dy_stride_n, x_stride_n, mean, scale, shift,
                                                         tile, s_blocks, N, S, sum_dy, sum_dy_xmu, RELU, ACC, ROWS,
                                                         BLOCK_S, OFFSET_64, PAIRS, LANES, FOLD_ROWS)
    else:
        for tile in range(first_tile, last_tile):
            sum_dy, sum_dy_xmu = _add_tile_gradient_sums(dy_ptr, x_ptr, dy_stride_n, x_stride_n, mean, scale, shift,
                                                         tile, s_blocks, N, S, sum_dy, sum_dy_xmu, RELU, ACC, ROWS,
                                                         BLOCK_S, OFFSET_64, PAIRS, LANES, FOLD_ROWS)
    return per_channel(sum_dy, S, LANES, GROUP), per_channel(sum_dy_xmu, S, LANES, GROUP)


@triton.jit
def _input_gradient(dy_ptr, x_ptr, dx_ptr, dy_stride_n, x_stride_n, dx_stride_n, scale, shift, mean, mean_dy,
                    projection, first_tile, last_tile, s_blocks, N, S, TRAINING: tl.constexpr, RELU: tl.constexpr,
                    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr):
    """dx = scale * (dy - mean(dy) - (x - mean) * projection) in training, scale * dy in eval, with
    dy through the ReLU's recomputed mask when RELU (see _gradient_sums).
    Tiles in reverse and evict-first, as _normalize: the second pass over dy and x.
    16-bit inputs take x uncentered, dy - mean(dy) then two FMAs a value over terms computed once: see
    dx_value in kernels/cuda/backward.cuh (its rounding is of the order of the saved fp32 mean's, far below
    the input's);
    not with the ReLU's mask, which has x - mean anyway (uncentered, it would cost loads in flight)."""
    x_coefficient = -scale * projection
    constant = scale * projection * mean
    for i in range(first_tile, last_tile):
        tile = first_tile + last_tile - 1 - i
        n, s, mask, _ = _tile(tile, s_blocks, N, S, ROWS, BLOCK_S, OFFSET_64)
        dy = tl.load(dy_ptr + _offsets(n, s, dy_stride_n), mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
        if TRAINING or RELU:
            x = tl.load(x_ptr + _offsets(n, s, x_stride_n), mask=mask, other=0.0,
                        eviction_policy="evict_first").to(ACC)
        if RELU:
            dy = tl.where((x - mean) * scale + shift <= 0.0, 0.0, dy)
        if TRAINING:
            if dy_ptr.dtype.element_ty.primitive_bitwidth == 16 and not RELU:
                dx = tl.fma(scale, dy - mean_dy, tl.fma(x_coefficient, x, constant))
            else:
                dx = scale * (dy - mean_dy - (x - mean) * projection)
        else:
            dx = scale * dy
        tl.store(dx_ptr + _offsets(n, s, dx_stride_n), dx.to(dx_ptr.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")


@triton.jit
def statistics_channels_first(
    x_ptr,              # input (N, C, S)
    partial_count_ptr,  # (splits, C) number of values each program reduced (+ split groups rows: FINALIZE)
    partial_mean_ptr,   # (splits, C) their mean, less the channel's first value x[0, c, 0]
    partial_m2_ptr,     # (splits, C) their sum of squared deviations from that mean
    counter_ptr,        # int32 zeros when FINALIZE: see finalize.finalize_statistics_of_group
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,  # FINALIZE: see store_statistics
    N, C, S, chunk_channels, chunk_extra, stride_n, stride_c,  # chunk_*: GHOST (kernels/ghost.py)
    s_blocks, total_tiles, tiles_per_program, momentum: tl.float64, eps: tl.float64, group_splits,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr,
    GROUP: tl.constexpr, ALIGN: tl.constexpr, PAIRS: tl.constexpr,
    CHUNK: tl.constexpr, FINALIZE: tl.constexpr, HAS_RUNNING_STATS: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, STAGES: tl.constexpr, GHOST: tl.constexpr,
):
    """Partial moments per (split, channel); with FINALIZE, the last programs of each channel group
    to finish also merge its partials (finalize.finalize_statistics_of_group)."""
    group = _group(OFFSET_64)
    split = tl.program_id(1)
    c0, c, cols = group_channels(group, S, BLOCK_S, GROUP)
    if GHOST:
        x_ptr += chunk_offset(c0, chunk_channels, aligned(chunk_extra, ALIGN))
    first_tile, last_tile = _program_tiles(split, tiles_per_program, total_tiles)
    shift = finite_shift(tl.load(x_ptr + c * stride_c).to(ACC))
    count, mean, m2 = _moments(x_ptr + group_offset(c0, stride_c, ALIGN), aligned(stride_n, ALIGN), shift,
                               first_tile, last_tile, s_blocks, N, group_run(S, GROUP, ALIGN),
                               ACC, ROWS, BLOCK_S, OFFSET_64, CHUNK, GROUP, PAIRS, STAGES)
    out = split * C + cols
    tl.store(partial_count_ptr + out, count)
    tl.store(partial_mean_ptr + out, mean)
    tl.store(partial_m2_ptr + out, m2)
    if FINALIZE:
        group_cols = c0 + tl.arange(0, GROUP)
        finalize_statistics_of_group(split, group, tl.cdiv(C, GROUP), group_cols, group_cols < C, partial_count_ptr,
                                     partial_mean_ptr, partial_m2_ptr, counter_ptr, x_ptr, mean_ptr, invstd_ptr,
                                     running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, tl.num_programs(1),
                                     group_splits, C, stride_c, momentum, eps, HAS_RUNNING_STATS, CUMULATIVE, ACC,
                                     BLOCK_SPLITS, GROUP)


@triton.jit
def _statistics_from_running(mean_ptr, var_ptr, saved_mean_ptr, invstd_ptr, c, cols, C, split, eps,
                             ACC: tl.constexpr, GROUP: tl.constexpr):
    """Eval: (mean, invstd) of each lane's channel from the running statistics; split 0 also writes
    mean and invstd of the program's channels for the backward."""
    eps = in_dtype(eps, ACC)
    mean = tl.load(mean_ptr + c).to(ACC)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + c).to(ACC) + eps)
    if GROUP == 1:
        tl.store(saved_mean_ptr + c, mean, mask=split == 0)
        tl.store(invstd_ptr + c, invstd, mask=split == 0)
    else:  # once per channel, not once per lane
        first = (cols < C) & (split + tl.zeros([GROUP], tl.int32) == 0)  # (the interpreter's masks are not
                                                                           # broadcast from a scalar)
        tl.store(saved_mean_ptr + cols, tl.load(mean_ptr + cols).to(ACC), mask=first)
        tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(tl.load(var_ptr + cols).to(ACC) + eps), mask=first)
    return mean, invstd


@triton.jit
def normalize_channels_first(
    x_ptr,           # input (N, C, S)
    y_ptr,           # output (N, C, S), in the input's dtype; strides may differ from x
    residual_ptr,    # (N, C, S) added before the activation when HAS_RESIDUAL; the output's strides
    mean_ptr,        # (C,) batch mean (training) or running mean (eval)
    var_ptr,         # (C,) eval only: running variance
    invstd_ptr,      # (C,) training: read; eval: written by split 0 for the backward
    saved_mean_ptr,  # (C,) eval only: the running mean in the accumulation dtype, for the backward
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when HAS_BIAS
    num_batches_tracked_ptr,  # () int64, incremented by program (0, 0) when COUNT_BATCH
    N, C, S, chunk_channels, chunk_extra, x_stride_n, x_stride_c, y_stride_n, y_stride_c, eps: tl.float64,
    s_blocks, total_tiles, tiles_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_RUNNING_STATS: tl.constexpr,
    COUNT_BATCH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr,
    GROUP: tl.constexpr, ALIGN: tl.constexpr, GHOST: tl.constexpr,
):
    group, split = _reversed_program(OFFSET_64)
    c0, c, cols = group_channels(group, S, BLOCK_S, GROUP)
    if GHOST:  # x and y share their strides (the virtual batches' offset)
        ghost = chunk_offset(c0, chunk_channels, aligned(chunk_extra, ALIGN))
        x_ptr += ghost
        y_ptr += ghost
    if COUNT_BATCH:
        # Here, not in the finalize kernel: every finalize program reads the count before this
        # kernel starts (stream order), so the increment cannot race with those reads.
        count_batch(num_batches_tracked_ptr, (group + split) == 0)
    if FROM_RUNNING_STATS:
        mean, invstd = _statistics_from_running(mean_ptr, var_ptr, saved_mean_ptr, invstd_ptr, c, cols, C, split, eps,
                                                ACC, GROUP)
    else:
        mean = tl.load(mean_ptr + c).to(ACC)
        invstd = tl.load(invstd_ptr + c).to(ACC)
    scale, bias = _affine(c, invstd, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACC)
    first_tile, last_tile = _program_tiles(split, tiles_per_program, total_tiles)
    y_offset = group_offset(c0, y_stride_c, ALIGN)
    if HAS_RESIDUAL:
        residual_ptr += y_offset
    _normalize(x_ptr + group_offset(c0, x_stride_c, ALIGN), y_ptr + y_offset, residual_ptr, aligned(x_stride_n, ALIGN),
               aligned(y_stride_n, ALIGN), mean, scale, bias, first_tile, last_tile, s_blocks, N,
               group_run(S, GROUP, ALIGN), HAS_RESIDUAL, RELU, ACC, ROWS, BLOCK_S, OFFSET_64)


@triton.jit
def single_pass_forward_channels_first(
    x_ptr,           # input (N, C, S)
    y_ptr,           # output (N, C, S), in the input's dtype; strides may differ from x
    residual_ptr,    # (N, C, S) added before the activation when HAS_RESIDUAL; the output's strides
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,  # see store_statistics
    counter_ptr,     # (1,) int32 zero when COUNT_BATCH and CUMULATIVE: see count_batch_after_every_read
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when HAS_BIAS
    N, C, S, x_stride_n, x_stride_c, y_stride_n, y_stride_c, momentum: tl.float64, eps: tl.float64,
    s_blocks, total_tiles,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING_STATS: tl.constexpr,
    CUMULATIVE: tl.constexpr, COUNT_BATCH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr,
    GROUP: tl.constexpr, ALIGN: tl.constexpr, PAIRS: tl.constexpr,
    CHUNK: tl.constexpr, STAGES: tl.constexpr,
):
    # One program per channel (group) reads it twice: the second pass finds it in cache.
    group = _group(OFFSET_64)
    c0, c, cols = group_channels(group, S, BLOCK_S, GROUP)
    run = group_run(S, GROUP, ALIGN)
    x_stride_n, y_stride_n = aligned(x_stride_n, ALIGN), aligned(y_stride_n, ALIGN)
    lane_shift = finite_shift(tl.load(x_ptr + c * x_stride_c).to(ACC))
    count, mean_shifted, m2 = _moments(x_ptr + group_offset(c0, x_stride_c, ALIGN), x_stride_n, lane_shift,
                                       0, total_tiles, s_blocks, N, run, ACC, ROWS, BLOCK_S, OFFSET_64, CHUNK, GROUP,
                                       PAIRS, STAGES)
    if GROUP == 1:
        mean = lane_shift + mean_shifted
    else:
        mean = finite_shift(tl.load(x_ptr + cols * x_stride_c).to(ACC)) + mean_shifted
    invstd = store_statistics(cols, cols < C, count, mean, m2, mean_ptr, invstd_ptr, running_mean_ptr,
                              running_var_ptr, num_batches_tracked_ptr, momentum, eps, HAS_RUNNING_STATS, CUMULATIVE,
                              ACC)
    if COUNT_BATCH:
        if CUMULATIVE:  # every program reads the count in store_statistics: the last counts the batch
            count_batch_after_every_read(num_batches_tracked_ptr, counter_ptr)
        else:
            count_batch(num_batches_tracked_ptr, group == 0)
    scale, bias = _affine(c, to_lanes(invstd, c - c0, GROUP), weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACC)
    y_offset = group_offset(c0, y_stride_c, ALIGN)
    if HAS_RESIDUAL:
        residual_ptr += y_offset
    _normalize(x_ptr + group_offset(c0, x_stride_c, ALIGN), y_ptr + y_offset, residual_ptr, x_stride_n, y_stride_n,
               to_lanes(mean, c - c0, GROUP), scale, bias, 0, total_tiles, s_blocks, N, run, HAS_RESIDUAL, RELU,
               ACC, ROWS, BLOCK_S, OFFSET_64)


@triton.jit
def gradient_sums_channels_first(
    dy_ptr,                  # gradient of the output (N, C, S)
    x_ptr,                   # input (N, C, S)
    mean_ptr,                # (C,) mean the forward normalized with
    invstd_ptr,              # (C,) invstd the forward normalized with, when RELU or FINALIZE
    weight_ptr,              # (C,) scale, when RELU and HAS_WEIGHT
    bias_ptr,                # (C,) shift, when RELU and HAS_BIAS
    partial_sum_dy_ptr,      # (splits, C) sum of dy over the program's values (+ split groups rows: FINALIZE)
    partial_sum_dy_xmu_ptr,  # (splits, C) sum of dy * (x - mean)
    counter_ptr,             # int32 zeros when FINALIZE: see finalize.finalize_gradients_of_group
    total_dy_ptr, total_dy_xmu_ptr,  # (C,) when FINALIZE: see finalize.finalize_gradients (sum_dy_ptr, ...)
    grad_weight_ptr, grad_bias_ptr,  # (C,) when FINALIZE: see finalize.store_gradients
    N, C, S, chunk_channels, chunk_extra, dy_stride_n, dy_stride_c, x_stride_n, x_stride_c,
    s_blocks, total_tiles, tiles_per_program, group_splits,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr,
    GROUP: tl.constexpr, ALIGN: tl.constexpr, PAIRS: tl.constexpr,
    FINALIZE: tl.constexpr, BLOCK_SPLITS: tl.constexpr, STAGES: tl.constexpr, FOLD_ROWS: tl.constexpr,
    GHOST: tl.constexpr,
):
    """Partial sums per (split, channel); with FINALIZE, the last programs of each channel group to
    finish also write its totals, dweight and dbias (finalize.finalize_gradients_of_group). FOLD_ROWS:
    see _gradient_sums."""
    group = _group(OFFSET_64)
    split = tl.program_id(1)
    c0, c, cols = group_channels(group, S, BLOCK_S, GROUP)
    if GHOST:  # dy and x share their strides (the virtual batches' offset)
        ghost = chunk_offset(c0, chunk_channels, aligned(chunk_extra, ALIGN))
        dy_ptr += ghost
        x_ptr += ghost
    first_tile, last_tile = _program_tiles(split, tiles_per_program, total_tiles)
    scale = tl.zeros([], ACC)
    shift = tl.zeros([], ACC)
    if RELU:
        scale, shift = _affine(c, tl.load(invstd_ptr + c).to(ACC), weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACC)
    sum_dy, sum_dy_xmu = _gradient_sums(dy_ptr + group_offset(c0, dy_stride_c, ALIGN),
                                        x_ptr + group_offset(c0, x_stride_c, ALIGN), aligned(dy_stride_n, ALIGN),
                                        aligned(x_stride_n, ALIGN), tl.load(mean_ptr + c).to(ACC), scale, shift,
                                        first_tile, last_tile, s_blocks, N, group_run(S, GROUP, ALIGN), RELU, ACC,
                                        ROWS, BLOCK_S, OFFSET_64, GROUP, PAIRS, STAGES, FOLD_ROWS)
    out = split * C + cols
    tl.store(partial_sum_dy_ptr + out, sum_dy)
    tl.store(partial_sum_dy_xmu_ptr + out, sum_dy_xmu)
    if FINALIZE:
        group_cols = c0 + tl.arange(0, GROUP)
        finalize_gradients_of_group(split, group, tl.cdiv(C, GROUP), group_cols, group_cols < C, partial_sum_dy_ptr,
                                    partial_sum_dy_xmu_ptr, counter_ptr, invstd_ptr, total_dy_ptr, total_dy_xmu_ptr,
                                    grad_weight_ptr, grad_bias_ptr, tl.num_programs(1), group_splits, C, ACC,
                                    BLOCK_SPLITS, GROUP)


@triton.jit
def input_gradient_channels_first(
    dy_ptr,          # gradient of the output (N, C, S)
    x_ptr,           # input (N, C, S); read in training, or for the ReLU's mask
    dx_ptr,          # gradient of the input (N, C, S), in the input's dtype
    mean_ptr,        # (C,) mean the forward normalized with
    invstd_ptr,      # (C,) invstd the forward normalized with
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when RELU and HAS_BIAS
    sum_dy_ptr,      # (C,) training: total of dy per channel
    sum_dy_xmu_ptr,  # (C,) training: total of dy * (x - mean) per channel
    N, C, S, chunk_channels, chunk_extra, dy_stride_n, dy_stride_c, x_stride_n, x_stride_c, dx_stride_n, dx_stride_c,
    inv_count,       # 1 / (N * S) as a float
    s_blocks, total_tiles, tiles_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr,
    GROUP: tl.constexpr, ALIGN: tl.constexpr, GHOST: tl.constexpr,
):
    group, split = _reversed_program(OFFSET_64)
    c0, c, _ = group_channels(group, S, BLOCK_S, GROUP)
    if GHOST:  # dy, x and dx share their strides (the virtual batches' offset)
        ghost = chunk_offset(c0, chunk_channels, aligned(chunk_extra, ALIGN))
        dy_ptr += ghost
        x_ptr += ghost
        dx_ptr += ghost
    invstd = tl.load(invstd_ptr + c).to(ACC)
    scale, shift = _affine(c, invstd, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS and RELU, ACC)
    mean = tl.zeros([], ACC)
    mean_dy = tl.zeros([], ACC)
    projection = tl.zeros([], ACC)
    if TRAINING or RELU:
        mean = tl.load(mean_ptr + c).to(ACC)
    if TRAINING:
        # dx = weight * invstd * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean)))
        mean_dy = tl.load(sum_dy_ptr + c).to(ACC) * inv_count
        projection = tl.load(sum_dy_xmu_ptr + c).to(ACC) * invstd * invstd * inv_count
    first_tile, last_tile = _program_tiles(split, tiles_per_program, total_tiles)
    _input_gradient(dy_ptr + group_offset(c0, dy_stride_c, ALIGN), x_ptr + group_offset(c0, x_stride_c, ALIGN),
                    dx_ptr + group_offset(c0, dx_stride_c, ALIGN), aligned(dy_stride_n, ALIGN),
                    aligned(x_stride_n, ALIGN), aligned(dx_stride_n, ALIGN), scale, shift, mean, mean_dy, projection,
                    first_tile, last_tile, s_blocks, N, group_run(S, GROUP, ALIGN), TRAINING, RELU, ACC, ROWS, BLOCK_S,
                    OFFSET_64)


@triton.jit
def single_pass_backward_channels_first(
    dy_ptr,          # gradient of the output (N, C, S)
    x_ptr,           # input (N, C, S)
    dx_ptr,          # gradient of the input (N, C, S), in the input's dtype, when NEED_INPUT_GRAD
    mean_ptr,        # (C,) mean the forward normalized with
    invstd_ptr,      # (C,) invstd the forward normalized with
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when RELU and HAS_BIAS
    grad_weight_ptr, grad_bias_ptr,  # see store_gradients
    N, C, S, dy_stride_n, dy_stride_c, x_stride_n, x_stride_c, dx_stride_n, dx_stride_c,
    inv_count,       # 1 / (N * S) as a float
    s_blocks, total_tiles,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr, NEED_INPUT_GRAD: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr,
    GROUP: tl.constexpr, ALIGN: tl.constexpr, PAIRS: tl.constexpr, STAGES: tl.constexpr,
):
    # One program per channel (group): the sums, then dx from a second pass that finds dy and x in cache.
    group = _group(OFFSET_64)
    c0, c, cols = group_channels(group, S, BLOCK_S, GROUP)
    run = group_run(S, GROUP, ALIGN)
    dy_stride_n, x_stride_n = aligned(dy_stride_n, ALIGN), aligned(x_stride_n, ALIGN)
    dx_stride_n = aligned(dx_stride_n, ALIGN)
    dy_ptr += group_offset(c0, dy_stride_c, ALIGN)
    x_ptr += group_offset(c0, x_stride_c, ALIGN)
    mean = tl.load(mean_ptr + c).to(ACC)
    invstd = tl.load(invstd_ptr + c).to(ACC)
    scale, shift = _affine(c, invstd, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS and RELU, ACC)
    sum_dy, sum_dy_xmu = _gradient_sums(dy_ptr, x_ptr, dy_stride_n, x_stride_n, mean, scale, shift,
                                        0, total_tiles, s_blocks, N, run, RELU, ACC, ROWS, BLOCK_S, OFFSET_64, GROUP,
                                        PAIRS, STAGES, False)
    if GROUP == 1:
        store_gradients(c, c < C, sum_dy, sum_dy_xmu, invstd, grad_weight_ptr, grad_bias_ptr)
    else:
        store_gradients(cols, cols < C, sum_dy, sum_dy_xmu, tl.load(invstd_ptr + cols).to(ACC), grad_weight_ptr,
                        grad_bias_ptr)
    if NEED_INPUT_GRAD:
        mean_dy = to_lanes(sum_dy, c - c0, GROUP) * inv_count
        projection = to_lanes(sum_dy_xmu, c - c0, GROUP) * invstd * invstd * inv_count
        _input_gradient(dy_ptr, x_ptr, dx_ptr + group_offset(c0, dx_stride_c, ALIGN), dy_stride_n, x_stride_n,
                        dx_stride_n, scale, shift, mean, mean_dy, projection, 0, total_tiles, s_blocks, N, run,
                        TRAINING, RELU, ACC, ROWS, BLOCK_S, OFFSET_64)


# ---- on-chip kernels: x (and dy) read once -------------------------------------------------------
# A program holds HELD_ROWS // ROWS consecutive tiles of its channel group as one [HELD_ROWS, BLOCK_S]
# block in registers: its statistics (or gradient sums) and the elementwise pass both come from that
# block. EXCHANGE: several programs (splits) share a channel group; each publishes its partials, waits
# for the group's others (group_barrier.wait_for_group), and merges the group's partials in split
# order, so every program of the group finalizes the same bits. Without it, a program holds whole
# channel groups and walks them (grid-stride), its loop software-pipelined over STAGES: the next
# group's copies are in flight while it reduces and normalizes the current one.

@triton.jit
def _held_tiles(first_tile, last_tile, s_blocks, N, S, HELD_ROWS: tl.constexpr, ROWS: tl.constexpr,
                BLOCK_S: tl.constexpr, OFFSET_64: tl.constexpr):
    """Batch rows n [HELD_ROWS], spatial columns s [HELD_ROWS, BLOCK_S] and the validity mask of the
    tiles [first_tile, last_tile) stacked as one block, tile after tile (rows past last_tile masked)."""
    h = tl.arange(0, HELD_ROWS)
    tile = first_tile + h // ROWS
    n_block = tile // s_blocks
    s_block = tile - n_block * s_blocks
    n = n_block * ROWS + h % ROWS
    if OFFSET_64:
        n = n.to(tl.int64)
    s = (s_block * BLOCK_S)[:, None] + tl.arange(0, BLOCK_S)[None, :]
    mask = ((tile < last_tile) & (n < N))[:, None] & (s < S)
    return n, s, mask


@triton.jit
def _held_moments(x, mask, shift, lane_channel, run, ACC: tl.constexpr, BLOCK_S: tl.constexpr, GROUP: tl.constexpr):
    """(count, mean - shift, M2) per channel of a held block: the mean first, then the squared
    deviations from it -- both passes over registers."""
    shifted = tl.where(mask, x - shift, 0.0)
    count = per_channel(mask.to(ACC), run, BLOCK_S, GROUP)
    mean_shifted = per_channel(shifted, run, BLOCK_S, GROUP) / count
    deviation = tl.where(mask, shifted - to_lanes(mean_shifted, lane_channel, GROUP), 0.0)
    return count, mean_shifted, per_channel(deviation * deviation, run, BLOCK_S, GROUP)


@triton.jit
def _work_item(item, splits, held_tiles, total_tiles, OFFSET_64: tl.constexpr):
    """(channel group, split, first tile, end tile) of work item `item` (group-major)."""
    if OFFSET_64:
        item = item.to(tl.int64)
    group = item // splits
    split = item - group * splits
    first_tile = split * held_tiles
    return group, split, first_tile, tl.minimum(first_tile + held_tiles, total_tiles)


@triton.jit
def _on_chip_forward_item(
    item, x_ptr, y_ptr, residual_ptr, partial_count_ptr, partial_mean_ptr, partial_m2_ptr, counter_ptr,
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, weight_ptr, bias_ptr,
    N, C, S, x_stride_n, x_stride_c, y_stride_n, y_stride_c, momentum, eps, s_blocks, total_tiles, splits,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING_STATS: tl.constexpr,
    CUMULATIVE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, HELD_ROWS: tl.constexpr, OFFSET_64: tl.constexpr,
    GROUP: tl.constexpr, ALIGN: tl.constexpr, EXCHANGE: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    group, split, first_tile, last_tile = _work_item(item, splits, HELD_ROWS // ROWS, total_tiles, OFFSET_64)
    c0, c, cols = group_channels(group, S, BLOCK_S, GROUP)
    run = group_run(S, GROUP, ALIGN)
    n, s, mask = _held_tiles(first_tile, last_tile, s_blocks, N, run, HELD_ROWS, ROWS, BLOCK_S, OFFSET_64)
    x = tl.load(x_ptr + group_offset(c0, x_stride_c, ALIGN) + n[:, None] * x_stride_n + s, mask=mask, other=0.0).to(ACC)
    lane_shift = finite_shift(tl.load(x_ptr + c * x_stride_c).to(ACC))
    count, mean_shifted, m2 = _held_moments(x, mask, lane_shift, c - c0, run, ACC, BLOCK_S, GROUP)
    if EXCHANGE:
        out = split * C + cols
        tl.store(partial_count_ptr + out, count)
        tl.store(partial_mean_ptr + out, mean_shifted)
        tl.store(partial_m2_ptr + out, m2)
        wait_for_group(counter_ptr, group, splits)
        group_cols = c0 + tl.arange(0, GROUP)
        count, mean_shifted, m2 = merged_shifted(partial_count_ptr, partial_mean_ptr, partial_m2_ptr, group_cols,
                                                 group_cols < C, splits, C, ACC, BLOCK_SPLITS, GROUP)
        leave_group(counter_ptr, group, splits)
        if GROUP == 1:  # [1] vectors back to scalars
            count = tl.sum(count, axis=0)
            mean_shifted = tl.sum(mean_shifted, axis=0)
            m2 = tl.sum(m2, axis=0)
    if GROUP == 1:
        mean = lane_shift + mean_shifted
        writes = split == 0
    else:
        mean = finite_shift(tl.load(x_ptr + cols * x_stride_c).to(ACC)) + mean_shifted
        writes = (cols < C) & (split + tl.zeros([GROUP], tl.int32) == 0)  # (the interpreter's masks are not
                                                                         # broadcast from a scalar)
    # Every program of the group computes the same statistics; the first split writes them.
    invstd = store_statistics(cols, writes, count, mean, m2, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr,
                              num_batches_tracked_ptr, momentum, eps, HAS_RUNNING_STATS, CUMULATIVE, ACC)
    scale, bias = _affine(c, to_lanes(invstd, c - c0, GROUP), weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACC)
    y = (x - to_lanes(mean, c - c0, GROUP)) * scale + bias
    y_offsets = group_offset(c0, y_stride_c, ALIGN) + n[:, None] * y_stride_n + s
    if HAS_RESIDUAL:  # laid out as the output
        y += tl.load(residual_ptr + y_offsets, mask=mask, other=0.0).to(ACC)
    if RELU:
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def on_chip_forward_channels_first(
    x_ptr,           # input (N, C, S)
    y_ptr,           # output (N, C, S), in the input's dtype; strides may differ from x
    residual_ptr,    # (N, C, S) added before the activation when HAS_RESIDUAL; the output's strides
    partial_count_ptr, partial_mean_ptr, partial_m2_ptr,  # (splits, C) when EXCHANGE: see statistics_channels_first
    counter_ptr,     # int32 zeros, left at zero: a barrier per channel group (EXCHANGE), then the
                     # batch counter's ticket (COUNT_BATCH and CUMULATIVE)
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,  # see store_statistics
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when HAS_BIAS
    N, C, S, x_stride_n, x_stride_c, y_stride_n, y_stride_c, momentum: tl.float64, eps: tl.float64,
    s_blocks, total_tiles, splits, items,  # items: channel groups x splits
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING_STATS: tl.constexpr,
    CUMULATIVE: tl.constexpr, COUNT_BATCH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, HELD_ROWS: tl.constexpr, OFFSET_64: tl.constexpr,
    GROUP: tl.constexpr, ALIGN: tl.constexpr, EXCHANGE: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Training forward reading x once: statistics, running statistics and normalize, one work item
    (a channel group's split) a program with EXCHANGE, else every items-th from this program's."""
    # With EXCHANGE the grid is `items` programs, all resident: one item each.
    for item in tl.range(tl.program_id(0), items, tl.num_programs(0), num_stages=STAGES):
        _on_chip_forward_item(item, x_ptr, y_ptr, residual_ptr, partial_count_ptr, partial_mean_ptr,
                              partial_m2_ptr, counter_ptr, mean_ptr, invstd_ptr, running_mean_ptr,
                              running_var_ptr, num_batches_tracked_ptr, weight_ptr, bias_ptr, N, C, S,
                              aligned(x_stride_n, ALIGN), x_stride_c, aligned(y_stride_n, ALIGN), y_stride_c,
                              momentum, eps, s_blocks, total_tiles, splits, HAS_WEIGHT, HAS_BIAS, HAS_RUNNING_STATS,
                              CUMULATIVE, HAS_RESIDUAL, RELU, ACC, ROWS, BLOCK_S, HELD_ROWS, OFFSET_64, GROUP, ALIGN,
                              EXCHANGE, BLOCK_SPLITS)
    if COUNT_BATCH:  # every program has read the count in store_statistics by now
        if EXCHANGE:  # the batch counter's ticket follows the groups' barriers
            counter_ptr += items // splits
        count_batch_once(num_batches_tracked_ptr, counter_ptr, CUMULATIVE)


@triton.jit
def _on_chip_backward_item(
    item, dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, partial_sum_dy_ptr,
    partial_sum_dy_xmu_ptr, counter_ptr, grad_weight_ptr, grad_bias_ptr,
    N, C, S, dy_stride_n, dy_stride_c, x_stride_n, x_stride_c, dx_stride_n, dx_stride_c, inv_count,
    s_blocks, total_tiles, splits,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_INPUT_GRAD: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, HELD_ROWS: tl.constexpr, OFFSET_64: tl.constexpr,
    GROUP: tl.constexpr, ALIGN: tl.constexpr, EXCHANGE: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    group, split, first_tile, last_tile = _work_item(item, splits, HELD_ROWS // ROWS, total_tiles, OFFSET_64)
    c0, c, cols = group_channels(group, S, BLOCK_S, GROUP)
    run = group_run(S, GROUP, ALIGN)
    n, s, mask = _held_tiles(first_tile, last_tile, s_blocks, N, run, HELD_ROWS, ROWS, BLOCK_S, OFFSET_64)
    dy = tl.load(dy_ptr + group_offset(c0, dy_stride_c, ALIGN) + n[:, None] * dy_stride_n + s, mask=mask,
                 other=0.0).to(ACC)
    x = tl.load(x_ptr + group_offset(c0, x_stride_c, ALIGN) + n[:, None] * x_stride_n + s, mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + c).to(ACC)
    invstd = tl.load(invstd_ptr + c).to(ACC)
    scale, shift = _affine(c, invstd, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS and RELU, ACC)
    centered = tl.where(mask, x - mean, 0.0)
    if RELU:  # the forward's ReLU mask, recomputed from x (see _gradient_sums)
        dy = tl.where(centered * scale + shift <= 0.0, 0.0, dy)
    sum_dy = per_channel(dy, run, BLOCK_S, GROUP)
    sum_dy_xmu = per_channel(dy * centered, run, BLOCK_S, GROUP)
    if EXCHANGE:
        out = split * C + cols
        tl.store(partial_sum_dy_ptr + out, sum_dy)
        tl.store(partial_sum_dy_xmu_ptr + out, sum_dy_xmu)
        wait_for_group(counter_ptr, group, splits)
        group_cols = c0 + tl.arange(0, GROUP)
        sum_dy, sum_dy_xmu = summed_partials(partial_sum_dy_ptr, partial_sum_dy_xmu_ptr, group_cols, group_cols < C,
                                             splits, C, ACC, BLOCK_SPLITS, GROUP)
        leave_group(counter_ptr, group, splits)
        if GROUP == 1:
            sum_dy = tl.sum(sum_dy, axis=0)
            sum_dy_xmu = tl.sum(sum_dy_xmu, axis=0)
    if GROUP == 1:
        store_gradients(c, split == 0, sum_dy, sum_dy_xmu, invstd, grad_weight_ptr, grad_bias_ptr)
    else:
        store_gradients(cols, (cols < C) & (split + tl.zeros([GROUP], tl.int32) == 0), sum_dy, sum_dy_xmu,
                        tl.load(invstd_ptr + cols).to(ACC), grad_weight_ptr, grad_bias_ptr)
    if NEED_INPUT_GRAD:
        mean_dy = to_lanes(sum_dy, c - c0, GROUP) * inv_count
        projection = to_lanes(sum_dy_xmu, c - c0, GROUP) * invstd * invstd * inv_count
        dx = scale * (dy - mean_dy - centered * projection)
        tl.store(dx_ptr + group_offset(c0, dx_stride_c, ALIGN) + n[:, None] * dx_stride_n + s,
                 dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def on_chip_backward_channels_first(
    dy_ptr,          # gradient of the output (N, C, S)
    x_ptr,           # input (N, C, S)
    dx_ptr,          # gradient of the input (N, C, S), in the input's dtype, when NEED_INPUT_GRAD
    mean_ptr,        # (C,) mean the forward normalized with
    invstd_ptr,      # (C,) invstd the forward normalized with
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when RELU and HAS_BIAS
    partial_sum_dy_ptr, partial_sum_dy_xmu_ptr,  # (splits, C) when EXCHANGE: see gradient_sums_channels_first
    counter_ptr,     # int32 zeros when EXCHANGE, left at zero: a barrier per channel group
    grad_weight_ptr, grad_bias_ptr,  # see store_gradients
    N, C, S, dy_stride_n, dy_stride_c, x_stride_n, x_stride_c, dx_stride_n, dx_stride_c,
    inv_count,       # 1 / (N * S) as a float
    s_blocks, total_tiles, splits, items,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_INPUT_GRAD: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr, HELD_ROWS: tl.constexpr, OFFSET_64: tl.constexpr,
    GROUP: tl.constexpr, ALIGN: tl.constexpr, EXCHANGE: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Training backward reading dy and x once: dweight, dbias and dx, work items as in
    on_chip_forward_channels_first."""
    # With EXCHANGE the grid is `items` programs, all resident: one item each.
    for item in tl.range(tl.program_id(0), items, tl.num_programs(0), num_stages=STAGES):
        _on_chip_backward_item(item, dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
                               partial_sum_dy_ptr, partial_sum_dy_xmu_ptr, counter_ptr, grad_weight_ptr,
                               grad_bias_ptr, N, C, S, aligned(dy_stride_n, ALIGN), dy_stride_c,
                               aligned(x_stride_n, ALIGN), x_stride_c, aligned(dx_stride_n, ALIGN), dx_stride_c,
                               inv_count, s_blocks, total_tiles, splits, HAS_WEIGHT, HAS_BIAS, NEED_INPUT_GRAD, RELU,
                               ACC, ROWS, BLOCK_S, HELD_ROWS, OFFSET_64, GROUP, ALIGN, EXCHANGE, BLOCK_SPLITS)
