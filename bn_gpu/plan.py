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
import os
from dataclasses import dataclass

import torch
import triton

from .dtypes import stat_dtype
from .layout import (CHANNELS_FIRST, channels_first_view, channels_last_view, choose_layout, empty_in_family,
                     in_family, spatial_size)


@dataclass(frozen=True)
class Tuning:
    tile_elements: int     # values per tile (power of two)
    programs_per_sm: int   # grid target for the split reductions
    max_block_c: int       # channels per program in the channels-last kernels
    finalize_tile: int     # partials per finalize tile
    num_warps: int


def _tuning_from_environment(default: Tuning) -> Tuning:
    """`default` with the fields that BN_GPU_TUNING overrides ("tile_elements=4096,num_warps=8"):
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


# On a GPU: tiles of 2048 values give each of 128 threads 16 values (four 16-byte loads in fp32).
GPU_TUNING = _tuning_from_environment(
    Tuning(tile_elements=2048, programs_per_sm=4, max_block_c=128, finalize_tile=4096, num_warps=4))
# In the Triton interpreter: small tiles and few programs, so that tests on small shapes still
# walk several tiles per program, several splits per channel and several finalize chunks.
INTERPRETER_TUNING = Tuning(tile_elements=64, programs_per_sm=2, max_block_c=4, finalize_tile=8, num_warps=1)
INTERPRETER_SMS = 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def tuning_and_sms(device: torch.device) -> tuple[Tuning, int]:
    if device.type != "cuda":
        return INTERPRETER_TUNING, INTERPRETER_SMS
    return GPU_TUNING, multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@dataclass(frozen=True)
class ChannelsFirstPlan:
    rows: int              # batch rows per tile (power of two)
    block_s: int           # spatial positions per tile (power of two)
    s_blocks: int          # tiles across S
    total_tiles: int       # tiles per channel
    tiles_per_program: int
    splits: int            # programs per channel (grid axis 1)
    num_warps: int

    def grid(self, C: int) -> tuple[int, int]:
        return (C, self.splits)


@dataclass(frozen=True)
class ChannelsLastPlan:
    block_m: int           # rows per tile (power of two)
    block_c: int           # channels per program (power of two)
    c_blocks: int          # programs across C (grid axis 1)
    rows_per_program: int  # a multiple of block_m
    splits: int            # programs across M (grid axis 0)
    num_warps: int

    def grid(self, C: int) -> tuple[int, int]:
        return (self.splits, self.c_blocks)


@dataclass(frozen=True)
class FinalizePlan:
    block_splits: int
    block_c: int

    def grid(self, C: int) -> tuple[int]:
        return (triton.cdiv(C, self.block_c),)


def _lane_use(S: int, block: int) -> float:
    return S / (triton.cdiv(S, block) * block)


def _spatial_block(S: int, tile: int) -> int:
    """Largest power of two <= tile covering S without leaving many lanes of the last block idle."""
    block = min(tile, triton.next_power_of_2(S))
    while block > 32 and _lane_use(S, block // 2) > _lane_use(S, block) + 0.1:
        block //= 2
    return block


def _splits(total_tiles: int, wanted: int) -> tuple[int, int]:
    """(tiles_per_program, splits) covering total_tiles with about `wanted` programs."""
    tiles_per_program = triton.cdiv(total_tiles, max(1, min(wanted, total_tiles)))
    return tiles_per_program, triton.cdiv(total_tiles, tiles_per_program)


@functools.lru_cache(maxsize=1024)
def channels_first_plan(N: int, C: int, S: int, tuning: Tuning, sms: int) -> ChannelsFirstPlan:
    block_s = _spatial_block(S, tuning.tile_elements)
    rows = min(tuning.tile_elements // block_s, triton.next_power_of_2(N))
    s_blocks = triton.cdiv(S, block_s)
    total_tiles = triton.cdiv(N, rows) * s_blocks
    tiles_per_program, splits = _splits(total_tiles, triton.cdiv(tuning.programs_per_sm * sms, C))
    return ChannelsFirstPlan(rows, block_s, s_blocks, total_tiles, tiles_per_program, splits, tuning.num_warps)


@functools.lru_cache(maxsize=1024)
def channels_last_plan(M: int, C: int, tuning: Tuning, sms: int) -> ChannelsLastPlan:
    block_c = min(triton.next_power_of_2(C), tuning.max_block_c)
    block_m = min(max(1, tuning.tile_elements // block_c), triton.next_power_of_2(M))
    c_blocks = triton.cdiv(C, block_c)
    tiles_per_program, _ = _splits(triton.cdiv(M, block_m), triton.cdiv(tuning.programs_per_sm * sms, c_blocks))
    rows_per_program = tiles_per_program * block_m
    return ChannelsLastPlan(block_m, block_c, c_blocks, rows_per_program, triton.cdiv(M, rows_per_program),
                            tuning.num_warps)


@functools.lru_cache(maxsize=1024)
def finalize_plan(splits: int, C: int, tuning: Tuning) -> FinalizePlan:
    block_c = min(triton.next_power_of_2(C), 64 if tuning.max_block_c >= 64 else tuning.max_block_c)
    block_splits = min(triton.next_power_of_2(splits), max(1, tuning.finalize_tile // block_c))
    return FinalizePlan(block_splits, block_c)


class Geometry:
    """What a GPU backend launches for one input layout (and, in the backward, one gradient
    layout): family, sizes, per-tensor strides, the plan and the output's strides. Built from meta
    tensors once per (shape, strides, dtype, device, tuning) by `Geometry.of`, and cached."""

    def __init__(self, x: torch.Tensor, family: str, tuning: Tuning, sms: int, others=()):
        self.family = family
        self.first = family == CHANNELS_FIRST
        self.N, self.C = x.shape[0], x.shape[1]
        self.S = spatial_size(x.shape)
        self.count = self.N * self.S
        self.stat_dtype = stat_dtype(x.dtype)
        out = empty_in_family(x, family)  # x is a meta tensor: so is out
        self.out_strides = out.stride()
        tensors = (x, *others, out)
        if self.first:
            self.plan = channels_first_plan(self.N, self.C, self.S, tuning, sms)
            self.sizes = [self.N, self.C, self.S]
            self.strides = [[v.stride_n, v.stride_c] for v in map(channels_first_view, tensors)]
            self.tiling = [self.plan.s_blocks, self.plan.total_tiles, self.plan.tiles_per_program]
            self.fused_tiling = self.tiling[:2]  # single pass: the program walks every tile
            self.shift_stride = self.strides[0][1]  # between the first values of consecutive channels
        else:
            self.plan = channels_last_plan(self.count, self.C, tuning, sms)
            self.sizes = [self.count, self.C]
            self.strides = [[channels_last_view(t).stride_m] for t in tensors]
            self.tiling = [self.plan.rows_per_program]
            self.fused_tiling = []
            self.shift_stride = 1
        self.fused = self.plan.splits == 1
        self.offset_64 = any(sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) > 2**31 - 1
                             for t in tensors)
        self.copy_input = False   # x must first be copied into a layout the kernels read
        self.copy_others = []     # the same for each of `others`

    def geometry(self, *which: int) -> list:
        """Sizes, then the strides of the tensors numbered `which` (0: x, then the others, -1: output)."""
        return self.sizes + [s for i in which for s in self.strides[i]]

    @classmethod
    def of(cls, x: torch.Tensor, *others: torch.Tensor, tuning: Tuning, sms: int) -> "Geometry":
        return _cached_geometry(cls, tuple(x.shape), x.stride(), x.dtype, x.device,
                                tuple(o.stride() for o in others), tuning, sms)

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """x, or its copy in the layout the kernels read."""
        return choose_layout(x)[1] if self.copy_input else x


@functools.lru_cache(maxsize=1024)
def _cached_geometry(cls, shape, x_strides, dtype, device, other_strides, tuning, sms) -> Geometry:
    x = torch.empty_strided(shape, x_strides, dtype=dtype, device="meta")
    others = [torch.empty_strided(shape, s, dtype=dtype, device="meta") for s in other_strides]
    family, x_read = choose_layout(x)
    others = [in_family(t, family) for t in others]
    geometry = cls(x_read, family, tuning, sms, others)
    geometry.copy_input = x_read is not x
    geometry.copy_others = [o.stride() != s for o, s in zip(others, other_strides)]
    return geometry
