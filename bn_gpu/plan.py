"""Launch plans: how the (N, C, S) or (M, C) work is cut into tiles and programs.

Statistics are a split reduction: each channel (block) is spread over `splits` programs so that
the grid fills the GPU whatever C is, and the partials are merged by the finalize kernels. The
normalize and backward kernels walk the same tiles with the same grid.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Tuning:
    tile_elements: int     # values per tile (power of two)
    programs_per_sm: int   # grid target for the split reductions
    max_block_c: int       # channels per program in the channels-last kernels
    finalize_tile: int     # partials per finalize tile
    num_warps: int


# On a GPU: tiles of 2048 values give each of 128 threads 16 values (four 16-byte loads in fp32).
GPU_TUNING = Tuning(tile_elements=2048, programs_per_sm=4, max_block_c=128, finalize_tile=4096, num_warps=4)
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
