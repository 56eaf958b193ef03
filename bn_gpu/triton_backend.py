"""The Triton backend: its kernel table for bn_gpu.orchestration, which owns the control flow.

Each method marshals the arguments of one kernel of bn_gpu.kernels (channels-first or
channels-last by the geometry's family) in the kernel's parameter order and launches it at its
`Site` -- the kernel, grid, constexprs and integer arguments of one geometry and set of flags,
built once -- with the call's tensors and floats. Arguments a kernel does not read under its flags
are passed as None.

The first launch of each specialization goes through Triton's JIT (which compiles and caches);
later launches with the same specialization call the compiled kernel's launcher directly (as
Inductor does), skipping the JIT's argument binding and specialization. Where that does not apply
(the interpreter, launch hooks registered, a Triton without that launcher API) every launch goes
through the JIT; BN_GPU_DIRECT_LAUNCH=0 forces the JIT path. Checked bitwise against the JIT on an
H100 with Triton 3.6 (tests/test_gpu.py::test_direct_launches_match_the_jit, 2026-11-26).

CUDA tensors run compiled kernels; CPU tensors run them in the Triton interpreter, which must be
switched on with TRITON_INTERPRET=1 before the kernels are first used.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import orchestration
from .kernels import channels_first as cf
from .kernels import channels_last as cl
from .kernels import finalize as fin
from .plan import VECTOR_BYTES, Geometry, cdiv, geometry, interpreting, next_power_of_2, tuning_and_sms


def check_available(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors; got tensors on {device}. Move them to a GPU, use "
        "backend='cpu', or run the Triton kernels in the interpreter on CPU tensors by setting "
        "TRITON_INTERPRET=1 before importing bn_gpu (slow: for testing).")


# The normalize and input-gradient passes walk their tiles in the reverse of the order the
# statistics (gradient sums) read them, so their first tiles are still in L2 (the static model counts it).
SECOND_PASS_REVERSED = True


# ---- launching --------------------------------------------------------------------------------

def _no_launch_hooks() -> bool:
    """Whether no Triton launch hook (profilers set them) is registered. Recent Triton keeps each
    hook as a HookChain, empty by default (its `calls`); older ones keep None or the function."""
    if _RUNTIME_KNOBS is None:  # a Triton without knobs: its launcher API may differ, use the JIT
        return False
    enter, leave = _RUNTIME_KNOBS.launch_enter_hook, _RUNTIME_KNOBS.launch_exit_hook
    return not (getattr(enter, "calls", enter) or getattr(leave, "calls", leave))


_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)  # one object, its hooks set on it


def _current_stream() -> int:
    return triton.runtime.driver.active.get_current_stream(torch.cuda.current_device())


@dataclass(frozen=True, eq=False)
class Site:
    """One kernel's launch for one geometry and one set of flags: everything but its tensors and
    its floats, built once per geometry (the lru_cached *_site functions below), so that a launch
    only gathers those. Compared by identity: a site is the fixed part of the launcher's key."""
    kernel: object
    grid: tuple
    meta: dict        # constexprs, num_warps, maxnreg
    head: tuple       # the integer arguments between the pointers and the floats
    tail: tuple = ()  # the integer arguments after the floats

    def args(self, pointers: tuple, floats: tuple) -> list:
        """The kernel's runtime arguments in parameter order: pointers, head, floats, tail."""
        return [*pointers, *self.head, *floats, *self.tail]


MAX_REMEMBERED = 8192  # compiled specializations kept for direct launches (a site each, at least)


class Launcher:
    """Launches JIT kernels, reusing the compiled kernel of a specialization once the JIT made it."""

    def __init__(self, direct: bool | None = None):
        self.compiled = {}    # specialization key -> (compiled kernel, grid dims, constexpr values in order)
        self.replays = {}     # a forward call's signature -> its bn_gpu.replay.Replay (or why there is none)
        if direct is None:
            direct = os.environ.get("BN_GPU_DIRECT_LAUNCH", "1") != "0"
        self.direct = direct and not interpreting()

    @staticmethod
    def key(site: Site, pointers: tuple) -> tuple:
        """What the JIT specializes a compiled kernel on: a pointer's dtype and 16-byte alignment
        (or None); the site holds the rest (constexprs, grid, the integers' values), and no float
        is specialized on. Built on every launch, so from the pointers alone."""
        return (site, *[None if a is None else (a.dtype, a.data_ptr() % 16 == 0) for a in pointers])

    def __call__(self, site: Site, pointers: tuple, floats: tuple = ()) -> None:
        """Launch site's kernel on these tensors (or None) and Python floats."""
        key = None
        if self.direct and _no_launch_hooks():
            key = self.key(site, pointers)
            entry = self.compiled.get(key)
            if entry is not None:
                compiled, dims, constexprs = entry
                try:
                    compiled.run(*dims, _current_stream(), compiled.function, compiled.packed_metadata, None, None,
                                 None, *pointers, *site.head, *floats, *site.tail, *constexprs)
                    return
                except (TypeError, AttributeError):  # a launcher API other than the one this knows
                    self.direct = False
                    self.compiled.clear()
        compiled = site.kernel[site.grid](*site.args(pointers, floats), **site.meta)
        if key is not None and self.direct:
            self._remember(key, site, compiled, len(pointers) + len(site.head) + len(floats) + len(site.tail))

    def _remember(self, key, site: Site, compiled, runtime_args: int) -> None:
        """Keep the compiled kernel for direct launches when it has the launcher API this uses."""
        params = site.kernel.params[runtime_args:]
        if not all(p.is_constexpr and p.name in site.meta for p in params):
            return
        if not all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
            self.direct = False
            return
        if len(self.compiled) >= MAX_REMEMBERED:  # shapes without end (a dynamic batch): start again
            self.compiled.clear()
        grid = site.grid
        dims = (grid[0], grid[1] if len(grid) > 1 else 1, 1)
        self.compiled[key] = (compiled, dims, [site.meta[p.name] for p in params])


launch = Launcher()


# ---- the kernel table -------------------------------------------------------------------------

MAX_REGISTERS = 128  # per thread: 2 programs of 256 threads per SM


def pairs_of_values(g: Geometry) -> bool:
    """Whether the channels-first reductions sum a lane's values two at a time (PAIRS): 16-bit
    inputs of one channel a program, whose rows hold whole 16-byte groups, so that Triton gives each
    thread 8 consecutive values and a pair never straddles two threads. Halving the lanes' sums took
    the bf16 statistics kernel from 95 to 64 registers, 2 to 4 programs per SM, and the gradient sums
    from 120 to 72, 2 to 3 (static model, H200 target, Triton 3.9). Numerics are unchanged in kind:
    each sum still runs over at most CHUNK tiles' values of a lane."""
    group = VECTOR_BYTES // 2  # 16-bit values in 16 bytes
    return (g.channels_first and g.dtype.itemsize == 2 and g.plan.group == 1 and g.plan.block_s >= group
            and g.S % group == 0)


def split_register_cap(g: Geometry, job: str) -> int:
    """maxnreg of a split reduction's kernel, 0 for none. A cap of 64 (Tuning.split_max_registers)
    holds 4 programs of 8 warps per SM, so the whole-wave grids run in one wave. Measured per training
    step (H200, triton 3.6, run 7 in profiling/RESULTS.md): the statistics kernels got faster in fp32
    and in 16-bit channels-first (forward 5-14%), the fp32 channels-last gradient sums too (backward
    7%); 16-bit channels-last reductions got 30-50% slower, the fp32 channels-first gradient sums up
    to 5% and the channels-last statistics of 128 channels a program 1-3%, so those stay uncapped.
    The fp32 channels-last statistics of 64 channels a program spill 16 bytes under the cap (static
    model) and still measured 9-14% faster. The gradient-sums launch drops the cap with the ReLU's
    mask (TritonKernels._gradient_sums), which this geometry-keyed choice cannot see."""
    cap = g.plan.split_max_registers
    if not cap or g.plan.splits <= 1:
        return 0
    fp32 = g.dtype == torch.float32
    if job == "statistics" and not g.channels_first and g.plan.block_c > 64:
        return 0  # 128 channels a program spilled 24 bytes under the cap, and ran 1-3% slower (run 7)
    if job == "statistics" and (fp32 or g.channels_first):
        return cap
    if job == "gradient_sums" and fp32 and not g.channels_first:
        return cap
    return 0


@functools.lru_cache(maxsize=4096)
def _config(g: Geometry, job: str) -> tuple:
    """(kernel, grid, constexprs and warps) of a streaming kernel for one geometry."""
    p = g.plan
    family = "channels_first" if g.channels_first else "channels_last"
    kernel = getattr(cf if g.channels_first else cl, f"{job}_{family}")
    blocks = dict(ROWS=p.rows, BLOCK_S=p.block_s, GROUP=p.group, ALIGN=p.align) if g.channels_first else \
        dict(BLOCK_M=p.block_m, BLOCK_C=p.block_c)
    meta = dict(ACC=_accumulation(g), OFFSET_64=g.offset_64, num_warps=p.num_warps, **blocks)
    if job in ("statistics", "single_pass_forward"):
        meta["CHUNK"] = p.chunk_tiles
        if not g.channels_first:
            meta["STAGES"] = p.load_stages
            if p.load_stages > 1 and job == "statistics":
                # The stages keep the bytes in flight; tiles of half the rows halve the lanes' sums:
                # 16-bit 170 -> 96-108 registers, 1 -> 2 programs per SM (static model, H200 target).
                meta["BLOCK_M"] = max(1, p.block_m // 2)
    if g.channels_first and job in ("statistics", "single_pass_forward", "gradient_sums", "single_pass_backward"):
        meta["PAIRS"] = pairs_of_values(g)
    if g.channels_first and p.group > 1 and job == "single_pass_forward":
        # 32 values a thread (8 bf16 channels of 7x7, 16 rows) took 141-161 registers: 1 program per
        # SM and 16 KB of loads in flight. Capped, 2 per SM and 32 KB, without spills (static model,
        # H200 target, Triton 3.9; the single-pass backward spills under the cap and keeps 32 KB without it).
        meta["maxnreg"] = MAX_REGISTERS
    cap = split_register_cap(g, job)
    if cap:
        meta["maxnreg"] = cap
    return kernel, p.grid(g.C), meta


@functools.lru_cache(maxsize=4096)
def _finalize_config(g: Geometry) -> tuple:
    """(grid, constexprs) of the finalize kernels for one geometry."""
    return g.finalize.grid(g.C), dict(ACC=_accumulation(g), BLOCK_SPLITS=g.finalize.block_splits,
                                      BLOCK_C=g.finalize.block_c)


def _accumulation(g: Geometry):
    return tl.float64 if g.stat_dtype == torch.float64 else tl.float32


# ---- launch sites: one per kernel, geometry and set of flags ------------------------------------

@functools.lru_cache(maxsize=4096)
def _statistics_site(g: Geometry, finalize: bool, tracked: bool, cumulative: bool) -> Site:
    kernel, grid, meta = _config(g, "statistics")
    return Site(kernel, grid, dict(FINALIZE=finalize, HAS_RUNNING_STATS=tracked, CUMULATIVE=cumulative,
                                   BLOCK_SPLITS=g.finalize.fused_block_splits, **meta),
                head=(*g.sizes, *g.x.strides, *g.tiling), tail=(g.finalize.group_splits,))


@functools.lru_cache(maxsize=4096)
def _finalize_statistics_site(g: Geometry, tracked: bool, cumulative: bool) -> Site:
    grid, meta = _finalize_config(g)
    return Site(fin.finalize_statistics, grid, dict(HAS_RUNNING_STATS=tracked, CUMULATIVE=cumulative, **meta),
                head=(g.plan.splits, g.C, g.shift_stride))


@functools.lru_cache(maxsize=4096)
def _normalize_site(g: Geometry, has_weight: bool, has_bias: bool, from_running: bool, count_batch: bool,
                    has_residual: bool, relu: bool) -> Site:
    kernel, grid, meta = _config(g, "normalize")
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, FROM_RUNNING_STATS=from_running,
                                   COUNT_BATCH=count_batch, HAS_RESIDUAL=has_residual, RELU=relu, **meta),
                head=(*g.sizes, *g.x.strides, *g.out.strides), tail=g.tiling)


@functools.lru_cache(maxsize=4096)
def _single_pass_forward_site(g: Geometry, has_weight: bool, has_bias: bool, tracked: bool, cumulative: bool,
                              count_batch: bool, has_residual: bool, relu: bool) -> Site:
    kernel, grid, meta = _config(g, "single_pass_forward")
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_RUNNING_STATS=tracked,
                                   CUMULATIVE=cumulative, COUNT_BATCH=count_batch, HAS_RESIDUAL=has_residual,
                                   RELU=relu, **meta),
                head=(*g.sizes, *g.x.strides, *g.out.strides), tail=g.single_pass_tiling)


@functools.lru_cache(maxsize=4096)
def _gradient_sums_site(g: Geometry, relu: bool, has_weight: bool, has_bias: bool, finalize: bool) -> Site:
    kernel, grid, meta = _config(g, "gradient_sums")
    if relu and "maxnreg" in meta:
        # With the ReLU's mask the kernel takes 80 registers: under the cap it spilled 56-64 bytes
        # (static model, H200 target), and run 7 measured the cap on the plain kernel only.
        meta = {key: value for key, value in meta.items() if key != "maxnreg"}
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, RELU=relu, FINALIZE=finalize,
                                   BLOCK_SPLITS=g.finalize.fused_block_splits, **meta),
                head=(*g.sizes, *g.grad_y.strides, *g.x.strides, *g.tiling, g.finalize.group_splits))


@functools.lru_cache(maxsize=4096)
def _finalize_gradients_site(g: Geometry) -> Site:
    grid, meta = _finalize_config(g)
    return Site(fin.finalize_gradients, grid, meta, head=(g.plan.splits, g.C))


@functools.lru_cache(maxsize=4096)
def _input_gradient_site(g: Geometry, has_weight: bool, has_bias: bool, training: bool, relu: bool) -> Site:
    kernel, grid, meta = _config(g, "input_gradient")
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, TRAINING=training, RELU=relu, **meta),
                head=(*g.sizes, *g.grad_y.strides, *g.x.strides, *g.out.strides), tail=g.tiling)


@functools.lru_cache(maxsize=4096)
def _single_pass_backward_site(g: Geometry, has_weight: bool, has_bias: bool, training: bool, need_input_grad: bool,
                               relu: bool) -> Site:
    kernel, grid, meta = _config(g, "single_pass_backward")
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, TRAINING=training,
                                   NEED_INPUT_GRAD=need_input_grad, RELU=relu, **meta),
                head=(*g.sizes, *g.grad_y.strides, *g.x.strides, *g.out.strides), tail=g.single_pass_tiling)


@functools.lru_cache(maxsize=4096)
def _finalize_moments_site(g: Geometry) -> Site:
    grid, meta = _finalize_config(g)
    return Site(fin.finalize_moments, grid, meta, head=(g.plan.splits, g.C, g.shift_stride))


@functools.lru_cache(maxsize=1024)
def _merge_ranks_site(ranks: int, C: int, tracked: bool, cumulative: bool, float64: bool) -> Site:
    block_c = min(next_power_of_2(C), 8 if interpreting() else 128)
    return Site(fin.merge_ranks, (cdiv(C, block_c),),
                dict(HAS_RUNNING_STATS=tracked, CUMULATIVE=cumulative, ACC=tl.float64 if float64 else tl.float32,
                     BLOCK_C=block_c),
                head=(ranks, C))


def _momentum_and_eps(momentum, eps) -> tuple:
    return 0.0 if momentum is None else float(momentum), float(eps)


class TritonKernels:
    """The kernel table of bn_gpu.orchestration for Triton: each method gathers one kernel's tensors
    and floats in parameter order and launches them at its site."""

    def geometry(self, x: torch.Tensor, grad_y: torch.Tensor | None = None) -> Geometry:
        tuning, sms = tuning_and_sms(x.device)
        return geometry(x, grad_y, tuning, sms)

    def statistics(self, g, x, partials):
        self._statistics(g, x, partials)

    def statistics_finalized(self, g, x, partials, counters, mean, invstd, running_mean, running_var, counter,
                             momentum, eps):
        self._statistics(g, x, partials, counters, mean, invstd, running_mean, running_var, counter, momentum, eps)

    def _statistics(self, g, x, partials, counters=None, mean=None, invstd=None, running_mean=None, running_var=None,
                    counter=None, momentum=None, eps=0.0):
        """The statistics kernel; with counters, finalizing in the same launch."""
        part_count, part_mean, m2 = partials
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launch(_statistics_site(g, counters is not None, tracked, cumulative),
               (x, part_count, part_mean, m2, counters, mean, invstd, running_mean, running_var,
                counter if cumulative else None),
               _momentum_and_eps(momentum, eps))

    def finalize_statistics(self, g, x, partials, mean, invstd, running_mean, running_var, counter, momentum, eps):
        count, part_mean, m2 = partials
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launch(_finalize_statistics_site(g, tracked, cumulative),
               (count, part_mean, m2, x, mean, invstd, running_mean, running_var, counter if cumulative else None),
               _momentum_and_eps(momentum, eps))

    def normalize(self, g, x, y, mean, invstd, weight, bias, counter, eps, running_mean=None, running_var=None,
                  residual=None, relu=False):
        from_running = running_mean is not None
        # Eval reads the running statistics and writes mean and invstd for the backward.
        statistics = (running_mean, running_var, invstd, mean) if from_running else (mean, None, invstd, None)
        launch(_normalize_site(g, weight is not None, bias is not None, from_running, counter is not None,
                               residual is not None, relu),
               (x, y, residual, *statistics, weight, bias, counter), (float(eps),))

    def single_pass_forward(self, g, x, y, mean, invstd, weight, bias, running_mean, running_var, counter,
                            momentum, eps, count_batch, residual=None, relu=False, counters=None):
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launch(_single_pass_forward_site(g, weight is not None, bias is not None, tracked, cumulative, count_batch,
                                         residual is not None, relu),
               (x, y, residual, mean, invstd, running_mean, running_var,
                counter if cumulative or count_batch else None, counters if cumulative and count_batch else None,
                weight, bias),
               _momentum_and_eps(momentum, eps))

    def gradient_sums(self, g, grad_y, x, mean, partials, invstd=None, weight=None, bias=None, relu=False):
        self._gradient_sums(g, grad_y, x, mean, partials, invstd, weight, bias, relu)

    def gradient_sums_finalized(self, g, grad_y, x, mean, partials, counters, invstd, totals, grad_weight, grad_bias,
                                weight=None, bias=None, relu=False):
        self._gradient_sums(g, grad_y, x, mean, partials, invstd, weight, bias, relu, counters, totals, grad_weight,
                            grad_bias)

    def _gradient_sums(self, g, grad_y, x, mean, partials, invstd, weight, bias, relu, counters=None, totals=None,
                       grad_weight=None, grad_bias=None):
        """The gradient-sums kernel; with counters, finalizing in the same launch."""
        sum_dy, sum_dy_xmu = partials
        finalize = counters is not None
        total_dy, total_dy_xmu = totals if finalize else (None, None)
        launch(_gradient_sums_site(g, relu, relu and weight is not None, relu and bias is not None, finalize),
               (grad_y, x, mean, invstd if relu or finalize else None, weight if relu else None,
                bias if relu else None, sum_dy, sum_dy_xmu, counters, total_dy, total_dy_xmu, grad_weight, grad_bias))

    def finalize_gradients(self, g, partials, invstd, totals, grad_weight, grad_bias):
        sum_dy, sum_dy_xmu = partials
        total_dy, total_dy_xmu = totals
        launch(_finalize_gradients_site(g),
               (sum_dy, sum_dy_xmu, invstd, total_dy, total_dy_xmu, grad_weight, grad_bias))

    def input_gradient(self, g, grad_y, x, grad_x, mean, invstd, weight, totals, training, bias=None, relu=False):
        total_dy, total_dy_xmu = totals if training else (None, None)
        launch(_input_gradient_site(g, weight is not None, relu and bias is not None, training, relu),
               (grad_y, x, grad_x, mean, invstd, weight, bias if relu else None, total_dy, total_dy_xmu),
               (1.0 / g.count,))

    def single_pass_backward(self, g, grad_y, x, grad_x, mean, invstd, weight, grad_weight, grad_bias, training,
                             bias=None, relu=False):
        launch(_single_pass_backward_site(g, weight is not None, relu and bias is not None, training,
                                          grad_x is not None, relu),
               (grad_y, x, grad_x, mean, invstd, weight, bias if relu else None, grad_weight, grad_bias),
               (1.0 / g.count,))

    def finalize_moments(self, g, x, partials, moments):
        count, part_mean, m2 = partials
        launch(_finalize_moments_site(g), (count, part_mean, m2, x, moments))

    def merge_ranks(self, dtype, moments, mean, invstd, running_mean, running_var, counter, momentum, eps):
        ranks, C = moments.shape[0], (moments.shape[1] - 1) // 2
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launch(_merge_ranks_site(ranks, C, tracked, cumulative, moments.dtype == torch.float64),
               (moments, mean, invstd, running_mean, running_var, counter if cumulative else None),
               _momentum_and_eps(momentum, eps))


KERNELS = TritonKernels()
forward_train = functools.partial(orchestration.forward_train, KERNELS)
forward_eval = functools.partial(orchestration.forward_eval, KERNELS)
backward = functools.partial(orchestration.backward, KERNELS)
local_moments = functools.partial(orchestration.local_moments, KERNELS)
merge_ranks = functools.partial(orchestration.merge_ranks, KERNELS)
normalize = functools.partial(orchestration.normalize, KERNELS)
gradient_totals = functools.partial(orchestration.gradient_totals, KERNELS)
input_gradient = functools.partial(orchestration.input_gradient, KERNELS)
