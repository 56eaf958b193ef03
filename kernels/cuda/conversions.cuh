// Types, conversions between the input, weight and accumulation dtypes, and packs of VEC values
// loaded or stored in one 16-byte access.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
#pragma once

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
// before it (y might have been x). Normalize, its loads batched, keeps 4 in flight a thread; the
// channels-last dx needs fewer registers. Not in the reductions, which store nothing: there nvcc
// schedules the plain loads with more bytes in flight. Never for what other blocks of the same
// launch write (the partials).
template <int VEC, typename T> __device__ __forceinline__ Pack<T, VEC> load_pack_readonly(const T* p) {
    if constexpr (VEC * sizeof(T) == 16) {
        Pack<T, VEC> values;  // 16-byte aligned, as uint4
        *reinterpret_cast<uint4*>(&values) = __ldg(reinterpret_cast<const uint4*>(p));
        return values;
    } else {
        return load_pack<VEC>(p);
    }
}
