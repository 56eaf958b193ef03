// The channels-first (N, C, S) view: tiles, a thread's walk over its groups of a tile, and a
// channel's moments over a range of tiles.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
#pragma once
#include "merges.cuh"

// ---- tiles of the channels-first (N, C, S) view -----------------------------------------------

// A program (block) of channel c walks tiles [first, last) of the channel's (N, S) plane; a tile is
// `rows` batch rows by `block_s` spatial positions, as in bn_gpu/backends/plan.py.
struct Tiles {
    i64 N, S, s_blocks, first, last;
    int rows, block_s;
};

__device__ __forceinline__ Tiles program_tiles(i64 N, i64 S, i64 s_blocks, i64 total_tiles, i64 tiles_per_program,
                                               int rows, int block_s) {
    Tiles t;
    t.N = N; t.S = S; t.s_blocks = s_blocks; t.rows = rows; t.block_s = block_s;
    t.first = (i64)blockIdx.y * tiles_per_program;
    t.last = min(t.first + tiles_per_program, total_tiles);
    return t;
}

// A thread's part of every tile. block_s and blockDim.x are powers of two (the plan, THREADS), so a
// tile row of block_s / VEC groups either spans several threads' turns -- `across`: each thread
// takes every blockDim.x-th group of every row -- or a whole number of rows share one turn: each
// thread keeps one group and takes every step-th row. Found once per program; the steps are
// powers of two, so the loops below count their iterations with a shift. The host plans tiles of
// at most one turn a row (bn_gpu/backends/cupy/table.py, tuning_for), so that a thread walks down the
// tile and finds in one walk all its groups of the tile (4 in full tiles), which `walk` loads at
// once: along rows of 1-3 groups a thread, most loads would go one at a time.
struct TileWalk {
    bool across;
    int row, group;      // the thread's first row and group of a tile
    int step_log2;       // across: log2(blockDim.x * VEC) values along a row; else log2 of the row step
};

__device__ __forceinline__ int log2_of(int power_of_two) { return __ffs(power_of_two) - 1; }

template <int VEC> __device__ __forceinline__ TileWalk tile_walk(int block_s) {
    const int groups_per_row = block_s / VEC;
    if (groups_per_row > (int)blockDim.x) return {true, 0, (int)threadIdx.x, log2_of((int)blockDim.x * VEC)};
    return {false, (int)threadIdx.x / groups_per_row, (int)threadIdx.x % groups_per_row,
            log2_of((int)blockDim.x / groups_per_row)};
}

// How many of [first, end) a walk from `first` by 2**step_log2 visits.
__device__ __forceinline__ i64 visits(i64 first, i64 end, int step_log2) {
    return first < end ? ((end - first - 1) >> step_log2) + 1 : 0;
}

// `count` groups from (n, s), stepping along the row (ALONG: s += step) or down (n += step). An op
// with BATCHED (the reductions, normalize) has its loads and its arithmetic apart, `load` and `use`
// (which gets the group's place, for the ops that store), and UNROLL groups are loaded before the
// first is used: left to the unroll, nvcc uses each group before it loads the next, one load in
// flight a thread. The other op (dx) is `apply`d, unrolled by UNROLL: batched, it would need far
// more registers and instructions per value.
template <int VEC, int UNROLL, bool ALONG, typename Op>
__device__ __forceinline__ void walk(Op& op, i64 count, i64 n, i64 s, i64 step) {
    if constexpr (Op::BATCHED) {
        for (; count >= UNROLL; count -= UNROLL) {
            typename Op::template Loaded<VEC> in[UNROLL];
#pragma unroll
            for (int b = 0; b < UNROLL; ++b)
                in[b] = ALONG ? op.template load<VEC>(n, s + b * step) : op.template load<VEC>(n + b * step, s);
#pragma unroll
            for (int b = 0; b < UNROLL; ++b) {
                if (ALONG) op.template use<VEC>(in[b], n, s + b * step);
                else op.template use<VEC>(in[b], n + b * step, s);
            }
            if (ALONG) s += UNROLL * step; else n += UNROLL * step;
        }
        for (; count > 0; --count) {
            op.template use<VEC>(op.template load<VEC>(n, s), n, s);
            if (ALONG) s += step; else n += step;
        }
    } else if constexpr (ALONG) {
#pragma unroll UNROLL
        for (i64 i = 0; i < count; ++i, s += step) op.template apply<VEC>(n, s);
    } else {
#pragma unroll UNROLL
        for (i64 i = 0; i < count; ++i, n += step) op.template apply<VEC>(n, s);
    }
}

// Walks this thread's VEC-wide groups of tiles [first, last) with `walk` (n the row, s the first of
// VEC positions), and calls op.end_tile() after each tile; REVERSED walks the tiles from the last
// (a second pass: what a reduction read last is still in L2). The host takes VEC > 1 only where S
// is a multiple of VEC (bn_gpu/backends/cupy/table.py, _vector_width_for), so a group never crosses the end
// of a row. The tile's (row block, s block) is stepped with a carry: one division per program. The
// inner loops run a counted number of times, which nvcc unrolls into copies without a branch
// between them (on a bound such as s < end it kept a branch after each copy, and each load waited
// for the one before).
template <int VEC, bool REVERSED, int UNROLL = 4, typename Op>
__device__ __forceinline__ void for_each_group(const Tiles& t, i64 first, i64 last, Op& op) {
    if (first >= last) return;
    const TileWalk w = tile_walk<VEC>(t.block_s);
    const i64 tile = REVERSED ? last - 1 : first;
    i64 n_block = tile / t.s_blocks, s_block = tile - n_block * t.s_blocks;
    for (i64 left = last - first; left > 0; --left) {
        const i64 n0 = n_block * t.rows, s0 = s_block * t.block_s;
        const i64 n_end = min(n0 + t.rows, t.N), s_end = min(s0 + t.block_s, t.S);
        const i64 s_first = s0 + (i64)w.group * VEC;
        if (w.across) {
            const i64 count = visits(s_first, s_end, w.step_log2);
            for (i64 n = n0; n < n_end; ++n) walk<VEC, UNROLL, true>(op, count, n, s_first, i64(1) << w.step_log2);
        } else if (s_first < s_end) {
            walk<VEC, UNROLL, false>(op, visits(n0 + w.row, n_end, w.step_log2), n0 + w.row, s_first,
                                     i64(1) << w.step_log2);
        }
        op.end_tile();
        if (REVERSED) {
            if (s_block-- == 0) { s_block = t.s_blocks - 1; --n_block; }
        } else if (++s_block == t.s_blocks) {
            s_block = 0; ++n_block;
        }
    }
}

// ---- forward ----------------------------------------------------------------------------------

// Adds V shifted values of one row to a thread's running moments.
template <typename T, typename A> struct MomentsRow {
    static constexpr bool BATCHED = true;
    const T* x; i64 stride_n; A shift; RunningMoments<A>* moments;
    template <int V> using Loaded = Pack<T, V>;
    template <int V> __device__ __forceinline__ Loaded<V> load(i64 n, i64 s) const {
        return load_pack<V>(x + n * stride_n + s);
    }
    template <int V> __device__ __forceinline__ void use(const Loaded<V>& in, i64, i64) const {
        A values[V];
#pragma unroll
        for (int k = 0; k < V; ++k) values[k] = cvt<A>(in.v[k]) - shift;
        moments->add(values);
    }
    __device__ __forceinline__ void end_tile() const { moments->close(); }
};

// Moments of x - shift of one channel over tiles [first, last), valid in thread 0. The shift, a value
// of the channel, keeps the low bits when |mean| >> std: the subtraction is exact near it, and the
// squares do not cancel. A thread's run of sums closes at the end of each tile.
template <typename T, typename A, int VEC>
__device__ Moments<A> block_moments(const Tiles& t, i64 first, i64 last, const T* xc, i64 stride_n, A shift) {
    RunningMoments<A> moments = no_moments<A>();
    MomentsRow<T, A> op = {xc, stride_n, shift, &moments};
    for_each_group<VEC, false>(t, first, last, op);
    return block_merge(moments.merged);
}
