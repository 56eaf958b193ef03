"""Ghost BatchNorm (Hoffer et al., 2017) on the split path's kernels: statistics per virtual batch.

An input of N rows in G virtual batches of N / G rows is, to the statistics, normalize, gradient-sums
and input-gradient kernels (with GHOST), an input of N / G rows and G x C channels: channel
g * C + c is channel c of virtual batch g. Its values are where the plain index puts channel c of
rows g * N / G ... of the input once the virtual batch's offset is added: `chunk_offset`, a
two-level channel index computed once per program and added to its pointers channels-first, to its
columns' offsets channels-last (there a pointer computed from the parameter, rather than the
parameter itself, costs the dx kernel registers: profiling/journal/model-history.md). A program's
channels lie in one virtual batch:
the plan makes C a multiple of its channel group, channels-first, or of its channel block,
channels-last. Every per-channel array of those kernels -- partials, mean, invstd, weight, bias,
totals -- is indexed by the virtual channel, (G, C) row-major.

Two kernels of this file finalize per virtual batch, as Ghost BatchNorm's chunked definition does
(bn_gpu/reference.py):
    finalize_ghost_statistics  each virtual batch's mean and invstd from the partials; the running
                               statistics updated once per virtual batch, in order
    finalize_ghost_gradients   each virtual batch's totals for the dx kernel; dweight and dbias summed
                               over the virtual batches, in order
A program owns a block of the C channels and walks the virtual batches in order: deterministic.
"""
import triton
import triton.language as tl

from .finalize import channel_block, in_dtype, merged_shifted, summed_partials
from .moments import finite_shift


@triton.jit
def chunk_offset(first_channel, chunk_channels, chunk_extra):
    """How far past the plain index (first_channel * stride_c) the values of a program's channels
    start: chunk_extra for each virtual batch before theirs. chunk_extra is a virtual batch's values
    less the C channels' span that the plain index already counts (channels-first (N/G - 1) x C x S,
    channels-last (N/G x S - 1) x C), so a multiple of the channels' alignment."""
    return (first_channel // chunk_channels) * chunk_extra


@triton.jit
def finalize_ghost_statistics(
    partial_count_ptr,        # (splits, G * C) number of values behind each partial
    partial_mean_ptr,         # (splits, G * C) their mean, less the virtual channel's shift
    partial_m2_ptr,           # (splits, G * C) their sum of squared deviations from that mean
    shift_ptr,                # the input: channel c of virtual batch g starts at g * chunk_values + c * shift_stride
    mean_ptr, invstd_ptr,     # (G * C,) each virtual batch's mean and 1 / sqrt(biased var + eps)
    running_mean_ptr,         # (C,) updated in place once per virtual batch, in order, when HAS_RUNNING_STATS
    running_var_ptr,          # (C,) the same with the unbiased variances
    num_batches_tracked_ptr,  # () int64 batches seen before this call (CUMULATIVE: 1 / (seen + g + 1))
    splits, C, chunks, chunk_values, shift_stride, momentum: tl.float64, eps: tl.float64,
    HAS_RUNNING_STATS: tl.constexpr, CUMULATIVE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, col_mask = channel_block(C, BLOCK_C)
    virtual_C = chunks * C
    if HAS_RUNNING_STATS:
        running_mean = tl.load(running_mean_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        running_var = tl.load(running_var_ptr + cols, mask=col_mask, other=0.0).to(ACC)
        seen = tl.zeros([], ACC)
        if CUMULATIVE:
            seen = tl.load(num_batches_tracked_ptr).to(ACC)
    for chunk in range(0, chunks):
        virtual = chunk * C + cols
        count, mean_shifted, m2 = merged_shifted(partial_count_ptr, partial_mean_ptr, partial_m2_ptr, virtual,
                                                 col_mask, splits, virtual_C, ACC, BLOCK_SPLITS, BLOCK_C)
        shift = tl.load(shift_ptr + chunk * chunk_values + cols * shift_stride, mask=col_mask, other=0.0)
        mean = finite_shift(shift.to(ACC)) + mean_shifted
        invstd = 1.0 / tl.sqrt(m2 / count + in_dtype(eps, ACC))
        tl.store(mean_ptr + virtual, mean, mask=col_mask)
        tl.store(invstd_ptr + virtual, invstd, mask=col_mask)
        if HAS_RUNNING_STATS:
            if CUMULATIVE:
                factor = 1.0 / (seen + chunk + 1.0)
            else:
                factor = in_dtype(momentum, ACC)
            # Rounded to the buffers' dtype after each update, as the chunked definition stores them.
            running_mean = ((1.0 - factor) * running_mean + factor * mean).to(running_mean_ptr.dtype.element_ty)
            running_var = ((1.0 - factor) * running_var + factor * (m2 / (count - 1.0))).to(
                running_var_ptr.dtype.element_ty)
            running_mean = running_mean.to(ACC)
            running_var = running_var.to(ACC)
    if HAS_RUNNING_STATS:
        tl.store(running_mean_ptr + cols, running_mean.to(running_mean_ptr.dtype.element_ty), mask=col_mask)
        tl.store(running_var_ptr + cols, running_var.to(running_var_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def finalize_ghost_gradients(
    partial_sum_dy_ptr,      # (splits, G * C) sums of dy
    partial_sum_dy_xmu_ptr,  # (splits, G * C) sums of dy * (x - mean)
    invstd_ptr,              # (G * C,) invstd each virtual batch was normalized with
    sum_dy_ptr,              # (G * C,) total of dy, in ACC, for the dx kernel
    sum_dy_xmu_ptr,          # (G * C,) total of dy * (x - mean), in ACC, for the dx kernel
    grad_weight_ptr,         # (C,) sum over virtual batches of sum(dy * x_hat), in the weight's dtype
    grad_bias_ptr,           # (C,) sum(dy), in the bias's dtype
    splits, C, chunks,
    ACC: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, col_mask = channel_block(C, BLOCK_C)
    grad_weight = tl.zeros([BLOCK_C], ACC)
    grad_bias = tl.zeros([BLOCK_C], ACC)
    for chunk in range(0, chunks):
        virtual = chunk * C + cols
        sum_dy, sum_dy_xmu = summed_partials(partial_sum_dy_ptr, partial_sum_dy_xmu_ptr, virtual, col_mask, splits,
                                             chunks * C, ACC, BLOCK_SPLITS, BLOCK_C)
        tl.store(sum_dy_ptr + virtual, sum_dy, mask=col_mask)
        tl.store(sum_dy_xmu_ptr + virtual, sum_dy_xmu, mask=col_mask)
        grad_weight += sum_dy_xmu * tl.load(invstd_ptr + virtual, mask=col_mask, other=0.0).to(ACC)
        grad_bias += sum_dy
    tl.store(grad_weight_ptr + cols, grad_weight.to(grad_weight_ptr.dtype.element_ty), mask=col_mask)
    tl.store(grad_bias_ptr + cols, grad_bias.to(grad_bias_ptr.dtype.element_ty), mask=col_mask)
