// The blocks an SM that the split kernels' instantiations ask nvcc to fit: the minimum of their
// __launch_bounds__ (with CL_THREADS threads a block), by kernel and template arguments.
// Part of the CUDA C kernels of batch_norm.cu (see there); included in this order.
//
// The host sizes the split grids for whole waves of 4 blocks an SM (bn_gpu/backends/plan.py,
// programs_per_sm): a kernel that fits 3 runs such a grid in two waves, the last one partial. Left
// to its heuristics nvcc gave some of them a register or a few more than 4 blocks allow; a bound is
// an attribute of the template, and bounded nvcc fills the registers the bound allows. The registers,
// spills and waves of each instantiation, before and after its bound: profiling/MODEL.md and
// profiling/journal/model-history.md; docs/design.md says why each bound is what it is.
#pragma once
#include "conversions.cuh"

// The channels-last statistics: 4, a few values on the stack in the merge tree, the finalize and the
// close of each run of 64 rows' sums, none in the loops that load the rows; fp64 pairs, which would
// spill there, at 3.
template <typename T, int VEC> struct ChannelsLastStatisticsBlocks {
    static constexpr int value = sizeof(T) == 8 && VEC > 1 ? 3 : 4;
};

// The channels-first normalize with the epilogue (+ residual, ReLU): fp32 and fp16 at 4, spilling
// nothing; bf16 would spill in its loop at 4 and keeps 2. The plain kernels and the channel groups'
// (whose grids are under a wave) ask for no minimum (0: the thread count alone).
template <typename T> struct IsBfloat16 { static constexpr bool value = false; };
template <> struct IsBfloat16<__nv_bfloat16> { static constexpr bool value = true; };
template <typename T, bool FUSED, bool GROUPED> struct NormalizeBlocks {
    static constexpr int value = GROUPED || !FUSED ? 0 : IsBfloat16<T>::value ? 2 : 4;
};

// The channels-first gradient sums, each block with one 16 KB copy of dy and x in flight
// (async_copies.cuh): the split walks at 4 (a value or two spilled, 16 bytes at most); the channel
// groups' place walks, whose grids are under a wave, at the blocks they fit without the bound; fp64
// at 2.
template <typename T, bool FUSED, bool GROUPED> struct GradientSumsBlocks {
    static constexpr int value = sizeof(T) == 8 ? 2 : !GROUPED ? 4 : (sizeof(T) == 2 ? 3 : 4) - FUSED;
};
