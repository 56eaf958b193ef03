// The walk: where the channel groups fill the GPU's resident blocks and a group's whole slice fits
// twice in a block's share of shared memory, the training forward (backward) runs as a persistent
// grid (two blocks an SM, or one) whose blocks walk the groups -- every gridDim.x-th from blockIdx.x --
// with the next groups' slices of x (and dy) copied into shared memory (cp.async) while the current
// one is reduced and normalized (its dx computed) from there: x (and dy) are read from DRAM once,
// with a whole slice in flight a block, and no block waits on its own loads between its reduction
// and its second pass (the single-pass kernels' serial tail). bn_gpu/backends/plan.py, on_chip_plan,
// sizes it; the kernels are in batch_norm.cu.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
//
// A group is `group` adjacent channels (1, or channel_groups.cuh's group of a 7x7 plane) whose rows
// are runs of group x S values: whole 16-byte slots, at most one a thread of the block. A thread
// keeps its place of the run (run_place) for every group, copies that slot of its rows into the
// buffer, and reads back only those slots: cp.async.wait_group makes a thread's own copies visible
// to it, and a buffer is overwritten by the thread that read it, after its reads -- the slices need
// no barrier. The per-channel sums are block reductions with a fixed order: bitwise reproducible.
#pragma once
#include "on_chip.cuh"

// The stored slot of a place: cp.async (16 bytes, VEC == WIDE), or loaded value by value and
// stored where the host found a pointer or stride misaligned.
template <int VEC, int WIDE, typename T> __device__ __forceinline__ void copy_place(unsigned to, const T* from) {
    if constexpr (VEC == WIDE) {
        copy_async(to, from);
    } else {
        *reinterpret_cast<Pack<T, WIDE>*>(__cvta_shared_to_generic(to)) = read_place<VEC, WIDE>(from);
    }
}

// Waits until at most `left` (0 to 3) committed copies (groups) of this thread are in flight.
__device__ __forceinline__ void wait_copies_left(int left) {
    if (left >= 3) wait_copies<3>();
    else if (left == 2) wait_copies<2>();
    else if (left == 1) wait_copies<1>();
    else wait_copies<0>();
}

// Channel j's total of the block's values (the thread's values in channel j, per_channel) in
// totals[j] for every thread, j < p.group: warp sums, then the warps' in order.
template <int WIDE, typename A>
__device__ void group_totals(const Values<A, WIDE>& v, const GroupPlace<WIDE>& p, A* totals) {
    __shared__ A partial[WIDE][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int j = 0; j < WIDE; ++j) {
        const A sum = warp_sum(j < p.group ? channel_sum(v, p, j) : A(0));
        if (lane == 0) partial[j][warp] = sum;
    }
    __syncthreads();
    if (threadIdx.x < p.group) {
        A total = A(0);
        for (int w = 0; w < warps; ++w) total += partial[threadIdx.x][w];
        totals[threadIdx.x] = total;
    }
    __syncthreads();
}

// Rows of the residual a thread loads before it uses the first (the epilogue), within the two
// blocks an SM's registers.
constexpr int WALK_BATCH = 2;

// One walked group of the training forward, its slice in this thread's slots (r.count of them,
// `step` apart from `slots`): one pass over the slots for the sums of x - base and of its squares
// (the base the slot's first value, in its channel: finite_shift), the channel means from a block reduction of
// the sums, the squared deviations from them from a second; the statistics and running statistics
// of its channels; then y = epilogue((x - mean) * invstd * weight + bias), a second pass.
template <int VEC, bool FUSED, int WIDE, typename T, typename W, typename R, typename A>
__device__ __forceinline__ void walk_forward_group(
    const uint4* slots, i64 step, const PlaceRows& r, const GroupPlace<WIDE>& p, T* y,
    const T* residual, i64 y_stride_n, A count, A* mean_out, A* invstd_out, R* running_mean, R* running_var,
    const i64* num_batches_tracked, const W* weight, const W* bias, double momentum, double eps,
    int has_running_stats, int cumulative, int relu) {
    __shared__ A totals[WIDE], channel_scale[WIDE], channel_shift[WIDE];
    Values<A, WIDE> base = zeros<A, WIDE>(), sum = zeros<A, WIDE>(), squares = zeros<A, WIDE>();
    if (r.count > 0) {
        const Pack<T, WIDE> first = copied_pack<WIDE, T>(slots);
#pragma unroll
        for (int k = 0; k < WIDE; ++k) base.v[k] = finite_shift(cvt<A>(first.v[k]));
    }
    for (i64 i = 0; i < r.count; ++i) {
        const Pack<T, WIDE> in = copied_pack<WIDE, T>(slots + i * step);
#pragma unroll
        for (int k = 0; k < WIDE; ++k) {
            const A shifted = cvt<A>(in.v[k]) - base.v[k];
            sum.v[k] += shifted;
            squares.v[k] += shifted * shifted;
        }
    }
    const A rows = A(r.count);
    Values<A, WIDE> total;  // the thread's sum of x a slot
#pragma unroll
    for (int k = 0; k < WIDE; ++k) total.v[k] = rows * base.v[k] + sum.v[k];
    group_totals(total, p, totals);
    Values<A, WIDE> mean, deviations;  // deviations: the sum of (x - mean)^2 of the slot's values
#pragma unroll
    for (int k = 0; k < WIDE; ++k) {
        mean.v[k] = totals[p.channel[k]] / count;
        const A offset = mean.v[k] - base.v[k];
        deviations.v[k] = squares.v[k] - A(2) * offset * sum.v[k] + rows * offset * offset;
    }
    // Thread j's channel j (read before group_totals below writes the totals again).
    const A channel_mean = threadIdx.x < p.group ? totals[threadIdx.x] / count : A(0);
    group_totals(deviations, p, totals);
    if (threadIdx.x < p.group) {  // thread j writes channel j's statistics
        const i64 c = p.c0 + threadIdx.x;
        const A invstd = store_statistics(c, count, channel_mean, totals[threadIdx.x], mean_out, invstd_out,
                                          running_mean, running_var, num_batches_tracked, momentum, eps,
                                          has_running_stats, cumulative);
        A scale, shift;
        affine_from(c, invstd, weight, bias, scale, shift);
        channel_scale[threadIdx.x] = scale;
        channel_shift[threadIdx.x] = shift;
    }
    __syncthreads();
    Values<A, WIDE> scale, shift;
#pragma unroll
    for (int k = 0; k < WIDE; ++k) {
        scale.v[k] = channel_scale[p.channel[k]];
        shift.v[k] = channel_shift[p.channel[k]];
    }
    // y at the thread's rows; the residual's rows read WALK_BATCH at a time ahead of their use.
    i64 n = r.first;
    i64 left = r.count;
    const uint4* slot = slots;
    auto residual_at = [&](i64 row) {  // zeros without a residual
        Pack<T, WIDE> add;
#pragma unroll
        for (int k = 0; k < WIDE; ++k) add.v[k] = cvt<T>(A(0));
        if (FUSED && residual) add = read_place_readonly<VEC, WIDE>(residual + row * y_stride_n + p.s);
        return add;
    };
    auto write = [&](i64 row, const uint4* from, const Pack<T, WIDE>& add) {
        const Pack<T, WIDE> in = copied_pack<WIDE, T>(from);
        Pack<T, WIDE> out;
#pragma unroll
        for (int k = 0; k < WIDE; ++k) {
            const A value = (cvt<A>(in.v[k]) - mean.v[k]) * scale.v[k] + shift.v[k];
            out.v[k] = cvt<T>(FUSED ? epilogue(value, cvt<A>(add.v[k]), relu) : value);
        }
        write_place<VEC, WIDE>(y + row * y_stride_n + p.s, out);
    };
    for (; left >= WALK_BATCH; left -= WALK_BATCH, n += WALK_BATCH * r.step, slot += WALK_BATCH * step) {
        Pack<T, WIDE> add[WALK_BATCH];
#pragma unroll
        for (int b = 0; b < WALK_BATCH; ++b) add[b] = residual_at(n + b * r.step);
#pragma unroll
        for (int b = 0; b < WALK_BATCH; ++b) write(n + b * r.step, slot + b * step, add[b]);
    }
    for (; left > 0; --left, n += r.step, slot += step) write(n, slot, residual_at(n));
}

// The walk's loop: `stages` buffers, each of a group's slice (N rows of run = group x S values) of
// each of the STREAMS inputs (from[i], with strides stride_n[i] and stride_c[i]; stream i of buffer b
// at slice (b * STREAMS + i) in the block's dynamic shared memory), the next stages - 1 groups'
// copies in flight while use(place, slots, slice, step) runs on the current one: `slots` the thread's
// first slot of stream 0 in its buffer, stream i's `i * slice` after it, a row's `step` apart. The
// group of iteration i is in buffer i % stages, copied there at iteration i - ahead; a buffer is
// copied into again once its group is done.
template <int STREAMS, int VEC, int WIDE, typename T, typename Use>
__device__ __forceinline__ void walk_groups(const T* const (&from)[STREAMS], const i64 (&stride_n)[STREAMS],
                                            const i64 (&stride_c)[STREAMS], const GroupPlace<WIDE>& p,
                                            const PlaceRows& r, i64 N, i64 C, i64 S, int stages, int group, Use&& use) {
    uint4* buffers = held_memory<uint4>();
    const i64 run_slots = group * S / WIDE, slice = N * run_slots, step = r.step * run_slots;
    const i64 first_slot = p.first_row * run_slots + p.s / WIDE;  // the thread's first slot in a buffer
    const unsigned first_address = shared_address(buffers + first_slot);
    const i64 groups = C / group, ahead = min(stages - 1, 3);  // groups copied ahead (wait_copies_left)
    // The thread's slots of group g's slices into buffer b (a commit closes them as one copy).
    auto copy = [&](i64 g, i64 b) {
#pragma unroll
        for (int i = 0; i < STREAMS; ++i) {
            const T* row = from[i] + g * group * stride_c[i] + r.first * stride_n[i] + p.s;
            const i64 row_step = r.step * stride_n[i];
            unsigned to = first_address + (unsigned)((b * STREAMS + i) * slice * 16);
            // 16 copies an iteration, as nvcc unrolls the loop of one stream alone (inside the
            // loop over streams it unrolled 4: fewer copies issued before the first wait).
#pragma unroll 16
            for (i64 k = 0; k < r.count; ++k, row += row_step, to += (unsigned)(step * 16))
                copy_place<VEC, WIDE>(to, row);
        }
    };
    for (i64 b = 0; b < ahead; ++b) {
        const i64 g = blockIdx.x + b * gridDim.x;
        if (g < groups) copy(g, b);
        commit_copies();  // one copy per buffer, empty or not: wait_copies counts them
    }
    i64 buffer = 0;
    for (i64 g = blockIdx.x; g < groups; g += gridDim.x) {
        const i64 next = g + ahead * gridDim.x;
        if (next < groups) copy(next, (buffer + ahead) % stages);
        commit_copies();
        wait_copies_left((int)ahead);  // this group's copy is in
        GroupPlace<WIDE> place = p;
        place.c0 = g * group;
        use(place, buffers + buffer * STREAMS * slice + first_slot, slice, step);
        buffer = buffer + 1 == stages ? 0 : buffer + 1;
    }
    wait_copies<0>();
}

// The training forward's walk (on_chip_forward_channels_first with WALK): walk_groups over x.
template <typename T, typename W, typename R, typename A, int VEC, bool FUSED>
__device__ __forceinline__ void walk_forward(
    const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ residual, A* mean_out, A* invstd_out,
    R* running_mean, R* running_var, i64* num_batches_tracked, int* counters, const W* weight, const W* bias, i64 N,
    i64 C, i64 S, i64 x_stride_n, i64 x_stride_c, i64 y_stride_n, i64 y_stride_c, double momentum, double eps,
    int stages, int group, int block_s, int has_running_stats, int cumulative, int count_batch_here, int relu) {
    constexpr int WIDE = Wide<T>::values;
    const GroupPlace<WIDE> p = run_place<WIDE>(group, S, block_s);
    const PlaceRows r = place_rows(p, i64(0), N);
    const A count = A(N * S);
    const T* from[1] = {x};
    const i64 stride_n[1] = {x_stride_n}, stride_c[1] = {x_stride_c};
    walk_groups<1, VEC>(from, stride_n, stride_c, p, r, N, C, S, stages, group,
                        [&](const GroupPlace<WIDE>& place, const uint4* slots, i64, i64 step) {
        walk_forward_group<VEC, FUSED>(slots, step, r, place, y + place.c0 * y_stride_c,
                                       residual ? residual + place.c0 * y_stride_c : nullptr, y_stride_n, count,
                                       mean_out, invstd_out, running_mean, running_var, num_batches_tracked, weight,
                                       bias, momentum, eps, has_running_stats, cumulative, relu);
    });
    // Last, as the single-pass kernels: every block has read the count (store_statistics) by now.
    if (count_batch_here) count_batch_after_every_read(num_batches_tracked, counters, cumulative);
}

// One walked group of the training backward, dy's slice in this thread's slots (r.count of them,
// `step` apart from `slots`) and x's `slice` after them: one pass for the thread's sums of dy and of
// dy * (x - mean) (dy through the ReLU's mask with FUSED), the group's totals from block reductions,
// its channels' weight and bias gradients; then, with need_input_grad, dx from the same slots.
template <int VEC, bool FUSED, int WIDE, typename T, typename W, typename A>
__device__ __forceinline__ void walk_backward_group(
    const uint4* slots, i64 slice, i64 step, const PlaceRows& r, const GroupPlace<WIDE>& p, T* dx, i64 dx_stride_n,
    const A* mean_in, const A* invstd_in, const W* weight, const W* bias, W* grad_weight, W* grad_bias, A inv_count,
    int need_input_grad, int relu) {
    __shared__ A total_dy[WIDE], total_dy_xmu[WIDE];
    Values<A, WIDE> mean, sum_dy = zeros<A, WIDE>(), sum_dy_xmu = zeros<A, WIDE>();
#pragma unroll
    for (int k = 0; k < WIDE; ++k) mean.v[k] = mean_in[p.c0 + p.channel[k]];
    const Values<ReluMask<A>, WIDE> masks = place_relu_masks(p, FUSED && relu, mean, invstd_in, weight, bias);
    auto gradient = [&](int k, const Pack<T, WIDE>& g, const Pack<T, WIDE>& in) {
        const A d = cvt<A>(g.v[k]);
        return FUSED ? masks.v[k].apply(d, cvt<A>(in.v[k])) : d;
    };
    for (i64 i = 0; i < r.count; ++i) {
        const uint4* slot = slots + i * step;
        const Pack<T, WIDE> g = copied_pack<WIDE, T>(slot), in = copied_pack<WIDE, T>(slot + slice);
#pragma unroll
        for (int k = 0; k < WIDE; ++k) {
            const A d = gradient(k, g, in);
            sum_dy.v[k] += d;
            sum_dy_xmu.v[k] += d * (cvt<A>(in.v[k]) - mean.v[k]);
        }
    }
    group_totals(sum_dy, p, total_dy);
    group_totals(sum_dy_xmu, p, total_dy_xmu);
    store_group_gradients(p, total_dy, total_dy_xmu, invstd_in, grad_weight, grad_bias);
    if (!need_input_grad) return;
    Values<A, WIDE> mean_x, scale, mean_dy, projection;
    group_dx_coefficients(p, mean, invstd_in, weight, total_dy, total_dy_xmu, inv_count, 1, mean_x, scale, mean_dy,
                          projection);
    i64 n = r.first;
    for (i64 i = 0; i < r.count; ++i, n += r.step) {
        const uint4* slot = slots + i * step;
        const Pack<T, WIDE> g = copied_pack<WIDE, T>(slot), in = copied_pack<WIDE, T>(slot + slice);
        Pack<T, WIDE> out;
#pragma unroll
        for (int k = 0; k < WIDE; ++k)
            out.v[k] = cvt<T>(dx_value<T>(gradient(k, g, in), cvt<A>(in.v[k]), mean_x.v[k], scale.v[k],
                                          mean_dy.v[k], projection.v[k]));
        write_place<VEC, WIDE>(dx + n * dx_stride_n + p.s, out);
    }
}

// The training backward's walk (on_chip_backward_channels_first with WALK): walk_groups over dy and
// x, two slices a buffer.
template <typename T, typename W, typename A, int VEC, bool FUSED>
__device__ __forceinline__ void walk_backward(
    const T* __restrict__ dy, const T* __restrict__ x, T* __restrict__ dx, const A* mean_in, const A* invstd_in,
    const W* weight, const W* bias, W* grad_weight, W* grad_bias, i64 N, i64 C, i64 S, i64 dy_stride_n,
    i64 dy_stride_c, i64 x_stride_n, i64 x_stride_c, i64 dx_stride_n, i64 dx_stride_c, A inv_count, int stages,
    int group, int block_s, int need_input_grad, int relu) {
    constexpr int WIDE = Wide<T>::values;
    const GroupPlace<WIDE> p = run_place<WIDE>(group, S, block_s);
    const PlaceRows r = place_rows(p, i64(0), N);
    const T* from[2] = {dy, x};
    const i64 stride_n[2] = {dy_stride_n, x_stride_n}, stride_c[2] = {dy_stride_c, x_stride_c};
    walk_groups<2, VEC>(from, stride_n, stride_c, p, r, N, C, S, stages, group,
                        [&](const GroupPlace<WIDE>& place, const uint4* slots, i64 slice, i64 step) {
        walk_backward_group<VEC, FUSED>(slots, slice, step, r, place, dx + place.c0 * dx_stride_c, dx_stride_n,
                                        mean_in, invstd_in, weight, bias, grad_weight, grad_bias, inv_count,
                                        need_input_grad, relu);
    });
}
