// Finalize: merging the partials of the split reductions into mean, invstd, running statistics,
// dweight and dbias -- separately, or by the last blocks of the reduction itself (FINALIZE).
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
#pragma once
#include "channel_groups.cuh"

// ---- finalize: merging the partials of the split reductions -------------------------------------
// The separate finalize kernels (one 1-D block per channel) and the fused finalize of channels-first
// reductions (the last 1-D blocks to finish) merge one channel at a time with block-wide sums; the
// fused finalize of channels-last reductions merges the VEC channels of each column of its block at
// once, with the column trees. Partials are read with __ldcg (L2): in a fused finalize other blocks
// of the same launch wrote them, and L1 is not coherent with their stores.

// (count, mean less the channel's shift, M2) of channel c from `rows` rows of (.., C) partials,
// valid in thread 0 of a 1-D block. Chan's formula for many partials: M2 = sum(m2_i + n_i *
// (mean_i - mean)^2), the partial means relative to one shift per channel, so they stay small and
// exact when |mean| >> std.
template <typename A>
__device__ Moments<A> merged_rows(const A* part_count, const A* part_mean, const A* part_m2, i64 rows, i64 C, i64 c) {
    __shared__ A mean_of;
    A count = A(0), weighted = A(0);
    if (c < C)
        for (i64 i = threadIdx.x; i < rows; i += blockDim.x) {
            A n = __ldcg(part_count + i * C + c);
            count += n;
            weighted += n * __ldcg(part_mean + i * C + c);
        }
    count = block_sum<A, 0>(count);
    weighted = block_sum<A, 1>(weighted);
    if (threadIdx.x == 0) mean_of = count > A(0) ? weighted / count : A(0);
    __syncthreads();
    A mean_shifted = mean_of;
    A m2 = A(0);
    if (c < C)
        for (i64 i = threadIdx.x; i < rows; i += blockDim.x) {
            A delta = __ldcg(part_mean + i * C + c) - mean_shifted;
            m2 += __ldcg(part_m2 + i * C + c) + __ldcg(part_count + i * C + c) * delta * delta;
        }
    m2 = block_sum<A, 2>(m2);
    Moments<A> m = {count, mean_shifted, m2};
    return m;
}

// The column sums of two (rows, C) matrices of partial sums for channel c, valid in thread 0 of a 1-D block.
template <typename A>
__device__ void summed_rows(const A* first, const A* second, i64 rows, i64 C, i64 c, A& a, A& b) {
    a = A(0); b = A(0);
    if (c < C)
        for (i64 i = threadIdx.x; i < rows; i += blockDim.x) {
            a += __ldcg(first + i * C + c);
            b += __ldcg(second + i * C + c);
        }
    a = block_sum<A, 0>(a);
    b = block_sum<A, 1>(b);
}

// merged_rows for the VEC channels c0.. of a channels-last thread at once, its column's row threads
// sharing the rows: (count, mean less the shift, M2) per channel, valid where threadIdx.y == 0. (One
// channel at a time, with a chain of sums in the first row of threads, the last block of a bf16
// reduction merged 8 channels x 3 chains of 31 sums at each level.)
template <int VEC, typename A>
__device__ void merged_columns(const A* part_count, const A* part_mean, const A* part_m2, i64 rows, i64 C, i64 c0,
                               Values<A, VEC>& count, Values<A, VEC>& mean, Values<A, VEC>& m2) {
    __shared__ A mean_of[VEC][CL_MAX_CHANNELS / VEC];   // by threadIdx.x: block_c / VEC channel threads
    const bool active = c0 < C;  // all VEC channels or none (see the channels-last kernels)
    Values<A, VEC> weighted = zeros<A, VEC>();
    count = zeros<A, VEC>();
    if (active)
        for (i64 i = threadIdx.y; i < rows; i += blockDim.y) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                A n = __ldcg(part_count + i * C + c0 + k);
                count.v[k] += n;
                weighted.v[k] += n * __ldcg(part_mean + i * C + c0 + k);
            }
        }
    column_sums_tree(count, weighted);
    if (threadIdx.y == 0) {
#pragma unroll
        for (int k = 0; k < VEC; ++k)
            mean_of[k][threadIdx.x] = count.v[k] > A(0) ? weighted.v[k] / count.v[k] : A(0);
    }
    __syncthreads();
    Values<A, VEC> unused = zeros<A, VEC>();
    m2 = zeros<A, VEC>();
#pragma unroll
    for (int k = 0; k < VEC; ++k) mean.v[k] = mean_of[k][threadIdx.x];
    if (active)
        for (i64 i = threadIdx.y; i < rows; i += blockDim.y) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                A delta = __ldcg(part_mean + i * C + c0 + k) - mean.v[k];
                m2.v[k] += __ldcg(part_m2 + i * C + c0 + k) + __ldcg(part_count + i * C + c0 + k) * delta * delta;
            }
        }
    column_sums_tree(m2, unused);
}

// summed_rows for the VEC channels c0.. of a channels-last thread at once, valid where threadIdx.y == 0.
template <int VEC, typename A>
__device__ void summed_columns(const A* first, const A* second, i64 rows, i64 C, i64 c0, Values<A, VEC>& a,
                               Values<A, VEC>& b) {
    a = zeros<A, VEC>(); b = zeros<A, VEC>();
    if (c0 < C)
        for (i64 i = threadIdx.y; i < rows; i += blockDim.y) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                a.v[k] += __ldcg(first + i * C + c0 + k);
                b.v[k] += __ldcg(second + i * C + c0 + k);
            }
        }
    column_sums_tree(a, b);
}

// One level of the fused finalize for this thread's channels c0 .. c0 + channels - 1: COLUMNS, a
// channels-last block, its column's VEC channels at once; else a 1-D block, one channel at a time.
// Valid where leads<COLUMNS>().
template <bool COLUMNS> __device__ __forceinline__ bool leads() { return COLUMNS ? threadIdx.y == 0 : threadIdx.x == 0; }

template <bool COLUMNS, int VEC, typename A>
__device__ __forceinline__ void level_moments(const A* part_count, const A* part_mean, const A* part_m2, i64 rows,
                                              i64 C, i64 c0, int channels, Values<A, VEC>& count,
                                              Values<A, VEC>& mean, Values<A, VEC>& m2) {
    if constexpr (COLUMNS) {
        merged_columns<VEC>(part_count, part_mean, part_m2, rows, C, c0, count, mean, m2);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (k >= channels) break;
            const Moments<A> m = merged_rows(part_count, part_mean, part_m2, rows, C, c0 + k);
            count.v[k] = m.count; mean.v[k] = m.mean; m2.v[k] = m.m2;
        }
    }
}

template <bool COLUMNS, int VEC, typename A>
__device__ __forceinline__ void level_sums(const A* first, const A* second, i64 rows, i64 C, i64 c0, int channels,
                                           Values<A, VEC>& a, Values<A, VEC>& b) {
    if constexpr (COLUMNS) {
        summed_columns<VEC>(first, second, rows, C, c0, a, b);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (k >= channels) break;
            summed_rows(first, second, rows, C, c0 + k, a.v[k], b.v[k]);
        }
    }
}

// 1 / sqrt(biased variance + eps) of a channel's merged moments.
template <typename A> __device__ __forceinline__ A batch_invstd(A count, A m2, double eps) {
    return inv_sqrt(m2 / count + A(eps));
}

// Writes channel c's mean and invstd and updates its running statistics; returns invstd.
template <typename A, typename R>
__device__ A store_statistics(
    i64 c, A count, A mean, A m2,
    A* mean_out, A* invstd_out,   // (C,) saved for the backward
    R* running_mean, R* running_var,   // (C,) updated in place when has_running_stats
    const i64* num_batches_tracked,   // batches before this one, read when cumulative
    double momentum, double eps, int has_running_stats, int cumulative) {
    A invstd = batch_invstd(count, m2, eps);
    mean_out[c] = mean;
    invstd_out[c] = invstd;
    if (has_running_stats) {
        A factor = cumulative ? A(1) / (A(num_batches_tracked[0]) + A(1)) : A(momentum);
        A unbiased = m2 / (count - A(1));
        running_mean[c] = cvt<R>((A(1) - factor) * cvt<A>(running_mean[c]) + factor * mean);
        running_var[c] = cvt<R>((A(1) - factor) * cvt<A>(running_var[c]) + factor * unbiased);
    }
    return invstd;
}

template <typename A, typename W>
__device__ __forceinline__ void store_gradients(i64 c, A sum_dy, A sum_dy_xmu, A invstd, W* grad_weight, W* grad_bias) {
    grad_weight[c] = cvt<W>(sum_dy_xmu * invstd);
    grad_bias[c] = cvt<W>(sum_dy);
}

// ---- the fused finalize: the last blocks of a split reduction merge its partials -----------------
// As kernels/finalize.py, on the same counters and rows (bn_gpu/backends/plan.py): the group_splits blocks of
// a split group of one channel group (a channel channels-first, the channels of a block
// channels-last) count themselves done on a counter of their own, and the last of them merges
// the group's rows into row splits + group of the partials; the last group to finish merges those
// split_groups rows into the result. Two levels of about sqrt(splits) rows, so that no block merges
// 500 splits alone; fixed orders of summation, so the same bits whichever block is last. Each
// counter is set back to zero by the block that took its last ticket: ready for the next launch and
// for a CUDA-graph replay.

struct SplitGroup {
    i64 group, first, rows;   // this block's split group: its index, first row, rows (the last may be short)
    i64 split_groups;         // rows of the second level
    i64 level_1, level_2;     // the counters of the group and of the channel group
};

__device__ __forceinline__ SplitGroup split_group(i64 split, i64 group_index, i64 groups, i64 splits, i64 group_splits) {
    SplitGroup s;
    s.split_groups = (splits + group_splits - 1) / group_splits;
    s.group = split / group_splits;
    s.first = s.group * group_splits;
    s.rows = min(group_splits, splits - s.first);
    s.level_1 = group_index * s.split_groups + s.group;
    s.level_2 = groups * s.split_groups + group_index;
    return s;
}

// Whether this block is the last of `members` blocks to count itself done on counters[index] (the
// last resets it). The stores every thread made before the call are visible to the last block's
// loads after it: each thread fences, the barrier puts the fences before thread 0's atomic, and the
// last block's thread 0 fences again before the barrier that releases its threads (the CUDA
// samples' threadFenceReduction).
__device__ bool last_block_of(int* counters, i64 index, i64 members) {
    __shared__ int last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        last = atomicAdd(counters + index, 1) == members - 1;
        if (last) {
            counters[index] = 0;
            __threadfence();
        }
    }
    __syncthreads();
    return last;
}

// Called by every block of the statistics kernel after storing its partials (row `split`); this
// thread's channels are c0 .. c0 + channels - 1 (channels-first: 1; a channel group: its channels),
// their shifts in `shift`. COLUMNS: a channels-last block, whose columns of row threads each merge
// their VEC channels at once (merged_columns); else a 1-D block, one channel at a time.
template <bool COLUMNS, int VEC, typename A, typename R>
__device__ __forceinline__ void finalize_statistics_of_group(
    A* part_count, A* part_mean, A* part_m2,   // (splits + split groups, C)
    int* counters,   // (groups * (split groups + 1),) int32 zeros
    i64 c0, const Values<A, VEC>& shift, i64 split, i64 group_index, i64 groups, i64 splits, i64 group_splits, i64 C,
    A* mean_out, A* invstd_out, R* running_mean, R* running_var, const i64* num_batches_tracked,   // see store_statistics
    double momentum, double eps, int has_running_stats, int cumulative,
    int channels = VEC) {   // of the thread (channels-last) or block (channel groups): c0 .. c0 + channels - 1
    SplitGroup s = split_group(split, group_index, groups, splits, group_splits);
    if (!last_block_of(counters, s.level_1, s.rows)) return;
    Values<A, VEC> count, mean, m2;
    level_moments<COLUMNS, VEC>(part_count + s.first * C, part_mean + s.first * C, part_m2 + s.first * C, s.rows, C,
                                c0, channels, count, mean, m2);
    if (leads<COLUMNS>()) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (k >= channels || c0 + k >= C) break;
            i64 out = (splits + s.group) * C + c0 + k;
            part_count[out] = count.v[k]; part_mean[out] = mean.v[k]; part_m2[out] = m2.v[k];
        }
    }
    if (!last_block_of(counters, s.level_2, s.split_groups)) return;
    level_moments<COLUMNS, VEC>(part_count + splits * C, part_mean + splits * C, part_m2 + splits * C, s.split_groups,
                                C, c0, channels, count, mean, m2);
    if (leads<COLUMNS>()) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (k >= channels || c0 + k >= C) break;
            store_statistics(c0 + k, count.v[k], shift.v[k] + mean.v[k], m2.v[k], mean_out, invstd_out, running_mean,
                             running_var, num_batches_tracked, momentum, eps, has_running_stats, cumulative);
        }
    }
}

// Called by every block of the gradient-sums kernel after storing its partial sums (row `split`);
// this thread's channels are c0 .. c0 + VEC - 1.
template <bool COLUMNS, int VEC, typename A, typename W>
__device__ __forceinline__ void finalize_gradients_of_group(
    A* part_sum_dy, A* part_sum_dy_xmu,   // (splits + split groups, C)
    int* counters,   // (groups * (split groups + 1),) int32 zeros
    i64 c0, i64 split, i64 group_index, i64 groups, i64 splits, i64 group_splits, i64 C,
    const A* invstd_in, A* sum_dy_out, A* sum_dy_xmu_out, W* grad_weight, W* grad_bias,   // see finalize_gradients
    int channels = VEC) {   // as in finalize_statistics_of_group
    SplitGroup s = split_group(split, group_index, groups, splits, group_splits);
    if (!last_block_of(counters, s.level_1, s.rows)) return;
    Values<A, VEC> sum_dy, sum_dy_xmu;
    level_sums<COLUMNS, VEC>(part_sum_dy + s.first * C, part_sum_dy_xmu + s.first * C, s.rows, C, c0, channels, sum_dy,
                             sum_dy_xmu);
    if (leads<COLUMNS>()) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (k >= channels || c0 + k >= C) break;
            i64 out = (splits + s.group) * C + c0 + k;
            part_sum_dy[out] = sum_dy.v[k];
            part_sum_dy_xmu[out] = sum_dy_xmu.v[k];
        }
    }
    if (!last_block_of(counters, s.level_2, s.split_groups)) return;
    level_sums<COLUMNS, VEC>(part_sum_dy + splits * C, part_sum_dy_xmu + splits * C, s.split_groups, C, c0, channels,
                             sum_dy, sum_dy_xmu);
    if (leads<COLUMNS>()) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            if (k >= channels || c0 + k >= C) break;
            const i64 c = c0 + k;
            sum_dy_out[c] = sum_dy.v[k];
            sum_dy_xmu_out[c] = sum_dy_xmu.v[k];
            store_gradients(c, sum_dy.v[k], sum_dy_xmu.v[k], invstd_in[c], grad_weight, grad_bias);
        }
    }
}
