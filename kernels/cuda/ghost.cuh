// Ghost BatchNorm (Hoffer et al., 2017) on the split path's kernels, as kernels/ghost.py has it for
// the Triton backend: the two-level channel index, and the finalizes per virtual batch.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
//
// An input of N rows in G virtual batches of N / G rows is, to the statistics, normalize, gradient
// sums and input gradient kernels, an input of N / G rows and G x C channels: channel g * C + c is
// channel c of virtual batch g. Its values are where the plain index puts channel g * C + c (c *
// stride_c channels-first, column c channels-last) plus chunk_offset: the kernels add it to their
// tensors' pointers once, for a block's channels channels-first (a channel, or a channel group: the
// host makes C a multiple of the group) and for a thread's VEC channels channels-last (C a multiple
// of VEC). x, y, dy and dx share x's strides, so one offset serves them all. Every per-channel array
// of those kernels -- partials, mean, invstd, weight, bias, totals -- is indexed by the virtual
// channel, (G, C) row-major. The offset is compiled in only where the kernels' GHOST template
// argument is set, so that the other instantiations carry none of it: computed at run time, its
// division before the loops moves nvcc's registers and schedule of the loops themselves
// (profiling/journal/model-history.md).
#pragma once
#include "finalize.cuh"

// How far past the plain index the values of virtual channel c start: chunk_extra for each virtual
// batch before its own. chunk_extra is a virtual batch's values less the span of the C channels that
// the plain index already counts (channels-first (N/G - 1) x C x S, channels-last (N/G x S - 1) x C
// for dense inputs), so a multiple of the 16-byte accesses' width wherever the host chose them.
__device__ __forceinline__ i64 chunk_offset(i64 c, i64 chunk_channels, i64 chunk_extra) {
    return c / chunk_channels * chunk_extra;
}

// chunk_offset of a channels-first block's channels: C / gridDim.x of them from blockIdx.x's first
// (a channel, or a channel group: the grid has one block across C per group).
__device__ __forceinline__ i64 block_chunk_offset(i64 C, i64 chunk_channels, i64 chunk_extra) {
    return chunk_offset((i64)blockIdx.x * (C / gridDim.x), chunk_channels, chunk_extra);
}

// Moves each pointer `offset` values on (GHOST: a block's or thread's chunk_offset).
template <typename... P> __device__ __forceinline__ void move_by(i64 offset, P&... pointers) {
    ((pointers += offset), ...);
}

// Channel c's statistics of each virtual batch, in order, from (splits, G x C) partials: each virtual
// batch's mean and invstd at its virtual channel, and the running statistics updated once per
// virtual batch, rounded to R after each update (the chunked definition stores them so), with the
// cumulative average's factor 1 / (seen + g + 1). One 1-D block per channel.
template <typename T, typename A, typename R>
__device__ __forceinline__ void ghost_statistics_of_channel(
    i64 c, const A* part_count, const A* part_mean, const A* part_m2, const T* __restrict__ x, i64 chunk_values,
    i64 shift_stride, A* mean_out, A* invstd_out, R* running_mean, R* running_var, const i64* num_batches_tracked,
    i64 splits, i64 C, i64 chunks, double momentum, double eps, int has_running_stats, int cumulative) {
    for (i64 chunk = 0; chunk < chunks; ++chunk) {
        const i64 v = chunk * C + c;
        const Moments<A> m = merged_rows(part_count, part_mean, part_m2, splits, chunks * C, v);
        if (threadIdx.x != 0) continue;
        const A mean = finite_shift(cvt<A>(x[chunk * chunk_values + c * shift_stride])) + m.mean;
        mean_out[v] = mean;
        invstd_out[v] = batch_invstd(m.count, m.m2, eps);
        if (has_running_stats) {
            const A factor = cumulative ? A(1) / (A(num_batches_tracked[0]) + A(chunk) + A(1)) : A(momentum);
            running_mean[c] = cvt<R>((A(1) - factor) * cvt<A>(running_mean[c]) + factor * mean);
            running_var[c] = cvt<R>((A(1) - factor) * cvt<A>(running_var[c]) + factor * (m.m2 / (m.count - A(1))));
        }
    }
}

// Channel c's totals of each virtual batch for the dx kernel, from (splits, G x C) partial sums, and
// its dweight and dbias summed over the virtual batches in order (each virtual batch's dweight with
// its own invstd). One 1-D block per channel.
template <typename A, typename W>
__device__ __forceinline__ void ghost_gradients_of_channel(
    i64 c, const A* part_sum_dy, const A* part_sum_dy_xmu, const A* invstd_in, A* sum_dy_out, A* sum_dy_xmu_out,
    W* grad_weight, W* grad_bias, i64 splits, i64 C, i64 chunks) {
    A weight_sum = A(0), bias_sum = A(0);
    for (i64 chunk = 0; chunk < chunks; ++chunk) {
        const i64 v = chunk * C + c;
        A sum_dy, sum_dy_xmu;
        summed_rows(part_sum_dy, part_sum_dy_xmu, splits, chunks * C, v, sum_dy, sum_dy_xmu);
        if (threadIdx.x != 0) continue;
        sum_dy_out[v] = sum_dy;
        sum_dy_xmu_out[v] = sum_dy_xmu;
        weight_sum += sum_dy_xmu * invstd_in[v];
        bias_sum += sum_dy;
    }
    if (threadIdx.x == 0) {
        grad_weight[c] = cvt<W>(weight_sum);
        grad_bias[c] = cvt<W>(bias_sum);
    }
}
