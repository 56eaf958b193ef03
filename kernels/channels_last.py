"""Triton kernels for channels_last / channels_last_3d / (N, C) inputs, viewed as a row-major (M, C)
matrix with M = N * spatial rows and unit stride along C.

Loads coalesce along C. A program owns BLOCK_C channels (grid axis 1) and a contiguous range of
rows (grid axis 0: the split), walked in tiles of BLOCK_M rows; per-channel results are vectors of
BLOCK_C lanes. Every kernel of this file walks the same tiles, so one launch plan serves all.

Kernels, in the order a training step runs them:
    channels_last_stats_kernel            partial (count, mean, M2) per (split, channel)
    channels_last_normalize_kernel        y = (x - mean) * invstd * weight + bias (train and eval)
    channels_last_backward_reduce_kernel  partial sums of dy and dy * (x - mean)
    channels_last_backward_dx_kernel      dx from dy, x and the per-channel totals
"""
import triton
import triton.language as tl

from .batch_counter import count_batch
from .moments import merge_moments


@triton.jit
def _columns(C, BLOCK_C: tl.constexpr):
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _program_rows(M, rows_per_program, OFFSET_64: tl.constexpr):
    split = tl.program_id(0)
    if OFFSET_64:
        split = split.to(tl.int64)
    row_begin = split * rows_per_program
    return row_begin, tl.minimum(row_begin + rows_per_program, M)


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
def channels_last_stats_kernel(
    x_ptr,              # input (M, C)
    partial_count_ptr,  # (splits, C) number of values each program reduced
    partial_mean_ptr,   # (splits, C) their mean, less the channel's first value x[0, c]
    partial_m2_ptr,     # (splits, C) their sum of squared deviations from that mean
    M, C, stride_m, rows_per_program,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
):
    cols, col_mask = _columns(C, BLOCK_C)
    row_begin, row_end = _program_rows(M, rows_per_program, OFFSET_64)
    # Moments are taken of x - shift, the first row: the subtraction is exact for values near the
    # shift, so sums and partial means keep their low bits when |mean| >> std.
    shift = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    count = tl.zeros([], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for start in range(row_begin, row_end, BLOCK_M):
        rows, mask = _tile(start, row_end, col_mask, BLOCK_M, OFFSET_64)
        tile_count = tl.minimum(row_end - start, BLOCK_M).to(ACC)
        x = tl.load(x_ptr + _offsets(rows, cols, stride_m), mask=mask, other=0.0).to(ACC)
        shifted = tl.where(mask, x - shift[None, :], 0.0)
        tile_mean = tl.sum(shifted, axis=0) / tile_count
        deviation = tl.where(mask, shifted - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)
        count, mean, m2 = merge_moments(count, mean, m2, tile_count, tile_mean, tile_m2)
    out = tl.program_id(0) * C + cols
    tl.store(partial_count_ptr + out, tl.zeros([BLOCK_C], ACC) + count, mask=col_mask)
    tl.store(partial_mean_ptr + out, mean, mask=col_mask)
    tl.store(partial_m2_ptr + out, m2, mask=col_mask)


@triton.jit
def channels_last_normalize_kernel(
    x_ptr,           # input (M, C)
    y_ptr,           # output (M, C), in the input's dtype; row stride may differ from x
    mean_ptr,        # (C,) batch mean (training) or running mean (eval)
    var_ptr,         # (C,) eval only: running variance
    invstd_ptr,      # (C,) training: read; eval: written by split 0 for the backward
    saved_mean_ptr,  # (C,) eval only: the running mean in the accumulation dtype, for the backward
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    bias_ptr,        # (C,) shift, when HAS_BIAS
    num_batches_tracked_ptr,  # () int64, incremented by program (0, 0) when COUNT_BATCH
    M, C, x_stride_m, y_stride_m, eps, rows_per_program,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_RUNNING_STATS: tl.constexpr,
    COUNT_BATCH: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
):
    cols, col_mask = _columns(C, BLOCK_C)
    row_begin, row_end = _program_rows(M, rows_per_program, OFFSET_64)
    if COUNT_BATCH:
        # Here, not in the finalize kernel: every finalize program reads the count before this
        # kernel starts (stream order), so the increment cannot race with those reads.
        count_batch(num_batches_tracked_ptr, (tl.program_id(0) + tl.program_id(1)) == 0)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    if FROM_RUNNING_STATS:
        var = tl.load(var_ptr + cols, mask=col_mask, other=1.0).to(ACC)
        invstd = 1.0 / tl.sqrt(var + eps)
        first_split = col_mask & (tl.zeros([BLOCK_C], tl.int32) + tl.program_id(0) == 0)
        tl.store(saved_mean_ptr + cols, mean, mask=first_split)
        tl.store(invstd_ptr + cols, invstd, mask=first_split)
    else:
        invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    bias = tl.zeros([BLOCK_C], ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    # (x - mean) * scale + bias rather than x * scale + shift: the latter cancels when |mean| >> std.
    for start in range(row_begin, row_end, BLOCK_M):
        rows, mask = _tile(start, row_end, col_mask, BLOCK_M, OFFSET_64)
        x = tl.load(x_ptr + _offsets(rows, cols, x_stride_m), mask=mask, other=0.0).to(ACC)
        y = (x - mean[None, :]) * scale[None, :] + bias[None, :]
        tl.store(y_ptr + _offsets(rows, cols, y_stride_m), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def channels_last_backward_reduce_kernel(
    dy_ptr,                  # gradient of the output (M, C)
    x_ptr,                   # input (M, C)
    mean_ptr,                # (C,) mean the forward normalized with
    partial_sum_dy_ptr,      # (splits, C) sum of dy over the program's rows
    partial_sum_dy_xmu_ptr,  # (splits, C) sum of dy * (x - mean)
    M, C, dy_stride_m, x_stride_m, rows_per_program,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
):
    cols, col_mask = _columns(C, BLOCK_C)
    row_begin, row_end = _program_rows(M, rows_per_program, OFFSET_64)
    mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    # Lane-wise sums across tiles, one tree reduction at the end.
    sum_dy = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    sum_dy_xmu = tl.zeros([BLOCK_M, BLOCK_C], ACC)
    for start in range(row_begin, row_end, BLOCK_M):
        rows, mask = _tile(start, row_end, col_mask, BLOCK_M, OFFSET_64)
        dy = tl.load(dy_ptr + _offsets(rows, cols, dy_stride_m), mask=mask, other=0.0).to(ACC)
        x = tl.load(x_ptr + _offsets(rows, cols, x_stride_m), mask=mask, other=0.0).to(ACC)
        sum_dy += dy
        sum_dy_xmu += dy * (x - mean[None, :])
    out = tl.program_id(0) * C + cols
    tl.store(partial_sum_dy_ptr + out, tl.sum(sum_dy, axis=0), mask=col_mask)
    tl.store(partial_sum_dy_xmu_ptr + out, tl.sum(sum_dy_xmu, axis=0), mask=col_mask)


@triton.jit
def channels_last_backward_dx_kernel(
    dy_ptr,          # gradient of the output (M, C)
    x_ptr,           # input (M, C); read in training only
    dx_ptr,          # gradient of the input (M, C), in the input's dtype
    mean_ptr,        # (C,) mean the forward normalized with
    invstd_ptr,      # (C,) invstd the forward normalized with
    weight_ptr,      # (C,) scale, when HAS_WEIGHT
    sum_dy_ptr,      # (C,) training: total of dy per channel
    sum_dy_xmu_ptr,  # (C,) training: total of dy * (x - mean) per channel
    M, C, dy_stride_m, x_stride_m, dx_stride_m,
    inv_count,       # 1 / M as a float
    rows_per_program,
    HAS_WEIGHT: tl.constexpr, TRAINING: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, OFFSET_64: tl.constexpr,
):
    cols, col_mask = _columns(C, BLOCK_C)
    row_begin, row_end = _program_rows(M, rows_per_program, OFFSET_64)
    invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    if TRAINING:
        # dx = weight * invstd * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean)))
        mean = tl.load(mean_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        mean_dy = tl.load(sum_dy_ptr + cols, mask=col_mask, other=0.0).to(ACC) * inv_count
        sum_dy_xmu = tl.load(sum_dy_xmu_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        projection = sum_dy_xmu * invstd * invstd * inv_count
    for start in range(row_begin, row_end, BLOCK_M):
        rows, mask = _tile(start, row_end, col_mask, BLOCK_M, OFFSET_64)
        dy = tl.load(dy_ptr + _offsets(rows, cols, dy_stride_m), mask=mask, other=0.0).to(ACC)
        if TRAINING:
            x = tl.load(x_ptr + _offsets(rows, cols, x_stride_m), mask=mask, other=0.0).to(ACC)
            dx = scale[None, :] * (dy - mean_dy[None, :] - (x - mean[None, :]) * projection[None, :])
        else:
            dx = scale[None, :] * dy
        tl.store(dx_ptr + _offsets(rows, cols, dx_stride_m), dx.to(dx_ptr.dtype.element_ty), mask=mask)
