// Channel groups (channels-first, GROUPED): a block owns several adjacent channels of small planes.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
#pragma once
#include "channels_last.cuh"

// ---- channel groups (channels-first, GROUPED) ---------------------------------------------------
// Where rows of S values cannot start on 16 bytes (S = 49), a block owns `group` adjacent channels
// instead, c0 = blockIdx.x * group .. (bn_gpu/backends/plan.py, channel_group; the grid has C / group blocks
// across C), whose group x S values are one run of each row: a multiple of 16 bytes, starting on 16
// bytes. A thread keeps one place of the run for every row it visits, WIDE values (16 bytes: read
// with one access when VEC == WIDE, value by value when the host found a pointer or stride
// misaligned): the plan keeps the run within blockDim.x places, so the thread's place is threadIdx.x
// % places, its rows start at threadIdx.x / places and step by blockDim.x / places, and each of its
// values stays in one channel, found once. Per-channel values are gathered per value once; the
// sums are split by channel once, at the end (one block reduction per channel).

template <typename T> struct Wide { static constexpr int values = 16 / (int)sizeof(T); };

template <int WIDE> struct GroupPlace {
    i64 c0, group;          // the block's first channel, its number of channels
    i64 s;                  // the thread's first value in the run
    i64 first_row, row_step;
    bool active;            // whether the thread has a place in the run (the last places may not)
    int channel[WIDE];      // the channel of each of its values, less c0
};

// The thread's place in a run of `group` channels (c0 left to the caller).
template <int WIDE> __device__ __forceinline__ GroupPlace<WIDE> run_place(i64 group, i64 S, int block_s) {
    GroupPlace<WIDE> p;
    p.group = group;
    p.c0 = 0;
    const int places = block_s / WIDE;   // a power of two, at most blockDim.x (the plan)
    p.s = (i64)(threadIdx.x % places) * WIDE;
    p.first_row = threadIdx.x / places;
    p.row_step = blockDim.x / places;
    p.active = p.s < p.group * S;
#pragma unroll
    for (int k = 0; k < WIDE; ++k) p.channel[k] = p.active ? (int)((p.s + k) / S) : 0;
    return p;
}

template <int WIDE> __device__ __forceinline__ GroupPlace<WIDE> group_place(i64 C, i64 S, int block_s) {
    GroupPlace<WIDE> p = run_place<WIDE>(C / gridDim.x, S, block_s);
    p.c0 = (i64)blockIdx.x * p.group;
    return p;
}

// The WIDE values of a place: one 16-byte access when VEC == WIDE, else value by value.
template <int VEC, int WIDE, typename T> __device__ __forceinline__ Pack<T, WIDE> read_place(const T* p) {
    if constexpr (VEC == WIDE) {
        return load_pack<WIDE>(p);
    } else {
        Pack<T, WIDE> values;
#pragma unroll
        for (int k = 0; k < WIDE; ++k) values.v[k] = p[k];
        return values;
    }
}

// The same through the read-only path (load_pack_readonly): for the passes that store, so that
// their loads may be issued above the stores before them.
template <int VEC, int WIDE, typename T> __device__ __forceinline__ Pack<T, WIDE> read_place_readonly(const T* p) {
    if constexpr (VEC == WIDE) return load_pack_readonly<WIDE>(p);
    else return read_place<VEC, WIDE>(p);
}

// A thread walks its place down the rows 4 at a time where it has 4 left, loading all 4 before it
// uses the first (as `walk`: unrolled alone, nvcc used each row before it loaded the next).
constexpr int PLACE_BATCH = 4;

// The WIDE values of a place: one 16-byte store when VEC == WIDE (store_group), else value by value.
template <int VEC, int WIDE, typename T>
__device__ __forceinline__ void write_place(T* p, const Pack<T, WIDE>& values) {
    if constexpr (VEC == WIDE) {
        store_group<WIDE>(p, values);
    } else {
#pragma unroll
        for (int k = 0; k < WIDE; ++k) p[k] = values.v[k];
    }
}

// The rows [row_begin, row_end) a thread visits: `count` of them, from `first` by `step`.
struct PlaceRows { i64 first, count, step; };

template <int WIDE>
__device__ __forceinline__ PlaceRows place_rows(const GroupPlace<WIDE>& p, i64 row_begin, i64 row_end) {
    PlaceRows r;
    r.first = row_begin + p.first_row;
    r.step = p.row_step;
    r.count = p.active && r.first < row_end ? (row_end - r.first + r.step - 1) / r.step : 0;
    return r;
}

// Each value's channel's first value x[0, c, 0] (x at the group's first channel): its shift.
template <int WIDE, typename T, typename A>
__device__ __forceinline__ Values<A, WIDE> place_shifts(const T* x, i64 stride_c, const GroupPlace<WIDE>& p) {
    Values<A, WIDE> shift;
#pragma unroll
    for (int k = 0; k < WIDE; ++k) shift.v[k] = finite_shift(cvt<A>(x[p.channel[k] * stride_c]));
    return shift;
}

// The same per channel of the group (for the finalize), channel j in slot j.
template <int WIDE, typename T, typename A>
__device__ __forceinline__ Values<A, WIDE> channel_shifts(const T* x, i64 stride_c, i64 group) {
    Values<A, WIDE> shift = zeros<A, WIDE>();
#pragma unroll
    for (int j = 0; j < WIDE; ++j)
        if (j < group) shift.v[j] = finite_shift(cvt<A>(x[j * stride_c]));
    return shift;
}

// Moments of x - shift over the thread's rows of [row_begin, row_end) at its place, the run of sums
// closed every 64 rows of the thread (as column_moments): a place's rows are a column's, so 16-byte
// places go through staged_rows, copied ahead into shared memory. Value by value, the batched loop
// is column_moments' own, written again: one helper for both changed nvcc's schedule of one kernel
// or the other (fewer loads at once), and normalize through `walk` needs more registers.
template <int VEC, int WIDE, typename T, typename A>
__device__ __forceinline__ ColumnMoments<A, WIDE> place_moments(const T* x, i64 stride_n, const GroupPlace<WIDE>& p,
                                                                const Values<A, WIDE>& shift, i64 row_begin,
                                                                i64 row_end) {
    ColumnMoments<A, WIDE> moments = no_column_moments<A, WIDE>();
    const PlaceRows r = place_rows(p, row_begin, row_end);
    const T* row = x + r.first * stride_n + p.s;
    const i64 step = r.step * stride_n;
    if constexpr (VEC == WIDE) {
        const T* from[1] = {row};
        const i64 steps[1] = {step};
        staged_rows<1, COLUMN_BATCH>(from, steps, r.count, 64,
                                     [&](const uint4* slot, int) { moments.add(shifted(copied_pack<WIDE, T>(slot), shift)); },
                                     [&] { moments.close(); });
    } else {
        for (i64 done = 0; done < r.count; done += 64) {
            i64 rows = min(r.count - done, i64(64));
            for (; rows >= PLACE_BATCH; rows -= PLACE_BATCH, row += PLACE_BATCH * step) {
                Pack<T, WIDE> in[PLACE_BATCH];
#pragma unroll
                for (int b = 0; b < PLACE_BATCH; ++b) in[b] = read_place<VEC, WIDE>(row + b * step);
#pragma unroll
                for (int b = 0; b < PLACE_BATCH; ++b) moments.add(shifted(in[b], shift));
            }
            for (; rows > 0; --rows, row += step) moments.add(shifted(read_place<VEC, WIDE>(row), shift));
            moments.close();
        }
    }
    return moments;
}

// Channel j's moments of a thread's values: those of its slots in channel j, which share j's shift.
template <int WIDE, typename A>
__device__ __forceinline__ Moments<A> channel_moments(const ColumnMoments<A, WIDE>& m, const GroupPlace<WIDE>& p,
                                                      int j) {
    Moments<A> part = {A(0), A(0), A(0)};
#pragma unroll
    for (int k = 0; k < WIDE; ++k)
        if (p.active && p.channel[k] == j) merge(part, m.count, m.mean.v[k], m.m2.v[k]);
    return part;
}

template <int WIDE, typename A>
__device__ __forceinline__ A channel_sum(const Values<A, WIDE>& v, const GroupPlace<WIDE>& p, int j) {
    A sum = A(0);
#pragma unroll
    for (int k = 0; k < WIDE; ++k)
        if (p.active && p.channel[k] == j) sum += v.v[k];
    return sum;
}
