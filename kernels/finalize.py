"""Per-channel finalization, on the device: no host synchronization, so the ops capture into CUDA
graphs. Each program folds the splits in a fixed order (deterministic results).

    last_of_group             whether a program is the last of its group to finish (fused finalize)
    store_statistics          mean, invstd and the running-statistics update of some channels
    store_gradients           dweight, dbias (and the totals the dx pass needs) of some channels
    finalize_statistics       merges (splits, C) partials, then store_statistics
    finalize_gradients        sums (splits, C) partials, then store_gradients
    finalize_moments          merges (splits, C) partials into one process's (count, mean, M2): SyncBatchNorm
    merge_ranks               merges every rank's (count, mean, M2), then store_statistics: SyncBatchNorm

The two helpers also serve the single-pass kernels of channels_first.py / channels_last.py, whose
programs own whole channels and need no partials; merged_shifted and summed_partials also serve the
on-chip kernels, whose programs merge their channel group's partials themselves.

The split path's statistics and gradient-sums kernels can also finalize themselves, in the same
launch (FINALIZE): each program counts itself done (`last_of_group`), and the last programs to
finish merge the partials in two levels (`finalize_statistics_of_group`,
`finalize_gradients_of_group`, at the end of this file) with the code of the finalize kernels,
in a fixed order, then set their counters back to zero for the next launch and for CUDA-graph
replay.
"""
import triton
import triton.language as tl

from .moments import finite_shift, merged_mean


@triton.jit
def in_dtype(value, ACC: tl.constexpr):
    """A float argument of a kernel (momentum, eps: fp64 parameters, so that fp64 statistics get
    them exactly) in the accumulation dtype: rounded once for fp32, as a Python float passed as fp32
    would be. The sum with a zero of that dtype, not value.to(ACC): the interpreter passes plain
    Python floats."""
    return (value + tl.zeros([], ACC)).to(ACC)


@triton.jit
def store_statistics(
    index, mask,              # channels to write: a scalar channel or a vector of them
    count, mean, m2,          # their moments (m2 = sum of squared deviations from mean)
    mean_ptr,                 # (C,) batch mean, saved for the backward
    invstd_ptr,               # (C,) 1 / sqrt(biased variance + eps), saved for the backward
    running_mean_ptr,         # (C,) updated in place, when HAS_RUNNING_STATS
    running_var_ptr,          # (C,) updated in place with the unbiased variance
    num_batches_tracked_ptr,  # () int64 batches seen before this one (the batch is counted by the
                              # last kernel of the step): CUMULATIVE averages with 1/(count + 1)
    momentum, eps,
    HAS_RUNNING_STATS: tl.constexpr, CUMULATIVE: tl.constexpr, ACC: tl.constexpr,
):
    """Write mean and invstd, update the running statistics; returns invstd."""
    var = m2 / count
    invstd = 1.0 / tl.sqrt(var + in_dtype(eps, ACC))
    tl.store(mean_ptr + index, mean, mask=mask)
    tl.store(invstd_ptr + index, invstd, mask=mask)
    if HAS_RUNNING_STATS:
        if CUMULATIVE:
            factor = 1.0 / (tl.load(num_batches_tracked_ptr).to(ACC) + 1.0)
        else:
            factor = in_dtype(momentum, ACC)
        running_mean = tl.load(running_mean_ptr + index, mask=mask, other=0.0).to(ACC)
        running_var = tl.load(running_var_ptr + index, mask=mask, other=0.0).to(ACC)
        unbiased_var = m2 / (count - 1.0)
        running_mean = (1.0 - factor) * running_mean + factor * mean
        running_var = (1.0 - factor) * running_var + factor * unbiased_var
        tl.store(running_mean_ptr + index, running_mean.to(running_mean_ptr.dtype.element_ty), mask=mask)
        tl.store(running_var_ptr + index, running_var.to(running_var_ptr.dtype.element_ty), mask=mask)
    return invstd


@triton.jit
def store_gradients(
    index, mask,       # channels to write: a scalar channel or a vector of them
    sum_dy, sum_dy_xmu, invstd,
    grad_weight_ptr,   # (C,) sum(dy * x_hat), in the weight's dtype
    grad_bias_ptr,     # (C,) sum(dy), in the bias's dtype
):
    tl.store(grad_weight_ptr + index, (sum_dy_xmu * invstd).to(grad_weight_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_bias_ptr + index, sum_dy.to(grad_bias_ptr.dtype.element_ty), mask=mask)


@triton.jit
def channel_block(C, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _split_tile(start, splits, cols, col_mask, C, BLOCK_SPLITS: tl.constexpr):
    """Offsets and mask of BLOCK_SPLITS rows of a (splits, C) partials matrix."""
    rows = start + tl.arange(0, BLOCK_SPLITS)
    mask = (rows < splits)[:, None] & col_mask[None, :]
    return rows[:, None] * C + cols[None, :], mask


@triton.jit
def merged_shifted(
    partial_count_ptr, partial_mean_ptr, partial_m2_ptr,  # see finalize_statistics
    cols, col_mask, splits, C,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(count, mean less the shift, m2) of each channel of cols, from `splits` rows of partials."""
    # The partial means are relative to one shift per channel, so they stay small and exact when
    # |mean| >> std. M2 = sum(m2_i + n_i * delta_i^2) is Chan's formula for many partials at once.
    count = tl.zeros([BLOCK_C], ACC)
    weighted = tl.zeros([BLOCK_C], ACC)
    for start in range(0, splits, BLOCK_SPLITS):
        offsets, mask = _split_tile(start, splits, cols, col_mask, C, BLOCK_SPLITS)
        # .cg (L2, not L1): in a fused finalize the partials were written by other programs of
        # this launch, and an SM's L1 is not coherent with their stores.
        part_count = tl.load(partial_count_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(ACC)
        part_mean = tl.load(partial_mean_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(ACC)
        count += tl.sum(part_count, axis=0)
        weighted += tl.sum(part_count * part_mean, axis=0)
    count = tl.where(col_mask, count, 2.0)  # lanes past C: keep m2 / count and m2 / (count - 1) finite
    mean_shifted = weighted / count
    m2 = tl.zeros([BLOCK_C], ACC)
    for start in range(0, splits, BLOCK_SPLITS):
        offsets, mask = _split_tile(start, splits, cols, col_mask, C, BLOCK_SPLITS)
        part_count = tl.load(partial_count_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(ACC)
        part_mean = tl.load(partial_mean_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(ACC)
        part_m2 = tl.load(partial_m2_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(ACC)
        delta = part_mean - mean_shifted[None, :]
        m2 += tl.sum(tl.where(mask, part_m2 + part_count * delta * delta, 0.0), axis=0)
    return count, mean_shifted, m2


@triton.jit
def _merged_partials(
    partial_count_ptr, partial_mean_ptr, partial_m2_ptr, shift_ptr,  # see finalize_statistics
    cols, col_mask, splits, C, shift_stride,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(count, mean, m2) of each channel of cols, from its (splits, C) partials."""
    count, mean_shifted, m2 = merged_shifted(partial_count_ptr, partial_mean_ptr, partial_m2_ptr, cols, col_mask,
                                             splits, C, ACC, BLOCK_SPLITS, BLOCK_C)
    mean = finite_shift(tl.load(shift_ptr + cols * shift_stride, mask=col_mask, other=0.0).to(ACC)) + mean_shifted
    return count, mean, m2


@triton.jit
def summed_partials(
    first_ptr, second_ptr,    # (rows, C) partial sums
    cols, col_mask, rows, C,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The column sums of two (rows, C) matrices of partials, for the channels of cols."""
    first = tl.zeros([BLOCK_C], ACC)
    second = tl.zeros([BLOCK_C], ACC)
    for start in range(0, rows, BLOCK_SPLITS):
        offsets, mask = _split_tile(start, rows, cols, col_mask, C, BLOCK_SPLITS)
        # .cg: see merged_shifted.
        first += tl.sum(tl.load(first_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(ACC), axis=0)
        second += tl.sum(tl.load(second_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg").to(ACC), axis=0)
    return first, second


@triton.jit
def last_of_group(
    counter_ptr,  # (groups,) int32, zero between launches
    group, group_size,
):
    """Whether this program is the last of the group_size programs counting on counter `group` to
    get here. The barrier puts every thread's stores (the partials) before the release of the
    atomic (cumulative, at GPU scope); the last program's acquire puts them before its reads."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr + group, 1, sem="acq_rel", scope="gpu")
    return ticket == group_size - 1


@triton.jit
def finalized_statistics(
    cols, col_mask,           # the channels to finalize
    partial_count_ptr, partial_mean_ptr, partial_m2_ptr, shift_ptr,  # see finalize_statistics
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,  # see store_statistics
    splits, C, shift_stride, momentum, eps,
    HAS_RUNNING_STATS: tl.constexpr, CUMULATIVE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """finalize_statistics for the channels `cols`: the separate kernel and the fused finalize."""
    count, mean, m2 = _merged_partials(partial_count_ptr, partial_mean_ptr, partial_m2_ptr, shift_ptr, cols,
                                       col_mask, splits, C, shift_stride, ACC, BLOCK_SPLITS, BLOCK_C)
    store_statistics(cols, col_mask, count, mean, m2, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr,
                     num_batches_tracked_ptr, momentum, eps, HAS_RUNNING_STATS, CUMULATIVE, ACC)


@triton.jit
def finalize_statistics(
    partial_count_ptr,        # (splits, C) number of values behind each partial
    partial_mean_ptr,         # (splits, C) their mean, less the channel's shift
    partial_m2_ptr,           # (splits, C) their sum of squared deviations from that mean
    shift_ptr,                # the input: channel c's shift (its first value) is at c * shift_stride
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,  # see store_statistics
    splits, C, shift_stride, momentum: tl.float64, eps: tl.float64,
    HAS_RUNNING_STATS: tl.constexpr, CUMULATIVE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, col_mask = channel_block(C, BLOCK_C)
    finalized_statistics(cols, col_mask, partial_count_ptr, partial_mean_ptr, partial_m2_ptr, shift_ptr, mean_ptr,
                         invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, splits, C,
                         shift_stride, momentum, eps, HAS_RUNNING_STATS, CUMULATIVE, ACC, BLOCK_SPLITS, BLOCK_C)


@triton.jit
def finalize_moments(
    partial_count_ptr, partial_mean_ptr, partial_m2_ptr, shift_ptr,  # see finalize_statistics
    moments_ptr,              # (2C + 1,) this process's count, then C means, then C M2s: what
                              # SyncBatchNorm gathers from every rank
    splits, C, shift_stride,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, col_mask = channel_block(C, BLOCK_C)
    count, mean, m2 = _merged_partials(partial_count_ptr, partial_mean_ptr, partial_m2_ptr, shift_ptr, cols,
                                       col_mask, splits, C, shift_stride, ACC, BLOCK_SPLITS, BLOCK_C)
    tl.store(moments_ptr + cols * 0, count, mask=cols == 0)  # every channel has the same count
    tl.store(moments_ptr + 1 + cols, mean, mask=col_mask)
    tl.store(moments_ptr + 1 + C + cols, m2, mask=col_mask)


@triton.jit
def merge_ranks(
    moments_ptr,              # (ranks, 2C + 1) each rank's finalize_moments, in rank order
    mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,  # see store_statistics
    ranks, C, momentum: tl.float64, eps: tl.float64,
    HAS_RUNNING_STATS: tl.constexpr, CUMULATIVE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """SyncBatchNorm's global statistics: the ranks' moments merged with Chan's formula in rank
    order (deterministic). A rank with no values has count 0 and weighs 0: it changes nothing, with
    no test and no host synchronization."""
    cols, col_mask = channel_block(C, BLOCK_C)
    count = tl.zeros([BLOCK_C], ACC)
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    for rank in range(0, ranks):
        row = moments_ptr + rank * (2 * C + 1)
        rank_count = tl.load(row + cols * 0).to(ACC)
        rank_mean = tl.load(row + 1 + cols, mask=col_mask, other=0.0).to(ACC)
        rank_m2 = tl.load(row + 1 + C + cols, mask=col_mask, other=0.0).to(ACC)
        total = count + rank_count
        weight = rank_count / tl.maximum(total, 1.0)
        delta = rank_mean - mean
        mean = merged_mean(mean, rank_mean, delta, weight)
        m2 += rank_m2 + delta * delta * count * weight
        count = total
    # A global batch with no values: zeros saved, running statistics untouched (as one process does).
    empty = count == 0.0
    tl.store(mean_ptr + cols, tl.zeros([BLOCK_C], ACC), mask=col_mask & empty)
    tl.store(invstd_ptr + cols, tl.zeros([BLOCK_C], ACC), mask=col_mask & empty)
    store_statistics(cols, col_mask & (count > 0.0), tl.where(empty, 2.0, count), mean, m2, mean_ptr, invstd_ptr,
                     running_mean_ptr, running_var_ptr, num_batches_tracked_ptr, momentum, eps, HAS_RUNNING_STATS,
                     CUMULATIVE, ACC)


@triton.jit
def finalize_gradients(
    partial_sum_dy_ptr,      # (splits, C) sums of dy
    partial_sum_dy_xmu_ptr,  # (splits, C) sums of dy * (x - mean)
    invstd_ptr,              # (C,) invstd the forward normalized with
    sum_dy_ptr,              # (C,) total of dy, in ACC, for the dx kernel
    sum_dy_xmu_ptr,          # (C,) total of dy * (x - mean), in ACC, for the dx kernel
    grad_weight_ptr, grad_bias_ptr,  # see store_gradients
    splits, C,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, col_mask = channel_block(C, BLOCK_C)
    finalized_gradients(cols, col_mask, partial_sum_dy_ptr, partial_sum_dy_xmu_ptr, invstd_ptr, sum_dy_ptr,
                        sum_dy_xmu_ptr, grad_weight_ptr, grad_bias_ptr, splits, C, ACC, BLOCK_SPLITS, BLOCK_C)


@triton.jit
def finalized_gradients(
    cols, col_mask,           # the channels to finalize
    partial_sum_dy_ptr, partial_sum_dy_xmu_ptr, invstd_ptr, sum_dy_ptr, sum_dy_xmu_ptr,  # see finalize_gradients
    grad_weight_ptr, grad_bias_ptr,  # see store_gradients
    splits, C,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """finalize_gradients for the channels `cols`: the separate kernel and the fused finalize."""
    sum_dy, sum_dy_xmu = summed_partials(partial_sum_dy_ptr, partial_sum_dy_xmu_ptr, cols, col_mask, splits, C,
                                         ACC, BLOCK_SPLITS, BLOCK_C)
    invstd = tl.load(invstd_ptr + cols, mask=col_mask, other=0.0).to(ACC)
    tl.store(sum_dy_ptr + cols, sum_dy, mask=col_mask)
    tl.store(sum_dy_xmu_ptr + cols, sum_dy_xmu, mask=col_mask)
    store_gradients(cols, col_mask, sum_dy, sum_dy_xmu, invstd, grad_weight_ptr, grad_bias_ptr)


# ---- the fused finalize: the last programs of a reduction merge its partials --------------------
# Two levels, so that no program merges many partials alone (64 channels x 500 splits would take
# one program ~130 dependent tile loads): the `group_splits` programs of a split group are counted
# on a counter of their own, and the last of them merges the group's rows into one row of level 2
# (rows splits, splits + 1, ... of the same partials buffer); the last group to finish merges the
# level-2 rows into the result. Both merges walk their rows in a fixed order: the same bits
# whichever program finishes last. Counters: (channel groups, split groups) for level 1, then one
# per channel group for level 2, each set back to zero by the program that took its last ticket.

@triton.jit
def _split_group(split, group_index, splits, group_splits):
    """(split group, its first row, its rows, its level-1 counter) of this program."""
    split_groups = tl.cdiv(splits, group_splits)
    group = split // group_splits
    first = group * group_splits
    return group, first, tl.minimum(group_splits, splits - first), group_index * split_groups + group


@triton.jit
def finalize_statistics_of_group(
    split, group_index, groups,  # this program's split and channel group; how many channel groups
    cols, col_mask,           # the channel group's channels
    partial_count_ptr, partial_mean_ptr, partial_m2_ptr,  # (splits + split groups, C): see finalize_statistics
    counter_ptr,              # (groups * (split groups + 1),) int32 zeros
    shift_ptr, mean_ptr, invstd_ptr, running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,  # see above
    splits, group_splits, C, shift_stride, momentum, eps,
    HAS_RUNNING_STATS: tl.constexpr, CUMULATIVE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Called by every program after storing its partials (row `split`)."""
    split_groups = tl.cdiv(splits, group_splits)
    group, first, rows, level_1 = _split_group(split, group_index, splits, group_splits)
    if last_of_group(counter_ptr, level_1, rows):
        count, mean_shifted, m2 = merged_shifted(partial_count_ptr + first * C, partial_mean_ptr + first * C,
                                                 partial_m2_ptr + first * C, cols, col_mask, rows, C, ACC,
                                                 BLOCK_SPLITS, BLOCK_C)
        out = (splits + group) * C + cols
        tl.store(partial_count_ptr + out, count, mask=col_mask)
        tl.store(partial_mean_ptr + out, mean_shifted, mask=col_mask)
        tl.store(partial_m2_ptr + out, m2, mask=col_mask)
        tl.store(counter_ptr + level_1, 0)
        level_2 = groups * split_groups + group_index
        if last_of_group(counter_ptr, level_2, split_groups):
            finalized_statistics(cols, col_mask, partial_count_ptr + splits * C, partial_mean_ptr + splits * C,
                                 partial_m2_ptr + splits * C, shift_ptr, mean_ptr, invstd_ptr, running_mean_ptr,
                                 running_var_ptr, num_batches_tracked_ptr, split_groups, C, shift_stride, momentum,
                                 eps, HAS_RUNNING_STATS, CUMULATIVE, ACC, BLOCK_SPLITS, BLOCK_C)
            tl.store(counter_ptr + level_2, 0)


@triton.jit
def finalize_gradients_of_group(
    split, group_index, groups,  # this program's split and channel group; how many channel groups
    cols, col_mask,           # the channel group's channels
    partial_sum_dy_ptr, partial_sum_dy_xmu_ptr,  # (splits + split groups, C): see finalize_gradients
    counter_ptr,              # (groups * (split groups + 1),) int32 zeros
    invstd_ptr, sum_dy_ptr, sum_dy_xmu_ptr, grad_weight_ptr, grad_bias_ptr,  # see finalize_gradients
    splits, group_splits, C,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Called by every program after storing its partial sums (row `split`)."""
    split_groups = tl.cdiv(splits, group_splits)
    group, first, rows, level_1 = _split_group(split, group_index, splits, group_splits)
    if last_of_group(counter_ptr, level_1, rows):
        sum_dy, sum_dy_xmu = summed_partials(partial_sum_dy_ptr + first * C, partial_sum_dy_xmu_ptr + first * C,
                                             cols, col_mask, rows, C, ACC, BLOCK_SPLITS, BLOCK_C)
        out = (splits + group) * C + cols
        tl.store(partial_sum_dy_ptr + out, sum_dy, mask=col_mask)
        tl.store(partial_sum_dy_xmu_ptr + out, sum_dy_xmu, mask=col_mask)
        tl.store(counter_ptr + level_1, 0)
        level_2 = groups * split_groups + group_index
        if last_of_group(counter_ptr, level_2, split_groups):
            finalized_gradients(cols, col_mask, partial_sum_dy_ptr + splits * C, partial_sum_dy_xmu_ptr + splits * C,
                                invstd_ptr, sum_dy_ptr, sum_dy_xmu_ptr, grad_weight_ptr, grad_bias_ptr, split_groups, C,
                                ACC, BLOCK_SPLITS, BLOCK_C)
            tl.store(counter_ptr + level_2, 0)
