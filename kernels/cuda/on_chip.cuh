// One read on chip: the on-chip kernels' helpers (the kernels are in batch_norm.cu).
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
//
// Where the input fits in the shared memory of the GPU's SMs (bn_gpu/backends/plan.py, on_chip_plan
// with Tuning.on_chip_shared), the training forward and backward run as one cooperative launch:
// every block resident at once, which the driver guarantees for a cooperative launch (it refuses a
// grid that does not fit; the host checks the occupancy first, bn_gpu/backends/cupy/launcher.py). A
// block holds its slice of x (and dy) in dynamic shared memory in the input's dtype -- channels-first
// `held_rows` whole rows of S values of one channel, a (rows, S) matrix; channels-last rows of the
// block's channels, a (rows, block_c) matrix -- reduces it, stores its partials, waits for the other
// blocks of its channel (block) at a barrier, merges their partials in split order (every block of a
// channel gets the same bits, and results are bitwise reproducible), and normalizes (differentiates)
// from shared memory. Each thread reads back only what it stored itself (the same walk of the same
// rows), so the slice needs no barrier of its own. x (and dy) are read from global memory once.
#pragma once
#include "single_pass.cuh"

// The barrier of a channel group's blocks (a channel channels-first, a channel block channels-last),
// as kernels/group_barrier.py has it for the Triton kernels, on the same zeroed counters: a block
// adds 1 on arrival and waits until the counter reaches the group's `parties`; after its last read of
// the partials it adds 1 more, and the block that brings the counter to twice the parties -- every
// other has passed its wait -- sets it back to zero for the next launch and for CUDA-graph replay.
// (Not cooperative_groups' grid.sync(): its header needs libcu++'s, which NVRTC does not find
// everywhere CuPy runs, and it would make every channel wait for the whole grid.) Every thread fences
// its stores before the barrier that precedes thread 0's arrival (as last_block_of), and the partials
// are read with __ldcg (L2) after it.
__device__ __forceinline__ void wait_for_group(int* counters, i64 group, i64 parties) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        atomicAdd(counters + group, 1);
        while (*reinterpret_cast<volatile int*>(counters + group) < parties) {}
        __threadfence();
    }
    __syncthreads();
}

__device__ __forceinline__ void leave_group(int* counters, i64 group, i64 parties) {
    __syncthreads();  // the block's reads of the partials are done
    if (threadIdx.x == 0 && threadIdx.y == 0 && atomicAdd(counters + group, 1) == 2 * parties - 1)
        atomicExch(counters + group, 0);
}

// The tiles of a held channels-first slice: rows [0, rows_held) of the block's rows, whole rows of S.
__device__ __forceinline__ Tiles held_tiles(i64 rows_held, i64 S, i64 s_blocks, int rows, int block_s) {
    Tiles t;
    t.N = rows_held; t.S = S; t.s_blocks = s_blocks; t.rows = rows; t.block_s = block_s;
    t.first = 0;
    t.last = (rows_held + rows - 1) / rows * s_blocks;
    return t;
}

// A loaded group stored into the held slice at `at`: x alone (the forward), or dy and x (the backward).
template <int V, typename T> __device__ __forceinline__ void hold(const Pack<T, V>& in, T* held, T*, i64 at) {
    store_pack<V>(held + at, in);
}
template <int V, typename T>
__device__ __forceinline__ void hold(const PackPair<T, V>& in, T* held_dy, T* held_x, i64 at) {
    store_pack<V>(held_dy + at, in.g);
    store_pack<V>(held_x + at, in.in);
}

// A channels-first reduction's op (MomentsRow, GradientSumsRow) that also stores what it loads into
// the held slice, rows of S values.
template <typename Op, typename T> struct Holding {
    static constexpr bool BATCHED = true;
    Op op; T* held; T* held_x; i64 S;   // held_x: the backward's second slice, else null
    template <int V> using Loaded = typename Op::template Loaded<V>;
    template <int V> __device__ __forceinline__ Loaded<V> load(i64 n, i64 s) const { return op.template load<V>(n, s); }
    template <int V> __device__ __forceinline__ void use(const Loaded<V>& in, i64 n, i64 s) const {
        hold<V>(in, held, held_x, n * S + s);
        op.template use<V>(in, n, s);
    }
    __device__ __forceinline__ void end_tile() const { op.end_tile(); }
};

// Channels-last: copies this thread's VEC channels of rows [0, rows) (every blockDim.y-th from
// threadIdx.y, as the column walks take them) from src (row stride stride_m) into the held slice
// (row stride width), with 2 * COLUMN_BATCH loads in flight a thread.
template <int VEC, typename T>
__device__ __forceinline__ void hold_columns(const T* src, i64 stride_m, i64 rows, T* held, i64 width) {
    constexpr int BATCH = 2 * COLUMN_BATCH;
    const T* from = src + threadIdx.y * stride_m;
    T* to = held + threadIdx.y * width;
    const i64 from_step = blockDim.y * stride_m, to_step = blockDim.y * width;
    i64 i = rows_from(threadIdx.y, rows);
    for (; i >= BATCH; i -= BATCH, from += BATCH * from_step, to += BATCH * to_step) {
        Pack<T, VEC> in[BATCH];
#pragma unroll
        for (int b = 0; b < BATCH; ++b) in[b] = load_pack<VEC>(from + b * from_step);
#pragma unroll
        for (int b = 0; b < BATCH; ++b) store_pack<VEC>(to + b * to_step, in[b]);
    }
    for (; i > 0; --i, from += from_step, to += to_step) store_pack<VEC>(to, load_pack<VEC>(from));
}
