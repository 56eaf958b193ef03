// The channels-first (N, C, S) view: tiles, a thread's walk over its groups of a tile, and a
// channel's moments over a range of tiles.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
#pragma once
#include "merges.cuh"
#include "async_copies.cuh"

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

// ---- the reductions' walk with copies ahead -------------------------------------------------------

// The reductions' walk (forward only) with a thread's next groups copied into shared memory while it
// adds the current ones (async_copies.cuh). A thread's groups of a tile -- at most STAGED_GROUPS,
// down one column: rows n + i * step at s -- go in copies of UNIT groups of each of the op's STREAMS
// inputs, into two buffers: one copy in flight while the thread adds the other. With STAGED_GROUPS 4
// (a 16 KB tile over THREADS threads, the host's tiles) the statistics copy whole tiles (UNIT 4) and
// the gradient sums half tiles of dy and x (UNIT 2): 16 KB a copy, 32 KB of static shared memory a
// block either way. Blocks are 1-D of CL_THREADS (THREADS) threads; the buffers are indexed
// [buffer][slot][thread], so a warp's 16-byte slots are consecutive (no bank conflicts). The op
// gives each stream's address and step down the column (`column`) and reads a copied group back
// (`copied`). Used where a thread's groups of a tile are down one column (tile_walk not `across`),
// at most STAGED_GROUPS of them, 16 bytes each (`stageable`); else for_each_group.
constexpr int STAGED_GROUPS = 4;

template <typename Op, int VEC>
__device__ __forceinline__ bool stageable(const Tiles& t) {
    if constexpr (VEC * sizeof(typename Op::Value) != 16) {
        return false;
    } else {
        const int groups_per_row = t.block_s / VEC;
        return groups_per_row <= (int)blockDim.x && (i64)t.rows * groups_per_row <= (i64)STAGED_GROUPS * blockDim.x;
    }
}

// Where a thread's groups of the tile under the cursor are: `count` groups (at most STAGED_GROUPS)
// from each stream's `from`, `stride` apart down the column. Along a row block the groups move by
// block_s values (`along`); a new row block finds its addresses and its rows' count again (`down`).
template <typename T, int STREAMS> struct StagedTile {
    const T* from[STREAMS];
    i64 stride[STREAMS];
    i64 n_block, s_block, s;
    int rows, count;   // the thread's groups of a tile of this row block; of this tile

    template <int VEC, typename Op>
    __device__ __forceinline__ void start(const Tiles& t, const TileWalk& w, const Op& op) {
        const i64 n0 = n_block * t.rows, n = n0 + w.row;
        s = s_block * t.block_s + (i64)w.group * VEC;
        rows = (int)visits(n, min(n0 + t.rows, t.N), w.step_log2);
        count = s < t.S ? rows : 0;
        op.column(n, s, i64(1) << w.step_log2, from, stride);
    }
    __device__ __forceinline__ void along(const Tiles& t) {
        ++s_block;
        s += t.block_s;
#pragma unroll
        for (int m = 0; m < STREAMS; ++m) from[m] += t.block_s;
        count = s < t.S ? rows : 0;
    }
    template <int VEC, typename Op>
    __device__ __forceinline__ void down(const Tiles& t, const TileWalk& w, const Op& op) {
        s_block = 0; ++n_block;
        start<VEC>(t, w, op);
    }
};

// Copies unit `u` of a tile (its groups [u * UNIT, u * UNIT + UNIT) that exist; WHOLE: all of them,
// unchecked) into `buffer`.
template <int UNIT, bool WHOLE = false, typename T, int STREAMS>
__device__ __forceinline__ void copy_unit(const StagedTile<T, STREAMS>& g, int u, unsigned buffer) {
#pragma unroll
    for (int i = 0; i < UNIT; ++i) {
        if (WHOLE || u * UNIT + i < g.count) {
#pragma unroll
            for (int m = 0; m < STREAMS; ++m)
                copy_async(buffer + (m * UNIT + i) * (CL_THREADS * 16), g.from[m] + (u * UNIT + i) * g.stride[m]);
        }
    }
}

// Adds the tile under `ahead`, whose first unit is copied (into the buffer at `flip`): each unit is
// added once the copy after it -- the tile's next unit, or the first of the tile `advance` moves
// `ahead` to, if it does -- is issued. WHOLE: the tile and the next have all their groups (no checks).
template <int VEC, int UNIT, bool WHOLE, typename Op, typename Cursor, typename Advance>
__device__ __forceinline__ void add_staged_tile(Op& op, Cursor& ahead, unsigned base, const uint4* slots,
                                                unsigned& flip, Advance advance) {
    constexpr int UNITS = STAGED_GROUPS / UNIT;                  // copies a tile
    constexpr unsigned BUFFER = Op::STREAMS * UNIT * CL_THREADS * 16;  // bytes of a buffer
    const int count = ahead.count;
#pragma unroll
    for (int u = 0; u < UNITS; ++u) {
        if (u + 1 < UNITS) copy_unit<UNIT, WHOLE>(ahead, u + 1, base + (flip ^ BUFFER));
        else if (advance()) copy_unit<UNIT, WHOLE>(ahead, 0, base + (flip ^ BUFFER));
        commit_copies();   // empty past the end: one copy is still the one left in flight
        wait_copies<1>();  // unit u has landed
        const uint4* slot = slots + flip / 16;
#pragma unroll
        for (int i = 0; i < UNIT; ++i)
            if (WHOLE || u * UNIT + i < count)
                op.template use<VEC>(op.template copied<VEC>(slot + i * CL_THREADS, UNIT * CL_THREADS), 0, 0);
        flip ^= BUFFER;
    }
    op.end_tile();
}

template <int VEC, int UNIT, typename Op>
__device__ __forceinline__ void for_each_group_staged(const Tiles& t, i64 first, i64 last, Op& op) {
    __shared__ uint4 buffers[2][Op::STREAMS * UNIT][CL_THREADS];
    const unsigned base = shared_address(&buffers[0][0][threadIdx.x]);
    const uint4* slots = &buffers[0][0][threadIdx.x];
    const TileWalk w = tile_walk<VEC>(t.block_s);
    StagedTile<typename Op::Value, Op::STREAMS> ahead;   // the tile whose copies are being issued
    ahead.n_block = first / t.s_blocks;
    ahead.s_block = first - ahead.n_block * t.s_blocks;
    ahead.template start<VEC>(t, w, op);
    unsigned flip = 0;   // the buffer of the copy being added: its byte offset, 0 or one buffer's
    copy_unit<UNIT>(ahead, 0, base);
    commit_copies();
    auto along = [&] { ahead.along(t); return true; };
    for (i64 tile = first; tile < last; ++tile) {
        // The tiles after this one in its row block -- first those whose groups, and the next
        // tile's, are all there -- then the last, which moves `ahead` down.
        i64 following = min(last - 1 - tile, t.s_blocks - 1 - ahead.s_block);
        for (; following > 0 && ahead.count == STAGED_GROUPS && ahead.s + t.block_s < t.S; --following, ++tile)
            add_staged_tile<VEC, UNIT, true>(op, ahead, base, slots, flip, along);
#pragma unroll 1
        for (; following > 0; --following, ++tile) add_staged_tile<VEC, UNIT, false>(op, ahead, base, slots, flip, along);
        add_staged_tile<VEC, UNIT, false>(op, ahead, base, slots, flip, [&] {
            if (tile + 1 == last) return false;
            ahead.template down<VEC>(t, w, op);
            return true;
        });
    }
}

// for_each_group (forward) through the staged walk where it applies.
template <int VEC, int UNIT, typename Op>
__device__ __forceinline__ void reduce_groups(const Tiles& t, i64 first, i64 last, Op& op) {
    if (stageable<Op, VEC>(t)) for_each_group_staged<VEC, UNIT>(t, first, last, op);
    else for_each_group<VEC, false>(t, first, last, op);
}

// ---- forward ----------------------------------------------------------------------------------

// Adds V shifted values of one row to a thread's running moments.
template <typename T, typename A> struct MomentsRow {
    static constexpr bool BATCHED = true;
    static constexpr int STREAMS = 1;
    using Value = T;
    const T* x; i64 stride_n; A shift; RunningMoments<A>* moments;
    template <int V> using Loaded = Pack<T, V>;
    template <int V> __device__ __forceinline__ Loaded<V> load(i64 n, i64 s) const {
        return load_pack<V>(x + n * stride_n + s);
    }
    __device__ __forceinline__ void column(i64 n, i64 s, i64 step, const T* (&from)[1], i64 (&stride)[1]) const {
        from[0] = x + n * stride_n + s;
        stride[0] = step * stride_n;
    }
    template <int V> __device__ __forceinline__ Loaded<V> copied(const uint4* slot, int) const {
        return copied_pack<V, T>(slot);
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
    reduce_groups<VEC, STAGED_GROUPS>(t, first, last, op);
    return block_merge(moments.merged);
}
