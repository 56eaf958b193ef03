// BatchNorm kernels in CUDA C for the CuPy backend (bn_gpu/cupy_backend.py), compiled at run time by
// NVRTC through cupy.RawModule -- so no standard-library headers here, only the CUDA fp16/bf16 ones.
//
// The same kernels, under the same names, as the Triton backend (kernels/channels_first.py,
// channels_last.py, finalize.py), on the same split plan (bn_gpu/plan.py):
//   statistics_channels_first / _last            partial (count, mean - shift, M2) per (split, channel);
//                                                FINALIZE: its last blocks merge them (finalize_statistics)
//   finalize_statistics                          merge partials (Chan), mean, invstd, running stats
//   finalize_moments, merge_ranks                SyncBatchNorm: one process's moments; every rank's merged
//   normalize_channels_first / _last             y = (x - mean) * invstd * weight + bias (train, eval)
//   gradient_sums_channels_first / _last         partial sums of dy and dy * (x - mean);
//                                                FINALIZE: its last blocks sum them (finalize_gradients)
//   finalize_gradients                           totals, dweight, dbias
//   input_gradient_channels_first / _last        dx from dy, x and the totals
//   single_pass_forward_channels_first / _last   single pass when one block owns whole channels
//   single_pass_backward_channels_first / _last  (the launch plan has one split): 1 launch
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
// No atomics on values: every reduction has a fixed order, so results are bitwise reproducible; the
// only atomic is the fused finalize's integer ticket.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

typedef long long i64;

// ---- conversions ------------------------------------------------------------------------------

template <typename To, typename From> __device__ __forceinline__ To cvt(From v) { return static_cast<To>(v); }
template <> __device__ __forceinline__ float cvt<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float cvt<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ __half cvt<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 cvt<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

template <typename A> __device__ __forceinline__ A inv_sqrt(A v) { return A(1) / sqrt(v); }

// VEC consecutive values of type T, loaded or stored with one 16-byte access when VEC > 1.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <int VEC, typename T> __device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
    return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// load_pack through the read-only data path (ld.global.nc), for the inputs of a pass that stores
// (x, dy, the residual; no kernel writes its inputs, outputs are fresh tensors): a read-only load
// may be moved above a store, where through a plain pointer nvcc kept each load behind the store
// before it (y might have been x). Normalize, its loads batched, keeps 4 in flight a thread (static
// model: 16 -> 64 KB per SM in fp32); the channels-last dx takes 56 registers instead of 68. Not in
// the reductions, which store nothing: there nvcc scheduled the plain loads better (48-64 KB at
// once per SM against 32). Never for what other blocks of the same launch write (the partials).
template <int VEC, typename T> __device__ __forceinline__ Pack<T, VEC> load_pack_readonly(const T* p) {
    if constexpr (VEC * sizeof(T) == 16) {
        Pack<T, VEC> values;  // 16-byte aligned, as uint4
        *reinterpret_cast<uint4*>(&values) = __ldg(reinterpret_cast<const uint4*>(p));
        return values;
    } else {
        return load_pack<VEC>(p);
    }
}

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

// ---- tiles of the channels-first (N, C, S) view -----------------------------------------------

// A program (block) of channel c walks tiles [first, last) of the channel's (N, S) plane; a tile is
// `rows` batch rows by `block_s` spatial positions, as in bn_gpu/plan.py.
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
// at most one turn a row (bn_gpu/cupy_backend.py _tuning), so that a thread walks down the tile and
// finds in one walk all its groups of the tile (4 in full tiles), which `walk` loads at once: along
// rows of 1-3 groups a thread, most loads went one at a time (static model, walk_trips).
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
// first is used: left to the unroll, nvcc used each group before it loaded the next, one load in
// flight a thread. The other op (dx) is `apply`d, unrolled by UNROLL: batched, it took 96 registers
// in fp32 and twice the instructions per value (static model).
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
// is a multiple of VEC (bn_gpu/cupy_backend.py _vector_width_for), so a group never crosses the end
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

// ---- channels-last (M, C) -------------------------------------------------------------------------
// Blocks of at most CL_THREADS threads, shaped (channel threads, row threads) by the host
// (bn_gpu/cupy_backend.py): threadIdx.x owns VEC consecutive channels from c0 = (blockIdx.y *
// blockDim.x + threadIdx.x) * VEC, read with one 16-byte access per row when VEC > 1 -- the host
// chooses VEC > 1 only where C, every row stride and every pointer are multiples of VEC values, so a
// thread has all its VEC channels or none -- and threadIdx.y walks rows threadIdx.y, + blockDim.y,
// ... of the block's range. A block has at most CL_MAX_CHANNELS channels.
#if !defined(CL_THREADS) || !defined(CL_MAX_CHANNELS)
#error "compile with -DCL_THREADS=... -DCL_MAX_CHANNELS=... (bn_gpu.cupy_backend.COMPILE_OPTIONS)"
#endif

// VEC per-channel values of one thread (a struct, so that it stays in registers when passed on).
template <typename A, int VEC> struct Values { A v[VEC]; };

template <typename A, int VEC> __device__ __forceinline__ Values<A, VEC> zeros() {
    Values<A, VEC> z;
#pragma unroll
    for (int k = 0; k < VEC; ++k) z.v[k] = A(0);
    return z;
}

template <int VEC> __device__ __forceinline__ i64 first_channel() {
    return ((i64)blockIdx.y * blockDim.x + threadIdx.x) * VEC;
}

// How many of rows [first, end) a thread visits stepping by blockDim.y from `first`: the loops below
// count rows and step pointers, which the compiler unrolls (a loop on the row index did not).
__device__ __forceinline__ i64 rows_from(i64 first, i64 end) {
    return first < end ? (end - first + blockDim.y - 1) / blockDim.y : 0;
}

template <int VEC, typename T> __device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& values) {
    *reinterpret_cast<Pack<T, VEC>*>(p) = values;
}

// A 16-byte group stored with one access, through __stwb (st.global.wb.v4: the default caching):
// stored as a Pack, nvcc split it into four 32-bit stores (it did not keep the alignment of the cast).
template <int V, typename T> __device__ __forceinline__ void store_group(T* p, const Pack<T, V>& values) {
    if constexpr (V * sizeof(T) == 16) {
        __stwb(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&values));
    } else {
        *reinterpret_cast<Pack<T, V>*>(p) = values;
    }
}

// RunningMoments for the VEC channels of a thread, which share their rows and so their count.
template <typename A, int VEC> struct ColumnMoments {
    A count; Values<A, VEC> mean, m2;           // merged
    A n; Values<A, VEC> sum, squares;           // the open run
    __device__ __forceinline__ void add(const Values<A, VEC>& values) {
        n += A(1);
#pragma unroll
        for (int k = 0; k < VEC; ++k) { sum.v[k] += values.v[k]; squares.v[k] += values.v[k] * values.v[k]; }
    }
    // Chan's merge of the run into the moments, as merge() does for one channel.
    __device__ __forceinline__ void close() {
        if (n == A(0)) return;
        A total = count + n;
        A weight = n / total;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            A run_mean = sum.v[k] / n;
            A delta = run_mean - mean.v[k];
            mean.v[k] = merged_mean(mean.v[k], run_mean, delta, weight);
            m2.v[k] += (squares.v[k] - sum.v[k] * run_mean) + delta * delta * count * weight;
            sum.v[k] = A(0);
            squares.v[k] = A(0);
        }
        count = total;
        n = A(0);
    }
};

template <typename A, int VEC> __device__ __forceinline__ ColumnMoments<A, VEC> no_column_moments() {
    ColumnMoments<A, VEC> m;
    m.count = A(0); m.n = A(0);
    m.mean = zeros<A, VEC>(); m.m2 = zeros<A, VEC>(); m.sum = zeros<A, VEC>(); m.squares = zeros<A, VEC>();
    return m;
}

// The row threads of a channel column: each level of the trees below pairs the lower half with the
// upper one (of a power of two at least blockDim.y), in a fixed order, so results stay bitwise
// deterministic. A chain in the first row of threads, one channel after another -- 8 x 31
// dependent merges for bf16 -- kept the other warps waiting at its barriers: the CUDA C bf16
// channels-last statistics kernel took 156 us where the normalize pass over the same x took 54
// (H200, 2026-11-26, Nsight Compute: 43% of warp cycles stalled at a barrier).
__device__ __forceinline__ int column_tree_half() {
    int half = 1;
    while (2 * half < (int)blockDim.y) half *= 2;
    return half;
}

// The merged moments (count, mean, m2) of every channel of a thread over its column's row threads,
// all VEC channels at once (they share their rows, so their count), valid where threadIdx.y == 0.
// The open runs are closed (column_moments ends with one).
template <typename A, int VEC> __device__ void column_merge_tree(ColumnMoments<A, VEC>& m) {
    __shared__ A counts[CL_THREADS], means[VEC][CL_THREADS], m2s[VEC][CL_THREADS];
    const int i = threadIdx.y * blockDim.x + threadIdx.x;
    for (int half = column_tree_half(); half > 0; half /= 2) {
        __syncthreads();  // the previous level's reads are done
        if (threadIdx.y >= half && threadIdx.y < 2 * half) {
            counts[i] = m.count;
#pragma unroll
            for (int k = 0; k < VEC; ++k) { means[k][i] = m.mean.v[k]; m2s[k][i] = m.m2.v[k]; }
        }
        __syncthreads();
        const int other = i + half * blockDim.x;
        if (threadIdx.y < half && threadIdx.y + half < blockDim.y && counts[other] != A(0)) {
            const A count = counts[other], total = m.count + count, weight = count / total;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const A delta = means[k][other] - m.mean.v[k];
                m.mean.v[k] = merged_mean(m.mean.v[k], means[k][other], delta, weight);
                m.m2.v[k] += m2s[k][other] + delta * delta * m.count * weight;
            }
            m.count = total;
        }
    }
}

// a and b, VEC channels each, summed over a channel column's row threads, valid where
// threadIdx.y == 0 (as column_merge_tree).
template <typename A, int VEC> __device__ void column_sums_tree(Values<A, VEC>& a, Values<A, VEC>& b) {
    __shared__ A as[VEC][CL_THREADS], bs[VEC][CL_THREADS];
    const int i = threadIdx.y * blockDim.x + threadIdx.x;
    for (int half = column_tree_half(); half > 0; half /= 2) {
        __syncthreads();
        if (threadIdx.y >= half && threadIdx.y < 2 * half) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) { as[k][i] = a.v[k]; bs[k][i] = b.v[k]; }
        }
        __syncthreads();
        const int other = i + half * blockDim.x;
        if (threadIdx.y < half && threadIdx.y + half < blockDim.y) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) { a.v[k] += as[k][other]; b.v[k] += bs[k][other]; }
        }
    }
}

// The first row's values of channels c0.. : each channel's shift.
template <int VEC, typename T, typename A>
__device__ __forceinline__ Values<A, VEC> first_row(const T* x, i64 c0, bool active) {
    Values<A, VEC> shift = zeros<A, VEC>();
    if (active) {
        Pack<T, VEC> in = load_pack<VEC>(x + c0);
#pragma unroll
        for (int k = 0; k < VEC; ++k) shift.v[k] = finite_shift(cvt<A>(in.v[k]));
    }
    return shift;
}

template <int VEC, typename T, typename A>
__device__ __forceinline__ Values<A, VEC> shifted(const Pack<T, VEC>& in, const Values<A, VEC>& shift) {
    Values<A, VEC> values;
#pragma unroll
    for (int k = 0; k < VEC; ++k) values.v[k] = cvt<A>(in.v[k]) - shift.v[k];
    return values;
}

// Moments of x - shift over rows [row_begin, row_end) of channels c0.., this thread's share of them,
// the run of sums closed every 64 rows of the thread.
template <int VEC, typename T, typename A>
__device__ __forceinline__ ColumnMoments<A, VEC> column_moments(const T* x, i64 stride_m, i64 c0,
                                                                 const Values<A, VEC>& shift, i64 row_begin,
                                                                 i64 row_end) {
    ColumnMoments<A, VEC> moments = no_column_moments<A, VEC>();
    const i64 run = 64 * (i64)blockDim.y, step = blockDim.y * stride_m;
    for (i64 run_begin = row_begin + threadIdx.y; run_begin < row_end; run_begin += run) {
        i64 run_end = min(run_begin + run, row_end);
        const T* row = x + run_begin * stride_m + c0;
        const i64 rows = rows_from(run_begin, run_end);
        // Four rows loaded before the first is summed: left to the unroll, nvcc summed each row
        // before loading the next, one 16-byte load in flight a thread.
        i64 i = 0;
        for (; i + 4 <= rows; i += 4, row += 4 * step) {
            Pack<T, VEC> in[4];
#pragma unroll
            for (int b = 0; b < 4; ++b) in[b] = load_pack<VEC>(row + b * step);
#pragma unroll
            for (int b = 0; b < 4; ++b) moments.add(shifted(in[b], shift));
        }
        for (; i < rows; ++i, row += step) moments.add(shifted(load_pack<VEC>(row), shift));
        moments.close();
    }
    return moments;
}

// ---- channel groups (channels-first, GROUPED) ---------------------------------------------------
// Where rows of S values cannot start on 16 bytes (S = 49), a block owns `group` adjacent channels
// instead, c0 = blockIdx.x * group .. (bn_gpu/plan.py channel_group; the grid has C / group blocks
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

template <int WIDE> __device__ __forceinline__ GroupPlace<WIDE> group_place(i64 C, i64 S, int block_s) {
    GroupPlace<WIDE> p;
    p.group = C / gridDim.x;
    p.c0 = (i64)blockIdx.x * p.group;
    const int places = block_s / WIDE;   // a power of two, at most blockDim.x (the plan)
    p.s = (i64)(threadIdx.x % places) * WIDE;
    p.first_row = threadIdx.x / places;
    p.row_step = blockDim.x / places;
    p.active = p.s < p.group * S;
#pragma unroll
    for (int k = 0; k < WIDE; ++k) p.channel[k] = p.active ? (int)((p.s + k) / S) : 0;
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
// closed every 64 rows of the thread (as column_moments). Its batched loop is column_moments' own,
// written again: one helper for both moved nvcc's schedule, 16-24 KB less at once per SM in one
// kernel or the other (static model), and normalize through `walk` took 5 more registers.
template <int VEC, int WIDE, typename T, typename A>
__device__ __forceinline__ ColumnMoments<A, WIDE> place_moments(const T* x, i64 stride_n, const GroupPlace<WIDE>& p,
                                                                const Values<A, WIDE>& shift, i64 row_begin,
                                                                i64 row_end) {
    ColumnMoments<A, WIDE> moments = no_column_moments<A, WIDE>();
    const PlaceRows r = place_rows(p, row_begin, row_end);
    const T* row = x + r.first * stride_n + p.s;
    const i64 step = r.step * stride_n;
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
    __shared__ A mean_of[VEC][CL_THREADS];
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

// Writes channel c's mean and invstd and updates its running statistics; returns invstd.
template <typename A, typename R>
__device__ A store_statistics(
    i64 c, A count, A mean, A m2,
    A* mean_out, A* invstd_out,   // (C,) saved for the backward
    R* running_mean, R* running_var,   // (C,) updated in place when has_running_stats
    const i64* num_batches_tracked,   // batches before this one, read when cumulative
    double momentum, double eps, int has_running_stats, int cumulative) {
    A invstd = inv_sqrt(m2 / count + A(eps));
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
// As kernels/finalize.py, on the same counters and rows (bn_gpu/plan.py): the group_splits blocks of
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

// ---- statistics: partial moments per (split, channel) -------------------------------------------

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

template <typename T, typename A, typename R, int VEC, bool FINALIZE, bool GROUPED>
__global__ void statistics_channels_first(
    const T* __restrict__ x,   // input (N, C, S)
    A* part_count, A* part_mean, A* part_m2,   // (splits, C), FINALIZE (splits + split groups, C); part_mean is relative to x[0, c, 0]
    int* counters,   // FINALIZE: the fused finalize's int32 zeros, left at zero; else null
    A* mean_out, A* invstd_out, R* running_mean, R* running_var,   // FINALIZE: see store_statistics
    const i64* num_batches_tracked,
    i64 N, i64 C, i64 S, i64 stride_n, i64 stride_c,
    i64 s_blocks, i64 total_tiles, i64 tiles_per_program, int rows, int block_s,
    i64 group_splits, double momentum, double eps, int has_running_stats, int cumulative) {
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

template <typename T, typename A, typename R, int VEC, bool FINALIZE>
__global__ void statistics_channels_last(
    const T* __restrict__ x,   // input (M, C)
    A* part_count, A* part_mean, A* part_m2,   // (splits, C), FINALIZE (splits + split groups, C); part_mean is relative to x[0, c]
    int* counters,   // FINALIZE: the fused finalize's int32 zeros, left at zero; else null
    A* mean_out, A* invstd_out, R* running_mean, R* running_var,   // FINALIZE: see store_statistics
    const i64* num_batches_tracked,
    i64 M, i64 C, i64 stride_m, i64 rows_per_program,
    i64 group_splits, double momentum, double eps, int has_running_stats, int cumulative) {
    const i64 c0 = first_channel<VEC>();
    const bool active = c0 < C;
    const i64 row_begin = (i64)blockIdx.x * rows_per_program;
    const i64 row_end = min(row_begin + rows_per_program, M);
    const Values<A, VEC> shift = first_row<VEC, T, A>(x, c0, active);
    ColumnMoments<A, VEC> moments = no_column_moments<A, VEC>();
    if (active) moments = column_moments<VEC>(x, stride_m, c0, shift, row_begin, row_end);
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

template <typename T, typename A, bool FUSED> struct NormalizeRow {
    static constexpr bool BATCHED = true;
    const T* x; T* y; const T* residual; i64 x_stride_n, y_stride_n; A mean, scale, shift; int relu;
    // FUSED (a compile-time choice): with the epilogue; without it the code is the plain pass.
    template <int V> using Loaded = PackAndResidual<T, V>;
    template <int V> __device__ __forceinline__ Loaded<V> load(i64 n, i64 s) const {
        Loaded<V> loaded;
        loaded.in = load_pack_readonly<V>(x + n * x_stride_n + s);
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

template <typename T, typename W, typename R, typename A, int VEC, bool FUSED, bool GROUPED>
__global__ void normalize_channels_first(
    const T* __restrict__ x, T* __restrict__ y,   // (N, C, S), each with its own strides
    const T* __restrict__ residual,   // (N, C, S) with y's strides, or null
    const A* mean_in, const A* invstd_in,   // (C,) training statistics
    const R* running_mean, const R* running_var,   // (C,) eval statistics
    A* saved_mean, A* saved_invstd,   // (C,) eval: written by split 0
    const W* weight, const W* bias,   // (C,) or null
    i64* num_batches_tracked,   // incremented by block (0, 0), or null
    i64 N, i64 C, i64 S, i64 x_stride_n, i64 x_stride_c, i64 y_stride_n, i64 y_stride_c, double eps,
    i64 s_blocks, i64 total_tiles, i64 tiles_per_program, int rows, int block_s, int from_running_stats, int relu) {
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

template <typename T, typename W, typename R, typename A, int VEC, bool FUSED>
__global__ void normalize_channels_last(
    const T* __restrict__ x, T* __restrict__ y,   // (M, C), each with its own row stride
    const T* __restrict__ residual,   // (M, C) with y's row stride, or null
    const A* mean_in, const A* invstd_in, const R* running_mean, const R* running_var,
    A* saved_mean, A* saved_invstd, const W* weight, const W* bias, i64* num_batches_tracked,
    i64 M, i64 C, i64 x_stride_m, i64 y_stride_m, double eps, i64 rows_per_program, int from_running_stats,
    int relu) {
    const i64 c0 = first_channel<VEC>();
    if (threadIdx.x == 0 && threadIdx.y == 0) count_batch(num_batches_tracked, blockIdx.x == 0 && blockIdx.y == 0);
    if (c0 >= C) return;
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

// Adds V values of one row to a thread's sum(dy) and sum(dy * (x - mean)).
// dy through a ReLU that followed the BatchNorm (no residual), its mask recomputed from x as the
// forward computed the ReLU's input, (x - mean) * scale + shift, rather than read from memory.
template <typename A> struct ReluMask {
    int on; A mean, scale, shift;
    __device__ __forceinline__ A apply(A dy, A x) const {
        return on && (x - mean) * scale + shift <= A(0) ? A(0) : dy;  // a NaN input passes dy on, as torch's ReLU
    }
};

template <typename W, typename A>
__device__ __forceinline__ ReluMask<A> relu_mask(i64 c, int on, const A* mean, const A* invstd, const W* weight,
                                                const W* bias) {
    ReluMask<A> m = {on, A(0), A(0), A(0)};
    if (on) {
        m.mean = mean[c];
        affine_from(c, invstd[c], weight, bias, m.scale, m.shift);
    }
    return m;
}

template <typename T, int V> struct PackPair { Pack<T, V> g, in; };

template <typename T, typename A, bool FUSED> struct GradientSumsRow {
    static constexpr bool BATCHED = true;
    const T* dy; const T* x; i64 dy_stride_n, x_stride_n; A mean; A* sum_dy; A* sum_dy_xmu; ReluMask<A> relu;
    template <int V> using Loaded = PackPair<T, V>;
    template <int V> __device__ __forceinline__ Loaded<V> load(i64 n, i64 s) const {
        return {load_pack<V>(dy + n * dy_stride_n + s), load_pack<V>(x + n * x_stride_n + s)};
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
    for_each_group<VEC, false>(t, first, last, op);
    sum_dy = block_sum<A, 0>(sum_dy);
    sum_dy_xmu = block_sum<A, 1>(sum_dy_xmu);
}

// The ReLU masks of a thread's values (see relu_mask), by their channels.
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
#pragma unroll 2
    for (i64 i = r.count; i > 0; --i, dy_row += dy_step, x_row += x_step) {
        Pack<T, WIDE> g = read_place<VEC, WIDE>(dy_row);
        Pack<T, WIDE> in = read_place<VEC, WIDE>(x_row);
#pragma unroll
        for (int k = 0; k < WIDE; ++k) {
            A xv = cvt<A>(in.v[k]);
            A d = cvt<A>(g.v[k]);
            if constexpr (FUSED) d = relu.v[k].apply(d, xv);
            sum_dy.v[k] += d;
            sum_dy_xmu.v[k] += d * (xv - mean.v[k]);
        }
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
                                          mean, place_relu_masks(p, relu, mean_in, invstd_in, weight, bias),
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

template <typename T, typename W, typename A, int VEC, bool FUSED, bool FINALIZE, bool GROUPED>
__global__ void gradient_sums_channels_first(
    const T* __restrict__ dy, const T* __restrict__ x, const A* mean_in,
    const A* invstd_in,   // read for the ReLU's mask when relu, and by FINALIZE
    const W* weight, const W* bias,   // read for the ReLU's mask when relu
    A* part_sum_dy, A* part_sum_dy_xmu,   // (splits, C), FINALIZE (splits + split groups, C)
    int* counters,   // FINALIZE: the fused finalize's int32 zeros, left at zero; else null
    A* sum_dy_out, A* sum_dy_xmu_out, W* grad_weight, W* grad_bias,   // FINALIZE: see finalize_gradients
    i64 N, i64 C, i64 S, i64 dy_stride_n, i64 dy_stride_c, i64 x_stride_n, i64 x_stride_c,
    i64 s_blocks, i64 total_tiles, i64 tiles_per_program, int rows, int block_s, i64 group_splits, int relu) {
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
    ReluMask<A> mask = relu_mask(c, relu, mean_in, invstd_in, weight, bias);
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

// The ReLU masks of channels c0.. (see relu_mask).
template <int VEC, typename W, typename A>
__device__ __forceinline__ Values<ReluMask<A>, VEC> relu_masks(i64 c0, int on, const A* mean, const A* invstd,
                                                                const W* weight, const W* bias) {
    Values<ReluMask<A>, VEC> masks;
#pragma unroll
    for (int k = 0; k < VEC; ++k) masks.v[k] = relu_mask(c0 + k, on, mean, invstd, weight, bias);
    return masks;
}

// This thread's share of sum(dy) and sum(dy * (x - mean)) over rows [row_begin, row_end) of channels c0..
template <int VEC, bool FUSED, typename T, typename A>
__device__ __forceinline__ void column_gradient_sums(const T* dy, const T* x, i64 dy_stride_m, i64 x_stride_m, i64 c0,
                                                     const Values<A, VEC>& mean, const Values<ReluMask<A>, VEC>& relu,
                                                     i64 row_begin, i64 row_end, Values<A, VEC>& sum_dy,
                                                     Values<A, VEC>& sum_dy_xmu) {
    const i64 first = row_begin + threadIdx.y, dy_step = blockDim.y * dy_stride_m, x_step = blockDim.y * x_stride_m;
    const T* dy_row = dy + first * dy_stride_m + c0;
    const T* x_row = x + first * x_stride_m + c0;
#pragma unroll 2
    for (i64 i = rows_from(first, row_end); i > 0; --i, dy_row += dy_step, x_row += x_step) {
        Pack<T, VEC> g = load_pack<VEC>(dy_row);
        Pack<T, VEC> in = load_pack<VEC>(x_row);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            A xv = cvt<A>(in.v[k]);
            A d = cvt<A>(g.v[k]);
            if constexpr (FUSED) d = relu.v[k].apply(d, xv);
            sum_dy.v[k] += d;
            sum_dy_xmu.v[k] += d * (xv - mean.v[k]);
        }
    }
}

template <typename T, typename W, typename A, int VEC, bool FUSED, bool FINALIZE>
__global__ void gradient_sums_channels_last(
    const T* __restrict__ dy, const T* __restrict__ x, const A* mean_in,
    const A* invstd_in,   // read for the ReLU's mask when relu, and by FINALIZE
    const W* weight, const W* bias,   // read for the ReLU's mask when relu
    A* part_sum_dy, A* part_sum_dy_xmu,   // (splits, C), FINALIZE (splits + split groups, C)
    int* counters,   // FINALIZE: the fused finalize's int32 zeros, left at zero; else null
    A* sum_dy_out, A* sum_dy_xmu_out, W* grad_weight, W* grad_bias,   // FINALIZE: see finalize_gradients
    i64 M, i64 C, i64 dy_stride_m, i64 x_stride_m, i64 rows_per_program, i64 group_splits, int relu) {
    const i64 c0 = first_channel<VEC>();
    const bool active = c0 < C;
    const i64 row_begin = (i64)blockIdx.x * rows_per_program;
    const i64 row_end = min(row_begin + rows_per_program, M);
    Values<A, VEC> sum_dy = zeros<A, VEC>(), sum_dy_xmu = zeros<A, VEC>();
    if (active) {
        Values<A, VEC> mean;
#pragma unroll
        for (int k = 0; k < VEC; ++k) mean.v[k] = mean_in[c0 + k];
        column_gradient_sums<VEC, FUSED>(dy, x, dy_stride_m, x_stride_m, c0, mean,
                                         relu_masks<VEC>(c0, relu, mean_in, invstd_in, weight, bias), row_begin,
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

template <typename T, typename W, typename A, int VEC, bool FUSED, bool GROUPED>
__global__ void input_gradient_channels_first(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,   // (N, C, S)
    const A* mean_in, const A* invstd_in, const W* weight,
    const W* bias,   // read for the ReLU's mask when relu
    const A* sum_dy, const A* sum_dy_xmu,
    i64 N, i64 C, i64 S, i64 dy_stride_n, i64 dy_stride_c, i64 x_stride_n, i64 x_stride_c,
    i64 dx_stride_n, i64 dx_stride_c, A inv_count,
    i64 s_blocks, i64 total_tiles, i64 tiles_per_program, int rows, int block_s, int training, int relu) {
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

// dx over this thread's rows [row_begin, row_end) of channels c0.. (x read in training, or for the ReLU's mask).
template <int VEC, bool FUSED, typename T, typename A>
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
            // Read-only loads where they helped: with the ReLU's mask they doubled the instructions per
            // value and halved the loads at once (static model, H200 target).
            Pack<T, VEC> g = FUSED ? load_pack<VEC>(dy_row) : load_pack_readonly<VEC>(dy_row);
            Pack<T, VEC> in = FUSED ? load_pack<VEC>(x_row) : load_pack_readonly<VEC>(x_row);
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
            Pack<T, VEC> g = load_pack_readonly<VEC>(dy_row);
            Pack<T, VEC> out;
#pragma unroll
            for (int k = 0; k < VEC; ++k) out.v[k] = cvt<T>(scale.v[k] * cvt<A>(g.v[k]));
            store_pack<VEC>(dx_row, out);
        }
    }
}

template <typename T, typename W, typename A, int VEC, bool FUSED>
__global__ void input_gradient_channels_last(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx,   // (M, C)
    const A* mean_in, const A* invstd_in, const W* weight,
    const W* bias,   // read for the ReLU's mask when relu
    const A* sum_dy, const A* sum_dy_xmu,
    i64 M, i64 C, i64 dy_stride_m, i64 x_stride_m, i64 dx_stride_m, A inv_count, i64 rows_per_program,
    int training, int relu) {
    const i64 c0 = first_channel<VEC>();
    if (c0 >= C) return;
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
    if (active) {
        Values<A, VEC> mean, scale, bias_c;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            const int slot = threadIdx.x * VEC + k;
            mean.v[k] = channel_mean[slot];
            affine_from(c0 + k, channel_invstd[slot], weight, bias, scale.v[k], bias_c.v[k]);
        }
        column_normalize<VEC, FUSED>(x, y, residual, x_stride_m, y_stride_m, c0, mean, scale, bias_c, relu, i64(0),
                                     M);
    }
    // Last, as in single_pass_forward_channels_first (every thread of the block gets here).
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
    const Values<ReluMask<A>, WIDE> masks = place_relu_masks(p, relu, mean_in, invstd_in, weight, bias);
    place_gradient_sums<VEC, WIDE, FUSED>(dyg, xg, dy_stride_n, x_stride_n, p, mean, masks, i64(0), N, sum_dy,
                                          sum_dy_xmu);
    for (int j = 0; j < p.group; ++j) {
        A total_dy, total_dy_xmu;
        channel_sums(sum_dy, sum_dy_xmu, p, j, total_dy, total_dy_xmu);
        if (threadIdx.x == 0) { totals[0][j] = total_dy; totals[1][j] = total_dy_xmu; }
    }
    __syncthreads();
    if (threadIdx.x < p.group)  // thread j writes channel j's gradients
        store_gradients(p.c0 + threadIdx.x, totals[0][threadIdx.x], totals[1][threadIdx.x],
                        invstd_in[p.c0 + threadIdx.x], grad_weight, grad_bias);
    if (!need_input_grad) return;
    Values<A, WIDE> mean_x, scale, mean_dy, projection;
#pragma unroll
    for (int k = 0; k < WIDE; ++k) {
        const int j = p.channel[k];
        dx_coefficients(p.c0 + j, mean.v[k], invstd_in[p.c0 + j], weight, totals[0][j], totals[1][j], inv_count,
                        training, mean_x.v[k], scale.v[k], mean_dy.v[k], projection.v[k]);
    }
    place_input_gradient<VEC, WIDE, FUSED>(dyg, xg, dx + p.c0 * dx_stride_c, dy_stride_n, x_stride_n, dx_stride_n, p,
                                           mean_x, scale, mean_dy, projection, training, masks, i64(0), N);
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
    ReluMask<A> mask = relu_mask(c, relu, mean_in, invstd_in, weight, bias);
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
    const Values<ReluMask<A>, VEC> masks = relu_masks<VEC>(c0, relu && active, mean_in, invstd_in, weight, bias);
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
    Values<A, VEC> mean_x, scale, mean_dy, projection;
#pragma unroll
    for (int k = 0; k < VEC; ++k)
        dx_coefficients(c0 + k, mean.v[k], invstd.v[k], weight, totals[0][threadIdx.x * VEC + k],
                        totals[1][threadIdx.x * VEC + k], inv_count, training, mean_x.v[k], scale.v[k], mean_dy.v[k],
                        projection.v[k]);
    column_input_gradient<VEC, FUSED>(dy, x, dx, dy_stride_m, x_stride_m, dx_stride_m, c0, mean_x, scale, mean_dy,
                                      projection, training, masks, i64(0), M);
}
