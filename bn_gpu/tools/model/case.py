"""The model of one case: launches, DRAM bytes, bounds, bytes in flight, host cost."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .. import launches as recorded
from .compiled import Compiled, Compiler
from .targets import FLOOR_PASSES, FUSED_OPS, GHOST_OPS, STREAMS, VIRTUAL_BATCHES, Target, job_of, plain_op


def occupancy(compiled: Compiled, threads: int, target: Target, dynamic_shared: int = 0) -> int:
    """Programs (blocks) resident per SM, from registers, shared memory (static, and the launch's
    dynamic: the CUDA C on-chip kernels' held slice, a deeper copy ring) and the hardware limits."""
    warps = -(-threads // 32)
    registers_per_warp = -(-max(compiled.registers, 1) * 32 // 256) * 256
    by_registers = target.regs_per_sm // (registers_per_warp * warps)
    by_shared = (target.smem_per_sm_kb * 1024) // (compiled.shared_bytes + dynamic_shared + 1024)
    return max(0, min(64 // warps, by_registers, by_shared, 32))


@dataclass
class KernelFigures:
    backend: str
    name: str
    variant: str
    grid: tuple
    threads: int
    programs: int
    per_sm: int              # resident programs per SM (occupancy)
    waves: float
    registers: int
    spill_bytes: int
    shared_bytes: int
    load_widths: str
    loads_at_once_bytes: int   # one thread's loads in flight together (loads_at_once)
    store_widths: str
    barriers_per_iteration: int
    instructions_per_element: float
    bytes_in_flight_per_sm: float
    bytes_at_once_per_sm: float  # the same with the loads one thread has in flight at once (loads_at_once),
                                 # fewer where its walk gives a thread fewer groups than a batch (walk_trips)
    groups_per_trip: float   # CUDA C channels-first: a thread's groups per wait on memory (walk_trips); else nan
    dram_bytes: float
    memory_us: float
    issue_us: float
    tail_factor: float       # ceil(waves) / waves above one wave: the partial last wave runs as long as a full one


def _threads(launch) -> int:
    if launch.backend == "triton":
        return 32 * launch.meta.get("num_warps", 4)
    return math.prod(launch.block)


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _bytes_read_per_element(job: str, training: bool, size: int) -> int:
    streams = [s for s in STREAMS.get(job, []) if s in ("x", "dy")]
    if job == "input_gradient" and not training:
        streams = ["dy"]
    return max(1, len(streams)) * size


def kernel_figures(launch, compiled: Compiled, case, target: Target) -> KernelFigures:
    shape, dtype, _, op = case
    numel = math.prod(shape)
    size = _element_bytes(dtype)
    threads = _threads(launch)
    per_sm = occupancy(compiled, threads, target, launch.meta.get("dynamic_shared", 0))
    programs = launch.programs
    waves = programs / max(1, per_sm * target.sms)
    job = job_of(launch.name)
    training = op != "eval_bwd"
    main = compiled.main
    loaded_bytes = sum(main.load_bits) / 8 if main else 0.0
    elements_per_iteration = loaded_bytes / _bytes_read_per_element(job, training, size) if main else 0.0
    instructions_per_element = main.instructions / elements_per_iteration if elements_per_iteration else math.nan
    resident = min(per_sm, -(-programs // target.sms))
    in_flight = loaded_bytes * threads * resident
    at_once_bits = main.loads_at_once_bits if main else 0
    groups_per_trip = math.nan
    if main and "tile_walk" in launch.meta and not main.pipelined:
        unroll = WALK_UNROLL.get(job, 4)
        groups_per_trip = walk_trips(threads=threads, unroll=unroll, **launch.meta["tile_walk"])
        # The loop's body holds `unroll` groups; a thread with fewer left in a walk loads them one by one.
        # (The reductions' staged walk copies a thread's groups of a tile whatever their number.)
        at_once_bits = min(at_once_bits, sum(main.load_bits) / unroll * groups_per_trip)
    at_once = at_once_bits / 8 * threads * resident
    if "walk" in launch.meta:  # CUDA C's walk: stages - 1 slices copied ahead a block, whatever its loop
        walk = launch.meta["walk"]
        in_flight = at_once = (walk["stages"] - 1) * walk["slice_bytes"] * resident
    dram = dram_bytes(launch, case, target, per_sm)
    memory_us = dram / (target.bandwidth_tbs * 1e12) * 1e6
    streamed = numel if job in STREAMS else 0
    issue_us = (instructions_per_element * streamed / (target.sms * 128 * target.clock_ghz * 1e9) * 1e6
                if streamed and not math.isnan(instructions_per_element) else 0.0)
    widths = lambda bits: "/".join(str(b) for b in sorted(set(bits), reverse=True)) if bits else "-"  # noqa: E731
    return KernelFigures(
        backend=launch.backend, name=launch.name, variant=compiled.variant, grid=launch.grid, threads=threads,
        programs=programs, per_sm=per_sm, waves=round(waves, 2), registers=compiled.registers,
        spill_bytes=compiled.spill_bytes, shared_bytes=compiled.shared_bytes,
        load_widths=widths(main.load_bits) if main else "-",
        loads_at_once_bytes=main.loads_at_once_bits // 8 if main else 0,
        store_widths=widths(main.store_bits) if main else "-",
        barriers_per_iteration=main.barriers if main else 0,
        instructions_per_element=round(instructions_per_element, 2) if not math.isnan(instructions_per_element)
        else math.nan, bytes_in_flight_per_sm=in_flight, bytes_at_once_per_sm=at_once,
        groups_per_trip=round(groups_per_trip, 2), dram_bytes=dram,
        memory_us=memory_us, issue_us=issue_us, tail_factor=round(tail_factor(waves), 3))


# The groups a CUDA C channels-first kernel's `walk` loads before it uses the first (kernels/cuda/channels_first.cuh:
# for_each_group's UNROLL; dx is unrolled by 2 and not batched).
WALK_UNROLL = {"input_gradient": 2}


@functools.lru_cache(maxsize=None)
def walk_trips(rows: int, block_s: int, N: int, S: int, vec: int, threads: int, unroll: int) -> float:
    """A CUDA C channels-first thread's groups of VEC values per wait on memory, over the tiles of
    one row block (kernels/cuda/channels_first.cuh, tile_walk and walk): a walk of `count` groups loads them
    `unroll` at a time, then the rest one by one, so it waits count // unroll + count % unroll
    times. A tile row of more groups than the block has threads is walked along each row ("across",
    one walk a row), else a thread keeps one group and walks down the tile's rows. The main loop's
    loads at once count only where every walk has `unroll` groups or more."""
    groups_per_row = block_s // vec
    tile_rows = min(rows, N)
    groups = trips = 0
    for s0 in range(0, S, block_s):
        s_end = min(s0 + block_s, S)
        for thread in range(threads):
            if groups_per_row > threads:
                first, step, walks = s0 + thread * vec, threads * vec, tile_rows
                count = max(0, -(-(s_end - first) // step))
            else:
                row, group = divmod(thread, groups_per_row)
                step = threads // groups_per_row
                walks = 1 if s0 + group * vec < s_end else 0
                count = max(0, -(-(tile_rows - row) // step))
            groups += walks * count
            trips += walks * (count // unroll + count % unroll)
    return groups / trips if trips else 0.0


def tail_factor(waves: float) -> float:
    """How much longer than its share of bandwidth a launch of equal programs takes when its last
    wave is partial: 1.09 waves run as 2 (H200, 2026-11-26: Nsight Compute measured such a
    statistics kernel at 51% of DRAM bandwidth, and "up to 50%" lost to the partial wave). Below one
    wave every program runs at once."""
    return math.ceil(waves) / waves if waves > 1 else 1.0


def dram_bytes(launch, case, target: Target, per_sm: int) -> float:
    """Bytes one launch moves across DRAM. A second read of x (or dy) finds in L2 what can still be
    resident there: in a later kernel that walks x in the same order as the one that read it, only
    when all of it fits (a sequential pass over more than the cache evicts its own start first); in
    one that walks it in reverse (the backend's SECOND_PASS_REVERSED), the last reusable-L2 bytes
    the first pass read; in a single-pass kernel, whose programs re-read their own slices, the same
    by the working set of the programs resident at once: all of it when it fits, else, walked in
    reverse, the last reusable-L2 bytes of it (each program re-reads what it read last first; the
    programs run side by side, so L2 holds the last part of every slice), and none walked in order."""
    shape, dtype, _, op = case
    numel = math.prod(shape)
    size = _element_bytes(dtype)
    tensor = numel * size
    reuse = target.l2_reuse_mb * 1e6
    job = job_of(launch.name)
    if job not in STREAMS:  # finalize kernels: the partials
        return sum(a.numel() * a.element_size() for a in launch.args if isinstance(a, torch.Tensor) and a.dim() >= 1
                   and a.numel() < numel)
    streams = list(STREAMS[job])
    if job == "input_gradient" and op == "eval_bwd":
        streams = ["dy", "y"]
    if op == "train_fwd_add_relu" and job in ("normalize", "single_pass_forward", "on_chip_forward"):
        streams.append("residual")
    total = 0.0
    for stream in streams:
        if stream.endswith("2"):  # second read inside one single-pass kernel
            resident_programs = min(launch.programs, per_sm * target.sms)
            reread = len([s for s in streams if s.endswith("2")])
            working_set = tensor * reread * resident_programs / launch.programs
            if _reverses_second_pass(launch.backend):
                total += tensor * max(0.0, 1.0 - reuse / working_set)
            else:
                total += 0.0 if working_set <= reuse else tensor
        elif stream in ("x", "dy") and _second_pass(launch, op):
            reread = tensor * (2 if plain_op(op) == "train_bwd" else 1)  # the backward re-reads x and dy
            if _reverses_second_pass(launch.backend):
                total += tensor * max(0.0, 1.0 - reuse / reread)
            else:
                total += 0.0 if reread <= reuse else tensor
        else:
            total += tensor
    return total


def _reverses_second_pass(backend: str) -> bool:
    from ...backends import cupy, triton
    return {"triton": triton, "cupy": cupy}[backend].SECOND_PASS_REVERSED


def _second_pass(launch, op: str) -> bool:
    """Whether this kernel re-reads what an earlier kernel of the same op read (split path)."""
    job = job_of(launch.name)
    op = plain_op(op)
    return (job == "normalize" and op == "train_fwd") or (job == "input_gradient" and op == "train_bwd")


@dataclass
class CaseFigures:
    backend: str
    shape: str
    dtype: str
    layout: str
    op: str
    launches: int
    kernels: list
    floor_bytes: int
    dram_bytes: float
    floor_pct_bound: float       # floor bytes / modelled DRAM bytes: the best this plan can reach
    wave_pct_bound: float        # the same with each kernel's DRAM time stretched by its partial last wave
    issue_headroom: float        # min over streaming kernels of memory time / issue time
    min_bytes_in_flight_kb: float
    min_bytes_at_once_kb: float  # the same with the loads in flight at once (loads_at_once)
    needed_in_flight_kb: float
    host_us: float               # assumed host time of the launches
    kernel_us: float             # modelled: the larger of memory and issue time, summed over kernels


def model_case(backend: str, shape, dtype: torch.dtype, layout: str, op: str, target: Target,
               compiler: Compiler) -> CaseFigures:
    case = (shape, dtype, layout, op)
    launches = recorded.record(backend, op if op in GHOST_OPS else plain_op(op), shape, dtype, layout,
                               sms=target.sms, shared_kb=target.smem_per_sm_kb, epilogue=op in FUSED_OPS,
                               virtual_batches=VIRTUAL_BATCHES)
    figures = []
    for launch in launches:
        compiled = compiler.triton(launch) if backend == "triton" else compiler.cuda(launch)
        figures.append(kernel_figures(launch, compiled, case, target))
    numel = math.prod(shape)
    size = torch.empty((), dtype=dtype).element_size()
    floor = FLOOR_PASSES[op] * numel * size
    dram = sum(f.dram_bytes for f in figures)
    waved_dram = sum(f.dram_bytes * f.tail_factor for f in figures)
    streaming = [f for f in figures if job_of(f.name) in STREAMS]
    headroom = min((f.memory_us / f.issue_us for f in streaming if f.issue_us > 0), default=math.inf)
    in_flight = min((f.bytes_in_flight_per_sm for f in streaming), default=0.0)
    at_once = min((f.bytes_at_once_per_sm for f in streaming), default=0.0)
    needed = target.bandwidth_tbs * 1e12 / target.sms * target.latency_us * 1e-6
    return CaseFigures(
        backend=backend, shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""), layout=layout,
        op=op, launches=len(launches), kernels=figures, floor_bytes=floor, dram_bytes=dram,
        floor_pct_bound=100.0 * floor / dram if dram else math.nan,
        wave_pct_bound=100.0 * floor / waved_dram if waved_dram else math.nan, issue_headroom=headroom,
        min_bytes_in_flight_kb=in_flight / 1024, min_bytes_at_once_kb=at_once / 1024,
        needed_in_flight_kb=needed / 1024,
        host_us=len(launches) * target.host_us_per_launch,
        kernel_us=sum(max(f.memory_us, f.issue_us) for f in figures))
