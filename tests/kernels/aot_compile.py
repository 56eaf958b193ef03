"""Compile every Triton kernel variant that bn_gpu launches, as it launches it, for one GPU target
with Triton's own compiler -- no GPU needed. The variants come from the real launch plans
(bn_gpu.tools.launches records the Triton backend's launches on meta tensors for the benchmark's
shapes, every dtype and layout, with and without affine parameters and running statistics, both
kernel paths), with the JIT's argument specialization (16-byte alignment and divisibility hints,
1-valued integers). Run in a process without TRITON_INTERPRET:

    TRITON_INTERPRET=0 python tests/kernels/aot_compile.py 90           # every variant
    TRITON_INTERPRET=0 python tests/kernels/aot_compile.py 80 --paths   # one variant of each code path

A code path is a kernel with its input dtype and its boolean constexprs (the flags that add or remove
code); the variants of one path differ in tile sizes, pipeline stages and argument hints alone.
"""
import sys

import torch

# (32, 128, 14, 14): the on-chip kernels' exchange, forward and backward, in both layouts; (64, 2048, 7, 7),
# (5, 3) and (4, 3, 7, 9) their walk; (32, 128, 14, 14) contiguous in fp32: rows that start on 16 bytes where
# the JIT cannot see it (ALIGN).
SHAPES = [(64, 64, 112, 112), (64, 2048, 7, 7), (16384, 2048), (8, 64, 16, 56, 56), (32, 128, 14, 14), (5, 3),
          (4, 3, 7, 9)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (affine, running statistics, momentum, epilogue: residual + ReLU)
OPTIONS = [(True, True, 0.1, False), (False, False, 0.1, False), (True, True, None, False), (True, True, 0.1, True)]
# 24 channels channels-last: ALIGN in every channels-last kernel (split, on chip, and single-pass where the
# on-chip kernels are off), plain and with the epilogue (the other options' code: the shapes above).
ALIGNED_SHAPES = [(128, 24, 56, 56), (8, 24, 5, 6)]


# Tunings other than the default that change the compiled code: (fields, layouts, ops, options) -- the
# split reductions' plain tile loops (profiling/tuning_sweep.py measures them), and the two-pass plans
# where the on-chip kernels take the default's place (the small shapes' single passes, which run with
# BN_GPU_TUNING=on_chip_bytes=0 and on inputs above the on-chip limit).
SWEPT = [({"load_stages": 0}, ["contiguous", "channels_last"], ["train_fwd", "train_bwd"], OPTIONS[:1]),
         ({"on_chip_bytes": 0}, ["contiguous", "channels_last"], ["train_fwd", "train_bwd"], OPTIONS)]


def _record(found: dict, layouts, ops, options, sms: int, shapes=SHAPES) -> None:
    """Adds the launches of every shape and dtype in these layouts, ops and options to found."""
    from bn_gpu.tools import launches
    for shape in shapes:
        for dtype in DTYPES:
            for layout in (layouts if len(shape) > 2 else ["contiguous"]):
                for affine, running, momentum, epilogue in options:
                    for op in ops:
                        for launch in launches.record("triton", op, shape, dtype, layout, sms=sms, affine=affine,
                                                      running=running, momentum=momentum, epilogue=epilogue):
                            signature, constexprs, attrs, compile_options = launches.triton_compile_inputs(launch)
                            key = (launch.name, tuple(signature.items()), repr(sorted(constexprs.items())),
                                   repr(sorted(attrs.items())), tuple(compile_options.items()))
                            found.setdefault(key, launch)


# Ghost BatchNorm's launches (the GHOST kernels and their finalize): channel groups (7x7), the 2-D
# channels-last input, the on-chip sizes' split plans; with and without running statistics, cumulative.
GHOST_SHAPES = [(64, 2048, 7, 7), (16384, 2048), (32, 128, 14, 14)]


def variants(sms: int = 132) -> dict:
    """{specialization key: recorded launch}, each distinct compile once."""
    import dataclasses

    from bn_gpu.backends import plan
    from bn_gpu.tools import launches
    found = {}
    _record(found, ["contiguous", "channels_last"], launches.OPS + launches.SYNC_OPS, OPTIONS, sms)
    _record(found, ["channels_last"], launches.OPS, [OPTIONS[0], OPTIONS[3]], sms, ALIGNED_SHAPES)
    _record(found, ["contiguous", "channels_last"], launches.GHOST_OPS, OPTIONS[:3], sms, GHOST_SHAPES)
    default = plan.GPU_TUNING
    for fields, layouts, ops, options in SWEPT:
        plan.GPU_TUNING = dataclasses.replace(default, **fields)
        try:
            _record(found, layouts, ops, options, sms)
            _record(found, ["channels_last"], ops, [OPTIONS[0], OPTIONS[3]], sms, ALIGNED_SHAPES)
        finally:
            plan.GPU_TUNING = default
    return found


def code_paths(found: dict) -> dict:
    """The first variant of each kernel, input dtype and set of boolean constexprs in found."""
    paths = {}
    for key, launch in found.items():
        dtype = next((a.dtype for a in launch.args if isinstance(a, torch.Tensor)), None)
        flags = tuple(sorted(name for name, value in launch.meta.items() if value is True))
        paths.setdefault((launch.name, dtype, flags), (key, launch))
    return dict(paths.values())


def compile_all(capability: int, paths_only: bool = False) -> tuple[int, set]:
    from bn_gpu.tools import launches
    found = code_paths(variants()) if paths_only else variants()
    for launch in found.values():
        compiled = launches.compile_triton(launch, capability)
        assert compiled.asm["cubin"], launch.name
    return len(found), {launch.name for launch in found.values()}


if __name__ == "__main__":
    import os
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default up to 3.9, as the JIT compiles
    import triton
    count, names = compile_all(int(sys.argv[1]), paths_only="--paths" in sys.argv[2:])
    print(f"compiled {count} kernel variants of {len(names)} kernels for sm_{sys.argv[1]} with triton "
          f"{triton.__version__}: {', '.join(sorted(names))}")
