// Asynchronous copies from global into shared memory (cp.async, sm_80 and later): the reductions'
// loads in flight without the registers to hold them.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
//
// A reduction that loads a group and adds it in the same iteration has only that iteration's loads
// in flight; nvcc, bound by the registers a batch of loads takes, schedules at most a few groups
// ahead. A copy into shared memory takes no register until it is read back, so a thread can keep a
// whole copy (several 16-byte groups of each input) in flight while it adds the one before:
// `copy_async` issues the copies, `commit_copies` closes a copy, `wait_copies<LEFT>` waits until at
// most LEFT copies are still in flight. Each thread reads back only what it copied itself -- its own
// slots of the ring -- so no block barrier is needed: cp.async.wait_group makes a thread's own copies
// visible to it. Before sm_80 the same calls load and store synchronously.
#pragma once
#include "conversions.cuh"

// `to`: a shared-memory address (shared_address), 16-byte aligned; `from` a global one, 16-byte aligned.
__device__ __forceinline__ void copy_async(unsigned to, const void* from) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(to), "l"(from) : "memory");
#else
    *reinterpret_cast<uint4*>(__cvta_shared_to_generic(to)) = *reinterpret_cast<const uint4*>(from);
#endif
}

// The shared-memory address of a pointer into shared memory, found once per walk: on sm_90 each
// conversion reads the block's cluster rank.
__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void commit_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int LEFT> __device__ __forceinline__ void wait_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(LEFT) : "memory");
#endif
}

// The block's dynamic shared memory (16-byte aligned) as values of T: the on-chip kernels' held
// slices, and copy rings larger than a block's 48 KB of static shared memory allow.
template <typename T> __device__ __forceinline__ T* held_memory() {
    extern __shared__ uint4 held_bytes[];
    return reinterpret_cast<T*>(held_bytes);
}

// A pack of VEC values (16 bytes) read back from a thread's slot.
template <int VEC, typename T> __device__ __forceinline__ Pack<T, VEC> copied_pack(const uint4* slot) {
    return *reinterpret_cast<const Pack<T, VEC>*>(slot);
}
