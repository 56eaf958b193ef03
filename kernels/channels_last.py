"""Triton kernels for channels_last / channels_last_3d / (N, C) inputs, viewed as a row-major (M, C)
matrix with M = N * spatial rows and unit stride along C.

Loads coalesce along C. A program owns BLOCK_C channels (grid axis 1) and a contiguous range of
rows (grid axis 0: the split), walked in tiles of BLOCK_M rows; per-channel results are vectors of
BLOCK_C lanes. Every kernel of this file walks the same tiles, so one launch plan serves all.

Split path (several programs per channel), in the order a training step runs them:
    statistics_channels_last           partial (count, mean, M2) per (split, channel)
    normalize_channels_last            y = (x - mean) * invstd * weight + bias (train and eval)
    gradient_sums_channels_last        partial sums of dy and dy * (x - mean)
    input_gradient_channels_last       dx from dy, x and the per-channel totals
Single-pass path (one program per channel block, when that fills the GPU or the input is small):
    single_pass_forward_channels_last  statistics, running stats and normalize in one launch
    single_pass_backward_channels_last dweight, dbias and dx in one launch
On-chip path (the input held in registers: read once; see the section at the end of this file):
    on_chip_forward_channels_last      statistics, running stats and normalize in one launch
    on_chip_backward_channels_last     dweight, dbias and dx in one launch
The partials are merged by the last programs of each channel block to finish (FINALIZE, in two
levels: finalize.finalize_statistics_of_group), or by the finalize kernels of finalize.py in a
launch of their own (SyncBatchNorm's local moments).
"""
import triton
import triton.language as tl

from .alignment import aligned
from .batch_counter import count_batch, count_batch_after_every_read, count_batch_once
from .finalize import (finalize_gradients_of_group, finalize_statistics_of_group, in_dtype, merged_shifted,
                       store_gradients, store_statistics, summed_partials)
from .ghost import chunk_offset
from .group_barrier import leave_group, wait_for_group
from .moments import finite_shift, merge_moments


@triton.jit
def _columns(C, BLOCK_C: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _first_column(OFFSET_64: tl.constexpr, BLOCK_C: tl.constexpr, REVERSED: tl.constexpr = False):
    """The first channel of this program's block (of _columns, or of _reversed_program when REVERSED)."""
    block = tl.program_id(1)
    if REVERSED:
        block = tl.num_programs(1) - 1 - block
    if OFFSET_64:
        block = block.to(tl.int64)
    return block * BLOCK_C


@triton.jit
def _tensor_columns(cols, chunk_channels, chunk_extra, OFFSET_64: tl.constexpr, BLOCK_C: tl.constexpr,
                    REVERSED: tl.constexpr, GHOST: tl.constexpr, ALIGN: tl.constexpr):
    """The columns' offsets in x, y, dy and dx (one set of strides under GHOST): cols, plus the
    program's virtual batch's offset with GHOST -- in the offsets, not the pointers, which stay the
    kernel's parameters (a pointer computed from one costs the dx kernel registers:
    profiling/journal/model-history.md)."""
    if GHOST:
        cols = cols + chunk_offset(_first_column(OFFSET_64, BLOCK_C, REVERSED), chunk_channels,
                                   aligned(chunk_extra, ALIGN))
    return cols


@triton.jit
def _program_rows(M, rows_per_program, OFFSET_64: tl.constexpr):
    split = tl.program_id(0)
    if OFFSET_64:
        split = split.to(tl.int64)
    row_begin = split * rows_per_program
    return row_begin, tl.minimum(row_begin + rows_per_program, M)


@triton.jit
def _reversed_program(M, C, rows_per_program, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr):
    """Columns and rows of this program, counted from the end of the grid: GPUs start programs
    roughly in launch order, so a second pass over x starts with what the first pass read last --
    the part still in L2."""
    cols = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.num_programs(0) - 1 - tl.program_id(0)
    if OFFSET_64:
        split = split.to(tl.int64)
    row_begin = split * rows_per_program
    return cols, cols < C, row_begin, tl.minimum(row_begin + rows_per_program, M)


@triton.jit
def _reversed_tile_start(start, row_begin, row_end, BLOCK_M: tl.constexpr):
    """The tile walked at step `start` of range(row_begin, row_end, BLOCK_M), last tile first."""
    last_start = row_begin + ((row_end - row_begin - 1) // BLOCK_M) * BLOCK_M
    return last_start - (start - row_begin)


@triton.jit
def _tile(start, row_end, col_mask, BLOCK_M: tl.constexpr, OFFSET_64: tl.constexpr):
    """Rows of the tile starting at `start`, and its validity mask."""
    rows = start + tl.arange(0, BLOCK_M)
    mask = (rows < row_end)[:, None] & col_mask[None, :]
    if OFFSET_64:
        rows = rows.to(tl.int64)
    return rows, mask


@triton.jit
def _offsets(rows, cols, stride_m):
    return rows[:, None] * stride_m + cols[None, :]


@triton.jit
def _add_shifted_tile(x_ptr, stride_m, cols, col_mask, shift, start, row_end, total, squares,
                      ACC: tl.constexpr, BLOCK_M: tl.constexpr, OFFSET_64: tl.constexpr):
    """A lane's sums of x - shift and of its square, with the tile at `start` added."""
    rows, mask = _tile(start, row_end, col_mask, BLOCK_M, OFFSET_64)
    x = tl.load(x_ptr + _offsets(rows, cols, stride_m), mask=mask, other=0.0).to(ACC)
    shifted = tl.where(mask, x - shift[None, :], 0.0)
    return total + shifted, squares + shifted * shifted


@triton.jit
def _moments(x_ptr, stride_m, cols, col_mask, shift, row_begin, row_end,
             ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
             CHUNK: tl.constexpr, STAGES: tl.constexpr):
    """(count, mean - shift, M2) per channel over rows [row_begin, row_end).

    Moments are taken of x - shift, a row of x, which lies near the mean: the subtraction keeps the
    low bits when |mean| >> std, and the squares of x - shift do not cancel. Each lane sums x - shift
    and its square over CHUNK tiles without talking to the other lanes; only then are the rows
    reduced (one reduction per chunk, not per tile) and the chunk merged into the running moments
    with Chan's formula, so no sum runs over more than CHUNK values of a lane.

    STAGES > 1 software-pipelines the tile loop (tl.range(num_stages=STAGES)): Triton copies the
    next STAGES - 1 tiles into shared memory (cp.async) while the lanes add this one, so a program
    keeps that many tiles of loads in flight without registers to hold them. The plain loop keeps
    one tile's loads at once, too few bytes in flight per SM to reach the copy rate (the static
    model's figures: profiling/MODEL.md).
    """
    count = tl.zeros([], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for chunk in range(row_begin, row_end, CHUNK * BLOCK_M):
        chunk_end = tl.minimum(chunk + CHUNK * BLOCK_M, row_end)
        total = tl.zeros([BLOCK_M, BLOCK_C], ACC)
        squares = tl.zeros([BLOCK_M, BLOCK_C], ACC)
        if STAGES > 1:  # software-pipelined: tiles copied ahead into shared memory (see Tuning.load_stages)
            for start in tl.range(chunk, chunk_end, BLOCK_M, num_stages=STAGES):
                total, squares = _add_shifted_tile(x_ptr, stride_m, cols, col_mask, shift, start, chunk_end, total,
                                                   squares, ACC, BLOCK_M, OFFSET_64)
        else:
            for start in range(chunk, chunk_end, BLOCK_M):
                total, squares = _add_shifted_tile(x_ptr, stride_m, cols, col_mask, shift, start, chunk_end, total,
                                                   squares, ACC, BLOCK_M, OFFSET_64)
        chunk_count = (chunk_end - chunk).to(ACC)
        chunk_sum = tl.sum(total, axis=0)
        chunk_mean = chunk_sum / chunk_count
        chunk_m2 = tl.sum(squares, axis=0) - chunk_sum * chunk_mean
        count, mean, m2 = merge_moments(count, mean, m2, chunk_count, chunk_mean, chunk_m2)
    return count, mean, m2


@triton.jit
def _affine(cols, col_mask, invstd, weight_ptr, bias_ptr,
            HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-channel (scale, bias) of y = (x - mean) * scale + bias."""
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    bias = tl.zeros([BLOCK_C], ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    return scale, bias


@triton.jit
def _normalize(x_ptr, y_ptr, residual_ptr, x_stride_m, y_stride_m, cols, col_mask, mean, scale, bias, row_begin,
               row_end, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
               ACC: tl.constexpr, BLOCK_M: tl.constexpr, OFFSET_64: tl.constexpr):
    # (x - mean) * scale + bias rather than x * scale + shift: the latter cancels when |mean| >> std.
    # Tiles in reverse (the last read first: still in L2), and x and y marked first to evict: this
    # is their last use, and the cache is better spent on the tiles not yet re-read. The epilogue
    # (+ residual, ReLU) costs the residual's read and nothing else.
    for start in range(row_begin, row_end, BLOCK_M):
        rows, mask = _tile(_reversed_tile_start(start, row_begin, row_end, BLOCK_M), row_end, col_mask, BLOCK_M,
                           OFFSET_64)
        x = tl.load(x_ptr + _offsets(rows, cols, x_stride_m), mask=mask, other=0.0,
                    eviction_policy="evict_first").to(ACC)
        y = (x - mean[None, :]) * scale[None, :] + bias[None, :]
        if HAS_RESIDUAL:  # laid out as the output
            y += tl.load(residual_ptr + _offsets(rows, cols, y_stride_m), mask=mask, other=0.0,
                         eviction_policy="evict_first").to(ACC)
        if RELU:
            y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN kept, as torch.relu keeps it
        tl.store(y_ptr + _offsets(rows, cols, y_stride_m), y.to(y_ptr.dtype.element_ty), mask=mask,
                 eviction_policy="evict_first")


@triton.jit
def _add_tile_gradient_sums(dy_ptr, x_ptr, dy_stride_m, x_stride_m, cols, col_mask, mean, scale, shift, start,
                            row_end, sum_dy, sum_dy_xmu, RELU: tl.constexpr, ACC: tl.constexpr,
                            BLOCK_M: tl.constexpr, OFFSET_64: tl.constexpr):
    """A lane's sums of dy and dy * (x - mean) with the tile at `start` added."""
    rows, mask = _tile(start, row_end, col_mask, BLOCK_M, OFFSET_64)
    dy = tl.load(dy_ptr + _offsets(rows, cols, dy_stride_m), mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + _offsets(rows, cols, x_stride_m), mask=mask, other=0.0).to(ACC)
    if RELU:
        dy = tl.where((x - mean[None, :]) * scale[None, :] + shift[None, :] <= 0.0, 0.0, dy)
    return sum_dy + dy, sum_dy_xmu + dy * (x - mean[None, :])


@triton.jit
def _gradient_sums(dy_ptr, x_ptr, dy_stride_m, x_stride_m, cols, col_mask, mean, scale, shift, row_begin, row_end,
                   RELU: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
                   STAGES: tl.constexpr):
    """(sum of dy, sum of dy * (x - mean)) per channel over rows [row_begin, row_end). RELU: dy
    through the forward's ReLU, its mask recomputed from x (zero where (x - mean) * scale + shift <= 0,
    as the forward computed it) rather than read from memory: a NaN input passes its gradient on.
    STAGES > 1: the tile loop software-pipelined, as in _moments."""
    # Lane-wise sums across tiles, one tree reduction at the end.
    sum_dy = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    sum_dy_xmu = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    if STAGES > 1:
        for start in tl.range(row_begin, row_end, BLOCK_M, num_stages=STAGES):
            sum_dy, sum_dy_xmu = _add_tile_gradient_sums(dy_ptr, x_ptr, dy_stride_m, x_stride_m, cols, col_mask, mean,
                                                         scale, shift, start, row_end, sum_dy, sum_dy_xmu, RELU, ACC,
                                                         BLOCK_M, OFFSET_64)
    else:
        for start in range(row_begin, row_end, BLOCK_M):
            sum_dy, sum_dy_xmu = _add_tile_gradient_sums(dy_ptr, x_ptr, dy_stride_m, x_stride_m, cols, col_mask, mean,
                                                         scale, shift, start, row_end, sum_dy, sum_dy_xmu, RELU, ACC,
                                                         BLOCK_M, OFFSET_64)
    return tl.sum(sum_dy, axis=0), tl.sum(sum_dy_xmu, axis=0)


@triton.jit
def _input_gradient_tile(dy_ptrs, x_ptrs, dx_ptrs, mask, scale, shift, mean, mean_dy, projection, x_coefficient,
                         constant, TRAINING: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr):
    dy = tl.load(dy_ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    if TRAINING or RELU:
        x = tl.load(x_ptrs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    if RELU:
        dy = tl.where((x - mean[None, :]) * scale[None, :] + shift[None, :] <= 0.0, 0.0, dy)
    if TRAINING:
        if dy_ptrs.dtype.element_ty.primitive_bitwidth == 16 and not RELU:
            dx = tl.fma(scale[None, :], dy - mean_dy[None, :], tl.fma(x_coefficient[None, :], x, constant[None, :]))
        else:
            dx = scale[None, :] * (dy - mean_dy[None, :] - (x - mean[None, :]) * projection[None, :])
    else:
        dx = scale[None, :] * dy
    tl.store(dx_ptrs, dx.to(dx_ptrs.dtype.element_ty), mask=mask, eviction_policy="evict_first")


@triton.jit
def _input_gradient(dy_ptr, x_ptr, dx_ptr, dy_stride_m, x_stride_m, dx_stride_m, cols, col_mask,
                    scale, shift, mean, mean_dy, projection, row_begin, row_end, TRAINING: tl.constexpr,
                    RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, OFFSET_64: tl.constexpr):
    """dx = scale * (dy - mean(dy) - (x - mean) * projection) in training, scale * dy in eval, with
    dy through the ReLU's recomputed mask when RELU (see _gradient_sums).
    Tiles in reverse and evict-first, as _normalize: the second pass over dy and x.
    16-bit inputs take x uncentered, dy - mean(dy) then two FMAs a value over terms computed once: see
    dx_value in kernels/cuda/backward.cuh (its rounding is of the order of the saved fp32 mean's, far below
    the input's);
    not with the ReLU's mask, which has x - mean anyway (uncentered, it would cost loads in flight).
    Without the mask the pointers step back a tile at a time instead of being recomputed from the
    rows: less 64-bit address arithmetic a value for the three tensors. With the mask, stepping
    costs registers and loads at once, so the addresses are recomputed."""
    x_coefficient = -scale * projection
    constant = scale * projection * mean
    if RELU:
        for start in range(row_begin, row_end, BLOCK_M):
            rows, mask = _tile(_reversed_tile_start(start, row_begin, row_end, BLOCK_M), row_end, col_mask, BLOCK_M,
                               OFFSET_64)
            _input_gradient_tile(dy_ptr + _offsets(rows, cols, dy_stride_m), x_ptr + _offsets(rows, cols, x_stride_m),
                                 dx_ptr + _offsets(rows, cols, dx_stride_m), mask, scale, shift, mean, mean_dy,
                                 projection, x_coefficient, constant, TRAINING, RELU, ACC)
    else:
        rows, _ = _tile(_reversed_tile_start(row_begin, row_begin, row_end, BLOCK_M), row_end, col_mask, BLOCK_M,
                        OFFSET_64)
        dy_ptrs = dy_ptr + _offsets(rows, cols, dy_stride_m)
        x_ptrs = x_ptr + _offsets(rows, cols, x_stride_m)
        dx_ptrs = dx_ptr + _offsets(rows, cols, dx_stride_m)
        for start in range(row_begin, row_end, BLOCK_M):
            mask = (rows < row_end)[:, None] & col_mask[None, :]
            _input_gradient_tile(dy_ptrs, x_ptrs, dx_ptrs, mask, scale, shift, mean, mean_dy, projection,
                                 x_coefficient, constant, TRAINING, RELU, ACC)
            rows -= BLOCK_M
            dy_ptrs -= BLOCK_M * dy_stride_m
            x_ptrs -= BLOCK_M * x_stride_m
            dx_ptrs -= BLOCK_M * dx_stride_m


@triton.jit
def statistics_channels_last(
    x_ptr,              # input (M, C)
    partial_count_ptr,  # (splits, C) number of values each program reduced (+ split groups rows: FINALIZE)
    partial_mean_ptr,   # (splits, C) their mean, less the channel's first value x[0, c]
    partial_m2_ptr,     # (splits, C) their sum of squared deviations from that mean
    counter_ptr,        # int32 zeros when FINALIZE: see finalize.finalize_statistics_of_group
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,  # FINALIZE: see store_statistics
    M, C, chunk_channels, chunk_extra, stride_m, rows_per_program,  # chunk_*: GHOST (kernels/ghost.py)
    momentum: tl.float64, eps: tl.float64, group_splits,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
    CHUNK: tl.constexpr, FINALIZE: tl.constexpr, HAS_RUNNING_STATS: tl.constexpr, CUMULATIVE: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr, STAGES: tl.constexpr, GHOST: tl.constexpr, ALIGN: tl.constexpr,
):
    """Partial moments per (split, channel); with FINALIZE, the last programs of each channel block
    to finish also merge the block's partials (finalize.finalize_statistics_of_group)."""
    C, stride_m = aligned(C, ALIGN), aligned(stride_m, ALIGN)  # ALIGN: kernels/alignment.py
    cols, col_mask = _columns(C, BLOCK_C)
    tensor_cols = _tensor_columns(cols, chunk_channels, chunk_extra, OFFSET_64, BLOCK_C, False, GHOST, ALIGN)
    row_begin, row_end = _program_rows(M, rows_per_program, OFFSET_64)
    shift = finite_shift(tl.load(x_ptr + tensor_cols, mask=col_mask, other=0.0).to(ACC))
    count, mean, m2 = _moments(x_ptr, stride_m, tensor_cols, col_mask, shift, row_begin, row_end,
                               ACC, BLOCK_M, BLOCK_C, OFFSET_64, CHUNK, STAGES)
    out = tl.program_id(0) * C + cols
    tl.store(partial_count_ptr + out, tl.zeros([BLOCK_C], ACC) + count, mask=col_mask)
    tl.store(partial_mean_ptr + out, mean, mask=col_mask)
    tl.store(partial_m2_ptr + out, m2, mask=col_mask)
    if FINALIZE:
        finalize_statistics_of_group(tl.program_id(0), tl.program_id(1), tl.num_programs(1), cols, col_mask,
                                     partial_count_ptr, partial_mean_ptr, partial_m2_ptr, counter_ptr, x_ptr, mean_ptr,
                                     invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
                                     tl.num_programs(0), group_splits, C, 1, momentum, eps, HAS_RUNNING_STATS,
                                     CUMULATIVE, ACC, BLOCK_SPLITS, BLOCK_C)


@triton.jit
def normalize_channels_last(
    x_ptr,           # input (M, C)
    y_ptr,           # output (M, C), in the input's dtype; row stride may differ from x
    residual_ptr,    # (M, C) added before the activation when HAS_RESIDUAL; the output's row stride
    mean_ptr,        # (C,) batch mean (training) or running mean (eval)
    var_ptr,         # (C,) eval only: running variance
    invstd_ptr,      # (C,) training: read; eval: written by split 0 for the backward
    saved_mean_ptr,  # (C,) eval only: the running mean in the accumulation dtype, for the backward
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when HAS_BIAS
    num_batches_tracked_ptr,  # () int64, incremented by program (0, 0) when COUNT_BATCH
    M, C, chunk_channels, chunk_extra, x_stride_m, y_stride_m, eps: tl.float64, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_RUNNING_STATS: tl.constexpr,
    COUNT_BATCH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
    GHOST: tl.constexpr, ALIGN: tl.constexpr,
):
    C, x_stride_m, y_stride_m = aligned(C, ALIGN), aligned(x_stride_m, ALIGN), aligned(y_stride_m, ALIGN)
    cols, col_mask, row_begin, row_end = _reversed_program(M, C, rows_per_program, BLOCK_C, OFFSET_64)
    tensor_cols = _tensor_columns(cols, chunk_channels, chunk_extra, OFFSET_64, BLOCK_C, True, GHOST, ALIGN)
    if COUNT_BATCH:
        # Here, not in the finalize kernel: every finalize program reads the count before this
        # kernel starts (stream order), so the increment cannot race with those reads.
        count_batch(num_batches_tracked_ptr, (tl.program_id(0) + tl.program_id(1)) == 0)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    if FROM_RUNNING_STATS:
        var = tl.load(var_ptr + cols, mask=col_mask, other=1.0).to(ACC)
        invstd = 1.0 / tl.sqrt(var + in_dtype(eps, ACC))
        first_split = col_mask & (tl.zeros([BLOCK_C], tl.int32) + tl.program_id(0) == 0)
        tl.store(saved_mean_ptr + cols, mean, mask=first_split)
        tl.store(invstd_ptr + cols, invstd, mask=first_split)
    else:
        invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    scale, bias = _affine(cols, col_mask, invstd, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C)
    _normalize(x_ptr, y_ptr, residual_ptr, x_stride_m, y_stride_m, tensor_cols, col_mask, mean, scale, bias, row_begin,
               row_end, HAS_RESIDUAL, RELU, ACC, BLOCK_M, OFFSET_64)


@triton.jit
def single_pass_forward_channels_last(
    x_ptr,           # input (M, C)
    y_ptr,           # output (M, C), in the input's dtype; row stride may differ from x
    residual_ptr,    # (M, C) added before the activation when HAS_RESIDUAL; the output's row stride
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,  # see store_statistics
    counter_ptr,     # (1,) int32 zero when COUNT_BATCH and CUMULATIVE: see count_batch_after_every_read
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when HAS_BIAS
    M, C, x_stride_m, y_stride_m, momentum: tl.float64, eps: tl.float64,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING_STATS: tl.constexpr,
    CUMULATIVE: tl.constexpr, COUNT_BATCH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
    CHUNK: tl.constexpr, STAGES: tl.constexpr, ALIGN: tl.constexpr,
):
    # One program per channel block reads its columns twice: the second pass finds them in cache.
    C, x_stride_m, y_stride_m = aligned(C, ALIGN), aligned(x_stride_m, ALIGN), aligned(y_stride_m, ALIGN)
    cols, col_mask = _columns(C, BLOCK_C)
    shift = finite_shift(tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(ACC))
    count, mean_shifted, m2 = _moments(x_ptr, x_stride_m, cols, col_mask, shift, 0, M,
                                       ACC, BLOCK_M, BLOCK_C, OFFSET_64, CHUNK, STAGES)
    mean = shift + mean_shifted
    invstd = store_statistics(cols, col_mask, count, mean, m2, mean_ptr, invstd_ptr, running_mean_ptr,
                              running_var_ptr, num_batches_tracked_ptr, momentum, eps,
                              HAS_RUNNING_STATS, CUMULATIVE, ACC)
    if COUNT_BATCH:
        if CUMULATIVE:  # every program reads the count in store_statistics: the last counts the batch
            count_batch_after_every_read(num_batches_tracked_ptr, counter_ptr)
        else:
            count_batch(num_batches_tracked_ptr, tl.program_id(1) == 0)
    scale, bias = _affine(cols, col_mask, invstd, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C)
    _normalize(x_ptr, y_ptr, residual_ptr, x_stride_m, y_stride_m, cols, col_mask, mean, scale, bias, 0, M,
               HAS_RESIDUAL, RELU, ACC, BLOCK_M, OFFSET_64)


@triton.jit
def gradient_sums_channels_last(
    dy_ptr,                  # gradient of the output (M, C)
    x_ptr,                   # input (M, C)
    mean_ptr,                # (C,) mean the forward normalized with
    invstd_ptr,              # (C,) invstd the forward normalized with, when RELU or FINALIZE
    weight_ptr,              # (C,) scale, when RELU and HAS_WEIGHT
    bias_ptr,                # (C,) shift, when RELU and HAS_BIAS
    partial_sum_dy_ptr,      # (splits, C) sum of dy over the program's rows (+ split groups rows: FINALIZE)
    partial_sum_dy_xmu_ptr,  # (splits, C) sum of dy * (x - mean)
    counter_ptr,             # int32 zeros when FINALIZE: see finalize.finalize_gradients_of_group
    total_dy_ptr, total_dy_xmu_ptr,  # (C,) when FINALIZE: see finalize.finalize_gradients (sum_dy_ptr, ...)
    grad_weight_ptr, grad_bias_ptr,  # (C,) when FINALIZE: see finalize.store_gradients
    M, C, chunk_channels, chunk_extra, dy_stride_m, x_stride_m, rows_per_program, group_splits,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
    FINALIZE: tl.constexpr, BLOCK_SPLITS: tl.constexpr, STAGES: tl.constexpr, GHOST: tl.constexpr,
    ALIGN: tl.constexpr,
):
    """Partial sums per (split, channel); with FINALIZE, the last programs of each channel block to
    finish also write the block's totals, dweight and dbias (finalize.finalize_gradients_of_group)."""
    C, dy_stride_m, x_stride_m = aligned(C, ALIGN), aligned(dy_stride_m, ALIGN), aligned(x_stride_m, ALIGN)
    cols, col_mask = _columns(C, BLOCK_C)
    tensor_cols = _tensor_columns(cols, chunk_channels, chunk_extra, OFFSET_64, BLOCK_C, False, GHOST, ALIGN)
    row_begin, row_end = _program_rows(M, rows_per_program, OFFSET_64)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    scale = tl.zeros([BLOCK_C], ACC)
    shift = tl.zeros([BLOCK_C], ACC)
    if RELU:
        invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        scale, shift = _affine(cols, col_mask, invstd, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C)
    sum_dy, sum_dy_xmu = _gradient_sums(dy_ptr, x_ptr, dy_stride_m, x_stride_m, tensor_cols, col_mask, mean, scale,
                                        shift, row_begin, row_end, RELU, ACC, BLOCK_M, BLOCK_C, OFFSET_64, STAGES)
    out = tl.program_id(0) * C + cols
    tl.store(partial_sum_dy_ptr + out, sum_dy, mask=col_mask)
    tl.store(partial_sum_dy_xmu_ptr + out, sum_dy_xmu, mask=col_mask)
    if FINALIZE:
        finalize_gradients_of_group(tl.program_id(0), tl.program_id(1), tl.num_programs(1), cols, col_mask,
                                    partial_sum_dy_ptr, partial_sum_dy_xmu_ptr, counter_ptr, invstd_ptr, total_dy_ptr,
                                    total_dy_xmu_ptr, grad_weight_ptr, grad_bias_ptr, tl.num_programs(0), group_splits,
                                    C, ACC, BLOCK_SPLITS, BLOCK_C)


@triton.jit
def input_gradient_channels_last(
    dy_ptr,          # gradient of the output (M, C)
    x_ptr,           # input (M, C); read in training, or for the ReLU's mask
    dx_ptr,          # gradient of the input (M, C), in the input's dtype
    mean_ptr,        # (C,) mean the forward normalized with
    invstd_ptr,      # (C,) invstd the forward normalized with
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when RELU and HAS_BIAS
    sum_dy_ptr,      # (C,) training: total of dy per channel
    sum_dy_xmu_ptr,  # (C,) training: total of dy * (x - mean) per channel
    M, C, chunk_channels, chunk_extra, dy_stride_m, x_stride_m, dx_stride_m,
    inv_count,       # 1 / M as a float
    rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
    GHOST: tl.constexpr, ALIGN: tl.constexpr,
):
    C, dy_stride_m, x_stride_m = aligned(C, ALIGN), aligned(dy_stride_m, ALIGN), aligned(x_stride_m, ALIGN)
    dx_stride_m = aligned(dx_stride_m, ALIGN)
    cols, col_mask, row_begin, row_end = _reversed_program(M, C, rows_per_program, BLOCK_C, OFFSET_64)
    invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    scale, shift = _affine(cols, col_mask, invstd, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS and RELU, ACC,
                           BLOCK_C)
    mean = tl.zeros([BLOCK_C], ACC)
    mean_dy = tl.zeros([BLOCK_C], ACC)
    projection = tl.zeros([BLOCK_C], ACC)
    if TRAINING or RELU:
        mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    if TRAINING:
        # dx = weight * invstd * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean)))
        mean_dy = tl.load(sum_dy_ptr + cols, mask=col_mask, other=0.0).to(ACC) * inv_count
        sum_dy_xmu = tl.load(sum_dy_xmu_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        projection = sum_dy_xmu * invstd * invstd * inv_count
    tensor_cols = _tensor_columns(cols, chunk_channels, chunk_extra, OFFSET_64, BLOCK_C, True, GHOST, ALIGN)
    _input_gradient(dy_ptr, x_ptr, dx_ptr, dy_stride_m, x_stride_m, dx_stride_m, tensor_cols, col_mask,
                    scale, shift, mean, mean_dy, projection, row_begin, row_end, TRAINING, RELU, ACC, BLOCK_M,
                    OFFSET_64)


@triton.jit
def single_pass_backward_channels_last(
    dy_ptr,          # gradient of the output (M, C)
    x_ptr,           # input (M, C)
    dx_ptr,          # gradient of the input (M, C), in the input's dtype, when NEED_INPUT_GRAD
    mean_ptr,        # (C,) mean the forward normalized with
    invstd_ptr,      # (C,) invstd the forward normalized with
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when RELU and HAS_BIAS
    grad_weight_ptr, grad_bias_ptr,  # see store_gradients
    M, C, dy_stride_m, x_stride_m, dx_stride_m,
    inv_count,       # 1 / M as a float
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, TRAINING: tl.constexpr, NEED_INPUT_GRAD: tl.constexpr,
    RELU: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr, ALIGN: tl.constexpr,
):
    # One program per channel block: the sums, then dx from a second pass that finds dy and x in cache.
    C, dy_stride_m, x_stride_m = aligned(C, ALIGN), aligned(dy_stride_m, ALIGN), aligned(x_stride_m, ALIGN)
    dx_stride_m = aligned(dx_stride_m, ALIGN)
    cols, col_mask = _columns(C, BLOCK_C)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    scale, shift = _affine(cols, col_mask, invstd, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS and RELU, ACC,
                           BLOCK_C)
    sum_dy, sum_dy_xmu = _gradient_sums(dy_ptr, x_ptr, dy_stride_m, x_stride_m, cols, col_mask, mean, scale, shift,
                                        0, M, RELU, ACC, BLOCK_M, BLOCK_C, OFFSET_64, 0)
    store_gradients(cols, col_mask, sum_dy, sum_dy_xmu, invstd, grad_weight_ptr, grad_bias_ptr)
    if NEED_INPUT_GRAD:
        mean_dy = sum_dy * inv_count
        projection = sum_dy_xmu * invstd * invstd * inv_count
        _input_gradient(dy_ptr, x_ptr, dx_ptr, dy_stride_m, x_stride_m, dx_stride_m, cols, col_mask,
                        scale, shift, mean, mean_dy, projection, 0, M, TRAINING, RELU, ACC, BLOCK_M, OFFSET_64)


# ---- on-chip kernels: x (and dy) read once -------------------------------------------------------
# A program holds HELD_ROWS rows of its BLOCK_C channels in registers: its statistics (or gradient
# sums) and the elementwise pass both come from that block. EXCHANGE and the walk without it as in
# channels_first.py's on-chip kernels: the channel block is the group, a range of rows its split.

@triton.jit
def _held_rows(item, splits, M, C, HELD_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr):
    """(channel block, split, rows [HELD_ROWS], channels [BLOCK_C], their mask, the block's mask) of a
    work item (channel-block-major)."""
    if OFFSET_64:
        item = item.to(tl.int64)
    block = item // splits
    split = item - block * splits
    rows = split * HELD_ROWS + tl.arange(0, HELD_ROWS)
    cols = block * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    return block, split, rows, cols, col_mask, (rows < M)[:, None] & col_mask[None, :]


@triton.jit
def _on_chip_forward_item(
    item, x_ptr, y_ptr, residual_ptr, partial_count_ptr, partial_mean_ptr, partial_m2_ptr, counter_ptr,
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, weight_ptr, bias_ptr,
    M, C, x_stride_m, y_stride_m, momentum, eps, splits,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING_STATS: tl.constexpr,
    CUMULATIVE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, HELD_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
    EXCHANGE: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    block, split, rows, cols, col_mask, mask = _held_rows(item, splits, M, C, HELD_ROWS, BLOCK_C, OFFSET_64)
    first = col_mask & (split + tl.zeros([BLOCK_C], tl.int32) == 0)  # the first split's channels (the
                                                                       # interpreter's masks are not
                                                                       # broadcast from a scalar)
    x = tl.load(x_ptr + _offsets(rows, cols, x_stride_m), mask=mask, other=0.0).to(ACC)
    shift = finite_shift(tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(ACC))
    # Moments of the held rows: the mean first, then the squared deviations from it (registers only).
    shifted = tl.where(mask, x - shift[None, :], 0.0)
    count = tl.maximum(tl.sum(mask.to(ACC), axis=0), 1.0)  # (channels past C: no division by zero)
    mean_shifted = tl.sum(shifted, axis=0) / count
    deviation = tl.where(mask, shifted - mean_shifted[None, :], 0.0)
    m2 = tl.sum(deviation * deviation, axis=0)
    if EXCHANGE:
        out = split * C + cols
        tl.store(partial_count_ptr + out, count, mask=col_mask)
        tl.store(partial_mean_ptr + out, mean_shifted, mask=col_mask)
        tl.store(partial_m2_ptr + out, m2, mask=col_mask)
        wait_for_group(counter_ptr, block, splits)
        count, mean_shifted, m2 = merged_shifted(partial_count_ptr, partial_mean_ptr, partial_m2_ptr, cols, col_mask,
                                                 splits, C, ACC, BLOCK_SPLITS, BLOCK_C)
        leave_group(counter_ptr, block, splits)
    mean = shift + mean_shifted
    # Every program of the channel block computes the same statistics; the first split writes them.
    invstd = store_statistics(cols, first, count, mean, m2, mean_ptr, invstd_ptr, running_mean_ptr,
                              running_var_ptr, num_batches_tracked_ptr, momentum, eps, HAS_RUNNING_STATS, CUMULATIVE,
                              ACC)
    scale, bias = _affine(cols, col_mask, invstd, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS, ACC, BLOCK_C)
    y = (x - mean[None, :]) * scale[None, :] + bias[None, :]
    if HAS_RESIDUAL:  # laid out as the output
        y += tl.load(residual_ptr + _offsets(rows, cols, y_stride_m), mask=mask, other=0.0).to(ACC)
    if RELU:
        y = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(y_ptr + _offsets(rows, cols, y_stride_m), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def on_chip_forward_channels_last(
    x_ptr,           # input (M, C)
    y_ptr,           # output (M, C), in the input's dtype; row stride may differ from x
    residual_ptr,    # (M, C) added before the activation when HAS_RESIDUAL; the output's row stride
    partial_count_ptr, partial_mean_ptr, partial_m2_ptr,  # (splits, C) when EXCHANGE: see statistics_channels_last
    counter_ptr,     # int32 zeros, left at zero: a barrier per channel block (EXCHANGE), then the
                     # batch counter's ticket (COUNT_BATCH and CUMULATIVE)
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,  # see store_statistics
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when HAS_BIAS
    M, C, x_stride_m, y_stride_m, momentum: tl.float64, eps: tl.float64,
    splits, items,   # items: channel blocks x splits
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING_STATS: tl.constexpr,
    CUMULATIVE: tl.constexpr, COUNT_BATCH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, HELD_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
    EXCHANGE: tl.constexpr, BLOCK_SPLITS: tl.constexpr, STAGES: tl.constexpr, ALIGN: tl.constexpr,
):
    """Training forward reading x once (see channels_first.on_chip_forward_channels_first)."""
    C, x_stride_m, y_stride_m = aligned(C, ALIGN), aligned(x_stride_m, ALIGN), aligned(y_stride_m, ALIGN)
    # With EXCHANGE the grid is `items` programs, all resident: one item each.
    for item in tl.range(tl.program_id(0), items, tl.num_programs(0), num_stages=STAGES):
        _on_chip_forward_item(item, x_ptr, y_ptr, residual_ptr, partial_count_ptr, partial_mean_ptr,
                              partial_m2_ptr, counter_ptr, mean_ptr, invstd_ptr, running_mean_ptr,
                              running_var_ptr, num_batches_tracked_ptr, weight_ptr, bias_ptr, M, C, x_stride_m,
                              y_stride_m, momentum, eps, splits, HAS_WEIGHT, HAS_BIAS, HAS_RUNNING_STATS,
                              CUMULATIVE, HAS_RESIDUAL, RELU, ACC, HELD_ROWS, BLOCK_C, OFFSET_64, EXCHANGE,
                              BLOCK_SPLITS)
    if COUNT_BATCH:  # every program has read the count in store_statistics by now
        if EXCHANGE:  # the batch counter's ticket follows the groups' barriers
            counter_ptr += items // splits
        count_batch_once(num_batches_tracked_ptr, counter_ptr, CUMULATIVE)


@triton.jit
def _on_chip_backward_item(
    item, dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, partial_sum_dy_ptr,
    partial_sum_dy_xmu_ptr, counter_ptr, grad_weight_ptr, grad_bias_ptr,
    M, C, dy_stride_m, x_stride_m, dx_stride_m, inv_count, splits,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_INPUT_GRAD: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, HELD_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
    EXCHANGE: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
):
    block, split, rows, cols, col_mask, mask = _held_rows(item, splits, M, C, HELD_ROWS, BLOCK_C, OFFSET_64)
    dy = tl.load(dy_ptr + _offsets(rows, cols, dy_stride_m), mask=mask, other=0.0).to(ACC)
    x = tl.load(x_ptr + _offsets(rows, cols, x_stride_m), mask=mask, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    scale, shift = _affine(cols, col_mask, invstd, weight_ptr, bias_ptr, HAS_WEIGHT, HAS_BIAS and RELU, ACC, BLOCK_C)
    centered = tl.where(mask, x - mean[None, :], 0.0)
    if RELU:  # the forward's ReLU mask, recomputed from x (see _gradient_sums)
        dy = tl.where(centered * scale[None, :] + shift[None, :] <= 0.0, 0.0, dy)
    sum_dy = tl.sum(dy, axis=0)
    sum_dy_xmu = tl.sum(dy * centered, axis=0)
    if EXCHANGE:
        out = split * C + cols
        tl.store(partial_sum_dy_ptr + out, sum_dy, mask=col_mask)
        tl.store(partial_sum_dy_xmu_ptr + out, sum_dy_xmu, mask=col_mask)
        wait_for_group(counter_ptr, block, splits)
        sum_dy, sum_dy_xmu = summed_partials(partial_sum_dy_ptr, partial_sum_dy_xmu_ptr, cols, col_mask, splits, C,
                                             ACC, BLOCK_SPLITS, BLOCK_C)
        leave_group(counter_ptr, block, splits)
    first = col_mask & (split + tl.zeros([BLOCK_C], tl.int32) == 0)
    store_gradients(cols, first, sum_dy, sum_dy_xmu, invstd, grad_weight_ptr, grad_bias_ptr)
    if NEED_INPUT_GRAD:
        mean_dy = sum_dy * inv_count
        projection = sum_dy_xmu * invstd * invstd * inv_count
        dx = scale[None, :] * (dy - mean_dy[None, :] - centered * projection[None, :])
        tl.store(dx_ptr + _offsets(rows, cols, dx_stride_m), dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def on_chip_backward_channels_last(
    dy_ptr,          # gradient of the output (M, C)
    x_ptr,           # input (M, C)
    dx_ptr,          # gradient of the input (M, C), in the input's dtype, when NEED_INPUT_GRAD
    mean_ptr,        # (C,) mean the forward normalized with
    invstd_ptr,      # (C,) invstd the forward normalized with
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when RELU and HAS_BIAS
    partial_sum_dy_ptr, partial_sum_dy_xmu_ptr,  # (splits, C) when EXCHANGE: see gradient_sums_channels_last
    counter_ptr,     # int32 zeros when EXCHANGE, left at zero: a barrier per channel block
    grad_weight_ptr, grad_bias_ptr,  # see store_gradients
    M, C, dy_stride_m, x_stride_m, dx_stride_m,
    inv_count,       # 1 / M as a float
    splits, items,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, NEED_INPUT_GRAD: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, HELD_ROWS: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
    EXCHANGE: tl.constexpr, BLOCK_SPLITS: tl.constexpr, STAGES: tl.constexpr, ALIGN: tl.constexpr,
):
    """Training backward reading dy and x once (see channels_first.on_chip_backward_channels_first)."""
    C, dy_stride_m, x_stride_m = aligned(C, ALIGN), aligned(dy_stride_m, ALIGN), aligned(x_stride_m, ALIGN)
    dx_stride_m = aligned(dx_stride_m, ALIGN)
    # With EXCHANGE the grid is `items` programs, all resident: one item each.
    for item in tl.range(tl.program_id(0), items, tl.num_programs(0), num_stages=STAGES):
        _on_chip_backward_item(item, dy_ptr, x_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr,
                               partial_sum_dy_ptr, partial_sum_dy_xmu_ptr, counter_ptr, grad_weight_ptr,
                               grad_bias_ptr, M, C, dy_stride_m, x_stride_m, dx_stride_m, inv_count, splits,
                               HAS_WEIGHT, HAS_BIAS, NEED_INPUT_GRAD, RELU, ACC, HELD_ROWS, BLOCK_C, OFFSET_64,
                               EXCHANGE, BLOCK_SPLITS)
