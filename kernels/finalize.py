"""Per-channel merges of the (splits, C) partials, on the device: no host synchronization, so the
ops capture into CUDA graphs. Both layouts share these kernels; the grid is one program per
BLOCK_C channels, and each program folds the splits in a fixed order (deterministic results).

    forward_finalize_kernel   mean, invstd and the in-place running-statistics update
    backward_finalize_kernel  totals of dy and dy * (x - mean), dweight and dbias
"""
import triton
import triton.language as tl


@triton.jit
def _channel_block(C, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _split_tile(start, splits, cols, col_mask, C, BLOCK_SPLITS: tl.constexpr):
    """Offsets and mask of BLOCK_SPLITS rows of a (splits, C) partials matrix."""
    rows = start + tl.arange(0, BLOCK_SPLITS)
    mask = (rows < splits)[:, None] & col_mask[None, :]
    return rows[:, None] * C + cols[None, :], mask


@triton.jit
def forward_finalize_kernel(
    partial_count_ptr,        # (splits, C) number of values behind each partial
    partial_mean_ptr,         # (splits, C) their mean, less the channel's shift
    partial_m2_ptr,           # (splits, C) their sum of squared deviations from that mean
    shift_ptr,                # the input: channel c's shift (its first value) is at c * shift_stride
    mean_ptr,                 # (C,) batch mean, saved for the backward
    invstd_ptr,               # (C,) 1 / sqrt(biased variance + eps), saved for the backward
    running_mean_ptr,         # (C,) updated in place, when HAS_RUNNING_STATS
    running_var_ptr,          # (C,) updated in place with the unbiased variance
    num_batches_tracked_ptr,  # () int64 batches seen before this one (the normalize kernel
                              # increments it afterwards): CUMULATIVE averages with 1/(count + 1)
    splits, C, shift_stride, momentum, eps,
    HAS_RUNNING_STATS: tl.constexpr, CUMULATIVE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, col_mask = _channel_block(C, BLOCK_C)
    # The partial means are relative to one shift per channel, so they stay small and exact when
    # |mean| >> std; the shift comes back only in the final mean. M2 = sum(m2_i + n_i * delta_i^2)
    # is Chan's formula for many partials at once.
    count = tl.zeros([BLOCK_C], ACC)
    weighted = tl.zeros([BLOCK_C], ACC)
    for start in range(0, splits, BLOCK_SPLITS):
        offsets, mask = _split_tile(start, splits, cols, col_mask, C, BLOCK_SPLITS)
        part_count = tl.load(partial_count_ptr + offsets, mask=mask, other=0.0).to(ACC)
        part_mean = tl.load(partial_mean_ptr + offsets, mask=mask, other=0.0).to(ACC)
        count += tl.sum(part_count, axis=0)
        weighted += tl.sum(part_count * part_mean, axis=0)
    count = tl.where(col_mask, count, 2.0)  # lanes past C: keep m2 / count and m2 / (count - 1) finite
    mean_shifted = weighted / count
    m2 = tl.zeros([BLOCK_C], ACC)
    for start in range(0, splits, BLOCK_SPLITS):
        offsets, mask = _split_tile(start, splits, cols, col_mask, C, BLOCK_SPLITS)
        part_count = tl.load(partial_count_ptr + offsets, mask=mask, other=0.0).to(ACC)
        part_mean = tl.load(partial_mean_ptr + offsets, mask=mask, other=0.0).to(ACC)
        part_m2 = tl.load(partial_m2_ptr + offsets, mask=mask, other=0.0).to(ACC)
        delta = part_mean - mean_shifted[None, :]
        m2 += tl.sum(tl.where(mask, part_m2 + part_count * delta * delta, 0.0), axis=0)
    mean = tl.load(shift_ptr + cols * shift_stride, mask=col_mask, other=0.0).to(ACC) + mean_shifted
    var = m2 / count
    tl.store(mean_ptr + cols, mean, mask=col_mask)
    tl.store(invstd_ptr + cols, 1.0 / tl.sqrt(var + eps), mask=col_mask)
    if HAS_RUNNING_STATS:
        if CUMULATIVE:
            factor = 1.0 / (tl.load(num_batches_tracked_ptr).to(ACC) + 1.0)
        else:
            factor = momentum
        running_mean = tl.load(running_mean_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        running_var = tl.load(running_var_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        unbiased_var = m2 / (count - 1.0)
        running_mean = (1.0 - factor) * running_mean + factor * mean
        running_var = (1.0 - factor) * running_var + factor * unbiased_var
        tl.store(running_mean_ptr + cols, running_mean.to(running_mean_ptr.dtype.element_ty), mask=col_mask)
        tl.store(running_var_ptr + cols, running_var.to(running_var_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def backward_finalize_kernel(
    partial_sum_dy_ptr,      # (splits, C) sums of dy
    partial_sum_dy_xmu_ptr,  # (splits, C) sums of dy * (x - mean)
    invstd_ptr,              # (C,) invstd the forward normalized with
    sum_dy_ptr,              # (C,) total of dy, in ACC, for the dx kernel
    sum_dy_xmu_ptr,          # (C,) total of dy * (x - mean), in ACC, for the dx kernel
    grad_weight_ptr,         # (C,) sum(dy * x_hat), in the weight's dtype
    grad_bias_ptr,           # (C,) sum(dy), in the bias's dtype
    splits, C,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, col_mask = _channel_block(C, BLOCK_C)
    sum_dy = tl.zeros([BLOCK_C], ACC)
    sum_dy_xmu = tl.zeros([BLOCK_C], ACC)
    for start in range(0, splits, BLOCK_SPLITS):
        offsets, mask = _split_tile(start, splits, cols, col_mask, C, BLOCK_SPLITS)
        sum_dy += tl.sum(tl.load(partial_sum_dy_ptr + offsets, mask=mask, other=0.0).to(ACC), axis=0)
        sum_dy_xmu += tl.sum(tl.load(partial_sum_dy_xmu_ptr + offsets, mask=mask, other=0.0).to(ACC), axis=0)
    invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    tl.store(sum_dy_ptr + cols, sum_dy, mask=col_mask)
    tl.store(sum_dy_xmu_ptr + cols, sum_dy_xmu, mask=col_mask)
    tl.store(grad_weight_ptr + cols, (sum_dy_xmu * invstd).to(grad_weight_ptr.dtype.element_ty), mask=col_mask)
    tl.store(grad_bias_ptr + cols, sum_dy.to(grad_bias_ptr.dtype.element_ty), mask=col_mask)
