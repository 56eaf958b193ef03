// The channels-last (M, C) view: a thread's columns of VEC channels, the rows it walks, and
// merges across a block's row threads.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
#pragma once
#include "channels_first.cuh"

// ---- channels-last (M, C) -------------------------------------------------------------------------
// Blocks of at most CL_THREADS threads, shaped (channel threads, row threads) by the host
// (bn_gpu/backends/cupy/table.py): threadIdx.x owns VEC consecutive channels from c0 = (blockIdx.y *
// blockDim.x + threadIdx.x) * VEC, read with one 16-byte access per row when VEC > 1 -- the host
// chooses VEC > 1 only where C, every row stride and every pointer are multiples of VEC values, so a
// thread has all its VEC channels or none -- and threadIdx.y walks rows threadIdx.y, + blockDim.y,
// ... of the block's range. A block has at most CL_MAX_CHANNELS channels.
#if !defined(CL_THREADS) || !defined(CL_MAX_CHANNELS)
#error "compile with -DCL_THREADS=... -DCL_MAX_CHANNELS=... (bn_gpu.backends.cupy.compilation.COMPILE_OPTIONS)"
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
// deterministic. A chain in the first row of threads, one channel after another (8 x 31 dependent
// merges for bf16), would keep the other warps waiting at its barriers; a tree takes log2 levels.
__device__ __forceinline__ int column_tree_half() {
    int half = 1;
    while (2 * half < (int)blockDim.y) half *= 2;
    return half;
}

// A level's writers are the row threads [half, 2 * half) below blockDim.y -- at most half the
// block, as 2 * half >= blockDim.y -- so the trees keep half a block's slots: the slot of the row
// thread `half` rows above the reader `row`.
constexpr int TREE_SLOTS = CL_THREADS / 2;
__device__ __forceinline__ int tree_slot(int row) { return row * blockDim.x + threadIdx.x; }

// The trees' slots: one array for a kernel's trees of VEC channels in A, which they take in turn
// (each level opens with a barrier), as large as the wider, column_merge_tree's (a count, VEC means
// and VEC M2s). An array for each tree would take as much again each, and the 16-bit statistics'
// staged buffers (staged_rows) would not fit beside them in a block's 48 KB of static shared memory.
template <typename A, int VEC> __device__ __forceinline__ A* tree_scratch() {
    __shared__ A scratch[(1 + 2 * VEC) * TREE_SLOTS];
    return scratch;
}

// The merged moments (count, mean, m2) of every channel of a thread over its column's row threads,
// all VEC channels at once (they share their rows, so their count), valid where threadIdx.y == 0.
// The open runs are closed (column_moments ends with one).
template <typename A, int VEC> __device__ void column_merge_tree(ColumnMoments<A, VEC>& m) {
    A* counts = tree_scratch<A, VEC>();
    A* means = counts + TREE_SLOTS;          // [VEC][TREE_SLOTS]
    A* m2s = means + VEC * TREE_SLOTS;       // [VEC][TREE_SLOTS]
    for (int half = column_tree_half(); half > 0; half /= 2) {
        __syncthreads();  // the previous level's (or tree's) reads are done
        if (threadIdx.y >= half && threadIdx.y < 2 * half) {
            const int i = tree_slot(threadIdx.y - half);
            counts[i] = m.count;
#pragma unroll
            for (int k = 0; k < VEC; ++k) { means[k * TREE_SLOTS + i] = m.mean.v[k]; m2s[k * TREE_SLOTS + i] = m.m2.v[k]; }
        }
        __syncthreads();
        const int other = tree_slot(threadIdx.y);
        if (threadIdx.y < half && threadIdx.y + half < blockDim.y && counts[other] != A(0)) {
            const A count = counts[other], total = m.count + count, weight = count / total;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const A delta = means[k * TREE_SLOTS + other] - m.mean.v[k];
                m.mean.v[k] = merged_mean(m.mean.v[k], means[k * TREE_SLOTS + other], delta, weight);
                m.m2.v[k] += m2s[k * TREE_SLOTS + other] + delta * delta * m.count * weight;
            }
            m.count = total;
        }
    }
}

// a and b, VEC channels each, summed over a channel column's row threads, valid where
// threadIdx.y == 0 (as column_merge_tree).
template <typename A, int VEC> __device__ void column_sums_tree(Values<A, VEC>& a, Values<A, VEC>& b) {
    A* as = tree_scratch<A, VEC>();          // [VEC][TREE_SLOTS]
    A* bs = as + VEC * TREE_SLOTS;           // [VEC][TREE_SLOTS]
    for (int half = column_tree_half(); half > 0; half /= 2) {
        __syncthreads();  // the previous level's (or tree's) reads are done
        if (threadIdx.y >= half && threadIdx.y < 2 * half) {
            const int i = tree_slot(threadIdx.y - half);
#pragma unroll
            for (int k = 0; k < VEC; ++k) { as[k * TREE_SLOTS + i] = a.v[k]; bs[k * TREE_SLOTS + i] = b.v[k]; }
        }
        __syncthreads();
        const int other = tree_slot(threadIdx.y);
        if (threadIdx.y < half && threadIdx.y + half < blockDim.y) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) { a.v[k] += as[k * TREE_SLOTS + other]; b.v[k] += bs[k * TREE_SLOTS + other]; }
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

// Rows a thread of the channels-last reductions loads before it uses the first: left to the unroll,
// nvcc uses each row before it loads the next, one 16-byte load (a pair: dy and x) in flight a
// thread. More rows put no more loads in flight in the statistics: under their register bound nvcc
// issues four at once either way (static model). The gradient sums load 8 groups a batch, dy's and x's.
constexpr int COLUMN_BATCH = 4;

// The channels-last reductions' walk with copies ahead (async_copies.cuh, as for_each_group_staged
// channels-first): a thread's `rows` rows (stepping by `step` down each of the STREAMS inputs from
// `from`) go in copies of BATCH rows into a ring of BUFFERS buffers, BUFFERS - 1 copies in flight
// while the thread adds the oldest, and `close` after each run of `run` rows (a multiple of BATCH).
// A copy is BATCH x STREAMS x 16 bytes a thread: 16 KB a block for 4 rows of x or 2 rows of dy and
// x. A buffer is indexed [slot][thread]: a warp's slots are consecutive.
template <int STREAMS, int BATCH, int BUFFERS = 2, typename T, typename Add, typename Close>
__device__ __forceinline__ void staged_rows(const T* (&from)[STREAMS], const i64 (&step)[STREAMS], i64 rows, i64 run,
                                            Add add, Close close) {
    static_assert(BUFFERS >= 2, "a copy in flight while the thread adds another");
    constexpr unsigned BUFFER = STREAMS * BATCH * CL_THREADS * 16;  // bytes of a buffer
    const int thread = threadIdx.y * blockDim.x + threadIdx.x;
    // Two buffers in static shared memory, beside the kernels' other arrays; a deeper ring in the
    // block's dynamic shared memory (the launch passes BUFFERS x BUFFER bytes:
    // bn_gpu/backends/cupy/compilation.py, ring_bytes).
    const uint4* slots;
    if constexpr (BUFFERS == 2) {
        __shared__ uint4 buffers[2][STREAMS * BATCH][CL_THREADS];
        slots = &buffers[0][0][thread];
    } else {
        slots = held_memory<uint4>() + thread;
    }
    const unsigned base = shared_address(slots);
    i64 to_copy = rows;
    // Copies the next min(to_copy, BATCH) rows into `buffer` (whole: BATCH of them, unchecked; the
    // calls pass a constant, which the inlined lambda folds).
    auto copy = [&](unsigned buffer, bool whole) {
        const int copied = whole ? BATCH : (int)max(min(to_copy, (i64)BATCH), i64(0));
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
            if (whole || b < copied) {
#pragma unroll
                for (int m = 0; m < STREAMS; ++m)
                    copy_async(buffer + (m * BATCH + b) * (CL_THREADS * 16), from[m] + b * step[m]);
            }
        }
#pragma unroll
        for (int m = 0; m < STREAMS; ++m) from[m] += BATCH * step[m];
        to_copy -= BATCH;
    };
    // Byte offsets in the ring: of the buffer after `offset`, and of the one before it (two buffers:
    // the other one).
    auto after = [](unsigned offset) {
        return BUFFERS == 2 ? offset ^ BUFFER : offset == (BUFFERS - 1) * BUFFER ? 0u : offset + BUFFER;
    };
    auto before = [](unsigned offset) {
        return BUFFERS == 2 ? offset ^ BUFFER : offset == 0 ? (BUFFERS - 1) * BUFFER : offset - BUFFER;
    };
    unsigned oldest = 0;   // the buffer of the copy being added; the one before it is free for the next copy
    // Issues the next copy (past the end: empty) into the buffer added last, waits for the oldest
    // and adds its `landed` rows.
    auto step_batch = [&](bool whole, int landed) {
        copy(base + before(oldest), whole);
        commit_copies();
        wait_copies<BUFFERS - 1>();
        const uint4* slot = slots + oldest / 16;
#pragma unroll
        for (int b = 0; b < BATCH; ++b)
            if (whole || b < landed) add(slot + b * CL_THREADS, BATCH * CL_THREADS);
        oldest = after(oldest);
    };
#pragma unroll
    for (int k = 0; k < BUFFERS - 1; ++k) {
        copy(base + k * BUFFER, false);
        commit_copies();
    }
    for (i64 done = 0; done < rows; done += run) {
        const i64 run_rows = min(run, rows - done);
        i64 i = 0;
        // Whole batches while the next copy is whole too, then the run's last ones.
        for (; i + BATCH <= run_rows && to_copy >= BATCH; i += BATCH) step_batch(true, BATCH);
#pragma unroll 1
        for (; i < run_rows; i += BATCH) step_batch(false, (int)min(run_rows - i, (i64)BATCH));
        close();
    }
}

// Moments of x - shift over rows [row_begin, row_end) of channels c0.., this thread's share of them,
// the run of sums closed every 64 rows of the thread. STAGED (x in global memory, 16-byte groups):
// through staged_rows, in the same order.
template <int VEC, bool STAGED = false, typename T, typename A>
__device__ __forceinline__ ColumnMoments<A, VEC> column_moments(const T* x, i64 stride_m, i64 c0,
                                                                 const Values<A, VEC>& shift, i64 row_begin,
                                                                 i64 row_end) {
    ColumnMoments<A, VEC> moments = no_column_moments<A, VEC>();
    if constexpr (STAGED && VEC * sizeof(T) == 16) {
        const T* from[1] = {x + (row_begin + threadIdx.y) * stride_m + c0};
        const i64 step[1] = {blockDim.y * stride_m};
        staged_rows<1, COLUMN_BATCH>(from, step, rows_from(row_begin + threadIdx.y, row_end), 64,
                                     [&](const uint4* slot, int) { moments.add(shifted(copied_pack<VEC, T>(slot), shift)); },
                                     [&] { moments.close(); });
    } else {
        const i64 run = 64 * (i64)blockDim.y, step = blockDim.y * stride_m;
        for (i64 run_begin = row_begin + threadIdx.y; run_begin < row_end; run_begin += run) {
            i64 run_end = min(run_begin + run, row_end);
            const T* row = x + run_begin * stride_m + c0;
            const i64 rows = rows_from(run_begin, run_end);
            i64 i = 0;
            for (; i + COLUMN_BATCH <= rows; i += COLUMN_BATCH, row += COLUMN_BATCH * step) {
                Pack<T, VEC> in[COLUMN_BATCH];
#pragma unroll
                for (int b = 0; b < COLUMN_BATCH; ++b) in[b] = load_pack<VEC>(row + b * step);
#pragma unroll
                for (int b = 0; b < COLUMN_BATCH; ++b) moments.add(shifted(in[b], shift));
            }
            for (; i < rows; ++i, row += step) moments.add(shifted(load_pack<VEC>(row), shift));
            moments.close();
        }
    }
    return moments;
}
