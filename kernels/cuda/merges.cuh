// Merges across a warp and a block: moments (Chan) and sums, in a fixed order.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
#pragma once
#include "conversions.cuh"

// ---- block-level merges (1-D blocks of a multiple of 32 threads, at most 1024) -------------------

template <typename A> struct Moments {
    A count, mean, m2;
};

// The mean of two partials, b weighing `weight`: Chan's mean_a + delta * weight, or, where
// delta = mean_b - mean_a is not finite (an inf among the values), the weighted mean -- that inf, or
// NaN for +inf with -inf -- as the plain sum of the values gives it (and torch's mean).
template <typename A> __device__ __forceinline__ A merged_mean(A mean_a, A mean_b, A delta, A weight) {
    return delta - delta == A(0) ? mean_a + delta * weight : mean_a * (A(1) - weight) + mean_b * weight;
}

// A value of x as its channel's shift, or 0 where it is inf or NaN: moments of x - inf would make
// every finite value -inf and the mean NaN, where a batch holding an inf has that inf as its mean.
template <typename A> __device__ __forceinline__ A finite_shift(A value) {
    return value - value == A(0) ? value : A(0);
}

// Chan's merge of partial moments; b may be empty.
template <typename A> __device__ __forceinline__ void merge(Moments<A>& a, A count, A mean, A m2) {
    if (count == A(0)) return;
    A total = a.count + count;
    A delta = mean - a.mean;
    A weight = count / total;
    a.mean = merged_mean(a.mean, mean, delta, weight);
    a.m2 += m2 + delta * delta * a.count * weight;
    a.count = total;
}

// Moments of shifted values, accumulated as a short run of plain sums (one add and one fma per
// value, the count once per group of values) that is folded into the running moments with Chan's
// formula when closed: a sum never runs over more than one tile's share of a thread, so it stays
// exact enough in fp32, and the division of the merge is paid once per run, not per value.
template <typename A> struct RunningMoments {
    Moments<A> merged;
    A n, sum, squares;   // the open run
    template <int V> __device__ __forceinline__ void add(const A (&values)[V]) {
#pragma unroll
        for (int k = 0; k < V; ++k) { sum += values[k]; squares += values[k] * values[k]; }
        n += A(V);
    }
    __device__ __forceinline__ void close() {
        if (n == A(0)) return;
        A mean = sum / n;
        merge(merged, n, mean, squares - sum * mean);
        n = A(0); sum = A(0); squares = A(0);
    }
};

template <typename A> __device__ __forceinline__ RunningMoments<A> no_moments() {
    RunningMoments<A> r;
    r.merged.count = A(0); r.merged.mean = A(0); r.merged.m2 = A(0);
    r.n = A(0); r.sum = A(0); r.squares = A(0);
    return r;
}

template <typename A> __device__ Moments<A> warp_merge(Moments<A> m) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        A count = __shfl_down_sync(0xffffffffu, m.count, offset);
        A mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
        A m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
        merge(m, count, mean, m2);
    }
    return m;
}

// The merged moments of the whole block, valid in thread 0.
template <typename A> __device__ Moments<A> block_merge(Moments<A> m) {
    __shared__ A counts[32], means[32], m2s[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    m = warp_merge(m);
    if (lane == 0) { counts[warp] = m.count; means[warp] = m.mean; m2s[warp] = m.m2; }
    __syncthreads();
    if (warp == 0) {
        Moments<A> w = {A(0), A(0), A(0)};
        if (lane < warps) { w.count = counts[lane]; w.mean = means[lane]; w.m2 = m2s[lane]; }
        m = warp_merge(w);
    }
    return m;
}

template <typename A> __device__ A warp_sum(A v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;
}

// The sum over the block, valid in thread 0. `slot` keeps two calls in a row from sharing memory.
template <typename A, int slot> __device__ A block_sum(A v) {
    __shared__ A partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) v = warp_sum(lane < warps ? partial[lane] : A(0));
    return v;
}
