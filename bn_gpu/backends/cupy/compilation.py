"""The CUDA C kernels of the CuPy backend: their names, their source, NVRTC compilation and streams.

The kernels of kernels/cuda/batch_norm.cu (its headers inlined) are compiled at run time by NVRTC
through cupy.RawModule, once per device and dtype combination (cached). Kernel names are the
Triton backend's; the block shapes are defined here and handed to the source as macros, so the two
sides cannot disagree. Importing this module never needs CuPy; check_available says what is missing.
"""
from __future__ import annotations

import functools
import importlib.resources
import itertools
import re
import warnings

import torch

from .. import plan as plans

C_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16", torch.float64: "double"}
THREADS = 256            # threads per block: 1-D channels-first and finalize blocks, 2-D channels-last ones
CHANNEL_THREADS = 32     # channels-last blocks: at most a warp's width of threads across channels, each
                         # with VECTOR_BYTES of consecutive channels; the rest of THREADS walk rows
VECTOR_BYTES = plans.VECTOR_BYTES
MAX_BLOCK_C = CHANNEL_THREADS * VECTOR_BYTES // 2  # channels of a channels-last block, at most (16-bit inputs)
# Shared memory a block of the on-chip kernels keeps beside its held slice: their largest static
# shared memory (the channels-last forward's column trees and per-channel arrays for 16-bit inputs;
# tests/backends/test_cuda_source.py checks every instantiation against it) and the 1 KB the driver
# reserves per block. The launcher checks the compiled kernel's occupancy before its first
# launch, so a larger need is an error, not a hang.
ON_CHIP_RESERVED_SHARED = 16 * 1024
# The ring of copies of the channels-last gradient sums of 16-bit inputs through the ReLU's mask
# (kernels/cuda/backward.cuh, column_gradient_sums): 4 copies of 16 KB (2 rows of dy and x a thread) in
# flight while a block adds a fifth, in dynamic shared memory (ring_bytes). Their registers would fit 3
# blocks an SM, and so would a shallower ring, and their grid, sized for 4 an SM, would end on a partial
# wave; five buffers hold them at 2, with twice the copies in flight (docs/design.md). 2 buffers, in
# static shared memory, everywhere else.
MASKED_RING_BUFFERS = 5
RING_COPY_BYTES = 2 * 2 * THREADS * VECTOR_BYTES
# The source's compile-time constants, from here.
COMPILE_OPTIONS = ("-std=c++17", f"-DCL_THREADS={THREADS}", f"-DCL_MAX_CHANNELS={MAX_BLOCK_C}",
                   f"-DCL_MASKED_RING_BUFFERS={MASKED_RING_BUFFERS}")
# Kernels instantiated without and with the epilogue (FUSED: + residual and ReLU forward, the
# ReLU's mask backward), a compile-time choice so that the plain kernels carry none of it.
FUSABLE = ("normalize", "single_pass_forward", "gradient_sums", "input_gradient", "single_pass_backward",
           "on_chip_forward", "on_chip_backward")
# Split reductions instantiated without and with their own finalize (FINALIZE: the last blocks to
# finish merge the partials; SyncBatchNorm's local moments use the plain statistics kernel).
FINALIZING = ("statistics", "gradient_sums")
# Channels-first kernels instantiated without and with channel groups (GROUPED: a block owns the
# adjacent channels of bn_gpu.backends.plan.channel_group, whose rows together start on 16 bytes).
GROUPABLE = ("statistics", "normalize", "single_pass_forward", "gradient_sums", "input_gradient",
             "single_pass_backward")
# The on-chip channels-first kernels instantiated without and with the walk (WALK: a persistent grid whose
# blocks walk whole channel groups, kernels/cuda/walk.cuh).
WALKING = ("on_chip_forward", "on_chip_backward")
# Split kernels instantiated without and with Ghost BatchNorm's two-level channel index (GHOST:
# kernels/cuda/ghost.cuh), the latter without the epilogue or the fused finalize, which Ghost
# BatchNorm does not use; compiled in a module of their own, when first used (kernel_modules).
GHOSTED = ("statistics", "normalize", "gradient_sums", "input_gradient")


_INSTALL_HINT = ("pip install -e .[cupy-cuda13] for a torch built with CUDA 13.x, .[cupy-cuda12] for CUDA 12.x "
                 "(torch.version.cuda tells)")


def import_cupy():
    try:
        import cupy
    except ImportError as error:
        raise RuntimeError(f"backend='cupy' needs CuPy, which is not installed: {_INSTALL_HINT}") from error
    return cupy


def type_combinations():
    """Every (input T, weight/bias W, running statistics R, accumulation A) the backend compiles."""
    combos = [("float", "float", "float", "float"), ("double", "double", "double", "double")]
    for half in ("__half", "__nv_bfloat16"):
        combos += [(half, w, r, "float") for w in (half, "float") for r in (half, "float")]
    return combos


def _vector_width(T: str) -> int:
    return VECTOR_BYTES // {"float": 4, "double": 8, "__half": 2, "__nv_bfloat16": 2}[T]


def kernel_names(T: str, W: str, R: str, A: str) -> dict:
    """{role: name expression} of one type combination. A role is the kernel's name, with the
    vector width appended for the streaming kernels (1, and the width of 16 bytes), "_fused" for
    the instantiation with the epilogue, "_finalized" for the one with its own finalize,
    "_grouped" for the channels-first one with channel groups, "_walk" for the on-chip walk and
    "_ghost" for the one with Ghost BatchNorm's channel index."""
    templates = {
        "statistics_channels_first": f"<{T}, {A}, {R}, VEC>",
        "statistics_channels_last": f"<{T}, {A}, {R}, VEC>",
        "finalize_statistics": f"<{T}, {A}, {R}>",
        "finalize_moments": f"<{T}, {A}>",
        "merge_ranks": f"<{A}, {R}>",
        "normalize_channels_first": f"<{T}, {W}, {R}, {A}, VEC>",
        "normalize_channels_last": f"<{T}, {W}, {R}, {A}, VEC>",
        "single_pass_forward_channels_first": f"<{T}, {W}, {R}, {A}, VEC>",
        "single_pass_forward_channels_last": f"<{T}, {W}, {R}, {A}, VEC>",
        "gradient_sums_channels_first": f"<{T}, {W}, {A}, VEC>",
        "gradient_sums_channels_last": f"<{T}, {W}, {A}, VEC>",
        "finalize_gradients": f"<{A}, {W}>",
        "finalize_ghost_statistics": f"<{T}, {A}, {R}>",
        "finalize_ghost_gradients": f"<{A}, {W}>",
        "input_gradient_channels_first": f"<{T}, {W}, {A}, VEC>",
        "input_gradient_channels_last": f"<{T}, {W}, {A}, VEC>",
        "single_pass_backward_channels_first": f"<{T}, {W}, {A}, VEC>",
        "single_pass_backward_channels_last": f"<{T}, {W}, {A}, VEC>",
        "on_chip_forward_channels_first": f"<{T}, {W}, {R}, {A}, VEC>",
        "on_chip_forward_channels_last": f"<{T}, {W}, {R}, {A}, VEC>",
        "on_chip_backward_channels_first": f"<{T}, {W}, {A}, VEC>",
        "on_chip_backward_channels_last": f"<{T}, {W}, {A}, VEC>",
    }
    names = {}
    for name, arguments in templates.items():
        variants = [(name, arguments)]
        if "VEC" in arguments:
            variants = [(f"{name}_{vec}", arguments.replace("VEC", str(vec))) for vec in sorted({1, _vector_width(T)})]
        family, _, layout_family = name.partition("_channels_")
        groupable = GROUPABLE if layout_family == "first" else ()
        # The boolean template parameters, in the source's order: (role suffix when true) per flag.
        walking = WALKING if layout_family == "first" else ()
        flags = [suffix for suffix, kinds in (("_fused", FUSABLE), ("_finalized", FINALIZING), ("_grouped", groupable),
                                              ("_walk", walking), ("_ghost", GHOSTED)) if family in kinds]
        for role, expression in variants:
            for values in itertools.product((False, True), repeat=len(flags)):
                suffix = "".join(flag for flag, on in zip(flags, values) if on)
                if "_ghost" in suffix and ("_fused" in suffix or "_finalized" in suffix):
                    continue
                booleans = "".join(", true" if on else ", false" for on in values)
                names[role + suffix] = name + expression[:-1] + booleans + ">"
    return names


_INCLUDE = re.compile(r'^#include "([\w.]+)"$', re.MULTILINE)


def source() -> str:
    """kernels/cuda/batch_norm.cu with its local headers inlined, each once: NVRTC compiles one
    string, without an include path into the installed package."""
    folder = importlib.resources.files("bn_gpu.kernels").joinpath("cuda")
    seen = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = folder.joinpath(name).read_text().replace("#pragma once\n", "")
        return _INCLUDE.sub(lambda match: expand(match.group(1)), text)

    return expand("batch_norm.cu")


def ring_bytes(role: str) -> int:
    """Dynamic shared memory of a streaming kernel's copy ring: the channels-last gradient sums of
    16-bit inputs (16-byte groups of 8 values) through the ReLU's mask (MASKED_RING_BUFFERS); 0 for
    the others, whose two buffers are static."""
    return MASKED_RING_BUFFERS * RING_COPY_BYTES if role.startswith("gradient_sums_channels_last_8_fused") else 0


def kernel_modules(T: str, W: str, R: str, A: str) -> tuple[dict, dict, dict]:
    """kernel_names of one type combination by module: the kernels every call may take; the kernels
    with dynamic shared memory (the on-chip kernels, the copy rings of ring_bytes), whose dynamic
    shared memory is an extern array, a module-wide symbol, so that nvcc (sm_90) rounds the static
    shared memory of every kernel of their module up to 1 KB (the normalize kernels' 0 bytes would
    become 1024); and Ghost BatchNorm's (GHOSTED and its finalizes), which other calls never take."""
    names = kernel_names(T, W, R, A)
    dynamic = {role: name for role, name in names.items() if role.startswith("on_chip_") or ring_bytes(role)}
    ghost = {role: name for role, name in names.items() if role.endswith("_ghost") or role.startswith("finalize_ghost")}
    plain = {role: name for role, name in names.items() if role not in dynamic and role not in ghost}
    return plain, dynamic, ghost


def _module(device_index: int, names: dict) -> dict:
    cupy = import_cupy()
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(code=source(), options=COMPILE_OPTIONS, name_expressions=tuple(names.values()))
        return {role: module.get_function(name) for role, name in names.items()}


class _Kernels(dict):
    """{role: compiled kernel} of one device and type combination: the first module of kernel_modules
    compiled at once, each other when one of its kernels is first asked for."""

    def __init__(self, device_index: int, types: tuple):
        plain, *self.later = kernel_modules(*types)
        super().__init__(_module(device_index, plain))
        self.device_index = device_index

    def __missing__(self, role: str):
        names = next((names for names in self.later if role in names), None)
        if names is None:
            raise KeyError(role)
        self.later.remove(names)
        self.update(_module(self.device_index, names))
        return self[role]


@functools.lru_cache(maxsize=None)
def compiled_kernels(device_index: int, T: str, W: str, R: str, A: str) -> dict:
    return _Kernels(device_index, (T, W, R, A))


@functools.lru_cache(maxsize=None)
def shared_memory_per_sm(device_index: int) -> int:
    """Bytes of shared memory of one SM of the device."""
    return import_cupy().cuda.runtime.getDeviceProperties(device_index)["sharedMemPerMultiprocessor"]


@functools.lru_cache(maxsize=64)
def stream(device_index: int, handle: int):
    """A CuPy view of one of torch's streams (cached: creating one per launch costs host time)."""
    cupy = import_cupy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # newer CuPy prefers Stream.from_external
        return cupy.cuda.ExternalStream(handle, device_index)
