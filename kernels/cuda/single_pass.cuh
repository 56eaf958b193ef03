// Single-pass helpers: a block that owns whole channels reduces, then normalizes (or differentiates)
// from the same data.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
#pragma once
#include "backward.cuh"

// single_pass_forward_channels_first for a channel group (GROUPED).
template <typename T, typename W, typename R, typename A, int VEC, bool FUSED>
__device__ __forceinline__ void group_single_pass_forward(
    const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ residual, A* mean_out, A* invstd_out,
    R* running_mean, R* running_var, i64* num_batches_tracked, int* counters, const W* weight, const W* bias,
    i64 N, i64 C, i64 S, i64 x_stride_n, i64 x_stride_c, i64 y_stride_n, i64 y_stride_c, double momentum, double eps,
    int block_s, int has_running_stats, int cumulative, int count_batch_here, int relu) {
    constexpr int WIDE = Wide<T>::values;
    __shared__ A channel_count[WIDE], channel_mean[WIDE], channel_m2[WIDE], channel_invstd[WIDE];
    const GroupPlace<WIDE> p = group_place<WIDE>(C, S, block_s);
    const T* xg = x + p.c0 * x_stride_c;
    const Values<A, WIDE> shift = place_shifts<WIDE, T, A>(xg, x_stride_c, p);
    const ColumnMoments<A, WIDE> moments = place_moments<VEC, WIDE>(xg, x_stride_n, p, shift, i64(0), N);
    for (int j = 0; j < p.group; ++j) {
        __syncthreads();  // the previous channel's block_merge has read its shared memory
        const Moments<A> m = block_merge(channel_moments(moments, p, j));
        if (threadIdx.x == 0) { channel_count[j] = m.count; channel_mean[j] = m.mean; channel_m2[j] = m.m2; }
    }
    __syncthreads();
    if (threadIdx.x < p.group) {  // thread j writes channel j's statistics
        const int j = threadIdx.x;
        channel_mean[j] += cvt<A>(xg[j * x_stride_c]);
        channel_invstd[j] = store_statistics(p.c0 + j, channel_count[j], channel_mean[j], channel_m2[j], mean_out,
                                             invstd_out, running_mean, running_var, num_batches_tracked, momentum,
                                             eps, has_running_stats, cumulative);
    }
    __syncthreads();
    Values<A, WIDE> mean, scale, bias_c;
#pragma unroll
    for (int k = 0; k < WIDE; ++k) {
        mean.v[k] = channel_mean[p.channel[k]];
        affine_from(p.c0 + p.channel[k], channel_invstd[p.channel[k]], weight, bias, scale.v[k], bias_c.v[k]);
    }
    place_normalize<VEC, WIDE, FUSED>(xg, y + p.c0 * y_stride_c, residual ? residual + p.c0 * y_stride_c : nullptr,
                                      x_stride_n, y_stride_n, p, mean, scale, bias_c, relu, i64(0), N);
    if (count_batch_here) count_batch_after_every_read(num_batches_tracked, counters, cumulative);
}

// single_pass_backward_channels_first for a channel group (GROUPED).
template <typename T, typename W, typename A, int VEC, bool FUSED>
__device__ __forceinline__ void group_single_pass_backward(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const A* mean_in, const A* invstd_in,
    const W* weight, const W* bias, W* grad_weight, W* grad_bias, i64 N, i64 C, i64 S, i64 dy_stride_n,
    i64 dy_stride_c, i64 x_stride_n, i64 x_stride_c, i64 dx_stride_n, i64 dx_stride_c, A inv_count, int block_s,
    int training, int need_input_grad, int relu) {
    constexpr int WIDE = Wide<T>::values;
    __shared__ A totals[2][WIDE];
    const GroupPlace<WIDE> p = group_place<WIDE>(C, S, block_s);
    const T* dyg = dy + p.c0 * dy_stride_c;
    const T* xg = x + p.c0 * x_stride_c;
    Values<A, WIDE> mean, sum_dy = zeros<A, WIDE>(), sum_dy_xmu = zeros<A, WIDE>();
#pragma unroll
    for (int k = 0; k < WIDE; ++k) mean.v[k] = mean_in[p.c0 + p.channel[k]];
    const Values<ReluMask<A>, WIDE> masks = place_relu_masks(p, relu, mean, invstd_in, weight, bias);
    place_gradient_sums<VEC, WIDE, FUSED>(dyg, xg, dy_stride_n, x_stride_n, p, mean, masks, i64(0), N, sum_dy,
                                          sum_dy_xmu);
    for (int j = 0; j < p.group; ++j) {
        A total_dy, total_dy_xmu;
        channel_sums(sum_dy, sum_dy_xmu, p, j, total_dy, total_dy_xmu);
        if (threadIdx.x == 0) { totals[0][j] = total_dy; totals[1][j] = total_dy_xmu; }
    }
    __syncthreads();
    store_group_gradients(p, totals[0], totals[1], invstd_in, grad_weight, grad_bias);
    if (!need_input_grad) return;
    Values<A, WIDE> mean_x, scale, mean_dy, projection;
    group_dx_coefficients(p, mean, invstd_in, weight, totals[0], totals[1], inv_count, training, mean_x, scale,
                          mean_dy, projection);
    place_input_gradient<VEC, WIDE, FUSED>(dyg, xg, dx + p.c0 * dx_stride_c, dy_stride_n, x_stride_n, dx_stride_n, p,
                                           mean_x, scale, mean_dy, projection, training, masks, i64(0), N);
}

// The channels-last single passes' second half, from the per-channel values the block shares in
// shared memory at slot threadIdx.x * VEC + k of this thread's channel c0 + k. The walks read and
// write at place `at`: c0, or the thread's place in a held slice (the on-chip kernels, whose x, dy
// and outputs the caller offsets to the block's first channel and row).

// y = epilogue((x - mean) * invstd * weight + bias) over this thread's rows [0, rows).
template <int VEC, bool FUSED, typename T, typename W, typename A>
__device__ __forceinline__ void column_normalize_slots(const T* x, T* y, const T* residual, i64 x_stride_m,
                                                       i64 y_stride_m, i64 at, i64 c0, const A* channel_mean,
                                                       const A* channel_invstd, const W* weight, const W* bias,
                                                       int relu, i64 rows) {
    Values<A, VEC> mean, scale, bias_c;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        const int slot = threadIdx.x * VEC + k;
        mean.v[k] = channel_mean[slot];
        affine_from(c0 + k, channel_invstd[slot], weight, bias, scale.v[k], bias_c.v[k]);
    }
    column_normalize<VEC, FUSED>(x, y, residual, x_stride_m, y_stride_m, at, mean, scale, bias_c, relu, i64(0), rows);
}

// dx over this thread's rows [0, rows) from the totals sum(dy), sum(dy * (x - mean)).
template <int VEC, bool FUSED, bool HELD, typename T, typename W, typename A>
__device__ __forceinline__ void column_input_gradient_slots(
    const T* dy, const T* x, T* dx, i64 dy_stride_m, i64 x_stride_m, i64 dx_stride_m, i64 at, i64 c0,
    const Values<A, VEC>& mean, const Values<A, VEC>& invstd, const W* weight, const A* total_dy,
    const A* total_dy_xmu, A inv_count, int training, const Values<ReluMask<A>, VEC>& masks, i64 rows) {
    Values<A, VEC> mean_x, scale, mean_dy, projection;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
        dx_coefficients(c0 + k, mean.v[k], invstd.v[k], weight, total_dy[threadIdx.x * VEC + k],
                        total_dy_xmu[threadIdx.x * VEC + k], inv_count, training, mean_x.v[k], scale.v[k],
                        mean_dy.v[k], projection.v[k]);
    column_input_gradient<VEC, FUSED, HELD>(dy, x, dx, dy_stride_m, x_stride_m, dx_stride_m, at, mean_x, scale,
                                            mean_dy, projection, training, masks, i64(0), rows);
}
