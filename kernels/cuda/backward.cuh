// Backward helpers: the ReLU's mask, the gradient sums and the input gradient walks.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
#pragma once
#include "forward.cuh"

// Adds V values of one row to a thread's sum(dy) and sum(dy * (x - mean)).
// dy through a ReLU that followed the BatchNorm (no residual), its mask recomputed from x as the
// forward computed the ReLU's input, (x - mean) * scale + shift, rather than read from memory.
template <typename A> struct ReluMask {
    int on; A mean, scale, shift;
    __device__ __forceinline__ A apply(A dy, A x) const {
        return on && (x - mean) * scale + shift <= A(0) ? A(0) : dy;  // a NaN input passes dy on, as torch's ReLU
    }
};

// The mask of channel c around the mean the caller's sums subtract: the same value, so that the
// compiler computes x - mean once a value for the mask and the sums (from a second load of the mean
// it computed it twice). The dx passes, whose mean is 0 in eval, load it here.
template <typename W, typename A>
__device__ __forceinline__ ReluMask<A> relu_mask(i64 c, int on, A mean, const A* invstd, const W* weight,
                                                const W* bias) {
    ReluMask<A> m = {on, mean, A(0), A(0)};
    if (on) affine_from(c, invstd[c], weight, bias, m.scale, m.shift);
    return m;
}

template <typename W, typename A>
__device__ __forceinline__ ReluMask<A> relu_mask(i64 c, int on, const A* mean, const A* invstd, const W* weight,
                                                const W* bias) {
    return relu_mask(c, on, on ? mean[c] : A(0), invstd, weight, bias);
}

template <typename T, int V> struct PackPair { Pack<T, V> g, in; };

template <typename T, typename A, bool FUSED> struct GradientSumsRow {
    static constexpr bool BATCHED = true;
    static constexpr int STREAMS = 2;   // dy, then x
    using Value = T;
    const T* dy; const T* x; i64 dy_stride_n, x_stride_n; A mean; A* sum_dy; A* sum_dy_xmu; ReluMask<A> relu;
    template <int V> using Loaded = PackPair<T, V>;
    template <int V> __device__ __forceinline__ Loaded<V> load(i64 n, i64 s) const {
        return {load_pack<V>(dy + n * dy_stride_n + s), load_pack<V>(x + n * x_stride_n + s)};
    }
    __device__ __forceinline__ void column(i64 n, i64 s, i64 step, const T* (&from)[2], i64 (&stride)[2]) const {
        from[0] = dy + n * dy_stride_n + s; stride[0] = step * dy_stride_n;
        from[1] = x + n * x_stride_n + s; stride[1] = step * x_stride_n;
    }
    template <int V> __device__ __forceinline__ Loaded<V> copied(const uint4* slot, int stride) const {
        return {copied_pack<V, T>(slot), copied_pack<V, T>(slot + stride)};
    }
    template <int V> __device__ __forceinline__ void use(const Loaded<V>& loaded, i64, i64) const {
        const Pack<T, V>& g = loaded.g;
        const Pack<T, V>& in = loaded.in;
        if constexpr (FUSED) {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                A d = relu.apply(cvt<A>(g.v[k]), cvt<A>(in.v[k]));
                *sum_dy += d;
                *sum_dy_xmu += d * (cvt<A>(in.v[k]) - mean);
            }
        } else {
#pragma unroll
            for (int k = 0; k < V; ++k) {
                A d = cvt<A>(g.v[k]);
                *sum_dy += d;
                *sum_dy_xmu += d * (cvt<A>(in.v[k]) - mean);
            }
        }
    }
    __device__ __forceinline__ void end_tile() const {}
};

// sum(dy) and sum(dy * (x - mean)) of one channel over tiles [first, last), valid in thread 0.
template <typename T, typename A, int VEC, bool FUSED>
__device__ void block_gradient_sums(const Tiles& t, i64 first, i64 last, const T* dyc, const T* xc,
                                    i64 dy_stride_n, i64 x_stride_n, A mean, const ReluMask<A>& relu, A& sum_dy,
                                    A& sum_dy_xmu) {
    GradientSumsRow<T, A, FUSED> op = {dyc, xc, dy_stride_n, x_stride_n, mean, &sum_dy, &sum_dy_xmu, relu};
    reduce_groups<VEC, STAGED_GROUPS / 2>(t, first, last, op);
    sum_dy = block_sum<A, 0>(sum_dy);
    sum_dy_xmu = block_sum<A, 1>(sum_dy_xmu);
}

// The ReLU masks of a thread's values (see relu_mask), by their channels: around the means the caller
// holds, or loaded.
template <int WIDE, typename W, typename A>
__device__ __forceinline__ Values<ReluMask<A>, WIDE> place_relu_masks(const GroupPlace<WIDE>& p, int on,
                                                                      const Values<A, WIDE>& mean, const A* invstd,
                                                                      const W* weight, const W* bias) {
    Values<ReluMask<A>, WIDE> masks;
#pragma unroll
    for (int k = 0; k < WIDE; ++k) masks.v[k] = relu_mask(p.c0 + p.channel[k], on, mean.v[k], invstd, weight, bias);
    return masks;
}

template <int WIDE, typename W, typename A>
__device__ __forceinline__ Values<ReluMask<A>, WIDE> place_relu_masks(const GroupPlace<WIDE>& p, int on,
                                                                      const A* mean, const A* invstd,
                                                                      const W* weight, const W* bias) {
    Values<ReluMask<A>, WIDE> masks;
#pragma unroll
    for (int k = 0; k < WIDE; ++k) masks.v[k] = relu_mask(p.c0 + p.channel[k], on, mean, invstd, weight, bias);
    return masks;
}

// This thread's share of sum(dy) and sum(dy * (x - mean)) at its place, over its rows of [row_begin, row_end).
template <int VEC, int WIDE, bool FUSED, typename T, typename A>
__device__ __forceinline__ void place_gradient_sums(const T* dy, const T* x, i64 dy_stride_n, i64 x_stride_n,
                                                    const GroupPlace<WIDE>& p, const Values<A, WIDE>& mean,
                                                    const Values<ReluMask<A>, WIDE>& relu, i64 row_begin, i64 row_end,
                                                    Values<A, WIDE>& sum_dy, Values<A, WIDE>& sum_dy_xmu) {
    const PlaceRows r = place_rows(p, row_begin, row_end);
    const T* dy_row = dy + r.first * dy_stride_n + p.s;
    const T* x_row = x + r.first * x_stride_n + p.s;
    const i64 dy_step = r.step * dy_stride_n, x_step = r.step * x_stride_n;
    auto add = [&](const Pack<T, WIDE>& g, const Pack<T, WIDE>& in) {
#pragma unroll
        for (int k = 0; k < WIDE; ++k) {
            A xv = cvt<A>(in.v[k]);
            A d = cvt<A>(g.v[k]);
            if constexpr (FUSED) d = relu.v[k].apply(d, xv);
            sum_dy.v[k] += d;
            sum_dy_xmu.v[k] += d * (xv - mean.v[k]);
        }
    };
    if constexpr (VEC == WIDE) {   // 16-byte places: copied ahead, as column_gradient_sums
        const T* from[2] = {dy_row, x_row};
        const i64 steps[2] = {dy_step, x_step};
        staged_rows<2, COLUMN_BATCH / 2>(from, steps, r.count, r.count, [&](const uint4* slot, int stride) {
            add(copied_pack<WIDE, T>(slot), copied_pack<WIDE, T>(slot + stride));
        }, [] {});
    } else {
#pragma unroll 2
        for (i64 i = r.count; i > 0; --i, dy_row += dy_step, x_row += x_step)
            add(read_place<VEC, WIDE>(dy_row), read_place<VEC, WIDE>(x_row));
    }
}

// Channel j's two sums over the block, valid in thread 0, for j = 0 .. group - 1 in turn.
template <int WIDE, typename A>
__device__ __forceinline__ void channel_sums(const Values<A, WIDE>& sum_dy, const Values<A, WIDE>& sum_dy_xmu,
                                             const GroupPlace<WIDE>& p, int j, A& total_dy, A& total_dy_xmu) {
    __syncthreads();  // the previous channel's block sums have read their shared memory
    total_dy = block_sum<A, 0>(channel_sum(sum_dy, p, j));
    total_dy_xmu = block_sum<A, 1>(channel_sum(sum_dy_xmu, p, j));
}

// gradient_sums_channels_first for a channel group (GROUPED).
template <typename T, typename W, typename A, int VEC, bool FUSED, bool FINALIZE>
__device__ __forceinline__ void group_gradient_sums(
    const T* __restrict__ dy, const T* __restrict__ x, const A* mean_in, const A* invstd_in, const W* weight,
    const W* bias, A* part_sum_dy, A* part_sum_dy_xmu, int* counters, A* sum_dy_out, A* sum_dy_xmu_out,
    W* grad_weight, W* grad_bias, i64 N, i64 C, i64 S, i64 dy_stride_n, i64 dy_stride_c, i64 x_stride_n,
    i64 x_stride_c, i64 total_tiles, i64 tiles_per_program, int rows, int block_s, i64 group_splits, int relu) {
    constexpr int WIDE = Wide<T>::values;
    const GroupPlace<WIDE> p = group_place<WIDE>(C, S, block_s);
    Values<A, WIDE> mean, sum_dy = zeros<A, WIDE>(), sum_dy_xmu = zeros<A, WIDE>();
#pragma unroll
    for (int k = 0; k < WIDE; ++k) mean.v[k] = mean_in[p.c0 + p.channel[k]];
    const i64 first = (i64)blockIdx.y * tiles_per_program, last = min(first + tiles_per_program, total_tiles);
    place_gradient_sums<VEC, WIDE, FUSED>(dy + p.c0 * dy_stride_c, x + p.c0 * x_stride_c, dy_stride_n, x_stride_n, p,
                                          mean, place_relu_masks(p, relu, mean, invstd_in, weight, bias),
                                          first * rows, min(last * rows, N), sum_dy, sum_dy_xmu);
    for (int j = 0; j < p.group; ++j) {
        A total_dy, total_dy_xmu;
        channel_sums(sum_dy, sum_dy_xmu, p, j, total_dy, total_dy_xmu);
        if (threadIdx.x == 0) {
            const i64 out = (i64)blockIdx.y * C + p.c0 + j;
            part_sum_dy[out] = total_dy;
            part_sum_dy_xmu[out] = total_dy_xmu;
        }
    }
    if constexpr (FINALIZE)
        finalize_gradients_of_group<false, WIDE>(part_sum_dy, part_sum_dy_xmu, counters, p.c0, blockIdx.y, blockIdx.x,
                                                 gridDim.x, gridDim.y, group_splits, C, invstd_in, sum_dy_out,
                                                 sum_dy_xmu_out, grad_weight, grad_bias, (int)p.group);
}

// The ReLU masks of channels c0.. (see relu_mask): around the means the caller holds, or loaded.
template <int VEC, typename W, typename A>
__device__ __forceinline__ Values<ReluMask<A>, VEC> relu_masks(i64 c0, int on, const Values<A, VEC>& mean,
                                                                const A* invstd, const W* weight, const W* bias) {
    Values<ReluMask<A>, VEC> masks;
#pragma unroll
    for (int k = 0; k < VEC; ++k) masks.v[k] = relu_mask(c0 + k, on, mean.v[k], invstd, weight, bias);
    return masks;
}

template <int VEC, typename W, typename A>
__device__ __forceinline__ Values<ReluMask<A>, VEC> relu_masks(i64 c0, int on, const A* mean, const A* invstd,
                                                                const W* weight, const W* bias) {
    Values<ReluMask<A>, VEC> masks;
#pragma unroll
    for (int k = 0; k < VEC; ++k) masks.v[k] = relu_mask(c0 + k, on, mean, invstd, weight, bias);
    return masks;
}

// This thread's share of sum(dy) and sum(dy * (x - mean)) over rows [row_begin, row_end) of channels c0..
template <int VEC, bool FUSED, bool STAGED = false, typename T, typename A>
__device__ __forceinline__ void column_gradient_sums(const T* dy, const T* x, i64 dy_stride_m, i64 x_stride_m, i64 c0,
                                                     const Values<A, VEC>& mean, const Values<ReluMask<A>, VEC>& relu,
                                                     i64 row_begin, i64 row_end, Values<A, VEC>& sum_dy,
                                                     Values<A, VEC>& sum_dy_xmu) {
    const i64 first = row_begin + threadIdx.y, dy_step = blockDim.y * dy_stride_m, x_step = blockDim.y * x_stride_m;
    const T* dy_row = dy + first * dy_stride_m + c0;
    const T* x_row = x + first * x_stride_m + c0;
    auto add = [&](const Pack<T, VEC>& g, const Pack<T, VEC>& in) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            A xv = cvt<A>(in.v[k]);
            A d = cvt<A>(g.v[k]);
            if constexpr (FUSED) d = relu.v[k].apply(d, xv);
            sum_dy.v[k] += d;
            sum_dy_xmu.v[k] += d * (xv - mean.v[k]);
        }
    };
    // STAGED (dy and x in global memory, 16-byte groups): 2 rows of each a copy, through staged_rows
    // (the ReLU's mask too: the copies in flight take no registers). 16-bit inputs through the mask
    // run 2 blocks an SM (their registers fit 3), so their ring is deeper (CL_MASKED_RING_BUFFERS, in
    // dynamic shared memory, which holds them at 2): 4 copies in flight a block, where the others' 4
    // blocks an SM keep one (backends/cupy/compilation.py).
    if constexpr (STAGED && VEC * sizeof(T) == 16) {
        constexpr int BUFFERS = FUSED && sizeof(T) == 2 ? CL_MASKED_RING_BUFFERS : 2;
        const T* from[2] = {dy_row, x_row};
        const i64 step[2] = {dy_step, x_step};
        const i64 rows = rows_from(first, row_end);
        staged_rows<2, COLUMN_BATCH / 2, BUFFERS>(from, step, rows, rows, [&](const uint4* slot, int stride) {
            add(copied_pack<VEC, T>(slot), copied_pack<VEC, T>(slot + stride));
        }, [] {});
    } else {
        // Rows of dy and x loaded in batches before the first is used, as column_moments; one at a time
        // with the ReLU's mask, whose registers a batch would take from the blocks an SM holds.
        constexpr int BATCH = FUSED ? 1 : COLUMN_BATCH;
        i64 i = rows_from(first, row_end);
        for (; i >= BATCH; i -= BATCH, dy_row += BATCH * dy_step, x_row += BATCH * x_step) {
            Pack<T, VEC> g[BATCH], in[BATCH];
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {
                g[b] = load_pack<VEC>(dy_row + b * dy_step);
                in[b] = load_pack<VEC>(x_row + b * x_step);
            }
#pragma unroll
            for (int b = 0; b < BATCH; ++b) add(g[b], in[b]);
        }
        for (; i > 0; --i, dy_row += dy_step, x_row += x_step) add(load_pack<VEC>(dy_row), load_pack<VEC>(x_row));
    }
}

// Per-channel coefficients of dx = scale * (dy - mean_dy - (x - mean) * projection) in training,
// dx = scale * dy in eval.
template <typename W, typename A>
__device__ __forceinline__ void dx_coefficients(
    i64 c, A mean_in, A invstd, const W* weight, A sum_dy, A sum_dy_xmu, A inv_count, int training,
    A& mean, A& scale, A& mean_dy, A& projection) {
    scale = weight ? invstd * cvt<A>(weight[c]) : invstd;
    mean = A(0); mean_dy = A(0); projection = A(0);
    if (training) {
        mean = mean_in;
        mean_dy = sum_dy * inv_count;
        projection = sum_dy_xmu * invstd * invstd * inv_count;
    }
}

// dx of one value in training: scale * (dy - mean_dy - (x - mean) * projection). For 16-bit inputs
// x uncentered, over per-channel terms that the loops hoist: scale * (dy - mean_dy) + (-scale *
// projection) * x + scale * projection * mean -- 3 floating-point operations a value instead of 4.
// Its rounding, a few ulp_fp32(scale * projection * mean), is of the order of that of the saved fp32
// mean itself (the bound of tests/test_numerics.py) and far below the 16-bit input's own (2^-8 or
// 2^-11 of |x|). dy - mean_dy stays centered: folded into the constant, its rounding,
// ulp_fp32(scale * mean_dy), grows without bound with scale (a constant channel with a tiny eps) where
// the exact dx is 0. fp32 and fp64 inputs keep the centered form.
template <typename T, typename A>
__device__ __forceinline__ A dx_value(A dy, A x, A mean, A scale, A mean_dy, A projection) {
    if constexpr (sizeof(T) == 2) return fma(scale, dy - mean_dy, fma(-scale * projection, x, scale * projection * mean));
    else return scale * (dy - mean_dy - (x - mean) * projection);
}

// The same from the per-channel arrays (the totals are not read in eval).
template <typename W, typename A>
__device__ __forceinline__ void dx_coefficients_at(
    i64 c, const A* mean_in, const A* invstd_in, const W* weight, const A* sum_dy, const A* sum_dy_xmu,
    A inv_count, int training, A& mean, A& scale, A& mean_dy, A& projection) {
    dx_coefficients(c, training ? mean_in[c] : A(0), invstd_in[c], weight, training ? sum_dy[c] : A(0),
                    training ? sum_dy_xmu[c] : A(0), inv_count, training, mean, scale, mean_dy, projection);
}

// A channel group's weight and bias gradients from its totals (channel j's at j): thread j writes
// channel j's.
template <int WIDE, typename W, typename A>
__device__ __forceinline__ void store_group_gradients(const GroupPlace<WIDE>& p, const A* total_dy,
                                                      const A* total_dy_xmu, const A* invstd_in, W* grad_weight,
                                                      W* grad_bias) {
    if (threadIdx.x < p.group)
        store_gradients(p.c0 + threadIdx.x, total_dy[threadIdx.x], total_dy_xmu[threadIdx.x],
                        invstd_in[p.c0 + threadIdx.x], grad_weight, grad_bias);
}

// The dx coefficients (dx_coefficients) of a thread's values in a channel group, by their channels.
template <int WIDE, typename W, typename A>
__device__ __forceinline__ void group_dx_coefficients(
    const GroupPlace<WIDE>& p, const Values<A, WIDE>& mean, const A* invstd_in, const W* weight, const A* total_dy,
    const A* total_dy_xmu, A inv_count, int training, Values<A, WIDE>& mean_x, Values<A, WIDE>& scale,
    Values<A, WIDE>& mean_dy, Values<A, WIDE>& projection) {
#pragma unroll
    for (int k = 0; k < WIDE; ++k) {
        const int j = p.channel[k];
        dx_coefficients(p.c0 + j, mean.v[k], invstd_in[p.c0 + j], weight, total_dy[j], total_dy_xmu[j], inv_count,
                        training, mean_x.v[k], scale.v[k], mean_dy.v[k], projection.v[k]);
    }
}

// dx on V values of one row (x is read in training, or for the ReLU's mask). TRAINING is a template
// argument, so that the loops of for_each_group hold no branch on it (see input_gradient_tiles).
template <typename T, typename A, bool FUSED, bool TRAINING> struct InputGradientRow {
    static constexpr bool BATCHED = false;
    const T* dy; const T* x; T* dx; i64 dy_stride_n, x_stride_n, dx_stride_n;
    A mean, scale, mean_dy, projection; ReluMask<A> relu;
    template <int V> __device__ __forceinline__ void apply(i64 n, i64 s) const {
        Pack<T, V> g = load_pack<V>(dy + n * dy_stride_n + s);
        Pack<T, V> out;
        if constexpr (FUSED) {
            Pack<T, V> in = load_pack<V>(x + n * x_stride_n + s);
#pragma unroll
            for (int k = 0; k < V; ++k) {
                A xv = cvt<A>(in.v[k]);
                A d = relu.apply(cvt<A>(g.v[k]), xv);
                out.v[k] = cvt<T>(TRAINING ? dx_value<T>(d, xv, mean, scale, mean_dy, projection) : scale * d);
            }
        } else if constexpr (TRAINING) {
            Pack<T, V> in = load_pack<V>(x + n * x_stride_n + s);
#pragma unroll
            for (int k = 0; k < V; ++k)
                out.v[k] = cvt<T>(dx_value<T>(cvt<A>(g.v[k]), cvt<A>(in.v[k]), mean, scale, mean_dy, projection));
        } else {
#pragma unroll
            for (int k = 0; k < V; ++k) out.v[k] = cvt<T>(scale * cvt<A>(g.v[k]));
        }
        store_group<V>(dx + n * dx_stride_n + s, out);
    }
    __device__ __forceinline__ void end_tile() const {}
};

// dx over tiles [first, last), from the last (a second pass), one instantiation per `training`.
template <int VEC, bool FUSED, typename T, typename A>
__device__ __forceinline__ void input_gradient_tiles(const Tiles& t, i64 first, i64 last, const T* dy, const T* x,
                                                     T* dx, i64 dy_stride_n, i64 x_stride_n, i64 dx_stride_n, A mean,
                                                     A scale, A mean_dy, A projection, int training,
                                                     const ReluMask<A>& relu) {
    if (training) {
        InputGradientRow<T, A, FUSED, true> op = {dy, x, dx, dy_stride_n, x_stride_n, dx_stride_n, mean, scale,
                                                  mean_dy, projection, relu};
        for_each_group<VEC, true, 2>(t, first, last, op);
    } else {
        InputGradientRow<T, A, FUSED, false> op = {dy, x, dx, dy_stride_n, x_stride_n, dx_stride_n, mean, scale,
                                                   mean_dy, projection, relu};
        for_each_group<VEC, true, 2>(t, first, last, op);
    }
}

// dx at a thread's place over its rows of [row_begin, row_end), from the last (a second pass).
template <int VEC, int WIDE, bool FUSED, typename T, typename A>
__device__ __forceinline__ void place_input_gradient(const T* dy, const T* x, T* dx, i64 dy_stride_n, i64 x_stride_n,
                                                     i64 dx_stride_n, const GroupPlace<WIDE>& p,
                                                     const Values<A, WIDE>& mean, const Values<A, WIDE>& scale,
                                                     const Values<A, WIDE>& mean_dy,
                                                     const Values<A, WIDE>& projection, int training,
                                                     const Values<ReluMask<A>, WIDE>& relu, i64 row_begin,
                                                     i64 row_end) {
    const PlaceRows r = place_rows(p, row_begin, row_end);
#pragma unroll 2
    for (i64 n = r.first + (r.count - 1) * r.step; n >= r.first; n -= r.step) {
        Pack<T, WIDE> g = read_place<VEC, WIDE>(dy + n * dy_stride_n + p.s);
        Pack<T, WIDE> out;
        if constexpr (FUSED) {
            Pack<T, WIDE> in = read_place<VEC, WIDE>(x + n * x_stride_n + p.s);
#pragma unroll
            for (int k = 0; k < WIDE; ++k) {
                A xv = cvt<A>(in.v[k]);
                A d = relu.v[k].apply(cvt<A>(g.v[k]), xv);
                out.v[k] = cvt<T>(training ? dx_value<T>(d, xv, mean.v[k], scale.v[k], mean_dy.v[k], projection.v[k])
                                           : scale.v[k] * d);
            }
        } else if (training) {
            Pack<T, WIDE> in = read_place<VEC, WIDE>(x + n * x_stride_n + p.s);
#pragma unroll
            for (int k = 0; k < WIDE; ++k)
                out.v[k] = cvt<T>(dx_value<T>(cvt<A>(g.v[k]), cvt<A>(in.v[k]), mean.v[k], scale.v[k], mean_dy.v[k],
                                                projection.v[k]));
        } else {
#pragma unroll
            for (int k = 0; k < WIDE; ++k) out.v[k] = cvt<T>(scale.v[k] * cvt<A>(g.v[k]));
        }
        write_place<VEC, WIDE>(dx + n * dx_stride_n + p.s, out);
    }
}

// input_gradient_channels_first for a channel group (GROUPED).
template <typename T, typename W, typename A, int VEC, bool FUSED>
__device__ __forceinline__ void group_input_gradient(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const A* mean_in, const A* invstd_in,
    const W* weight, const W* bias, const A* sum_dy, const A* sum_dy_xmu, i64 N, i64 C, i64 S, i64 dy_stride_n,
    i64 dy_stride_c, i64 x_stride_n, i64 x_stride_c, i64 dx_stride_n, i64 dx_stride_c, A inv_count,
    i64 total_tiles, i64 tiles_per_program, int rows, int block_s, int training, int relu) {
    constexpr int WIDE = Wide<T>::values;
    const GroupPlace<WIDE> p = group_place<WIDE>(C, S, block_s);
    Values<A, WIDE> mean, scale, mean_dy, projection;
#pragma unroll
    for (int k = 0; k < WIDE; ++k)
        dx_coefficients_at(p.c0 + p.channel[k], mean_in, invstd_in, weight, sum_dy, sum_dy_xmu, inv_count, training,
                           mean.v[k], scale.v[k], mean_dy.v[k], projection.v[k]);
    const i64 first = (i64)blockIdx.y * tiles_per_program, last = min(first + tiles_per_program, total_tiles);
    place_input_gradient<VEC, WIDE, FUSED>(dy + p.c0 * dy_stride_c, x + p.c0 * x_stride_c, dx + p.c0 * dx_stride_c,
                                           dy_stride_n, x_stride_n, dx_stride_n, p, mean, scale, mean_dy, projection,
                                           training, place_relu_masks(p, relu, mean_in, invstd_in, weight, bias),
                                           first * rows, min(last * rows, N));
}

// dx over this thread's rows [row_begin, row_end) of channels c0.. (x read in training, or for the ReLU's mask).
// HELD: dy and x are in shared memory (the on-chip kernels), read with plain loads.
template <int VEC, bool FUSED, bool HELD = false, typename T, typename A>
__device__ __forceinline__ void column_input_gradient(const T* dy, const T* x, T* dx, i64 dy_stride_m, i64 x_stride_m,
                                                      i64 dx_stride_m, i64 c0, const Values<A, VEC>& mean,
                                                      const Values<A, VEC>& scale, const Values<A, VEC>& mean_dy,
                                                      const Values<A, VEC>& projection, int training,
                                                      const Values<ReluMask<A>, VEC>& relu, i64 row_begin,
                                                      i64 row_end) {
    // The thread's rows from its last (reversed): negative steps.
    const i64 rows = rows_from(row_begin + threadIdx.y, row_end), last = row_begin + threadIdx.y + (rows - 1) * blockDim.y;
    const i64 dy_step = -(i64)blockDim.y * dy_stride_m, x_step = -(i64)blockDim.y * x_stride_m;
    const i64 dx_step = -(i64)blockDim.y * dx_stride_m;
    const T* dy_row = dy + last * dy_stride_m + c0;
    T* dx_row = dx + last * dx_stride_m + c0;
    if (FUSED || training) {
        const T* x_row = x + last * x_stride_m + c0;
#pragma unroll 2
        for (i64 i = rows; i > 0; --i, dy_row += dy_step, x_row += x_step, dx_row += dx_step) {
            // Read-only loads without the ReLU's mask only: with it, nvcc's schedule of them costs
            // instructions and loads in flight.
            Pack<T, VEC> g = FUSED || HELD ? load_pack<VEC>(dy_row) : load_pack_readonly<VEC>(dy_row);
            Pack<T, VEC> in = FUSED || HELD ? load_pack<VEC>(x_row) : load_pack_readonly<VEC>(x_row);
            Pack<T, VEC> out;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                A xv = cvt<A>(in.v[k]);
                A d = cvt<A>(g.v[k]);
                if constexpr (FUSED) d = relu.v[k].apply(d, xv);
                out.v[k] = cvt<T>(training ? dx_value<T>(d, xv, mean.v[k], scale.v[k], mean_dy.v[k], projection.v[k])
                                           : scale.v[k] * d);
            }
            store_pack<VEC>(dx_row, out);
        }
    } else {
#pragma unroll 2
        for (i64 i = rows; i > 0; --i, dy_row += dy_step, dx_row += dx_step) {
            Pack<T, VEC> g = HELD ? load_pack<VEC>(dy_row) : load_pack_readonly<VEC>(dy_row);
            Pack<T, VEC> out;
#pragma unroll
            for (int k = 0; k < VEC; ++k) out.v[k] = cvt<T>(scale.v[k] * cvt<A>(g.v[k]));
            store_pack<VEC>(dx_row, out);
        }
    }
}
