"""Launch plans: how the (N, C, S) or (M, C) work is cut into tiles and programs, and the launch
geometry (plan, sizes, strides) that both GPU backends build from it once per input layout.

Statistics are a split reduction: each channel (block) is spread over `splits` programs so that
the grid fills the GPU whatever C is, and the partials are merged by the finalize kernels. The
normalize and backward kernels walk the same tiles with the same grid. With one split, programs
own whole channels and the single-pass kernels do everything in one launch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch

from ..dtypes import stat_dtype
from .device import multiprocessors
from .layout import (CHANNELS_FIRST, ChannelsFirstView, ChannelsLastView, channels_first_view, channels_last_view,
                     choose_layout, empty_in_family, in_family, spatial_size)


@dataclass(frozen=True)
class Tuning:
    tile_bytes: int        # bytes of input per tile (a power of two): 16-bit inputs get twice the values
    programs_per_sm: int   # grid target for the split reductions
    max_block_c: int       # channels per program in the channels-last kernels
    finalize_tile: int     # partials per finalize tile
    num_warps: int
    chunk_tiles: int       # tiles a lane sums before the statistics are reduced and merged (Chan)
    channel_groups: bool = True  # channels-first: adjacent channels per program where rows of S values cannot
                                 # start on 16 bytes (see channel_group)
    split_max_registers: int = 0  # Triton: a register cap on the split reductions where it measured faster
                                  # (backends/triton/sites.py, split_register_cap), 0 for none; 64 holds 4
                                  # programs of 8 warps per SM
    load_stages: int = 0  # Triton reductions (split statistics and gradient sums, channels-first single passes):
                          # a software pipeline of this many stages (tl.range(num_stages=...): tiles copied
                          # ahead into shared memory; backends/triton/sites.py, load_stages), 0 for plain loops
    max_block_s: int = 0  # channels-first: spatial positions per tile at most, 0 for the tile's (the CUDA C
                          # backend's: one turn of its block, see backends/cupy/table.py, tuning_for)
    on_chip_bytes: int = 0  # input an SM holds in the on-chip kernels (x in the forward, x and dy together in
                            # the backward), 0 for none: the two-pass plans alone (see on_chip_plan)
    on_chip_programs_per_sm: int = 2  # on-chip programs resident on an SM at once: bounds their grid
    on_chip_shared: bool = False  # CUDA C: the input held in shared memory in its own dtype, channels-first
                                  # as whole rows of S; exchanges alone (see on_chip_plan)

    def tile_elements(self, itemsize: int) -> int:
        return max(1, self.tile_bytes // itemsize)


def _tuning_from_environment(default: Tuning) -> Tuning:
    """`default` with the fields that BN_GPU_TUNING overrides ("tile_bytes=32768,num_warps=8"):
    for tuning experiments on a GPU without editing the code."""
    text = os.environ.get("BN_GPU_TUNING", "").strip()
    if not text:
        return default
    try:
        fields = {key.strip(): int(value) for key, value in (item.split("=") for item in text.split(","))}
        return dataclasses.replace(default, **fields)
    except (ValueError, TypeError) as error:
        raise ValueError(f"BN_GPU_TUNING={text!r}: expected comma-separated field=integer pairs of "
                         f"{', '.join(f.name for f in dataclasses.fields(Tuning))}") from error


# The input an SM holds in the Triton on-chip kernels: 64 KB, a quarter of its 256 KB register file. Two exchanging
# programs of 8 warps, capped at 128 registers a thread to share an SM, hold 32 KB each: 32 fp32 registers a thread,
# which left them without spills in the static model (at 64 KB each they spilled under the cap:
# journal/model-history.md); a walking program alone on its SM holds all 64 KB. See on_chip_plan and docs/design.md.
ON_CHIP_BYTES = 65536

# On a GPU: 16 KB tiles over 8 warps give each thread four 16-byte loads per tile in every dtype
# (4096 fp32 or 8192 bf16 values), so 16-bit inputs keep as many bytes in flight as fp32; a lane
# sums 8 tiles before the block reduces them. Tiles sized in values instead would leave 16-bit
# inputs with half the bytes in flight (docs/design.md, "Tiles sized in bytes").
GPU_TUNING = _tuning_from_environment(
    Tuning(tile_bytes=16384, programs_per_sm=4, max_block_c=128, finalize_tile=4096, num_warps=8, chunk_tiles=8,
           split_max_registers=64, load_stages=3, on_chip_bytes=ON_CHIP_BYTES, on_chip_programs_per_sm=2))
# In the Triton interpreter: small tiles and few programs, so that tests on small shapes still
# walk several tiles and chunks per program, several splits per channel and several finalize chunks.
INTERPRETER_TUNING = Tuning(tile_bytes=256, programs_per_sm=2, max_block_c=4, finalize_tile=8, num_warps=1,
                            chunk_tiles=2, load_stages=3)
INTERPRETER_SMS = 4


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tuning_and_sms(device: torch.device) -> tuple[Tuning, int]:
    if device.type != "cuda":
        return INTERPRETER_TUNING, INTERPRETER_SMS
    return GPU_TUNING, multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class ChannelsFirstPlan:
    rows: int              # batch rows per tile (power of two)
    block_s: int           # spatial positions per tile (power of two)
    s_blocks: int          # tiles across S (GROUP x S when channels are grouped)
    total_tiles: int       # tiles per channel (group)
    tiles_per_program: int
    splits: int            # programs per channel (group) (grid axis 1)
    num_warps: int
    chunk_tiles: int
    group: int = 1         # adjacent channels per program (see channel_group)
    align: int = 1         # the run of (group x) S values and a channel's offset are multiples of this
    split_max_registers: int = 0  # Tuning.split_max_registers
    load_stages: int = 0          # Tuning.load_stages

    def grid(self, C: int) -> tuple[int, int]:
        return (cdiv(C, self.group), self.splits)


@dataclass(frozen=True)
class ChannelsLastPlan:
    block_m: int           # rows per tile (power of two)
    block_c: int           # channels per program (power of two)
    c_blocks: int          # programs across C (grid axis 1)
    rows_per_program: int  # a multiple of block_m
    splits: int            # programs across M (grid axis 0)
    num_warps: int
    chunk_tiles: int
    split_max_registers: int = 0  # Tuning.split_max_registers
    load_stages: int = 0          # Tuning.load_stages

    def grid(self, C: int) -> tuple[int, int]:
        return (self.splits, self.c_blocks)


@dataclass(frozen=True)
class FinalizePlan:
    block_splits: int
    block_c: int
    fused_block_splits: int  # rows of partials per tile when the reduction's last programs finalize
                             # (their own channels: 1 channels-first, the channel block channels-last)
    group_splits: int        # splits per group of the fused finalize's first level (see kernels/finalize.py)
    split_groups: int        # rows of its second level

    def grid(self, C: int) -> tuple[int]:
        return (cdiv(C, self.block_c),)


def _spatial_block(S: int, tile: int) -> int:
    """Largest power of two <= tile covering S without leaving many lanes of the last block idle."""
    block, lane_use = min(tile, next_power_of_2(S)), lambda block: S / (cdiv(S, block) * block)
    while block > 32 and lane_use(block // 2) > lane_use(block) + 0.1:
        block //= 2
    return block


def _splits(total_tiles: int, wanted: int) -> tuple[int, int]:
    """(tiles_per_program, splits) covering total_tiles with at most `wanted` programs (at least one)."""
    tiles_per_program = cdiv(total_tiles, max(1, min(wanted, total_tiles)))
    return tiles_per_program, cdiv(total_tiles, tiles_per_program)


def _splits_wanted(tuning: Tuning, sms: int, blocks: int) -> int:
    """Programs per channel (block): 1 where the blocks alone fill programs_per_sm x sms programs,
    else as many as fit in that many, rounded down to whole waves (at least 2). Rounded up, a
    partial last wave (64 channels: 576 programs where 4 per SM hold 528) runs as long as a full
    one; fewer programs per SM keep fewer warps, and so fewer loads, in flight."""
    slots = tuning.programs_per_sm * sms
    return 1 if blocks >= slots else max(2, slots // blocks)


VECTOR_BYTES = 16  # the widest global load and store
# The longest run of a channel group: 256 places of 16 bytes, so that each thread of a 256-thread
# CUDA C block keeps one place of the run for every row (kernels/cuda/channel_groups.cuh).
MAX_GROUP_RUN_BYTES = 256 * VECTOR_BYTES


def channel_group(C: int, S: int, itemsize: int, tile: int, channels_adjacent: bool) -> int:
    """Adjacent channels per channels-first program: 1, or the fewest channels whose rows of S
    values together span whole 16-byte words (a 7x7 plane: 4 fp32 or 8 bf16 channels, 196 or 392
    values), so that the kernels load and store 16 bytes where single rows cannot start on 16
    bytes. Only where that is possible and cheap: the channels lie back to back (stride_c == S in x,
    dy and the output), C is a multiple of the group, and the group's run fits one tile and
    MAX_GROUP_RUN_BYTES (each lane, or CUDA C thread, then stays in one place of the run, hence in
    one channel, which keeps the per-channel bookkeeping out of the loops)."""
    vector = max(1, VECTOR_BYTES // itemsize)
    group = vector // math.gcd(S, vector)
    run = group * S
    if group == 1 or S == 1 or not channels_adjacent or C % group or run > tile or run * itemsize > MAX_GROUP_RUN_BYTES:
        return 1
    return group


@functools.lru_cache(maxsize=1024)
def channels_first_plan(N: int, C: int, S: int, itemsize: int, tuning: Tuning, sms: int,
                        channels_adjacent: bool = False) -> ChannelsFirstPlan:
    tile = tuning.tile_elements(itemsize)
    group = channel_group(C, S, itemsize, tile, channels_adjacent) if tuning.channel_groups else 1
    run = group * S
    # A group's run is one tile wide (next_power_of_2(run) <= tile, both powers of two).
    block_s = next_power_of_2(run) if group > 1 else _spatial_block(S, min(tile, tuning.max_block_s or tile))
    rows = min(tile // block_s, next_power_of_2(N))
    s_blocks = cdiv(run, block_s)
    total_tiles = cdiv(N, rows) * s_blocks
    # Channels enough to fill the GPU one program each keep the single pass when grouped: fewer,
    # larger programs (2048 7x7 channels: 256 groups of 8 bf16 channels), but x is read once from
    # DRAM and the second pass finds it on chip (profiling/MODEL.md has the model's bound of each).
    wanted = 1 if _splits_wanted(tuning, sms, C) == 1 else _splits_wanted(tuning, sms, cdiv(C, group))
    tiles_per_program, splits = _splits(total_tiles, wanted)
    # Rows that start on 16 bytes though S is no multiple of 16 (14x14 fp32) are marked: kernels/alignment.py.
    aligned = group > 1 or (channels_adjacent and S % (VECTOR_BYTES // itemsize) == 0 and S % 16)
    return ChannelsFirstPlan(rows, block_s, s_blocks, total_tiles, tiles_per_program, splits, tuning.num_warps,
                             tuning.chunk_tiles, group, VECTOR_BYTES // itemsize if aligned else 1,
                             tuning.split_max_registers, tuning.load_stages)


@functools.lru_cache(maxsize=1024)
def channels_last_plan(M: int, C: int, itemsize: int, tuning: Tuning, sms: int) -> ChannelsLastPlan:
    block_c = min(next_power_of_2(C), tuning.max_block_c)
    block_m = min(max(1, tuning.tile_elements(itemsize) // block_c), next_power_of_2(M))
    c_blocks = cdiv(C, block_c)
    tiles_per_program, _ = _splits(cdiv(M, block_m), _splits_wanted(tuning, sms, c_blocks))
    rows_per_program = tiles_per_program * block_m
    return ChannelsLastPlan(block_m, block_c, c_blocks, rows_per_program, cdiv(M, rows_per_program),
                            tuning.num_warps, tuning.chunk_tiles, tuning.split_max_registers, tuning.load_stages)


@dataclass(frozen=True)
class OnChipPlan:
    """The on-chip kernels' launch: each program holds `held` tiles (channels-first; CUDA C: blocks of
    the tile's rows) or rows (channels-last) of one channel group (block) on chip. In an exchange the
    group's `splits` programs meet at a barrier, so the grid -- groups x splits programs -- must be
    resident at once; else `programs` Triton programs walk the groups, one split each."""
    held: int          # tiles or rows a program holds: a power of two
    splits: int        # programs per channel group (block)
    programs: int      # the grid
    block_splits: int  # rows of partials a tile of the exchange's merge
    load_stages: int   # the walk's pipeline: the next group's copies in flight (Tuning.load_stages)
    resident: int      # programs per SM the exchange needs at once (0 for the walk)

    @property
    def exchange(self) -> bool:
        return self.resident > 0


def on_chip_plan(units: int, unit_values: int, groups: int, group_channels: int, itemsize: int, tuning: Tuning,
                 sms: int, streams: int, walk: bool = True, exchange: bool = True) -> OnChipPlan | None:
    """Where x (and dy: streams = 2) fits on chip, the plan of the kernels that read it once; else None
    (the two-pass plans). A channel group has `units` tiles (or rows) of `unit_values` values each. An SM
    holds Tuning.on_chip_bytes of the input, x and dy sharing it in the backward: Triton in registers,
    as accumulation-dtype values (16-bit inputs held widened); CUDA C (on_chip_shared) in shared
    memory, in the input's dtype. Groups that fill the SMs' resident programs (on_chip_programs_per_sm
    each) are walked where `walk` allows: by one Triton program an SM holding whole groups (its SM's
    share); in CUDA C by the resident blocks, each with load_stages (2 at least) buffers of a group
    (its x, and dy in the backward) of a tile or more, the next copied ahead (one block an SM in the
    backward, where two buffers do not fit a block's share, or where fewer groups fill the SMs but
    cannot be exchanged). Where `exchange` allows (CUDA C: not channel groups), fewer groups are split
    so the resident programs all work, each holding an equal power-of-two share of a group within its
    part of the SM's, and meet at a barrier. docs/design.md, "One read on chip"."""
    if not tuning.on_chip_bytes or units == 0:
        return None
    held_itemsize = itemsize if tuning.on_chip_shared else max(4, itemsize)
    values = tuning.on_chip_bytes // (streams * held_itemsize)  # an SM's share of each stream
    resident = tuning.on_chip_programs_per_sm * sms
    # CUDA C walks at on_chip_programs_per_sm blocks an SM where two slices fit each (the forward: the backward's
    # registers fit one block), else at one; groups of a tile's bytes or more (fewer: reductions outweigh copies).
    if tuning.on_chip_shared and walk and (groups >= resident or not exchange and groups >= sms):
        per_sm = tuning.on_chip_programs_per_sm if streams == 1 and groups >= resident \
            and values // tuning.on_chip_programs_per_sm >= 2 * units * unit_values else 1
        stages = min(tuning.load_stages, values // per_sm // (units * unit_values))
        walked = stages >= 2 and units * unit_values * itemsize >= tuning.tile_bytes
        return OnChipPlan(units, 1, per_sm * sms, 1, stages, 0) if walked else None
    if groups >= resident:  # the groups fill the SMs: programs that walk whole groups
        if not walk or tuning.on_chip_shared:
            return None
        held = next_power_of_2(units)
        return OnChipPlan(held, 1, sms, 1, tuning.load_stages, 0) if held * unit_values <= values else None
    most = values // tuning.on_chip_programs_per_sm // unit_values  # units a program can hold
    if most < 1 or not exchange:
        return None
    spread = resident // groups  # programs a group may have
    # At least a tile's values a program where that fits: no program merges more partials than it holds values.
    enough = max(1, units * unit_values // tuning.tile_elements(itemsize))
    held = min(next_power_of_2(cdiv(units, min(spread, enough))), 1 << (most.bit_length() - 1))
    splits = cdiv(units, held)
    if splits > spread:
        return None
    # A group in one program's share: walked as above (Triton); in a block of its own (CUDA C: one party).
    if splits == 1 and not tuning.on_chip_shared:
        return OnChipPlan(held, 1, min(groups, sms), 1, tuning.load_stages, 0)
    block_splits = min(next_power_of_2(splits), max(1, FUSED_FINALIZE_TILE // group_channels))
    return OnChipPlan(held, splits, groups * splits, block_splits, tuning.load_stages,
                      tuning.on_chip_programs_per_sm)


# A fused finalize shares the reduction kernel's registers, so its tiles of partials stay small:
# 512 values (2 per thread over 8 warps): larger tiles of partials would take the registers that
# let another program share the SM.
FUSED_FINALIZE_TILE = 512


@functools.lru_cache(maxsize=1024)
def finalize_plan(splits: int, C: int, tuning: Tuning, sms: int, fused_block_c: int = 1) -> FinalizePlan:
    """Channels per finalize program: few enough that the channels spread over the GPU (a program
    walks every split of its channels: 64 channels x 500 splits in one program serialize). A fused
    finalize (the reduction's last programs) has the reduction's channels, fused_block_c, and
    merges about sqrt(splits) rows at each of its two levels."""
    spread = next_power_of_2(cdiv(C, sms))
    block_c = max(1, min(next_power_of_2(C), 64 if tuning.max_block_c >= 64 else tuning.max_block_c, spread))
    block_splits = min(next_power_of_2(splits), max(1, tuning.finalize_tile // block_c))
    fused_tile = min(tuning.finalize_tile, FUSED_FINALIZE_TILE)
    fused_block_splits = min(next_power_of_2(splits), max(1, fused_tile // fused_block_c))
    # About sqrt(splits) rows at each level: 523 splits of 64 channels merge as 17 groups of 32.
    group_splits = next_power_of_2(math.isqrt(splits))
    return FinalizePlan(block_splits, block_c, fused_block_splits, group_splits, cdiv(splits, group_splits))


@dataclass(frozen=True, eq=False)
class Geometry:
    """How the GPU backends launch on one input layout (and, in the backward, one gradient layout):
    the layout family, sizes, the named strides of each tensor as the kernels read it, the plan,
    and the output's strides. Built once per (shape, strides, dtype, tuning, GPU) by `geometry()`
    and cached, so one layout has one Geometry: it compares and hashes by identity (cheap keys for
    the backends' per-geometry caches), and its derived values are computed once."""

    family: str
    N: int
    C: int
    S: int
    dtype: torch.dtype          # of x, y, dy and dx
    stat_dtype: torch.dtype     # of mean, invstd and the partials
    plan: "ChannelsFirstPlan | ChannelsLastPlan"
    finalize: FinalizePlan
    x: "ChannelsFirstView | ChannelsLastView"         # x as the kernels read it
    out: "ChannelsFirstView | ChannelsLastView"       # y in the forward, dx in the backward
    grad_y: "ChannelsFirstView | ChannelsLastView | None"  # the backward's dy
    out_strides: tuple                                # the output tensor's strides
    read_strides: tuple | None       # x must first be copied into a layout the kernels read: its strides
    grad_read_strides: tuple | None  # the same for dy
    offset_64: bool      # some offset reaches 2**31: 64-bit index arithmetic
    on_chip: OnChipPlan | None = None           # the training forward's plan when x fits on chip
    on_chip_backward: OnChipPlan | None = None  # the training backward's when x and dy do
    chunk_channels: int = 0  # Ghost BatchNorm: C of each virtual batch (C above is virtual batches x C), else 0
    chunk_extra: int = 0     # and the virtual batches' offset (kernels/ghost.py, chunk_offset)

    @property
    def copy_input(self) -> bool:
        return self.read_strides is not None

    @functools.cached_property
    def channels_first(self) -> bool:
        return self.family == CHANNELS_FIRST

    @functools.cached_property
    def count(self) -> int:
        """Values per channel."""
        return self.N * self.S

    @functools.cached_property
    def finalize_groups(self) -> int:
        """Programs of the split reductions that share a fused finalize: one group per channel (group)
        channels-first, per channel block channels-last."""
        return self.plan.grid(self.C)[0] if self.channels_first else self.plan.c_blocks

    @functools.cached_property
    def finalize_counters(self) -> int:
        """Counters of the fused finalize: one per (channel group, split group), one per channel group."""
        return self.finalize_groups * (self.finalize.split_groups + 1)

    @functools.cached_property
    def partial_rows(self) -> int:
        """Rows of the split reductions' partials: one per split, one per split group (level 2)."""
        return self.plan.splits + self.finalize.split_groups

    @functools.cached_property
    def channel_groups(self) -> bool:
        """Channels-first programs own several adjacent channels (see channel_group)."""
        return self.channels_first and self.plan.group > 1

    @functools.cached_property
    def single_pass(self) -> bool:
        """One program per channel (block): statistics and elementwise pass in one launch."""
        return self.plan.splits == 1

    @functools.cached_property
    def sizes(self) -> tuple:
        """(N, C, S) channels-first, (M, C) channels-last: the size arguments of every kernel."""
        return (self.N, self.C, self.S) if self.channels_first else (self.count, self.C)

    @functools.cached_property
    def tiling(self) -> tuple:
        """The split path's tiling arguments."""
        p = self.plan
        return (p.s_blocks, p.total_tiles, p.tiles_per_program) if self.channels_first else (p.rows_per_program,)

    @functools.cached_property
    def single_pass_tiling(self) -> tuple:
        """The single-pass kernels' tiling arguments: the program walks every tile of its channel."""
        return (self.plan.s_blocks, self.plan.total_tiles) if self.channels_first else ()

    @functools.cached_property
    def shift_stride(self) -> int:
        """Distance in x between the first values of consecutive channels (their shifts)."""
        return self.x.stride_c if self.channels_first else 1


def geometry(x: torch.Tensor, grad_y: torch.Tensor | None, tuning: Tuning, sms: int) -> Geometry:
    """The cached Geometry of x (and of dy, for the backward)."""
    return _cached_geometry(tuple(x.shape), x.stride(), x.dtype, None if grad_y is None else grad_y.stride(),
                            tuning, sms)


@functools.lru_cache(maxsize=1024)
def _cached_geometry(shape, x_strides, dtype, grad_strides, tuning: Tuning, sms: int) -> Geometry:
    x = torch.empty_strided(shape, x_strides, dtype=dtype, device="meta")
    family, x_read = choose_layout(x)
    grad_y = None if grad_strides is None else in_family(torch.empty_strided(shape, grad_strides, dtype=dtype,
                                                                              device="meta"), family)
    out = empty_in_family(x_read, family)
    view = channels_first_view if family == CHANNELS_FIRST else channels_last_view
    N, C, S = shape[0], shape[1], spatial_size(shape)
    itemsize = x.element_size()
    tensors = [t for t in (x_read, grad_y, out) if t is not None]
    if family == CHANNELS_FIRST:
        adjacent = all(view(t).stride_c == S for t in tensors)
        plan = channels_first_plan(N, C, S, itemsize, tuning, sms, adjacent)
        # CUDA C (on_chip_shared) holds whole rows of the run of a group's S values, in blocks of the tile's
        # rows; it walks runs of whole 16-byte slots, one a thread at most (walk.cuh), and exchanges one channel.
        run_bytes = plan.group * S * itemsize
        slots = run_bytes % VECTOR_BYTES == 0 and run_bytes <= MAX_GROUP_RUN_BYTES
        paths = dict(walk=slots or not tuning.on_chip_shared, exchange=plan.group == 1 or not tuning.on_chip_shared)
        held = (cdiv(N, plan.rows), plan.rows * plan.group * S, C // plan.group, plan.group) if tuning.on_chip_shared \
            else (plan.total_tiles, plan.rows * plan.block_s, cdiv(C, plan.group), plan.group)
    else:
        plan = channels_last_plan(N * S, C, itemsize, tuning, sms)
        held, paths = (N * S, plan.block_c, plan.c_blocks, plan.block_c), dict(walk=not tuning.on_chip_shared)
    return Geometry(
        family=family, N=N, C=C, S=S, dtype=dtype, stat_dtype=stat_dtype(dtype), plan=plan,
        finalize=finalize_plan(plan.splits, C, tuning, sms, plan.group if family == CHANNELS_FIRST else plan.block_c),
        x=view(x_read), out=view(out),
        grad_y=None if grad_y is None else view(grad_y), out_strides=out.stride(),
        read_strides=x_read.stride() if x_read is not x else None,
        grad_read_strides=grad_y.stride() if grad_y is not None and grad_y.stride() != grad_strides else None,
        offset_64=any(sum((n - 1) * step for n, step in zip(t.shape, t.stride())) > 2**31 - 1 for t in tensors),
        on_chip=on_chip_plan(*held, itemsize, tuning, sms, streams=1, **paths),
        on_chip_backward=on_chip_plan(*held, itemsize, tuning, sms, streams=2, **paths))
