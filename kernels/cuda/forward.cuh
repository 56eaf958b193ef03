// Forward helpers: a group's statistics, the per-channel affine, the epilogue and the normalize walks.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
#pragma once
#include "finalize.cuh"

// statistics_channels_first for a channel group (GROUPED; see "channel groups").
template <typename T, typename A, typename R, int VEC, bool FINALIZE>
__device__ __forceinline__ void group_statistics(
    const T* __restrict__ x, A* part_count, A* part_mean, A* part_m2, int* counters, A* mean_out, A* invstd_out,
    R* running_mean, R* running_var, const i64* num_batches_tracked, i64 N, i64 C, i64 S, i64 stride_n, i64 stride_c,
    i64 total_tiles, i64 tiles_per_program, int rows, int block_s, i64 group_splits, double momentum, double eps,
    int has_running_stats, int cumulative) {
    constexpr int WIDE = Wide<T>::values;
    const GroupPlace<WIDE> p = group_place<WIDE>(C, S, block_s);
    const T* xg = x + p.c0 * stride_c;
    const i64 first = (i64)blockIdx.y * tiles_per_program, last = min(first + tiles_per_program, total_tiles);
    const Values<A, WIDE> shift = place_shifts<WIDE, T, A>(xg, stride_c, p);
    const ColumnMoments<A, WIDE> moments = place_moments<VEC, WIDE>(xg, stride_n, p, shift, first * rows,
                                                                    min(last * rows, N));
    for (int j = 0; j < p.group; ++j) {
        __syncthreads();  // the previous channel's block_merge has read its shared memory
        const Moments<A> m = block_merge(channel_moments(moments, p, j));
        if (threadIdx.x == 0) {
            const i64 out = (i64)blockIdx.y * C + p.c0 + j;
            part_count[out] = m.count; part_mean[out] = m.mean; part_m2[out] = m.m2;
        }
    }
    if constexpr (FINALIZE)
        finalize_statistics_of_group<false, WIDE>(part_count, part_mean, part_m2, counters, p.c0,
                                                  channel_shifts<WIDE, T, A>(xg, stride_c, p.group), blockIdx.y,
                                                  blockIdx.x, gridDim.x, gridDim.y, group_splits, C, mean_out,
                                                  invstd_out, running_mean, running_var, num_batches_tracked, momentum,
                                                  eps, has_running_stats, cumulative, (int)p.group);
}

// Channel blockIdx.x's (count, mean, M2) from its (splits, C) partials, valid in thread 0 of a 1-D block.
// shift_stride: distance between the first values of consecutive channels.
template <typename T, typename A>
__device__ Moments<A> merged_partials(
    const A* part_count, const A* part_mean, const A* part_m2,   // (splits, C)
    const T* __restrict__ x, i64 shift_stride, i64 splits, i64 C) {
    i64 c = blockIdx.x;
    Moments<A> m = merged_rows(part_count, part_mean, part_m2, splits, C, c);
    if (threadIdx.x == 0) m.mean += finite_shift(cvt<A>(x[c * shift_stride]));
    return m;
}

// Per-channel (scale, bias) of y = (x - mean) * scale + bias from invstd.
template <typename W, typename A>
__device__ __forceinline__ void affine_from(i64 c, A invstd, const W* weight, const W* bias, A& scale, A& shift) {
    scale = weight ? invstd * cvt<A>(weight[c]) : invstd;
    shift = bias ? cvt<A>(bias[c]) : A(0);
}

// Per-channel (mean, scale, bias) of y = (x - mean) * scale + bias. In eval (from_running_stats)
// mean and invstd come from the running statistics and split 0 saves them for the backward.
template <typename W, typename R, typename A>
__device__ __forceinline__ void channel_affine(
    i64 c, bool first_split, const A* mean_in, const A* invstd_in, const R* running_mean, const R* running_var,
    A* saved_mean, A* saved_invstd, const W* weight, const W* bias, double eps, int from_running_stats,
    A& mean, A& scale, A& shift) {
    A invstd;
    if (from_running_stats) {
        mean = cvt<A>(running_mean[c]);
        invstd = inv_sqrt(cvt<A>(running_var[c]) + A(eps));
        if (first_split) { saved_mean[c] = mean; saved_invstd[c] = invstd; }
    } else {
        mean = mean_in[c];
        invstd = invstd_in[c];
    }
    affine_from(c, invstd, weight, bias, scale, shift);
}

__device__ __forceinline__ void count_batch(i64* num_batches_tracked, bool first) {
    if (num_batches_tracked && first) num_batches_tracked[0] += 1;
}

// num_batches_tracked += 1 in a single-pass forward (every thread of every block calls it, at its
// end). With a cumulative average every block reads the count (store_statistics) before it gets
// here, so the last block to get here counts the batch (last_block_of, on counters[0]); else block
// 0 does.
__device__ void count_batch_after_every_read(i64* num_batches_tracked, int* counters, int cumulative) {
    bool first_block = blockIdx.x == 0 && blockIdx.y == 0;
    bool counts = cumulative ? last_block_of(counters, 0, (i64)gridDim.x * gridDim.y) : first_block;
    if (threadIdx.x == 0 && threadIdx.y == 0) count_batch(num_batches_tracked, counts);
}

// y = (x - mean) * scale + shift on V values of one row.
// The epilogue: + residual (laid out as the output; null: none), then ReLU when relu. Fused, it
// costs the residual's read; as separate ops each would read and write the activation again.
template <typename A> __device__ __forceinline__ A epilogue(A value, A residual, int relu) {
    value += residual;
    return relu && value < A(0) ? A(0) : value;
}

template <typename T, int V> struct PackAndResidual { Pack<T, V> in, residual; };

template <typename T, typename A, bool FUSED, bool HELD = false> struct NormalizeRow {
    static constexpr bool BATCHED = true;
    const T* x; T* y; const T* residual; i64 x_stride_n, y_stride_n; A mean, scale, shift; int relu;
    // FUSED (a compile-time choice): with the epilogue; without it the code is the plain pass.
    // HELD: x is in shared memory (the on-chip kernels), read with plain loads: the read-only path
    // (ld.global.nc) reads global memory only.
    template <int V> using Loaded = PackAndResidual<T, V>;
    template <int V> __device__ __forceinline__ Loaded<V> load(i64 n, i64 s) const {
        Loaded<V> loaded;
        loaded.in = HELD ? load_pack<V>(x + n * x_stride_n + s) : load_pack_readonly<V>(x + n * x_stride_n + s);
        if constexpr (FUSED) {
#pragma unroll
            for (int k = 0; k < V; ++k) loaded.residual.v[k] = cvt<T>(A(0));
            if (residual) loaded.residual = load_pack_readonly<V>(residual + n * y_stride_n + s);
        }
        return loaded;
    }
    template <int V> __device__ __forceinline__ void use(const Loaded<V>& loaded, i64 n, i64 s) const {
        Pack<T, V> out;
        if constexpr (FUSED) {
#pragma unroll
            for (int k = 0; k < V; ++k)
                out.v[k] = cvt<T>(epilogue((cvt<A>(loaded.in.v[k]) - mean) * scale + shift,
                                           cvt<A>(loaded.residual.v[k]), relu));
        } else {
#pragma unroll
            for (int k = 0; k < V; ++k) out.v[k] = cvt<T>((cvt<A>(loaded.in.v[k]) - mean) * scale + shift);
        }
        store_group<V>(y + n * y_stride_n + s, out);
    }
    __device__ __forceinline__ void end_tile() const {}
};

// y = epilogue((x - mean) * scale + shift) at a thread's place, over its rows of [row_begin, row_end)
// from the last (a second pass: see column_normalize).
template <int VEC, int WIDE, bool FUSED, typename T, typename A>
__device__ __forceinline__ void place_normalize(const T* x, T* y, const T* residual, i64 x_stride_n, i64 y_stride_n,
                                                const GroupPlace<WIDE>& p, const Values<A, WIDE>& mean,
                                                const Values<A, WIDE>& scale, const Values<A, WIDE>& shift, int relu,
                                                i64 row_begin, i64 row_end) {
    const PlaceRows r = place_rows(p, row_begin, row_end);
    auto load = [&](i64 n, Pack<T, WIDE>& in, Pack<T, WIDE>& add) {
        in = read_place_readonly<VEC, WIDE>(x + n * x_stride_n + p.s);
        if constexpr (FUSED) {
#pragma unroll
            for (int k = 0; k < WIDE; ++k) add.v[k] = cvt<T>(A(0));
            if (residual) add = read_place_readonly<VEC, WIDE>(residual + n * y_stride_n + p.s);
        }
    };
    auto use = [&](i64 n, const Pack<T, WIDE>& in, const Pack<T, WIDE>& add) {
        Pack<T, WIDE> out;
        if constexpr (FUSED) {
#pragma unroll
            for (int k = 0; k < WIDE; ++k)
                out.v[k] = cvt<T>(epilogue((cvt<A>(in.v[k]) - mean.v[k]) * scale.v[k] + shift.v[k], cvt<A>(add.v[k]),
                                           relu));
        } else {
#pragma unroll
            for (int k = 0; k < WIDE; ++k) out.v[k] = cvt<T>((cvt<A>(in.v[k]) - mean.v[k]) * scale.v[k] + shift.v[k]);
        }
        write_place<VEC, WIDE>(y + n * y_stride_n + p.s, out);
    };
    i64 n = r.first + (r.count - 1) * r.step;
    i64 left = r.count;
    for (; left >= PLACE_BATCH; left -= PLACE_BATCH, n -= PLACE_BATCH * r.step) {
        Pack<T, WIDE> in[PLACE_BATCH], add[PLACE_BATCH];
#pragma unroll
        for (int b = 0; b < PLACE_BATCH; ++b) load(n - b * r.step, in[b], add[b]);
#pragma unroll
        for (int b = 0; b < PLACE_BATCH; ++b) use(n - b * r.step, in[b], add[b]);
    }
    for (; left > 0; --left, n -= r.step) {
        Pack<T, WIDE> in, add;
        load(n, in, add);
        use(n, in, add);
    }
}

// normalize_channels_first for a channel group (GROUPED).
template <typename T, typename W, typename R, typename A, int VEC, bool FUSED>
__device__ __forceinline__ void group_normalize(
    const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ residual, const A* mean_in, const A* invstd_in,
    const R* running_mean, const R* running_var, A* saved_mean, A* saved_invstd, const W* weight, const W* bias,
    i64* num_batches_tracked, i64 N, i64 C, i64 S, i64 x_stride_n, i64 x_stride_c, i64 y_stride_n, i64 y_stride_c,
    double eps, i64 total_tiles, i64 tiles_per_program, int rows, int block_s, int from_running_stats, int relu) {
    constexpr int WIDE = Wide<T>::values;
    const GroupPlace<WIDE> p = group_place<WIDE>(C, S, block_s);
    if (threadIdx.x == 0) count_batch(num_batches_tracked, blockIdx.x == 0 && blockIdx.y == 0);
    A unused_mean, unused_scale, unused_shift;
    if (blockIdx.y == 0 && threadIdx.x < p.group)  // eval: split 0 saves each channel's statistics once
        channel_affine(p.c0 + threadIdx.x, true, mean_in, invstd_in, running_mean, running_var, saved_mean,
                       saved_invstd, weight, bias, eps, from_running_stats, unused_mean, unused_scale, unused_shift);
    Values<A, WIDE> mean, scale, shift;
#pragma unroll
    for (int k = 0; k < WIDE; ++k)
        channel_affine(p.c0 + p.channel[k], false, mean_in, invstd_in, running_mean, running_var, saved_mean,
                       saved_invstd, weight, bias, eps, from_running_stats, mean.v[k], scale.v[k], shift.v[k]);
    const i64 first = (i64)blockIdx.y * tiles_per_program, last = min(first + tiles_per_program, total_tiles);
    place_normalize<VEC, WIDE, FUSED>(x + p.c0 * x_stride_c, y + p.c0 * y_stride_c,
                                      residual ? residual + p.c0 * y_stride_c : nullptr, x_stride_n, y_stride_n, p,
                                      mean, scale, shift, relu, first * rows, min(last * rows, N));
}

// y = epilogue((x - mean) * scale + shift) over this thread's rows [row_begin, row_end) of channels c0..,
// walked from the last: a second pass over what a reduction read first to last starts with what is
// still in L2 (the same for the dx pass and the channels-first tiles below).
template <int VEC, bool FUSED, typename T, typename A>
__device__ __forceinline__ void column_normalize(const T* x, T* y, const T* residual, i64 x_stride_m, i64 y_stride_m,
                                                 i64 c0, const Values<A, VEC>& mean, const Values<A, VEC>& scale,
                                                 const Values<A, VEC>& shift, int relu, i64 row_begin, i64 row_end) {
    // The thread's rows from its last (reversed): negative steps.
    const i64 rows = rows_from(row_begin + threadIdx.y, row_end), last = row_begin + threadIdx.y + (rows - 1) * blockDim.y;
    const i64 x_step = -(i64)blockDim.y * x_stride_m, y_step = -(i64)blockDim.y * y_stride_m;
    const T* x_row = x + last * x_stride_m + c0;
    const T* residual_row = residual ? residual + last * y_stride_m + c0 : nullptr;
    T* y_row = y + last * y_stride_m + c0;
    // Four rows' loads in flight a thread: a grid of few blocks (64x2048x7x7: 392, ~3 an SM) still
    // keeps 48 KB in flight per SM (24 KB unrolled by 2).
#pragma unroll 4
    for (i64 i = rows; i > 0; --i, x_row += x_step, y_row += y_step) {
        Pack<T, VEC> in = load_pack<VEC>(x_row);
        Values<A, VEC> value;
#pragma unroll
        for (int k = 0; k < VEC; ++k) value.v[k] = (cvt<A>(in.v[k]) - mean.v[k]) * scale.v[k] + shift.v[k];
        if constexpr (FUSED) {
            Values<A, VEC> add = zeros<A, VEC>();
            if (residual) {
                Pack<T, VEC> res = load_pack<VEC>(residual_row);
                residual_row += y_step;
#pragma unroll
                for (int k = 0; k < VEC; ++k) add.v[k] = cvt<A>(res.v[k]);
            }
#pragma unroll
            for (int k = 0; k < VEC; ++k) value.v[k] = epilogue(value.v[k], add.v[k], relu);
        }
        Pack<T, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) out.v[k] = cvt<T>(value.v[k]);
        store_pack<VEC>(y_row, out);
    }
}
