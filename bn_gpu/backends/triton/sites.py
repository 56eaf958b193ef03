"""Launch sites of the Triton kernels: one per kernel, geometry and set of flags, built once.

The tuning rules (register caps, paired sums, pipeline stages) are decided here, per geometry; the
kernels themselves are named in one table, KERNELS_BY_JOB, so that a search for a kernel's name
finds where it is launched.
"""
from __future__ import annotations

import functools

import torch
import triton.language as tl

from ...kernels import channels_first as cf
from ...kernels import channels_last as cl
from ...kernels import finalize as fin
from ...kernels import ghost
from ..ghost import chunk_index, chunk_values
from ..plan import VECTOR_BYTES, Geometry, cdiv, interpreting, next_power_of_2
from .launcher import Site

# (job, channels_first) -> the streaming kernel of that job and layout family.
KERNELS_BY_JOB = {
    ("statistics", True): cf.statistics_channels_first,
    ("statistics", False): cl.statistics_channels_last,
    ("normalize", True): cf.normalize_channels_first,
    ("normalize", False): cl.normalize_channels_last,
    ("single_pass_forward", True): cf.single_pass_forward_channels_first,
    ("single_pass_forward", False): cl.single_pass_forward_channels_last,
    ("gradient_sums", True): cf.gradient_sums_channels_first,
    ("gradient_sums", False): cl.gradient_sums_channels_last,
    ("input_gradient", True): cf.input_gradient_channels_first,
    ("input_gradient", False): cl.input_gradient_channels_last,
    ("single_pass_backward", True): cf.single_pass_backward_channels_first,
    ("single_pass_backward", False): cl.single_pass_backward_channels_last,
    ("on_chip_forward", True): cf.on_chip_forward_channels_first,
    ("on_chip_forward", False): cl.on_chip_forward_channels_last,
    ("on_chip_backward", True): cf.on_chip_backward_channels_first,
    ("on_chip_backward", False): cl.on_chip_backward_channels_last,
}

MAX_REGISTERS = 128  # per thread: 2 programs of 256 threads per SM


def pairs_of_values(g: Geometry) -> bool:
    """Whether the channels-first reductions sum a lane's values two at a time (PAIRS): 16-bit and
    fp32 inputs of one channel a program, whose rows hold whole 16-byte groups, so that Triton gives
    each thread 8 (fp32: 4) consecutive values and a pair never straddles two threads. Halving the
    lanes' sums halves the registers that hold them, so more programs fit an SM, and the capped fp32
    statistics keep every value in registers (the static model's figures: profiling/MODEL.md).
    Numerics are unchanged in kind: each sum still runs over at most CHUNK tiles' values of a lane."""
    group = VECTOR_BYTES // g.dtype.itemsize  # values in 16 bytes
    return (g.channels_first and g.dtype.itemsize in (2, 4) and g.plan.group == 1 and g.plan.block_s >= group
            and g.S % group == 0)


def folded_rows(g: Geometry) -> bool:
    """Whether the channels-first gradient sums with PAIRS over tiles of several rows fold each tile's
    rows into one row of lane sums as they add it (FOLD_ROWS): where a row of the tile spans the
    program's threads (16-byte groups, 32 a warp), each thread holds the same lanes of every row, and
    the fold is its own adds; the lanes' sums take half the registers at 2 rows (56x56 planes: 80 ->
    50, through the ReLU's mask 61 under the cap, by the static model: profiling/MODEL.md). fp32 tiles
    of 2 rows with PAIRS already fit more programs an SM than their grids ask, and folded they would
    issue more instructions a value: they are left as they are."""
    row_spans_threads = g.plan.block_s >= 32 * g.plan.num_warps * VECTOR_BYTES // g.dtype.itemsize
    return pairs_of_values(g) and g.dtype.itemsize == 2 and g.plan.rows > 1 and row_spans_threads


def split_register_cap(g: Geometry, job: str) -> int:
    """maxnreg of a split plan's reduction (or dx) kernel, 0 for none. A cap of 64 (Tuning.split_max_registers)
    holds 4 programs of 8 warps per SM, so the whole-wave grids run in one wave. Capped where the
    cap measured faster on an H200 (profiling/RESULTS.md and journal/2026-11-27-h200-run7.md): the
    statistics in fp32 and in 16-bit channels-first, the fp32 channels-last gradient sums. Uncapped
    where it measured slower: the fp32 channels-first gradient sums (with PAIRS they fit more programs an
    SM uncapped than the cap would allow), and the fp32 channels-last
    statistics of more than 64 channels a program (they spill under it). The 16-bit channels-last
    reductions, pipelined (load_stages), are capped by the static model: uncapped the statistics take
    68 registers and the gradient sums 72-74, 3 programs an SM in grids sized for 4; under the cap the
    gradient sums keep every value in registers and the statistics put a value or two on the stack
    outside the tile loop (profiling/MODEL.md; as plain loops, run 7 measured the 16-bit gradient sums
    slower under the cap: they spilled or lost their loads in flight). Through the ReLU's mask, which
    this geometry-keyed choice cannot see, the channels-last gradient-sums launch keeps the cap over
    tiles of half the rows in 16-bit and drops it for the plain loop (gradient_sums_site). The 16-bit
    channels-first gradient sums with PAIRS over tiles of one row, by the static model as well:
    through the ReLU's mask they take 80 registers uncapped (3 programs an SM, a grid of 4 in 1.29
    waves) and none spills under the cap, mask or not; over tiles of two rows (56x56 planes) they
    spilled in the tile loop under it, folded (folded_rows) they fit it; the channel groups' (14x14)
    stay uncapped (they spill twice as much). One pass after them, by the static model too: the fp32
    channels-last dx of 64 channels a program (65-68 registers, 3 programs an SM, in a grid of 4) fits
    the cap without spills, with the ReLU's mask as well; of 128 channels it spills with the mask (it
    walks half tiles instead: input_gradient_site), and 16-bit spills (its tiles of 128 rows)."""
    cap = g.plan.split_max_registers
    if not cap or g.plan.splits <= 1:
        return 0
    fp32 = g.dtype == torch.float32
    if job == "statistics" and not g.channels_first:
        if g.dtype.itemsize == 2:
            return cap if load_stages(g, job) > 1 else 0
        return cap if fp32 and g.plan.block_c <= 64 else 0
    if job == "statistics":
        return cap if fp32 or g.channels_first else 0
    if job == "gradient_sums" and not g.channels_first:
        return cap if fp32 or load_stages(g, job) > 1 else 0
    if job == "gradient_sums":
        return cap if pairs_of_values(g) and not fp32 and (g.plan.rows == 1 or folded_rows(g)) else 0
    if job == "input_gradient" and not g.channels_first:
        return cap if fp32 and g.plan.block_c <= 64 else 0
    return 0


def load_stages(g: Geometry, job: str) -> int:
    """STAGES of a reduction: its tile loop software-pipelined over this many stages (Tuning.load_stages;
    0 for the plain loop), with the tiles copied ahead into shared memory. The channels-first gradient
    sums copy two streams a tile (dy and x): one stage fewer keeps their shared memory that of the
    statistics. The channels-last statistics walk smaller tiles (pipelined_block_m) and take two
    stages more, so that as many bytes are copied ahead -- in 16-bit, whose tiles are a quarter of
    the plan's rows and half its bytes, four more: 6 tiles of 4 KB ahead, 96 KB an SM at 4 programs
    (under split_register_cap); the 16-bit channels-last gradient sums one more: 3 tiles of dy and x
    ahead, 48 KB a program (through the ReLU's mask 6 tiles of half the rows: gradient_sums_site).
    A channels-first single pass owns whole channel groups and few tiles each: its programs are bound
    by their own serial walk, which the tiles copied ahead shorten (the reductions' walk; the second
    pass finds its tiles in L2). The channels-last single pass walks tiles of a few channels, too
    small to copy. The static model's figures of each choice: profiling/MODEL.md."""
    stages = g.plan.load_stages
    if stages <= 1:
        return 0
    if job in ("single_pass_forward", "single_pass_backward"):
        return stages if g.channels_first else 0
    if job not in ("statistics", "gradient_sums") or g.plan.splits <= 1:
        return 0
    if g.channels_first:
        return max(2, stages - 1) if job == "gradient_sums" else stages
    if job == "statistics":
        return stages + (4 if g.dtype.itemsize == 2 else 2)
    return stages + 1 if g.dtype.itemsize == 2 else stages


def pipelined_block_m(g: Geometry, job: str) -> int:
    """Rows of a pipelined channels-last tile: half the plan's, so that the lanes' sums take half the
    registers and twice the programs fit an SM; a quarter for 16-bit statistics, whose lanes hold
    twice the values of a tile of the same bytes (at half the rows they need 96-108 registers:
    2 programs per SM)."""
    quarter = job == "statistics" and g.dtype.itemsize == 2
    return max(1, g.plan.block_m // (4 if quarter else 2))


def half_tiles(meta: dict) -> dict:
    """A channels-last second pass's constexprs with tiles of half the plan's rows: its lanes hold
    half the values, so fewer registers; a program's rows (a multiple of the plan's tile) stay a
    whole number of tiles."""
    return dict(meta, BLOCK_M=max(1, meta["BLOCK_M"] // 2))


def column_alignment(g: Geometry) -> int:
    """ALIGN of the channels-last kernels (kernels/alignment.py): a 16-byte word's values where C
    and every row stride (and Ghost BatchNorm's virtual-batch offset) are multiples of them but not
    all of 16 (24 or 40 channels), so that the JIT loads 16 bytes at a time where it cannot see the
    rows start on 16 bytes; else 1."""
    vector = VECTOR_BYTES // g.dtype.itemsize
    sizes = [g.C] + [view.stride_m for view in (g.x, g.out, g.grad_y) if view is not None]
    sizes += [g.chunk_extra] if g.chunk_channels else []
    return vector if all(size % vector == 0 for size in sizes) and any(size % 16 for size in sizes) else 1


def row_alignment(g: Geometry) -> int:
    """ALIGN of the channels-first kernels: the plan's (its runs and channel offsets) where every
    tensor's batch stride (and Ghost BatchNorm's virtual-batch offset) is a multiple of it too, so
    that each row of a tile starts on 16 bytes (a 7x7 plane of 24 channels: 1176 values); else 1."""
    align = g.plan.align
    sizes = [view.stride_n for view in (g.x, g.out, g.grad_y) if view is not None]
    sizes += [g.chunk_extra] if g.chunk_channels else []
    return align if all(size % align == 0 for size in sizes) else 1


@functools.lru_cache(maxsize=4096)
def config(g: Geometry, job: str) -> tuple:
    """(kernel, grid, constexprs and warps) of a streaming kernel for one geometry."""
    p = g.plan
    kernel = KERNELS_BY_JOB[job, g.channels_first]
    blocks = dict(ROWS=p.rows, BLOCK_S=p.block_s, GROUP=p.group, ALIGN=row_alignment(g)) if g.channels_first else \
        dict(BLOCK_M=p.block_m, BLOCK_C=p.block_c, ALIGN=column_alignment(g))
    meta = dict(ACC=accumulation(g), OFFSET_64=g.offset_64, num_warps=p.num_warps, **blocks)
    if job in ("statistics", "single_pass_forward"):
        meta["CHUNK"] = p.chunk_tiles
    if job in ("statistics", "single_pass_forward", "gradient_sums", "single_pass_backward"):
        meta["STAGES"] = load_stages(g, job)
        if meta["STAGES"] > 1 and not g.channels_first:
            meta["BLOCK_M"] = pipelined_block_m(g, job)
    if g.channels_first and job in ("statistics", "single_pass_forward", "gradient_sums", "single_pass_backward"):
        meta["PAIRS"] = pairs_of_values(g)
    if g.channels_first and job == "gradient_sums":
        meta["FOLD_ROWS"] = folded_rows(g)
    if g.channels_first and p.group > 1 and job == "single_pass_forward":
        # 32 values a thread (8 bf16 channels of 7x7, 16 rows) need more than 128 registers uncapped:
        # one program per SM. The cap fits two without spilling (the single-pass backward would
        # spill under it, so it stays uncapped).
        meta["maxnreg"] = MAX_REGISTERS
    cap = split_register_cap(g, job)
    if cap:
        meta["maxnreg"] = cap
    if job in GHOST_JOBS:
        meta["GHOST"] = g.chunk_channels > 0
    return kernel, p.grid(g.C), meta


GHOST_JOBS = ("statistics", "normalize", "gradient_sums", "input_gradient")  # the kernels with GHOST


@functools.lru_cache(maxsize=4096)
def finalize_config(g: Geometry) -> tuple:
    """(grid, constexprs) of the finalize kernels for one geometry."""
    return g.finalize.grid(g.C), dict(ACC=accumulation(g), BLOCK_SPLITS=g.finalize.block_splits,
                                      BLOCK_C=g.finalize.block_c)


def accumulation(g: Geometry):
    return tl.float64 if g.stat_dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=4096)
def statistics_site(g: Geometry, finalize: bool, tracked: bool, cumulative: bool) -> Site:
    kernel, grid, meta = config(g, "statistics")
    return Site(kernel, grid, dict(FINALIZE=finalize, HAS_RUNNING_STATS=tracked, CUMULATIVE=cumulative,
                                   BLOCK_SPLITS=g.finalize.fused_block_splits, **meta),
                head=(*g.sizes, *chunk_index(g), *g.x.strides, *g.tiling), tail=(g.finalize.group_splits,))


@functools.lru_cache(maxsize=4096)
def finalize_statistics_site(g: Geometry, tracked: bool, cumulative: bool) -> Site:
    grid, meta = finalize_config(g)
    return Site(fin.finalize_statistics, grid, dict(HAS_RUNNING_STATS=tracked, CUMULATIVE=cumulative, **meta),
                head=(g.plan.splits, g.C, g.shift_stride))


@functools.lru_cache(maxsize=4096)
def normalize_site(g: Geometry, has_weight: bool, has_bias: bool, from_running: bool, count_batch: bool,
                   has_residual: bool, relu: bool) -> Site:
    kernel, grid, meta = config(g, "normalize")
    if has_residual and not g.channels_first and g.dtype.itemsize == 2:
        # The residual's lanes beside x's take the 16-bit kernel past the registers of the 4 programs an
        # SM its grid is sized for (capped, it spills); over half tiles 4 fit (static model: profiling/MODEL.md).
        meta = half_tiles(meta)
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, FROM_RUNNING_STATS=from_running,
                                   COUNT_BATCH=count_batch, HAS_RESIDUAL=has_residual, RELU=relu, **meta),
                head=(*g.sizes, *chunk_index(g), *g.x.strides, *g.out.strides), tail=g.tiling)


@functools.lru_cache(maxsize=4096)
def single_pass_forward_site(g: Geometry, has_weight: bool, has_bias: bool, tracked: bool, cumulative: bool,
                             count_batch: bool, has_residual: bool, relu: bool) -> Site:
    kernel, grid, meta = config(g, "single_pass_forward")
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_RUNNING_STATS=tracked,
                                   CUMULATIVE=cumulative, COUNT_BATCH=count_batch, HAS_RESIDUAL=has_residual,
                                   RELU=relu, **meta),
                head=(*g.sizes, *g.x.strides, *g.out.strides), tail=g.single_pass_tiling)


@functools.lru_cache(maxsize=4096)
def gradient_sums_site(g: Geometry, relu: bool, has_weight: bool, has_bias: bool, finalize: bool) -> Site:
    kernel, grid, meta = config(g, "gradient_sums")
    if g.channels_first and g.plan.group > 1 and meta["ALIGN"] > 1 and g.plan.splits > 1 and g.dtype.itemsize <= 4:
        # Channel groups loading 16 bytes take more registers than their grid's programs an SM leave: fp32
        # past the cap's 4 programs, 16-bit past 2 (1 an SM). By the static model (profiling/MODEL.md) fp32
        # keeps every value in registers under the cap (through the ReLU's mask it spills: 2 an SM instead),
        # and 16-bit under MAX_REGISTERS, mask or not.
        fp32_cap = g.dtype == torch.float32 and not relu and g.plan.split_max_registers
        meta = dict(meta, maxnreg=g.plan.split_max_registers if fp32_cap else MAX_REGISTERS)
    if relu and not g.channels_first:  # (the channels-first kernels are capped only where they fit)
        if meta["STAGES"] <= 1:
            # The plain loop through the mask spills under the cap (split_register_cap holds for the
            # pipelined one).
            meta = {key: value for key, value in meta.items() if key != "maxnreg"}
        elif g.dtype.itemsize == 2:
            # The ReLU's mask (a scale and shift a channel beside the mean) takes the 16-bit lanes of the
            # pipelined tiles past the cap's 64 registers (under it they spill); over tiles of half those
            # rows, twice as many copied ahead (the same shared memory), they fit it without spilling.
            meta = dict(half_tiles(meta), STAGES=2 * meta["STAGES"] - 1)
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, RELU=relu, FINALIZE=finalize,
                                   BLOCK_SPLITS=g.finalize.fused_block_splits, **meta),
                head=(*g.sizes, *chunk_index(g), *g.grad_y.strides, *g.x.strides, *g.tiling, g.finalize.group_splits))


@functools.lru_cache(maxsize=4096)
def finalize_gradients_site(g: Geometry) -> Site:
    grid, meta = finalize_config(g)
    return Site(fin.finalize_gradients, grid, meta, head=(g.plan.splits, g.C))


@functools.lru_cache(maxsize=4096)
def input_gradient_site(g: Geometry, has_weight: bool, has_bias: bool, training: bool, relu: bool) -> Site:
    kernel, grid, meta = config(g, "input_gradient")
    if relu and not g.channels_first and g.dtype == torch.float32 and g.plan.block_c > 64:
        # The ReLU's mask beside dy and x takes the fp32 dx of 128 channels a program past the registers of
        # 4 programs an SM (capped, it spills); over half tiles 4 fit (static model: profiling/MODEL.md).
        # (The 16-bit dx, 2 programs an SM, would fit 4 over half tiles too, but its SASS then has half the
        # bytes in flight an SM: it keeps the plan's tiles.)
        meta = half_tiles(meta)
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, TRAINING=training, RELU=relu, **meta),
                head=(*g.sizes, *chunk_index(g), *g.grad_y.strides, *g.x.strides, *g.out.strides), tail=g.tiling)


@functools.lru_cache(maxsize=4096)
def single_pass_backward_site(g: Geometry, has_weight: bool, has_bias: bool, training: bool, need_input_grad: bool,
                              relu: bool) -> Site:
    kernel, grid, meta = config(g, "single_pass_backward")
    tiling = g.single_pass_tiling
    if g.channels_first and g.plan.group > 1 and g.plan.rows > 1 and g.dtype.itemsize == 2:
        # A 16-bit channel group's tile of the plan's rows holds as many values a thread of dy and of x,
        # widened, as its lanes' sums: one program an SM. Over tiles of half the rows two or three fit, with
        # as many bytes copied ahead an SM. fp32 groups would fit the grid's 4 at half, but 4 an SM hold
        # more of dy and x between a program's two passes than the L2 keeps, and the second pass would read
        # DRAM again. The static model's figures: docs/design.md, profiling/MODEL.md.
        meta = dict(meta, ROWS=g.plan.rows // 2)
        tiling = (g.plan.s_blocks, cdiv(g.N, meta["ROWS"]) * g.plan.s_blocks)
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, TRAINING=training,
                                   NEED_INPUT_GRAD=need_input_grad, RELU=relu, **meta),
                head=(*g.sizes, *g.grad_y.strides, *g.x.strides, *g.out.strides), tail=tiling)


def on_chip_config(g: Geometry, job: str) -> tuple:
    """(kernel, grid, constexprs and warps, the work's integer arguments) of an on-chip kernel. The
    exchange's programs are capped at MAX_REGISTERS, which holds Tuning.on_chip_programs_per_sm (2)
    of them per SM whatever the compiler would take (the launcher checks it: Site.resident), and
    launched cooperatively: the driver starts every program at once or refuses the grid, so programs
    waiting at the barrier never wait for programs that kernels on other streams keep from starting.
    The walk pipelines its loop over groups (Tuning.load_stages) instead."""
    p = g.plan
    on_chip = g.on_chip if job == "on_chip_forward" else g.on_chip_backward
    kernel = KERNELS_BY_JOB[job, g.channels_first]
    items = g.finalize_groups * on_chip.splits  # (channel group, split) pairs
    if g.channels_first:
        blocks = dict(ROWS=p.rows, BLOCK_S=p.block_s, HELD_ROWS=on_chip.held * p.rows, GROUP=p.group,
                      ALIGN=row_alignment(g))
        work = (p.s_blocks, p.total_tiles, on_chip.splits, items)
    else:
        blocks = dict(HELD_ROWS=on_chip.held, BLOCK_C=p.block_c, ALIGN=column_alignment(g))
        work = (on_chip.splits, items)
    meta = dict(ACC=accumulation(g), OFFSET_64=g.offset_64, num_warps=p.num_warps, EXCHANGE=on_chip.exchange,
                BLOCK_SPLITS=on_chip.block_splits, STAGES=1 if on_chip.exchange else max(1, on_chip.load_stages),
                **blocks)
    if on_chip.exchange:
        meta.update(maxnreg=MAX_REGISTERS, launch_cooperative_grid=True)
    return kernel, (on_chip.programs,), meta, work, on_chip.resident


@functools.lru_cache(maxsize=4096)
def on_chip_forward_site(g: Geometry, has_weight: bool, has_bias: bool, tracked: bool, cumulative: bool,
                         count_batch: bool, has_residual: bool, relu: bool) -> Site:
    kernel, grid, meta, work, resident = on_chip_config(g, "on_chip_forward")
    if has_residual:  # a second stream copied ahead would double the walk's shared memory past an SM's
        meta = dict(meta, STAGES=1)
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, HAS_RUNNING_STATS=tracked,
                                   CUMULATIVE=cumulative, COUNT_BATCH=count_batch, HAS_RESIDUAL=has_residual,
                                   RELU=relu, **meta),
                head=(*g.sizes, *g.x.strides, *g.out.strides), tail=work, resident=resident)


@functools.lru_cache(maxsize=4096)
def on_chip_backward_site(g: Geometry, has_weight: bool, has_bias: bool, need_input_grad: bool, relu: bool) -> Site:
    kernel, grid, meta, work, resident = on_chip_config(g, "on_chip_backward")
    return Site(kernel, grid, dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, NEED_INPUT_GRAD=need_input_grad,
                                   RELU=relu, **meta),
                head=(*g.sizes, *g.grad_y.strides, *g.x.strides, *g.out.strides), tail=work, resident=resident)


@functools.lru_cache(maxsize=4096)
def finalize_moments_site(g: Geometry) -> Site:
    grid, meta = finalize_config(g)
    return Site(fin.finalize_moments, grid, meta, head=(g.plan.splits, g.C, g.shift_stride))


@functools.lru_cache(maxsize=1024)
def merge_ranks_site(ranks: int, C: int, tracked: bool, cumulative: bool, float64: bool) -> Site:
    block_c = min(next_power_of_2(C), 8 if interpreting() else 128)
    return Site(fin.merge_ranks, (cdiv(C, block_c),),
                dict(HAS_RUNNING_STATS=tracked, CUMULATIVE=cumulative, ACC=tl.float64 if float64 else tl.float32,
                     BLOCK_C=block_c),
                head=(ranks, C))


@functools.lru_cache(maxsize=1024)
def finalize_ghost_statistics_site(g: Geometry, tracked: bool, cumulative: bool) -> Site:
    """Ghost BatchNorm's finalize: a program per block of the C channels walks the virtual batches."""
    C = g.chunk_channels
    _, meta = finalize_config(g)
    return Site(ghost.finalize_ghost_statistics, (cdiv(C, meta["BLOCK_C"]),),
                dict(HAS_RUNNING_STATS=tracked, CUMULATIVE=cumulative, **meta),
                head=(g.plan.splits, C, g.C // C, chunk_values(g), g.shift_stride))


@functools.lru_cache(maxsize=1024)
def finalize_ghost_gradients_site(g: Geometry) -> Site:
    C = g.chunk_channels
    _, meta = finalize_config(g)
    return Site(ghost.finalize_ghost_gradients, (cdiv(C, meta["BLOCK_C"]),), meta, head=(g.plan.splits, C, g.C // C))
