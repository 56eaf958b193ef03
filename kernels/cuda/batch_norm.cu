// BatchNorm kernels in CUDA C for the CuPy backend (bn_gpu/backends/cupy/), compiled at run time by
// NVRTC through cupy.RawModule -- so no standard-library headers here, only the CUDA fp16/bf16 ones.
// This file holds the kernels only; their shared pieces are in the headers beside it, which
// bn_gpu/backends/cupy/compilation.py inlines (each once) before NVRTC compiles the result as one string.
//
// The same kernels, under the same names, as the Triton backend (kernels/channels_first.py,
// channels_last.py, finalize.py), on the same split plan (bn_gpu/backends/plan.py):
//   statistics_channels_first / _last            partial (count, mean - shift, M2) per (split, channel);
//                                                FINALIZE: its last blocks merge them (finalize_statistics)
//   finalize_statistics                          merge partials (Chan), mean, invstd, running stats
//   finalize_moments, merge_ranks                SyncBatchNorm: one process's moments; every rank's merged
//   normalize_channels_first / _last             y = (x - mean) * invstd * weight + bias (train, eval)
//   gradient_sums_channels_first / _last         partial sums of dy and dy * (x - mean);
//                                                FINALIZE: its last blocks sum them (finalize_gradients)
//   finalize_gradients                           totals, dweight, dbias
//   finalize_ghost_statistics / _gradients       Ghost BatchNorm: the finalizes per virtual batch (ghost.cuh)
//   input_gradient_channels_first / _last        dx from dy, x and the totals
//   single_pass_forward_channels_first / _last   single pass when one block owns whole channels
//   single_pass_backward_channels_first / _last  (the launch plan has one split): 1 launch
//   on_chip_forward_channels_first / _last       training forward (backward) where x (and dy) fit in
//   on_chip_backward_channels_first / _last      the SMs' shared memory: x read once (on_chip.cuh)
// Templates: FUSED, on the elementwise and backward kernels, compiles in the epilogue (+ residual,
// ReLU; in the backward the ReLU's mask) -- a compile-time choice, so that the plain kernels are
// the same code as without it. T the input dtype (float, __half, __nv_bfloat16, double), A the accumulation dtype
// (float; double for double input), W the weight/bias dtype and R the running-statistics dtype
// (T, or float for 16-bit inputs). Offsets are 64-bit throughout. Every streaming kernel loads VEC
// values at once (16 bytes) where the host found the data aligned, else VEC = 1: channels-first along
// a row of S values (a scalar tail where S is not a multiple of VEC), channels-last across VEC
// consecutive channels of a row (C a multiple of VEC).
// FINALIZE, on the two split reductions, compiles in their own finalize: the last blocks to finish
// merge the partials (in two levels, as kernels/finalize.py), so the split path takes 2 launches.
// GROUPED, on the channels-first kernels, compiles the channel-group version (see "channel groups"):
// a block owns several adjacent channels whose rows together start on 16 bytes (7x7 planes).
// GHOST, on the statistics, normalize, gradient sums and input gradient kernels (without FUSED and
// FINALIZE), compiles in Ghost BatchNorm's two-level channel index (chunk_channels, chunk_extra;
// ghost.cuh): virtual batch x channel. Without it those two parameters are not read.
// WALK, on the channels-first on-chip forward and backward, compiles the walk (walk.cuh): where the
// channel groups fill the resident blocks, each block walks several, the next copied into shared memory ahead.
// The split reductions (statistics, gradient sums) of 16-byte groups copy a thread's next rows into
// shared memory while it adds the current ones (cp.async: async_copies.cuh; for_each_group_staged,
// staged_rows): loads in flight that take no registers.
// The blocks an SM the split kernels ask nvcc to fit (their __launch_bounds__): launch_bounds.cuh.
// No atomics on values: every reduction has a fixed order, so results are bitwise reproducible; the
// only atomics are integer counters: the fused finalize's tickets and the on-chip kernels' barriers.

#include "conversions.cuh"
#include "merges.cuh"
#include "async_copies.cuh"
#include "channels_first.cuh"
#include "channels_last.cuh"
#include "channel_groups.cuh"
#include "finalize.cuh"
#include "ghost.cuh"
#include "forward.cuh"
#include "backward.cuh"
#include "single_pass.cuh"
#include "on_chip.cuh"
#include "walk.cuh"
#include "launch_bounds.cuh"

// ---- statistics: partial moments per (split, channel) -------------------------------------------

template <typename T, typename A, typename R, int VEC, bool FINALIZE, bool GROUPED, bool GHOST>
__global__ void statistics_channels_first(
    const T* __restrict__ x,   // input (N, C, S)
    A* part_count, A* part_mean, A* part_m2,   // (splits, C), FINALIZE (splits + split groups, C); part_mean is relative to x[0, c, 0]
    int* counters,   // FINALIZE: the fused finalize's int32 zeros, left at zero; else null
    A* mean_out, A* invstd_out, R* running_mean, R* running_var,   // FINALIZE: see store_statistics
    const i64* num_batches_tracked,
    i64 N, i64 C, i64 S, i64 chunk_channels, i64 chunk_extra, i64 stride_n, i64 stride_c,
    i64 s_blocks, i64 total_tiles, i64 tiles_per_program, int rows, int block_s,
    i64 group_splits, double momentum, double eps, int has_running_stats, int cumulative) {
    if constexpr (GHOST) move_by(block_chunk_offset(C, chunk_channels, chunk_extra), x);
    if constexpr (GROUPED) {
        group_statistics<T, A, R, VEC, FINALIZE>(x, part_count, part_mean, part_m2, counters, mean_out, invstd_out,
                                                 running_mean, running_var, num_batches_tracked, N, C, S, stride_n,
                                                 stride_c, total_tiles, tiles_per_program, rows, block_s,
                                                 group_splits, momentum, eps, has_running_stats, cumulative);
        return;
    }
    i64 c = blockIdx.x;
    const T* xc = x + c * stride_c;
    A shift = finite_shift(cvt<A>(xc[0]));
    Tiles t = program_tiles(N, S, s_blocks, total_tiles, tiles_per_program, rows, block_s);
    Moments<A> m = block_moments<T, A, VEC>(t, t.first, t.last, xc, stride_n, shift);
    if (threadIdx.x == 0) {
        i64 out = (i64)blockIdx.y * C + c;
        part_count[out] = m.count; part_mean[out] = m.mean; part_m2[out] = m.m2;
    }
    if constexpr (FINALIZE)
        finalize_statistics_of_group<false, 1>(part_count, part_mean, part_m2, counters, c, Values<A, 1>{{shift}},
                                               blockIdx.y, c, gridDim.x, gridDim.y, group_splits, C, mean_out,
                                               invstd_out, running_mean, running_var, num_batches_tracked, momentum,
                                               eps, has_running_stats, cumulative);
}

template <typename T, typename A, typename R, int VEC, bool FINALIZE, bool GHOST>
__global__ void __launch_bounds__(CL_THREADS, ChannelsLastStatisticsBlocks<T, VEC>::value) statistics_channels_last(
    const T* __restrict__ x,   // input (M, C)
    A* part_count, A* part_mean, A* part_m2,   // (splits, C), FINALIZE (splits + split groups, C); part_mean is relative to x[0, c]
    int* counters,   // FINALIZE: the fused finalize's int32 zeros, left at zero; else null
    A* mean_out, A* invstd_out, R* running_mean, R* running_var,   // FINALIZE: see store_statistics
    const i64* num_batches_tracked,
    i64 M, i64 C, i64 chunk_channels, i64 chunk_extra, i64 stride_m, i64 rows_per_program,
    i64 group_splits, double momentum, double eps, int has_running_stats, int cumulative) {
    const i64 c0 = first_channel<VEC>();
    if constexpr (GHOST) move_by(chunk_offset(c0, chunk_channels, chunk_extra), x);
    const bool active = c0 < C;
    const i64 row_begin = (i64)blockIdx.x * rows_per_program;
    const i64 row_end = min(row_begin + rows_per_program, M);
    const Values<A, VEC> shift = first_row<VEC, T, A>(x, c0, active);
    ColumnMoments<A, VEC> moments = no_column_moments<A, VEC>();
    if (active) moments = column_moments<VEC, true>(x, stride_m, c0, shift, row_begin, row_end);
    column_merge_tree(moments);
    if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            i64 out = (i64)blockIdx.x * C + c0 + k;
            part_count[out] = moments.count; part_mean[out] = moments.mean.v[k]; part_m2[out] = moments.m2.v[k];
        }
    }
    if constexpr (FINALIZE)
        finalize_statistics_of_group<true, VEC>(part_count, part_mean, part_m2, counters, c0, shift, blockIdx.x,
                                                blockIdx.y, gridDim.y, gridDim.x, group_splits, C, mean_out, invstd_out,
                                                running_mean, running_var, num_batches_tracked, momentum, eps,
                                                has_running_stats, cumulative);
}

// ---- the separate finalize and SyncBatchNorm's merges ---------------------------------------------

// One block per channel.
template <typename T, typename A, typename R>
__global__ void finalize_statistics(
    const A* part_count, const A* part_mean, const A* part_m2,   // (splits, C)
    const T* __restrict__ x, i64 shift_stride,   // the input: channel c's shift is x[c * shift_stride]
    A* mean_out, A* invstd_out,   // (C,) saved for the backward
    R* running_mean, R* running_var,   // (C,) updated in place when has_running_stats
    const i64* num_batches_tracked,   // batches before this one, when cumulative
    i64 splits, i64 C, double momentum, double eps, int has_running_stats, int cumulative) {
    Moments<A> m = merged_partials(part_count, part_mean, part_m2, x, shift_stride, splits, C);
    if (threadIdx.x == 0)
        store_statistics(blockIdx.x, m.count, m.mean, m.m2, mean_out, invstd_out, running_mean, running_var,
                         num_batches_tracked, momentum, eps, has_running_stats, cumulative);
}

// One block per channel: this process's (count, mean, M2) into moments (2C + 1): the count at 0
// (the same for every channel), the means from 1, the M2s from 1 + C -- what SyncBatchNorm gathers.
template <typename T, typename A>
__global__ void finalize_moments(
    const A* part_count, const A* part_mean, const A* part_m2,   // (splits, C)
    const T* __restrict__ x, i64 shift_stride, A* moments, i64 splits, i64 C) {
    Moments<A> m = merged_partials(part_count, part_mean, part_m2, x, shift_stride, splits, C);
    if (threadIdx.x != 0) return;
    if (blockIdx.x == 0) moments[0] = m.count;
    moments[1 + blockIdx.x] = m.mean;
    moments[1 + C + blockIdx.x] = m.m2;
}

// One thread per channel: SyncBatchNorm's global statistics, every rank's moments (ranks, 2C + 1)
// merged with Chan's formula in rank order (deterministic). A rank with no values has count 0 and
// weighs 0: it changes nothing, with no test and no host synchronization. A global batch with no
// values saves zeros and leaves the running statistics alone, as one process does.
template <typename A, typename R>
__global__ void merge_ranks(
    const A* moments, A* mean_out, A* invstd_out, R* running_mean, R* running_var,
    const i64* num_batches_tracked, i64 ranks, i64 C, double momentum, double eps, int has_running_stats,
    int cumulative) {
    i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    A count = A(0), mean = A(0), m2 = A(0);
    for (i64 rank = 0; rank < ranks; ++rank) {
        const A* row = moments + rank * (2 * C + 1);
        A rank_count = row[0];
        A total = count + rank_count;
        A weight = rank_count / (total > A(1) ? total : A(1));
        A delta = row[1 + c] - mean;
        mean = merged_mean(mean, row[1 + c], delta, weight);
        m2 += row[1 + C + c] + delta * delta * count * weight;
        count = total;
    }
    if (count == A(0)) {
        mean_out[c] = A(0);
        invstd_out[c] = A(0);
        return;
    }
    store_statistics(c, count, mean, m2, mean_out, invstd_out, running_mean, running_var, num_batches_tracked,
                     momentum, eps, has_running_stats, cumulative);
}

// ---- normalize: y = (x - mean) * invstd * weight + bias, and the epilogue --------------------------

template <typename T, typename W, typename R, typename A, int VEC, bool FUSED, bool GROUPED, bool GHOST>
__global__ void __launch_bounds__(CL_THREADS, NormalizeBlocks<T, FUSED, GROUPED>::value) normalize_channels_first(
    const T* __restrict__ x, T* __restrict__ y,   // (N, C, S), each with its own strides
    const T* __restrict__ residual,   // (N, C, S) with y's strides, or null
    const A* mean_in, const A* invstd_in,   // (C,) training statistics
    const R* running_mean, const R* running_var,   // (C,) eval statistics
    A* saved_mean, A* saved_invstd,   // (C,) eval: written by split 0
    const W* weight, const W* bias,   // (C,) or null
    i64* num_batches_tracked,   // incremented by block (0, 0), or null
    i64 N, i64 C, i64 S, i64 chunk_channels, i64 chunk_extra, i64 x_stride_n, i64 x_stride_c, i64 y_stride_n,
    i64 y_stride_c, double eps, i64 s_blocks, i64 total_tiles, i64 tiles_per_program, int rows, int block_s,
    int from_running_stats, int relu) {
    if constexpr (GHOST) move_by(block_chunk_offset(C, chunk_channels, chunk_extra), x, y);
    if constexpr (GROUPED) {
        group_normalize<T, W, R, A, VEC, FUSED>(x, y, residual, mean_in, invstd_in, running_mean, running_var,
                                                saved_mean, saved_invstd, weight, bias, num_batches_tracked, N, C, S,
                                                x_stride_n, x_stride_c, y_stride_n, y_stride_c, eps, total_tiles,
                                                tiles_per_program, rows, block_s, from_running_stats, relu);
        return;
    }
    i64 c = blockIdx.x;
    A mean, scale, shift;
    channel_affine(c, blockIdx.y == 0 && threadIdx.x == 0, mean_in, invstd_in, running_mean, running_var,
                   saved_mean, saved_invstd, weight, bias, eps, from_running_stats, mean, scale, shift);
    if (threadIdx.x == 0) count_batch(num_batches_tracked, blockIdx.x == 0 && blockIdx.y == 0);
    NormalizeRow<T, A, FUSED> op = {x + c * x_stride_c, y + c * y_stride_c, residual ? residual + c * y_stride_c : nullptr,
                             x_stride_n, y_stride_n, mean, scale, shift, relu};
    Tiles t = program_tiles(N, S, s_blocks, total_tiles, tiles_per_program, rows, block_s);
    for_each_group<VEC, true>(t, t.first, t.last, op);
}

template <typename T, typename W, typename R, typename A, int VEC, bool FUSED, bool GHOST>
__global__ void normalize_channels_last(
    const T* __restrict__ x, T* __restrict__ y,   // (M, C), each with its own row stride
    const T* __restrict__ residual,   // (M, C) with y's row stride, or null
    const A* mean_in, const A* invstd_in, const R* running_mean, const R* running_var,
    A* saved_mean, A* saved_invstd, const W* weight, const W* bias, i64* num_batches_tracked,
    i64 M, i64 C, i64 chunk_channels, i64 chunk_extra, i64 x_stride_m, i64 y_stride_m, double eps,
    i64 rows_per_program, int from_running_stats, int relu) {
    const i64 c0 = first_channel<VEC>();
    if (threadIdx.x == 0 && threadIdx.y == 0) count_batch(num_batches_tracked, blockIdx.x == 0 && blockIdx.y == 0);
    if (c0 >= C) return;
    if constexpr (GHOST) move_by(chunk_offset(c0, chunk_channels, chunk_extra), x, y);
    Values<A, VEC> mean, scale, shift;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
        channel_affine(c0 + k, blockIdx.x == 0 && threadIdx.y == 0, mean_in, invstd_in, running_mean, running_var,
                       saved_mean, saved_invstd, weight, bias, eps, from_running_stats, mean.v[k], scale.v[k],
                       shift.v[k]);
    const i64 row_begin = (i64)blockIdx.x * rows_per_program;
    column_normalize<VEC, FUSED>(x, y, residual, x_stride_m, y_stride_m, c0, mean, scale, shift, relu, row_begin,
                                 min(row_begin + rows_per_program, M));
}

// ---- backward ---------------------------------------------------------------------------------

template <typename T, typename W, typename A, int VEC, bool FUSED, bool FINALIZE, bool GROUPED, bool GHOST>
__global__ void __launch_bounds__(CL_THREADS, GradientSumsBlocks<T, FUSED, GROUPED>::value) gradient_sums_channels_first(
    const T* __restrict__ dy, const T* __restrict__ x, const A* mean_in,
    const A* invstd_in,   // read for the ReLU's mask when relu, and by FINALIZE
    const W* weight, const W* bias,   // read for the ReLU's mask when relu
    A* part_sum_dy, A* part_sum_dy_xmu,   // (splits, C), FINALIZE (splits + split groups, C)
    int* counters,   // FINALIZE: the fused finalize's int32 zeros, left at zero; else null
    A* sum_dy_out, A* sum_dy_xmu_out, W* grad_weight, W* grad_bias,   // FINALIZE: see finalize_gradients
    i64 N, i64 C, i64 S, i64 chunk_channels, i64 chunk_extra, i64 dy_stride_n, i64 dy_stride_c, i64 x_stride_n,
    i64 x_stride_c, i64 s_blocks, i64 total_tiles, i64 tiles_per_program, int rows, int block_s, i64 group_splits,
    int relu) {
    if constexpr (GHOST) move_by(block_chunk_offset(C, chunk_channels, chunk_extra), dy, x);
    if constexpr (GROUPED) {
        group_gradient_sums<T, W, A, VEC, FUSED, FINALIZE>(dy, x, mean_in, invstd_in, weight, bias, part_sum_dy,
                                                           part_sum_dy_xmu, counters, sum_dy_out, sum_dy_xmu_out,
                                                           grad_weight, grad_bias, N, C, S, dy_stride_n, dy_stride_c,
                                                           x_stride_n, x_stride_c, total_tiles, tiles_per_program,
                                                           rows, block_s, group_splits, relu);
        return;
    }
    i64 c = blockIdx.x;
    A mean = mean_in[c];
    ReluMask<A> mask = relu_mask(c, relu, mean, invstd_in, weight, bias);
    const T* dyc = dy + c * dy_stride_c;
    const T* xc = x + c * x_stride_c;
    A sum_dy = A(0), sum_dy_xmu = A(0);
    Tiles t = program_tiles(N, S, s_blocks, total_tiles, tiles_per_program, rows, block_s);
    block_gradient_sums<T, A, VEC, FUSED>(t, t.first, t.last, dyc, xc, dy_stride_n, x_stride_n, mean, mask, sum_dy,
                                   sum_dy_xmu);
    if (threadIdx.x == 0) {
        i64 out = (i64)blockIdx.y * C + c;
        part_sum_dy[out] = sum_dy;
        part_sum_dy_xmu[out] = sum_dy_xmu;
    }
    if constexpr (FINALIZE)
        finalize_gradients_of_group<false, 1>(part_sum_dy, part_sum_dy_xmu, counters, c, blockIdx.y, c, gridDim.x,
                                              gridDim.y, group_splits, C, invstd_in, sum_dy_out, sum_dy_xmu_out,
                                              grad_weight, grad_bias);
}

template <typename T, typename W, typename A, int VEC, bool FUSED, bool FINALIZE, bool GHOST>
__global__ void gradient_sums_channels_last(
    const T* __restrict__ dy, const T* __restrict__ x, const A* mean_in,
    const A* invstd_in,   // read for the ReLU's mask when relu, and by FINALIZE
    const W* weight, const W* bias,   // read for the ReLU's mask when relu
    A* part_sum_dy, A* part_sum_dy_xmu,   // (splits, C), FINALIZE (splits + split groups, C)
    int* counters,   // FINALIZE: the fused finalize's int32 zeros, left at zero; else null
    A* sum_dy_out, A* sum_dy_xmu_out, W* grad_weight, W* grad_bias,   // FINALIZE: see finalize_gradients
    i64 M, i64 C, i64 chunk_channels, i64 chunk_extra, i64 dy_stride_m, i64 x_stride_m, i64 rows_per_program,
    i64 group_splits, int relu) {
    const i64 c0 = first_channel<VEC>();
    if constexpr (GHOST) move_by(chunk_offset(c0, chunk_channels, chunk_extra), dy, x);
    const bool active = c0 < C;
    const i64 row_begin = (i64)blockIdx.x * rows_per_program;
    const i64 row_end = min(row_begin + rows_per_program, M);
    Values<A, VEC> sum_dy = zeros<A, VEC>(), sum_dy_xmu = zeros<A, VEC>();
    if (active) {
        Values<A, VEC> mean;
#pragma unroll
        for (int k = 0; k < VEC; ++k) mean.v[k] = mean_in[c0 + k];
        column_gradient_sums<VEC, FUSED, true>(dy, x, dy_stride_m, x_stride_m, c0, mean,
                                               relu_masks<VEC>(c0, relu, mean, invstd_in, weight, bias), row_begin,
                                               row_end, sum_dy, sum_dy_xmu);
    }
    column_sums_tree(sum_dy, sum_dy_xmu);
    if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            i64 out = (i64)blockIdx.x * C + c0 + k;
            part_sum_dy[out] = sum_dy.v[k];
            part_sum_dy_xmu[out] = sum_dy_xmu.v[k];
        }
    }
    if constexpr (FINALIZE)
        finalize_gradients_of_group<true, VEC>(part_sum_dy, part_sum_dy_xmu, counters, c0, blockIdx.x, blockIdx.y,
                                               gridDim.y, gridDim.x, group_splits, C, invstd_in, sum_dy_out,
                                               sum_dy_xmu_out, grad_weight, grad_bias);
}

// One block per channel.
template <typename A, typename W>
__global__ void finalize_gradients(
    const A* part_sum_dy, const A* part_sum_dy_xmu,   // (splits, C)
    const A* invstd_in,
    A* sum_dy_out, A* sum_dy_xmu_out,   // (C,) totals for the dx pass
    W* grad_weight, W* grad_bias,   // (C,)
    i64 splits, i64 C) {
    i64 c = blockIdx.x;
    A sum_dy, sum_dy_xmu;
    summed_rows(part_sum_dy, part_sum_dy_xmu, splits, C, c, sum_dy, sum_dy_xmu);
    if (threadIdx.x != 0) return;
    sum_dy_out[c] = sum_dy;
    sum_dy_xmu_out[c] = sum_dy_xmu;
    store_gradients(c, sum_dy, sum_dy_xmu, invstd_in[c], grad_weight, grad_bias);
}

// Ghost BatchNorm (ghost.cuh): one block per channel of the C channels walks the virtual batches in order.
template <typename T, typename A, typename R>
__global__ void finalize_ghost_statistics(
    const A* part_count, const A* part_mean, const A* part_m2,   // (splits, G x C)
    const T* __restrict__ x, i64 chunk_values, i64 shift_stride,   // channel c of virtual batch g starts at
                                                                   // g * chunk_values + c * shift_stride
    A* mean_out, A* invstd_out,   // (G x C,) each virtual batch's
    R* running_mean, R* running_var,   // (C,) updated once per virtual batch when has_running_stats
    const i64* num_batches_tracked,   // batches before this call, read when cumulative
    i64 splits, i64 C, i64 chunks, double momentum, double eps, int has_running_stats, int cumulative) {
    ghost_statistics_of_channel(i64(blockIdx.x), part_count, part_mean, part_m2, x, chunk_values, shift_stride,
                                mean_out, invstd_out, running_mean, running_var, num_batches_tracked, splits, C,
                                chunks, momentum, eps, has_running_stats, cumulative);
}

template <typename A, typename W>
__global__ void finalize_ghost_gradients(
    const A* part_sum_dy, const A* part_sum_dy_xmu,   // (splits, G x C)
    const A* invstd_in,   // (G x C,)
    A* sum_dy_out, A* sum_dy_xmu_out,   // (G x C,) totals for the dx pass
    W* grad_weight, W* grad_bias,   // (C,) summed over the virtual batches
    i64 splits, i64 C, i64 chunks) {
    ghost_gradients_of_channel(i64(blockIdx.x), part_sum_dy, part_sum_dy_xmu, invstd_in, sum_dy_out, sum_dy_xmu_out,
                               grad_weight, grad_bias, splits, C, chunks);
}

template <typename T, typename W, typename A, int VEC, bool FUSED, bool GROUPED, bool GHOST>
__global__ void input_gradient_channels_first(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,   // (N, C, S)
    const A* mean_in, const A* invstd_in, const W* weight,
    const W* bias,   // read for the ReLU's mask when relu
    const A* sum_dy, const A* sum_dy_xmu,
    i64 N, i64 C, i64 S, i64 chunk_channels, i64 chunk_extra, i64 dy_stride_n, i64 dy_stride_c, i64 x_stride_n,
    i64 x_stride_c, i64 dx_stride_n, i64 dx_stride_c, A inv_count,
    i64 s_blocks, i64 total_tiles, i64 tiles_per_program, int rows, int block_s, int training, int relu) {
    if constexpr (GHOST) move_by(block_chunk_offset(C, chunk_channels, chunk_extra), dy, x, dx);
    if constexpr (GROUPED) {
        group_input_gradient<T, W, A, VEC, FUSED>(dy, x, dx, mean_in, invstd_in, weight, bias, sum_dy, sum_dy_xmu, N,
                                                  C, S, dy_stride_n, dy_stride_c, x_stride_n, x_stride_c, dx_stride_n,
                                                  dx_stride_c, inv_count, total_tiles, tiles_per_program, rows,
                                                  block_s, training, relu);
        return;
    }
    i64 c = blockIdx.x;
    A mean, scale, mean_dy, projection;
    dx_coefficients_at(c, mean_in, invstd_in, weight, sum_dy, sum_dy_xmu, inv_count, training, mean, scale, mean_dy, projection);
    Tiles t = program_tiles(N, S, s_blocks, total_tiles, tiles_per_program, rows, block_s);
    input_gradient_tiles<VEC, FUSED>(t, t.first, t.last, dy + c * dy_stride_c, x + c * x_stride_c,
                                     dx + c * dx_stride_c, dy_stride_n, x_stride_n, dx_stride_n, mean, scale, mean_dy,
                                     projection, training, relu_mask(c, relu, mean_in, invstd_in, weight, bias));
}

template <typename T, typename W, typename A, int VEC, bool FUSED, bool GHOST>
__global__ void input_gradient_channels_last(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,   // (M, C)
    const A* mean_in, const A* invstd_in, const W* weight,
    const W* bias,   // read for the ReLU's mask when relu
    const A* sum_dy, const A* sum_dy_xmu,
    i64 M, i64 C, i64 chunk_channels, i64 chunk_extra, i64 dy_stride_m, i64 x_stride_m, i64 dx_stride_m,
    A inv_count, i64 rows_per_program, int training, int relu) {
    const i64 c0 = first_channel<VEC>();
    if (c0 >= C) return;
    if constexpr (GHOST) move_by(chunk_offset(c0, chunk_channels, chunk_extra), dy, x, dx);
    Values<A, VEC> mean, scale, mean_dy, projection;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
        dx_coefficients_at(c0 + k, mean_in, invstd_in, weight, sum_dy, sum_dy_xmu, inv_count, training, mean.v[k],
                           scale.v[k], mean_dy.v[k], projection.v[k]);
    const i64 row_begin = (i64)blockIdx.x * rows_per_program;
    column_input_gradient<VEC, FUSED>(dy, x, dx, dy_stride_m, x_stride_m, dx_stride_m, c0, mean, scale, mean_dy,
                                      projection, training, relu_masks<VEC>(c0, relu, mean_in, invstd_in, weight, bias),
                                      row_begin, min(row_begin + rows_per_program, M));
}

// ---- single pass: one block owns whole channels (the launch plan has one split) ------------------
// Statistics (or gradient sums), then the elementwise pass in the same launch; the second read of
// the block's channels comes from cache.

template <typename T, typename W, typename R, typename A, int VEC, bool FUSED, bool GROUPED>
__global__ void single_pass_forward_channels_first(
    const T* __restrict__ x, T* __restrict__ y,   // (N, C, S), each with its own strides
    const T* __restrict__ residual,   // (N, C, S) with y's strides, or null
    A* mean_out, A* invstd_out, R* running_mean, R* running_var,   // see store_statistics
    i64* num_batches_tracked,   // read when cumulative; incremented when count_batch_here (count_batch_after_every_read)
    int* counters,   // (1,) int32 zero when count_batch_here and cumulative, left at zero; else null
    const W* weight, const W* bias,   // (C,) or null
    i64 N, i64 C, i64 S, i64 x_stride_n, i64 x_stride_c, i64 y_stride_n, i64 y_stride_c, double momentum, double eps,
    i64 s_blocks, i64 total_tiles, int rows, int block_s, int has_running_stats, int cumulative, int count_batch_here,
    int relu) {
    if constexpr (GROUPED) {
        group_single_pass_forward<T, W, R, A, VEC, FUSED>(x, y, residual, mean_out, invstd_out, running_mean,
                                                          running_var, num_batches_tracked, counters, weight, bias, N,
                                                          C, S, x_stride_n, x_stride_c, y_stride_n, y_stride_c,
                                                          momentum, eps, block_s, has_running_stats, cumulative,
                                                          count_batch_here, relu);
        return;
    }
    __shared__ A channel[2];
    i64 c = blockIdx.x;
    const T* xc = x + c * x_stride_c;
    A shift = finite_shift(cvt<A>(xc[0]));
    Tiles t = program_tiles(N, S, s_blocks, total_tiles, total_tiles, rows, block_s);
    Moments<A> m = block_moments<T, A, VEC>(t, i64(0), total_tiles, xc, x_stride_n, shift);
    if (threadIdx.x == 0) {
        channel[0] = shift + m.mean;
        channel[1] = store_statistics(c, m.count, channel[0], m.m2, mean_out, invstd_out, running_mean, running_var,
                                      num_batches_tracked, momentum, eps, has_running_stats, cumulative);
    }
    __syncthreads();
    A scale, bias_c;
    affine_from(c, channel[1], weight, bias, scale, bias_c);
    NormalizeRow<T, A, FUSED> op = {xc, y + c * y_stride_c, residual ? residual + c * y_stride_c : nullptr, x_stride_n,
                             y_stride_n, channel[0], scale, bias_c, relu};
    for_each_group<VEC, true>(t, i64(0), total_tiles, op);
    // Last: the block has read the count long before (store_statistics), and the loops above keep
    // the code they have without the ticket.
    if (count_batch_here) count_batch_after_every_read(num_batches_tracked, counters, cumulative);
}

template <typename T, typename W, typename R, typename A, int VEC, bool FUSED>
__global__ void single_pass_forward_channels_last(
    const T* __restrict__ x, T* __restrict__ y,   // (M, C), each with its own row stride
    const T* __restrict__ residual,   // (M, C) with y's row stride, or null
    A* mean_out, A* invstd_out, R* running_mean, R* running_var, i64* num_batches_tracked,
    int* counters,   // see single_pass_forward_channels_first
    const W* weight, const W* bias,
    i64 M, i64 C, i64 x_stride_m, i64 y_stride_m, double momentum, double eps,
    int has_running_stats, int cumulative, int count_batch_here, int relu) {
    __shared__ A channel_mean[CL_MAX_CHANNELS], channel_invstd[CL_MAX_CHANNELS];
    const i64 c0 = first_channel<VEC>();
    const bool active = c0 < C;
    const Values<A, VEC> shift = first_row<VEC, T, A>(x, c0, active);
    ColumnMoments<A, VEC> moments = no_column_moments<A, VEC>();
    if (active) moments = column_moments<VEC>(x, x_stride_m, c0, shift, i64(0), M);
    column_merge_tree(moments);
    if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const int slot = threadIdx.x * VEC + k;
            channel_mean[slot] = shift.v[k] + moments.mean.v[k];
            channel_invstd[slot] = store_statistics(c0 + k, moments.count, channel_mean[slot], moments.m2.v[k],
                                                    mean_out, invstd_out, running_mean, running_var,
                                                    num_batches_tracked, momentum, eps, has_running_stats, cumulative);
        }
    }
    __syncthreads();
    if (active)
        column_normalize_slots<VEC, FUSED>(x, y, residual, x_stride_m, y_stride_m, c0, c0, channel_mean, channel_invstd,
                                           weight, bias, relu, M);
    // Last, as in single_pass_forward_channels_first (every thread of the block gets here).
    if (count_batch_here) count_batch_after_every_read(num_batches_tracked, counters, cumulative);
}

template <typename T, typename W, typename A, int VEC, bool FUSED, bool GROUPED>
__global__ void single_pass_backward_channels_first(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,   // (N, C, S); dx when need_input_grad
    const A* mean_in, const A* invstd_in, const W* weight,
    const W* bias,   // read for the ReLU's mask when relu
    W* grad_weight, W* grad_bias,
    i64 N, i64 C, i64 S, i64 dy_stride_n, i64 dy_stride_c, i64 x_stride_n, i64 x_stride_c,
    i64 dx_stride_n, i64 dx_stride_c, A inv_count,
    i64 s_blocks, i64 total_tiles, int rows, int block_s, int training, int need_input_grad, int relu) {
    if constexpr (GROUPED) {
        group_single_pass_backward<T, W, A, VEC, FUSED>(dy, x, dx, mean_in, invstd_in, weight, bias, grad_weight,
                                                        grad_bias, N, C, S, dy_stride_n, dy_stride_c, x_stride_n,
                                                        x_stride_c, dx_stride_n, dx_stride_c, inv_count, block_s,
                                                        training, need_input_grad, relu);
        return;
    }
    __shared__ A totals[2];
    i64 c = blockIdx.x;
    const T* dyc = dy + c * dy_stride_c;
    const T* xc = x + c * x_stride_c;
    A mean = mean_in[c], invstd = invstd_in[c];
    A sum_dy = A(0), sum_dy_xmu = A(0);
    Tiles t = program_tiles(N, S, s_blocks, total_tiles, total_tiles, rows, block_s);
    ReluMask<A> mask = relu_mask(c, relu, mean, invstd_in, weight, bias);
    block_gradient_sums<T, A, VEC, FUSED>(t, i64(0), total_tiles, dyc, xc, dy_stride_n, x_stride_n, mean, mask, sum_dy,
                                   sum_dy_xmu);
    if (threadIdx.x == 0) {
        store_gradients(c, sum_dy, sum_dy_xmu, invstd, grad_weight, grad_bias);
        totals[0] = sum_dy;
        totals[1] = sum_dy_xmu;
    }
    __syncthreads();
    if (!need_input_grad) return;
    A mean_x, scale, mean_dy, projection;
    dx_coefficients(c, mean, invstd, weight, totals[0], totals[1], inv_count, training, mean_x, scale, mean_dy, projection);
    input_gradient_tiles<VEC, FUSED>(t, i64(0), total_tiles, dyc, xc, dx + c * dx_stride_c, dy_stride_n, x_stride_n,
                                     dx_stride_n, mean_x, scale, mean_dy, projection, training, mask);
}

template <typename T, typename W, typename A, int VEC, bool FUSED>
__global__ void single_pass_backward_channels_last(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,   // (M, C); dx when need_input_grad
    const A* mean_in, const A* invstd_in, const W* weight,
    const W* bias,   // read for the ReLU's mask when relu
    W* grad_weight, W* grad_bias,
    i64 M, i64 C, i64 dy_stride_m, i64 x_stride_m, i64 dx_stride_m, A inv_count, int training, int need_input_grad,
    int relu) {
    __shared__ A totals[2][CL_MAX_CHANNELS];
    const i64 c0 = first_channel<VEC>();
    const bool active = c0 < C;
    Values<A, VEC> mean = zeros<A, VEC>(), invstd = zeros<A, VEC>();
    if (active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) { mean.v[k] = mean_in[c0 + k]; invstd.v[k] = invstd_in[c0 + k]; }
    }
    const Values<ReluMask<A>, VEC> masks = relu_masks<VEC>(c0, relu && active, mean, invstd_in, weight, bias);
    Values<A, VEC> sum_dy = zeros<A, VEC>(), sum_dy_xmu = zeros<A, VEC>();
    if (active)
        column_gradient_sums<VEC, FUSED>(dy, x, dy_stride_m, x_stride_m, c0, mean, masks, i64(0), M, sum_dy,
                                         sum_dy_xmu);
    column_sums_tree(sum_dy, sum_dy_xmu);
    if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            store_gradients(c0 + k, sum_dy.v[k], sum_dy_xmu.v[k], invstd.v[k], grad_weight, grad_bias);
            totals[0][threadIdx.x * VEC + k] = sum_dy.v[k];
            totals[1][threadIdx.x * VEC + k] = sum_dy_xmu.v[k];
        }
    }
    __syncthreads();
    if (!need_input_grad || !active) return;
    column_input_gradient_slots<VEC, FUSED, false>(dy, x, dx, dy_stride_m, x_stride_m, dx_stride_m, c0, c0, mean, invstd,
                                                   weight, totals[0], totals[1], inv_count, training, masks, M);
}

// ---- one read on chip: a cooperative grid holds the input in shared memory (see on_chip.cuh) ------
// Launched cooperatively with the dynamic shared memory of the held slice; grid (C, splits)
// channels-first, (splits, channel blocks) channels-last, as the split reductions, with splits > 1
// (the exchange). Training only.

// WALK: a persistent grid of blocks that walk whole channel groups (walk.cuh): no exchange (the
// partials null), counters the batch's ticket alone, held_rows the buffers, rows the group's channels,
// block_s its run's places x 16 bytes; grid (blocks,).
template <typename T, typename W, typename R, typename A, int VEC, bool FUSED, bool WALK>
__global__ void __launch_bounds__(CL_THREADS, 2) on_chip_forward_channels_first(
    const T* __restrict__ x, T* __restrict__ y,   // (N, C, S), each with its own strides
    const T* __restrict__ residual,   // (N, C, S) with y's strides, or null
    A* part_count, A* part_mean, A* part_m2,   // (splits, C); part_mean is relative to x[0, c, 0]
    A* mean_out, A* invstd_out, R* running_mean, R* running_var,   // see store_statistics: split 0 writes them
    i64* num_batches_tracked,   // read when cumulative; incremented when count_batch_here
    int* counters,   // (C + 1,) int32 zeros, left at zero: a barrier per channel, then the batch's ticket
    const W* weight, const W* bias,   // (C,) or null
    i64 N, i64 C, i64 S, i64 x_stride_n, i64 x_stride_c, i64 y_stride_n, i64 y_stride_c, double momentum, double eps,
    i64 s_blocks, i64 held_rows, int rows, int block_s, int has_running_stats, int cumulative, int count_batch_here,
    int relu) {
    if constexpr (WALK) {
        walk_forward<T, W, R, A, VEC, FUSED>(x, y, residual, mean_out, invstd_out, running_mean, running_var,
                                             num_batches_tracked, counters, weight, bias, N, C, S, x_stride_n,
                                             x_stride_c, y_stride_n, y_stride_c, momentum, eps, (int)held_rows, rows,
                                             block_s, has_running_stats, cumulative, count_batch_here, relu);
        return;
    }
    __shared__ A channel[2];
    T* held = held_memory<T>();   // (held_rows, S)
    const i64 c = blockIdx.x, split = blockIdx.y, n0 = split * held_rows;
    const T* xc = x + c * x_stride_c;
    const A shift = finite_shift(cvt<A>(xc[0]));
    const Tiles t = held_tiles(min(held_rows, N - n0), S, s_blocks, rows, block_s);
    RunningMoments<A> moments = no_moments<A>();
    Holding<MomentsRow<T, A>, T> op = {{xc + n0 * x_stride_n, x_stride_n, shift, &moments}, held, nullptr, S};
    for_each_group<VEC, false>(t, t.first, t.last, op);
    const Moments<A> m = block_merge(moments.merged);
    if (threadIdx.x == 0) {
        const i64 out = split * C + c;
        part_count[out] = m.count; part_mean[out] = m.mean; part_m2[out] = m.m2;
    }
    wait_for_group(counters, c, gridDim.y);
    const Moments<A> merged = merged_rows(part_count, part_mean, part_m2, (i64)gridDim.y, C, c);
    leave_group(counters, c, gridDim.y);
    if (threadIdx.x == 0) {
        channel[0] = shift + merged.mean;
        channel[1] = split == 0 ? store_statistics(c, merged.count, channel[0], merged.m2, mean_out, invstd_out,
                                                   running_mean, running_var, num_batches_tracked, momentum, eps,
                                                   has_running_stats, cumulative)
                                : batch_invstd(merged.count, merged.m2, eps);
    }
    __syncthreads();
    A scale, bias_c;
    affine_from(c, channel[1], weight, bias, scale, bias_c);
    const i64 y_offset = c * y_stride_c + n0 * y_stride_n;
    NormalizeRow<T, A, FUSED, true> normalize = {held, y + y_offset, residual ? residual + y_offset : nullptr, S,
                                                 y_stride_n, channel[0], scale, bias_c, relu};
    for_each_group<VEC, false>(t, t.first, t.last, normalize);
    if (count_batch_here) count_batch_after_every_read(num_batches_tracked, counters + C, cumulative);
}

template <typename T, typename W, typename R, typename A, int VEC, bool FUSED>
__global__ void on_chip_forward_channels_last(
    const T* __restrict__ x, T* __restrict__ y,   // (M, C), each with its own row stride
    const T* __restrict__ residual,   // (M, C) with y's row stride, or null
    A* part_count, A* part_mean, A* part_m2,   // (splits, C); part_mean is relative to x[0, c]
    A* mean_out, A* invstd_out, R* running_mean, R* running_var, i64* num_batches_tracked,
    int* counters,   // (channel blocks + 1,) int32 zeros, left at zero: a barrier per channel block, the ticket
    const W* weight, const W* bias,
    i64 M, i64 C, i64 x_stride_m, i64 y_stride_m, double momentum, double eps, i64 held_rows,
    int has_running_stats, int cumulative, int count_batch_here, int relu) {
    __shared__ A channel_mean[CL_MAX_CHANNELS], channel_invstd[CL_MAX_CHANNELS];
    T* held = held_memory<T>();   // (held_rows, blockDim.x * VEC)
    const i64 c0 = first_channel<VEC>(), local = threadIdx.x * VEC, width = blockDim.x * VEC;
    const bool active = c0 < C;
    const i64 m0 = (i64)blockIdx.x * held_rows, rows = min(held_rows, M - m0);
    const Values<A, VEC> shift = first_row<VEC, T, A>(x, c0, active);
    ColumnMoments<A, VEC> moments = no_column_moments<A, VEC>();
    if (active) {
        hold_columns<VEC>(x + m0 * x_stride_m + c0, x_stride_m, rows, held + local, width);
        moments = column_moments<VEC>(held, width, local, shift, i64(0), rows);
    }
    column_merge_tree(moments);
    if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const i64 out = (i64)blockIdx.x * C + c0 + k;
            part_count[out] = moments.count; part_mean[out] = moments.mean.v[k]; part_m2[out] = moments.m2.v[k];
        }
    }
    wait_for_group(counters, blockIdx.y, gridDim.x);
    Values<A, VEC> count, mean, m2;
    merged_columns<VEC>(part_count, part_mean, part_m2, (i64)gridDim.x, C, c0, count, mean, m2);
    leave_group(counters, blockIdx.y, gridDim.x);
    if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const int slot = threadIdx.x * VEC + k;
            channel_mean[slot] = shift.v[k] + mean.v[k];
            channel_invstd[slot] = blockIdx.x == 0
                ? store_statistics(c0 + k, count.v[k], channel_mean[slot], m2.v[k], mean_out, invstd_out, running_mean,
                                   running_var, num_batches_tracked, momentum, eps, has_running_stats, cumulative)
                : batch_invstd(count.v[k], m2.v[k], eps);
        }
    }
    __syncthreads();
    if (active) {
        const i64 y_offset = m0 * y_stride_m + c0 - local;   // the block's first row and channel
        column_normalize_slots<VEC, FUSED>(held, y + y_offset, residual ? residual + y_offset : nullptr, width,
                                           y_stride_m, local, c0, channel_mean, channel_invstd, weight, bias, relu,
                                           rows);
    }
    if (count_batch_here) count_batch_after_every_read(num_batches_tracked, counters + gridDim.y, cumulative);
}

// WALK: as the forward's, with buffers of dy's and x's slices (the partials and counters null).
template <typename T, typename W, typename A, int VEC, bool FUSED, bool WALK>
__global__ void on_chip_backward_channels_first(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,   // (N, C, S); dx when need_input_grad
    const A* mean_in, const A* invstd_in, const W* weight,
    const W* bias,   // read for the ReLU's mask when relu
    W* grad_weight, W* grad_bias,   // split 0 writes them
    A* part_sum_dy, A* part_sum_dy_xmu,   // (splits, C)
    int* counters,   // (C,) int32 zeros, left at zero: a barrier per channel
    i64 N, i64 C, i64 S, i64 dy_stride_n, i64 dy_stride_c, i64 x_stride_n, i64 x_stride_c,
    i64 dx_stride_n, i64 dx_stride_c, A inv_count,
    i64 s_blocks, i64 held_rows, int rows, int block_s, int need_input_grad, int relu) {
    if constexpr (WALK) {
        walk_backward<T, W, A, VEC, FUSED>(dy, x, dx, mean_in, invstd_in, weight, bias, grad_weight, grad_bias, N, C,
                                           S, dy_stride_n, dy_stride_c, x_stride_n, x_stride_c, dx_stride_n,
                                           dx_stride_c, inv_count, (int)held_rows, rows, block_s, need_input_grad,
                                           relu);
        return;
    }
    __shared__ A totals[2];
    T* held_dy = held_memory<T>();   // (held_rows, S) each
    T* held_x = held_dy + held_rows * S;
    const i64 c = blockIdx.x, split = blockIdx.y, n0 = split * held_rows;
    const A mean = mean_in[c], invstd = invstd_in[c];
    const Tiles t = held_tiles(min(held_rows, N - n0), S, s_blocks, rows, block_s);
    const ReluMask<A> mask = relu_mask(c, relu, mean, invstd_in, weight, bias);
    A sum_dy = A(0), sum_dy_xmu = A(0);
    Holding<GradientSumsRow<T, A, FUSED>, T> op = {
        {dy + c * dy_stride_c + n0 * dy_stride_n, x + c * x_stride_c + n0 * x_stride_n, dy_stride_n, x_stride_n, mean,
         &sum_dy, &sum_dy_xmu, mask}, held_dy, held_x, S};
    for_each_group<VEC, false>(t, t.first, t.last, op);
    sum_dy = block_sum<A, 0>(sum_dy);
    sum_dy_xmu = block_sum<A, 1>(sum_dy_xmu);
    if (threadIdx.x == 0) {
        part_sum_dy[split * C + c] = sum_dy;
        part_sum_dy_xmu[split * C + c] = sum_dy_xmu;
    }
    wait_for_group(counters, c, gridDim.y);
    A total_dy, total_dy_xmu;
    summed_rows(part_sum_dy, part_sum_dy_xmu, (i64)gridDim.y, C, c, total_dy, total_dy_xmu);
    leave_group(counters, c, gridDim.y);
    if (threadIdx.x == 0) {
        if (split == 0) store_gradients(c, total_dy, total_dy_xmu, invstd, grad_weight, grad_bias);
        totals[0] = total_dy;
        totals[1] = total_dy_xmu;
    }
    __syncthreads();
    if (!need_input_grad) return;
    A mean_x, scale, mean_dy, projection;
    dx_coefficients(c, mean, invstd, weight, totals[0], totals[1], inv_count, 1, mean_x, scale, mean_dy, projection);
    input_gradient_tiles<VEC, FUSED>(t, t.first, t.last, held_dy, held_x, dx + c * dx_stride_c + n0 * dx_stride_n, S,
                                     S, dx_stride_n, mean_x, scale, mean_dy, projection, 1, mask);
}

template <typename T, typename W, typename A, int VEC, bool FUSED>
__global__ void on_chip_backward_channels_last(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,   // (M, C); dx when need_input_grad
    const A* mean_in, const A* invstd_in, const W* weight,
    const W* bias,   // read for the ReLU's mask when relu
    W* grad_weight, W* grad_bias,   // split 0 writes them
    A* part_sum_dy, A* part_sum_dy_xmu,   // (splits, C)
    int* counters,   // (channel blocks,) int32 zeros, left at zero: a barrier per channel block
    i64 M, i64 C, i64 dy_stride_m, i64 x_stride_m, i64 dx_stride_m, A inv_count, i64 held_rows, int need_input_grad,
    int relu) {
    __shared__ A totals[2][CL_MAX_CHANNELS];
    const i64 c0 = first_channel<VEC>(), local = threadIdx.x * VEC, width = blockDim.x * VEC;
    T* held_dy = held_memory<T>();   // (held_rows, width) each
    T* held_x = held_dy + held_rows * width;
    const bool active = c0 < C;
    const i64 m0 = (i64)blockIdx.x * held_rows, rows = min(held_rows, M - m0);
    Values<A, VEC> mean = zeros<A, VEC>(), invstd = zeros<A, VEC>();
    if (active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) { mean.v[k] = mean_in[c0 + k]; invstd.v[k] = invstd_in[c0 + k]; }
    }
    const Values<ReluMask<A>, VEC> masks = relu_masks<VEC>(c0, relu && active, mean, invstd_in, weight, bias);
    Values<A, VEC> sum_dy = zeros<A, VEC>(), sum_dy_xmu = zeros<A, VEC>();
    if (active) {
        hold_columns<VEC>(dy + m0 * dy_stride_m + c0, dy_stride_m, rows, held_dy + local, width);
        hold_columns<VEC>(x + m0 * x_stride_m + c0, x_stride_m, rows, held_x + local, width);
        column_gradient_sums<VEC, FUSED>(held_dy, held_x, width, width, local, mean, masks, i64(0), rows, sum_dy,
                                         sum_dy_xmu);
    }
    column_sums_tree(sum_dy, sum_dy_xmu);
    if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            part_sum_dy[(i64)blockIdx.x * C + c0 + k] = sum_dy.v[k];
            part_sum_dy_xmu[(i64)blockIdx.x * C + c0 + k] = sum_dy_xmu.v[k];
        }
    }
    wait_for_group(counters, blockIdx.y, gridDim.x);
    summed_columns<VEC>(part_sum_dy, part_sum_dy_xmu, (i64)gridDim.x, C, c0, sum_dy, sum_dy_xmu);
    leave_group(counters, blockIdx.y, gridDim.x);
    if (threadIdx.y == 0 && active) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (blockIdx.x == 0) store_gradients(c0 + k, sum_dy.v[k], sum_dy_xmu.v[k], invstd.v[k], grad_weight, grad_bias);
            totals[0][threadIdx.x * VEC + k] = sum_dy.v[k];
            totals[1][threadIdx.x * VEC + k] = sum_dy_xmu.v[k];
        }
    }
    __syncthreads();
    if (!need_input_grad || !active) return;
    column_input_gradient_slots<VEC, FUSED, true>(held_dy, held_x, dx + m0 * dx_stride_m + c0 - local, width, width,
                                                  dx_stride_m, local, c0, mean, invstd, weight, totals[0], totals[1],
                                                  inv_count, 1, masks, rows);
}
