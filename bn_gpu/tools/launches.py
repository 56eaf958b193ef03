"""The launches an op makes on a GPU, recorded without one.

The GPU backends run their real orchestration on meta tensors (no data, no device) with the GPU
launch tuning and a given number of multiprocessors, and each launch is recorded instead of run:
kernel, grid, block, arguments and constexprs. The ahead-of-time compile test compiles exactly
these variants, and the static model (bn_gpu.model) compiles and counts them, so a change of tiles,
flags or specialization reaches both as it will run.

    record("triton", "train_fwd", (64, 64, 112, 112), torch.bfloat16, "channels_last", sms=132)
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, field

import torch

OPS = ("train_fwd", "eval_fwd", "train_bwd", "eval_bwd")
# SyncBatchNorm's kernel steps on one rank of two (the collectives between them are not launches here).
SYNC_OPS = ("sync_train_fwd", "sync_train_bwd")
# Ghost BatchNorm's on the GPU backends' kernels, in `virtual_batches` virtual batches.
GHOST_OPS = ("ghost_train_fwd", "ghost_train_bwd")


@dataclass
class Launch:
    backend: str
    name: str                 # kernel name (Triton function or CUDA C template, without arguments)
    grid: tuple
    args: list                # as passed: meta tensors, ints, floats, None
    meta: dict = field(default_factory=dict)   # Triton: constexprs and num_warps; CUDA C: the tile walk
    kernel: object = None     # Triton: the JITFunction; CUDA C: the name expression
    block: tuple = ()         # CUDA C: threads per block

    @property
    def programs(self) -> int:
        total = 1
        for size in self.grid:
            total *= size
        return total


@contextlib.contextmanager
def _recording_triton(sms: int, launches: list):
    from ..backends import plan
    from ..backends.triton import launcher, table

    def record(site, pointers, floats=()):
        launches.append(Launch("triton", site.kernel.__name__, tuple(site.grid), site.args(pointers, floats),
                               dict(site.meta), site.kernel))

    saved = launcher.launch, table.tuning_and_sms
    launcher.launch = record
    table.tuning_and_sms = lambda device: (plan.GPU_TUNING, sms)
    try:
        yield
    finally:
        launcher.launch, table.tuning_and_sms = saved


_WALKED_ROLE = re.compile(r"_channels_first_(\d+)")


def _tile_walk(g, role: str) -> dict:
    """What the static model needs to count a CUDA C channels-first thread's walk over its tiles
    (kernels/cuda/channels_first.cuh, for_each_group): the plan's tile, the sizes and the vector width. Empty
    for the other kernels (channels-last, channel groups, finalize, the on-chip walks)."""
    match = _WALKED_ROLE.search(role)
    if not match or not g.channels_first or g.channel_groups or role.endswith("_walk"):
        return {}
    return {"tile_walk": {"rows": g.plan.rows, "block_s": g.plan.block_s, "N": g.N, "S": g.S,
                          "vec": int(match.group(1))}}


@contextlib.contextmanager
def _recording_cuda(sms: int, launches: list, shared_kb: int):
    from ..backends import plan
    from ..backends.cupy import compilation, table

    def record_types(dtype, weight_dtype, running_dtype, role, grid, block, args, shared_mem=0, meta=None):
        names = compilation.kernel_names(*table.c_types(dtype, weight_dtype, running_dtype))
        meta = dict(meta or {}, **({"dynamic_shared": shared_mem} if shared_mem else {}))
        launches.append(Launch("cupy", names[role].split("<")[0], tuple(grid), list(args), meta,
                               kernel=names[role], block=tuple(block)))

    def record(g, weight_dtype, running_dtype, role, grid, block, args, shared_mem=0):
        record_types(g.dtype, weight_dtype, running_dtype, role, grid, block, args, shared_mem, _tile_walk(g, role))

    def record_on_chip(g, weight_dtype, running_dtype, role, grid, block, shared_mem, args):
        # The walk's copies ahead: stages - 1 slices of a group, of x (and dy) (kernels/cuda/walk.cuh).
        stages = (g.on_chip_backward if role.startswith("on_chip_backward") else g.on_chip).load_stages
        walk = {"walk": {"stages": stages, "slice_bytes": shared_mem // stages}} if role.endswith("_walk") else {}
        record_types(g.dtype, weight_dtype, running_dtype, role, grid, block, args, shared_mem,
                     dict(_tile_walk(g, role), **walk))

    saved = (table.launch, table.launch_types, table.launch_on_chip, table.shared_memory_per_sm, plan.multiprocessors,
             torch.cuda.current_device, table._ptr)
    table.launch, table.launch_types, table.launch_on_chip = record, record_types, record_on_chip
    table._ptr = lambda t: t  # the tensors themselves in place of their addresses: what a finalize moves
    table.shared_memory_per_sm = lambda index: shared_kb * 1024
    plan.multiprocessors = lambda index: sms
    torch.cuda.current_device = lambda: 0
    try:
        yield
    finally:
        (table.launch, table.launch_types, table.launch_on_chip, table.shared_memory_per_sm, plan.multiprocessors,
         torch.cuda.current_device, table._ptr) = saved


def record(backend: str, op: str, shape, dtype: torch.dtype, layout: str = "contiguous", *, sms: int = 132,
           shared_kb: int = 228, affine: bool = True, running: bool = True, momentum: float | None = 0.1,
           epilogue: bool = False, virtual_batches: int = 4) -> list[Launch]:
    """The launches of one op ("train_fwd", "eval_fwd", "train_bwd", "eval_bwd", or SyncBatchNorm's
    "sync_train_fwd", "sync_train_bwd") of a backend
    ("triton" or "cupy") on an input of this shape, dtype and layout, on a GPU of `sms`
    multiprocessors of `shared_kb` KB of shared memory each. Weight, bias and running statistics are
    fp32 for 16-bit inputs. epilogue: the forward ops with a residual and ReLU, the training backward
    through a ReLU. Ghost BatchNorm's ops ("ghost_train_fwd", "ghost_train_bwd") split the
    batch into `virtual_batches`."""
    from ..backends import cupy, triton
    from ..backends.layout import arranged
    module = {"triton": triton, "cupy": cupy}[backend]
    recorder = {"triton": _recording_triton,
                "cupy": functools.partial(_recording_cuda, shared_kb=shared_kb)}[backend]
    C = shape[1]
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    x = arranged(torch.empty(shape, dtype=dtype, device="meta"), layout)
    weight = torch.empty(C, dtype=param_dtype, device="meta") if affine else None
    bias = torch.empty(C, dtype=param_dtype, device="meta") if affine else None
    running_mean = torch.empty(C, dtype=param_dtype, device="meta") if running else None
    running_var = torch.empty(C, dtype=param_dtype, device="meta") if running else None
    counter = torch.zeros((), dtype=torch.int64, device="meta")
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    mean, invstd = torch.empty(C, dtype=stat, device="meta"), torch.empty(C, dtype=stat, device="meta")
    launches: list[Launch] = []
    with recorder(sms, launches):
        fused = dict(residual=torch.empty_like(x), relu=True) if epilogue else {}
        if op == "train_fwd":
            module.forward_train(x, weight, bias, running_mean, running_var, counter, momentum, 1e-5, **fused)
        elif op == "eval_fwd":
            module.forward_eval(x, weight, bias, running_mean if running else mean, running_var if running else invstd,
                                1e-5, **fused)
        elif op == "train_bwd":
            module.backward(torch.empty_like(x), x, weight, mean, invstd, True, True, True,
                            **(dict(bias=bias, relu=True) if epilogue else {}))
        elif op == "eval_bwd":
            module.backward(torch.empty_like(x), x, weight, mean, invstd, False, True, False)
        elif op == "sync_train_fwd":
            module.local_moments(x)
            gathered = torch.empty(2, 2 * C + 1, dtype=stat, device="meta")
            module.merge_ranks(x, gathered, running_mean, running_var, counter if momentum is None else None,
                               momentum, 1e-5)
            module.normalize(x, mean, invstd, weight, bias, counter, 1e-5)
        elif op == "sync_train_bwd":
            totals, _, _ = module.gradient_totals(torch.empty_like(x), x, mean, invstd,
                                                  weight.dtype if affine else stat)
            module.input_gradient(torch.empty_like(x), x, mean, invstd, weight, totals)
        elif op == "ghost_train_fwd":
            module.ghost_forward_train(x, weight, bias, running_mean, running_var, counter, momentum, 1e-5,
                                       virtual_batches)
        elif op == "ghost_train_bwd":
            virtual = torch.empty(virtual_batches * C, dtype=stat, device="meta")
            module.ghost_backward(torch.empty_like(x), x, weight, virtual, virtual, virtual_batches,
                                  weight.dtype if affine else stat)
        else:
            raise ValueError(f"unknown op {op!r}; one of {', '.join(OPS + SYNC_OPS + GHOST_OPS)}")
    return launches


# ---- Triton: the compile inputs the JIT would build for a recorded launch ----------------------

def _specialize(arg) -> tuple:
    """(signature type, attribute) of one argument, as Triton's JIT specializes it."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import native_specialize_impl
        return tuple(native_specialize_impl(BaseBackend, arg, False, True, True))
    except ImportError:  # Triton before the native specializer: the same rules, written out
        if arg is None or (isinstance(arg, int) and not isinstance(arg, bool) and arg == 1):
            return "constexpr", arg
        if isinstance(arg, torch.Tensor):
            names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                     torch.int64: "i64", torch.int32: "i32"}
            return "*" + names[arg.dtype], "D" if arg.data_ptr() % 16 == 0 else ""
        if isinstance(arg, float):
            return "fp32", None
        if isinstance(arg, int):
            return ("i32" if -2**31 <= arg < 2**31 else "i64"), "D" if arg % 16 == 0 else ""
        raise TypeError(f"no specialization for {arg!r}")


def triton_compile_inputs(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a recorded Triton launch: what the JIT passes
    to triton.compile for it, with meta tensors aligned as fresh CUDA allocations are."""
    kernel = launch.kernel
    values = list(launch.args) + [launch.meta[p.name] for p in kernel.params[len(launch.args):]]
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, value) in enumerate(zip(kernel.params, values)):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
            continue
        kind, attribute = _specialize(value)
        annotated = getattr(param, "annotation_type", "")
        if annotated and isinstance(value, float):  # a typed float parameter (momentum, eps: fp64)
            kind, attribute = annotated, None
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = value
        elif attribute == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in launch.meta.items() if k in ("num_warps", "num_stages", "maxnreg")}
    return signature, constexprs, attrs, options


def compile_triton(launch: Launch, capability: int):
    """The compiled kernel (triton.compile) of a recorded Triton launch for sm_<capability>."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature, constexprs, attrs, options = triton_compile_inputs(launch)
    source = ASTSource(fn=launch.kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
