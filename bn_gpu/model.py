"""python -m bn_gpu model: what the compiled code and the launch plans imply on a target GPU,
computed on a machine without one.

For each benchmark case (shape x dtype x layout x op) and GPU backend:
  1. the launches the backend makes (bn_gpu.launches records them on meta tensors): kernel, grid,
     block, programs per SM, waves;
  2. every launched kernel variant compiled for the target as it runs (Triton: the JIT's
     constexprs and argument specialization; CUDA C: nvcc with the backend's options), read back
     with cuobjdump: registers, spills, shared memory, occupancy, and in the main loop (the loop
     with the global loads) the load/store widths, barriers and SASS instructions per element;
  3. a DRAM-traffic model (bytes each launch reads and writes; a second read of x counts as an
     L2 hit only where what it re-reads can still be resident), the upper bound it gives in % of
     the floor, an issue-rate bound from instructions per element, the bytes in flight per SM
     against what the bandwidth needs (Little's law), and the host cost of the launches.

Every figure is either read from the compiled code, computed from the plan, or an assumption of
the target (marked "assumed" in the output). It is a model: no GPU ran anything.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from . import cli
from . import launches as recorded

# ---- targets ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    capability: int
    sms: int
    l2_mb: float
    l2_reuse_mb: float         # assumed: the part of L2 a second pass can count on
    smem_per_sm_kb: int
    regs_per_sm: int
    bandwidth_tbs: float       # copy bandwidth, bytes read + written
    clock_ghz: float
    latency_us: float          # assumed DRAM latency under load (Little's law)
    host_us_per_launch: float  # assumed host time of one eager launch


TARGETS = {
    # 4.28 TB/s: a device-to-device copy measured on an H200 (docs/baselines.md); 4.22 in profiling/RESULTS.md.
    "h200": Target("NVIDIA H200", 90, 132, 50, 40, 228, 65536, 4.28, 1.98, 0.7, 15.0),
    "h100": Target("NVIDIA H100 SXM", 90, 132, 50, 40, 228, 65536, 3.0, 1.98, 0.7, 15.0),
    "a100": Target("NVIDIA A100 80GB", 80, 108, 40, 32, 164, 65536, 1.8, 1.41, 0.7, 15.0),
}
ASSUMED = ("l2_reuse_mb", "latency_us", "host_us_per_launch")

DEFAULT_SHAPES = ["64x64x112x112", "64x256x56x56", "64x2048x7x7", "16384x2048", "8x64x16x56x56", "5x3"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = ("train_fwd", "eval_fwd", "train_bwd", "train_fwd_add_relu", "train_bwd_relu")
# Fused ops: (the plain op they extend, what the epilogue adds). The forward relu(bn(x) + residual)
# reads the residual as one more stream; the backward of BN + ReLU recomputes the ReLU's mask from x,
# which its kernels read anyway.
FUSED_OPS = {"train_fwd_add_relu": "train_fwd", "train_bwd_relu": "train_bwd"}
# Passes over the activation of the unfused sequence of a fused op: BatchNorm at its floor, then the
# add (read two, write one) and the ReLU (read, write) as kernels of their own; backward: the ReLU's
# (read y and dy, write the gradient), then BatchNorm's.
UNFUSED_PASSES = {"train_fwd_add_relu": 2 + 3 + 2, "train_bwd_relu": 3 + 3}
FLOOR_PASSES = {"train_fwd": 2, "eval_fwd": 2, "train_bwd": 3, "train_fwd_add_relu": 3, "train_bwd_relu": 3}

# Per kernel: which tensors it streams, as (name, passes): "x" read, "dy" read, "y" written;
# "x2" / "dy2" a second read of the same data in the same kernel (single-pass kernels).
STREAMS = {
    "statistics": ["x"],
    "normalize": ["x", "y"],
    "single_pass_forward": ["x", "x2", "y"],
    "gradient_sums": ["dy", "x"],
    "input_gradient": ["dy", "x", "y"],
    "single_pass_backward": ["dy", "x", "dy2", "x2", "y"],
}


def _job(name: str) -> str:
    return name.replace("_channels_first", "").replace("_channels_last", "")


# ---- tools ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def tool(name: str) -> str | None:
    """cuobjdump / nvcc / c++filt: Triton's bundled NVIDIA tools first, then the PATH and CUDA."""
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"):
        candidate = os.path.join(root, "bin", name)
        if root and os.path.exists(candidate):
            return candidate
    return None


# ---- SASS analysis ----------------------------------------------------------------------------

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_FUNCTION = re.compile(r"Function : (\S+)")


@dataclass
class Instruction:
    address: int
    opcode: str
    operands: str


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """{function name: instructions} from `cuobjdump -sass` output."""
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        match = _FUNCTION.search(line)
        if match:
            current = functions.setdefault(match.group(1), [])
            continue
        match = _INSTRUCTION.search(line)
        if match and current is not None:
            current.append(Instruction(int(match.group(1), 16), match.group(3), match.group(4).strip()))
    return functions


def _global_load(opcode: str) -> bool:
    """A load from global memory: LDG into registers, or LDGSTS, an asynchronous copy into shared
    memory (Triton's software pipeline); not LDGDEPBAR, which closes a group of such copies."""
    return opcode.startswith("LDG") and not opcode.startswith("LDGDEPBAR")


def _width(opcode: str) -> int:
    """Bits moved by one LDG/LDGSTS/STG."""
    for suffix, bits in ((".128", 128), (".64", 64), (".U16", 16), (".S16", 16), (".U8", 8), (".S8", 8)):
        if suffix in opcode:
            return bits
    return 32


@dataclass
class LoopStats:
    instructions: int        # SASS instructions in one iteration of the loop (NOPs excluded)
    load_bits: list          # widths of the global loads of one iteration
    streamed_bits: int       # bits of those loads that stream the kernel's data (see _streams)
    store_bits: list
    barriers: int            # BAR instructions per iteration
    loads_at_once_bits: int = 0  # the most bits of loads issued between two waits on a load (loads_at_once)
    pipelined: bool = False      # asynchronous copies, waited on with some left in flight (_pipelined)


def _streams(ins: Instruction) -> bool:
    """A global load of the data a kernel streams: not a coherent (.STRONG) load, which only the
    fused finalize makes (partials written by other programs of the launch, read through L2)."""
    return _global_load(ins.opcode) and ".STRONG" not in ins.opcode


def _branch_target(ins: Instruction) -> int | None:
    match = re.search(r"0x([0-9a-f]+)", ins.operands)
    return int(match.group(1), 16) if match else None


def _divergence_returns(instructions: list[Instruction]) -> set:
    """Addresses of the branches that end a warp-divergence fallback: nvcc places the path a
    BRA.DIV takes when a warp is not converged (shuffles one lane at a time) after the function's
    body, and its closing BRA jumps back to where the converged path resumes -- backwards, but no loop."""
    targets = {_branch_target(ins) for ins in instructions if ins.opcode.startswith("BRA.DIV")}
    returns = set()
    for target in targets - {None}:
        returns.update(next(([ins.address] for ins in instructions
                             if ins.address >= target and ins.opcode.startswith("BRA")), []))
    return returns


_REGISTER = re.compile(r"\bR(\d+)\b")
_GROUPS_LEFT = re.compile(r"SB0,\s*0x([0-9a-f]+)")


def loads_at_once(body: list[Instruction]) -> int:
    """The most bits of global loads one thread has in flight at once, in one in-order pass over a
    loop body: a load's destination registers stay pending until an instruction reads one of them,
    which waits -- and, loads taking about the same time, finds the loads issued before it done too.
    So the loads between two such waits are the ones in flight together. A compiler that
    interleaves each load with the arithmetic on the one before keeps one in flight, however many
    the body holds; this is what the bytes-in-flight figure reads as the loads of an iteration.
    Asynchronous copies into shared memory (LDGSTS: a Triton loop pipelined with
    tl.range(num_stages=...)) are waited on by group instead: `DEPBAR.LE SB0, n` waits until n
    groups are left, so a loop that issues one group an iteration has n + 1 of them in flight when
    it waits."""
    pending: set = set()
    best = current = 0
    copies = sum(_width(ins.opcode) for ins in body if ins.opcode.startswith("LDGSTS"))
    if copies:
        left = [n for n in map(_groups_left, body) if n is not None]
        best = copies * (max(left, default=0) + 1)
    plain = 0
    for ins in body:
        operands = [part.strip() for part in ins.operands.rstrip(" ;").split(",")]
        is_store = ins.opcode.startswith(("STG", "STS", "ST.", "ATOM", "RED"))
        sources = operands if is_store else operands[1:]
        if any(int(r) in pending for part in sources for r in _REGISTER.findall(part)):
            pending.clear()
            current = 0
        if _global_load(ins.opcode) and not ins.opcode.startswith("LDGSTS"):
            bits = _width(ins.opcode)
            destination = _REGISTER.findall(operands[0]) if operands else []
            if destination:
                first = int(destination[0])
                pending.update(range(first, first + max(1, bits // 32)))
            current += bits
            plain = max(plain, current)
    return best + plain


def _groups_left(ins: Instruction) -> int | None:
    """n of a `DEPBAR.LE SB0, n`: the groups of asynchronous copies it leaves in flight."""
    match = _GROUPS_LEFT.search(ins.operands) if ins.opcode.startswith("DEPBAR") else None
    return int(match.group(1), 16) if match else None


def _pipelined(body: list[Instruction]) -> bool:
    """A loop that copies into shared memory asynchronously and waits with copies left in flight."""
    return (any(ins.opcode.startswith("LDGSTS") for ins in body)
            and any((_groups_left(ins) or 0) > 0 for ins in body))


def main_loops(instructions: list[Instruction]) -> list[LoopStats]:
    """The loops with global loads: every backward branch closes a loop [target, branch] (except
    the return of a divergence fallback, `_divergence_returns`); nested loops count in their own
    body only. Sorted by bytes streamed per iteration (`_streams`), then by bytes loaded, largest
    first: a fused finalize's loops over partials come after the streaming loop, however much
    they load. A software-pipelined loop (one that waits with copies left in flight, `_pipelined`)
    comes first: the loop around it holds the pipeline's prologue, which copies several tiles ahead
    once per trip of the inner loop, not once per tile."""
    loops = []
    not_loops = _divergence_returns(instructions)
    for ins in instructions:
        if not ins.opcode.startswith("BRA") or ins.address in not_loops:
            continue
        start = _branch_target(ins)
        if start is None or start >= ins.address:
            continue
        loops.append((start, ins.address))
    stats = []
    for start, end in loops:
        inner = [(s, e) for s, e in loops if start < s and e < end]
        body = [ins for ins in instructions
                if start <= ins.address <= end and not any(s <= ins.address <= e for s, e in inner)]
        loads = [_width(ins.opcode) for ins in body if _global_load(ins.opcode)]
        if not loads:
            continue
        stats.append(LoopStats(instructions=sum(1 for ins in body if ins.opcode != "NOP"),
                               load_bits=loads,
                               streamed_bits=sum(_width(ins.opcode) for ins in body if _streams(ins)),
                               store_bits=[_width(ins.opcode) for ins in body if ins.opcode.startswith("STG")],
                               barriers=sum(1 for ins in body if ins.opcode.startswith("BAR")),
                               loads_at_once_bits=loads_at_once(body), pipelined=_pipelined(body)))
    if not stats:  # no loop (a tile covers everything): the whole function is one iteration
        loads = [_width(ins.opcode) for ins in instructions if _global_load(ins.opcode)]
        if loads:
            stats.append(LoopStats(instructions=sum(1 for ins in instructions if ins.opcode != "NOP"),
                                   load_bits=loads,
                                   streamed_bits=sum(_width(ins.opcode) for ins in instructions if _streams(ins)),
                                   store_bits=[_width(ins.opcode) for ins in instructions
                                               if ins.opcode.startswith("STG")],
                                   barriers=sum(1 for ins in instructions if ins.opcode.startswith("BAR")),
                                   loads_at_once_bits=loads_at_once(instructions)))
    return sorted(stats, key=lambda s: (not s.pipelined, -s.streamed_bits, -sum(s.load_bits)))


_RESOURCES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_resources(text: str) -> dict[str, dict]:
    """{function: {registers, stack, shared, local}} from `cuobjdump --dump-resource-usage`."""
    return {m.group(1): dict(registers=int(m.group(2)), stack=int(m.group(3)), shared=int(m.group(4)),
                             local=int(m.group(5))) for m in _RESOURCES.finditer(text)}


def _cuobjdump(cubin_path: str) -> tuple[dict, dict]:
    binary = tool("cuobjdump")
    resources = subprocess.run([binary, "--dump-resource-usage", cubin_path], capture_output=True, text=True,
                               check=True).stdout
    sass = subprocess.run([binary, "-sass", cubin_path], capture_output=True, text=True, check=True).stdout
    return parse_resources(resources), parse_sass(sass)


# ---- compiled kernels -------------------------------------------------------------------------

@dataclass
class Compiled:
    backend: str
    variant: str             # the launch's kernel with its specialization, as a short label
    registers: int
    spill_bytes: int         # stack + local memory per thread
    shared_bytes: int
    loops: list

    @property
    def main(self) -> LoopStats | None:
        return self.loops[0] if self.loops else None


def _triton_key(launch) -> tuple:
    signature, constexprs, attrs, options = recorded.triton_compile_inputs(launch)
    return (launch.name, tuple(signature.items()), repr(sorted(constexprs.items())), repr(sorted(attrs.items())),
            tuple(sorted(options.items())))


class Compiler:
    """Compiles each distinct launched variant once for the target and analyses it."""

    def __init__(self, target: Target, workdir: str):
        self.target = target
        self.workdir = workdir
        self.cache: dict = {}
        self.cuda_modules: dict = {}

    def triton(self, launch) -> Compiled:
        key = _triton_key(launch)
        if key not in self.cache:
            compiled = recorded.compile_triton(launch, self.target.capability)
            path = os.path.join(self.workdir, f"triton-{len(self.cache)}.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            resources, sass = _cuobjdump(path)
            name = launch.name
            usage = resources.get(name) or next(iter(resources.values()))
            shared = max(usage["shared"], getattr(compiled.metadata, "shared", 0) or 0)
            dtype = next((a.dtype for a in launch.args if isinstance(a, torch.Tensor)), None)
            flags = ",".join(k for k, v in sorted(launch.meta.items()) if v is True)
            label = (f"{name} {str(dtype).replace('torch.', '')} "
                     + " ".join(f"{k}={v}" for k, v in sorted(launch.meta.items())
                                if k.startswith(("BLOCK", "ROWS")) or (k == "GROUP" and v > 1))
                     + f" warps={launch.meta.get('num_warps', 4)}" + (f" [{flags}]" if flags else ""))
            self.cache[key] = Compiled("triton", label, usage["registers"], usage["stack"] + usage["local"],
                                       shared, main_loops(sass.get(name) or next(iter(sass.values()))))
        return self.cache[key]

    def cuda(self, launch) -> Compiled:
        if launch.kernel not in self.cache:
            self._compile_cuda_module(launch.kernel)
        return self.cache[launch.kernel]

    def _compile_cuda_module(self, expression: str) -> None:
        """Compile every name expression of the type combination holding `expression` (one nvcc run)."""
        from . import cupy_backend
        combination = next(c for c in cupy_backend.type_combinations()
                           if expression in cupy_backend.kernel_names(*c).values())
        names = sorted(set(cupy_backend.kernel_names(*combination).values()))
        unit = os.path.join(self.workdir, f"cuda-{len(self.cuda_modules)}.cu")
        with open(os.path.join(self.workdir, "batch_norm.cu"), "w") as f:
            f.write(cupy_backend.source())
        with open(unit, "w") as f:
            # Taking each kernel's address instantiates it, as NVRTC's name expressions do.
            f.write('#include "batch_norm.cu"\nvoid instantiate_all() {\n')
            f.write("".join(f"    (void)&{n};\n" for n in names) + "}\n")
        cubin = unit[:-3] + ".cubin"
        arch = f"sm_{self.target.capability}"
        subprocess.run([tool("nvcc"), *cupy_backend.COMPILE_OPTIONS, f"-arch={arch}", "-cubin", "-o", cubin, unit],
                       capture_output=True, text=True, check=True, cwd=self.workdir)
        resources, sass = _cuobjdump(cubin)
        demangled = _demangle(list(sass))
        for mangled, instructions in sass.items():
            name = re.sub(r"\(.*", "", demangled.get(mangled, mangled)).replace("void ", "").strip()
            name = re.sub(r"\s+", " ", name)
            usage = resources.get(mangled, dict(registers=0, stack=0, shared=0, local=0))
            for expression in names:
                if _same_template(expression, name):
                    self.cache[expression] = Compiled("cupy", expression, usage["registers"],
                                                      usage["stack"] + usage["local"], usage["shared"],
                                                      main_loops(instructions))
        self.cuda_modules[combination] = names


def _same_template(expression: str, demangled: str) -> bool:
    normalize = lambda s: re.sub(r"\s+", "", s).replace("(int)", "")  # noqa: E731
    return normalize(expression) == normalize(demangled)


def _demangle(names: list[str]) -> dict:
    binary = tool("c++filt")
    if binary is None:
        return {}
    out = subprocess.run([binary], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


# ---- the model of one case --------------------------------------------------------------------

def occupancy(compiled: Compiled, threads: int, target: Target) -> int:
    """Programs (blocks) resident per SM, from registers, shared memory and the hardware limits."""
    warps = -(-threads // 32)
    registers_per_warp = -(-max(compiled.registers, 1) * 32 // 256) * 256
    by_registers = target.regs_per_sm // (registers_per_warp * warps)
    by_shared = (target.smem_per_sm_kb * 1024) // (compiled.shared_bytes + 1024)
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
    per_sm = occupancy(compiled, threads, target)
    programs = launch.programs
    waves = programs / max(1, per_sm * target.sms)
    job = _job(launch.name)
    training = op != "eval_bwd"
    main = compiled.main
    loaded_bytes = sum(main.load_bits) / 8 if main else 0.0
    elements_per_iteration = loaded_bytes / _bytes_read_per_element(job, training, size) if main else 0.0
    instructions_per_element = main.instructions / elements_per_iteration if elements_per_iteration else math.nan
    resident = min(per_sm, -(-programs // target.sms))
    in_flight = loaded_bytes * threads * resident
    at_once_bits = main.loads_at_once_bits if main else 0
    groups_per_trip = math.nan
    if main and "tile_walk" in launch.meta:
        unroll = WALK_UNROLL.get(job, 4)
        groups_per_trip = walk_trips(threads=threads, unroll=unroll, **launch.meta["tile_walk"])
        # The loop's body holds `unroll` groups; a thread with fewer left in a walk loads them one by one.
        at_once_bits = min(at_once_bits, sum(main.load_bits) / unroll * groups_per_trip)
    at_once = at_once_bits / 8 * threads * resident
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


# The groups a CUDA C channels-first kernel's `walk` loads before it uses the first (kernels/batch_norm.cu:
# for_each_group's UNROLL; dx is unrolled by 2 and not batched).
WALK_UNROLL = {"input_gradient": 2}


@functools.lru_cache(maxsize=None)
def walk_trips(rows: int, block_s: int, N: int, S: int, vec: int, threads: int, unroll: int) -> float:
    """A CUDA C channels-first thread's groups of VEC values per wait on memory, over the tiles of
    one row block (kernels/batch_norm.cu, tile_walk and walk): a walk of `count` groups loads them
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
    the first pass read; in a single-pass kernel, when the slices of the programs resident at once
    fit."""
    shape, dtype, _, op = case
    numel = math.prod(shape)
    size = _element_bytes(dtype)
    tensor = numel * size
    reuse = target.l2_reuse_mb * 1e6
    job = _job(launch.name)
    if job not in STREAMS:  # finalize kernels: the partials
        return sum(a.numel() * a.element_size() for a in launch.args if isinstance(a, torch.Tensor) and a.dim() >= 1
                   and a.numel() < numel)
    streams = list(STREAMS[job])
    if job == "input_gradient" and op == "eval_bwd":
        streams = ["dy", "y"]
    if op == "train_fwd_add_relu" and job in ("normalize", "single_pass_forward"):
        streams.append("residual")
    total = 0.0
    for stream in streams:
        if stream.endswith("2"):  # second read inside one single-pass kernel
            resident_programs = min(launch.programs, per_sm * target.sms)
            reread = len([s for s in streams if s.endswith("2")])
            working_set = tensor * reread * resident_programs / launch.programs
            total += 0.0 if working_set <= reuse else tensor
        elif stream in ("x", "dy") and _second_pass(launch, op):
            reread = tensor * (2 if FUSED_OPS.get(op, op) == "train_bwd" else 1)  # the backward re-reads x and dy
            if _reverses_second_pass(launch.backend):
                total += tensor * max(0.0, 1.0 - reuse / reread)
            else:
                total += 0.0 if reread <= reuse else tensor
        else:
            total += tensor
    return total


def _reverses_second_pass(backend: str) -> bool:
    import importlib
    return getattr(importlib.import_module(f"bn_gpu.{backend}_backend"), "SECOND_PASS_REVERSED", False)


def _second_pass(launch, op: str) -> bool:
    """Whether this kernel re-reads what an earlier kernel of the same op read (split path)."""
    job = _job(launch.name)
    op = FUSED_OPS.get(op, op)
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
    launches = recorded.record(backend, FUSED_OPS.get(op, op), shape, dtype, layout, sms=target.sms,
                               epilogue=op in FUSED_OPS)
    figures = []
    for launch in launches:
        compiled = compiler.triton(launch) if backend == "triton" else compiler.cuda(launch)
        figures.append(kernel_figures(launch, compiled, case, target))
    numel = math.prod(shape)
    size = torch.empty((), dtype=dtype).element_size()
    floor = FLOOR_PASSES[op] * numel * size
    dram = sum(f.dram_bytes for f in figures)
    waved_dram = sum(f.dram_bytes * f.tail_factor for f in figures)
    streaming = [f for f in figures if _job(f.name) in STREAMS]
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


# ---- reports ----------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return "—" if math.isnan(value) else "∞"
    return format(value, spec)


def cases_markdown(cases: list[CaseFigures]) -> str:
    lines = ["| backend | shape | dtype | layout | op | launches | grid (programs/SM, waves) | DRAM / floor bytes | "
             "bound % floor | with partial waves | issue headroom | min in flight / at once / needed KB/SM | "
             "host µs (assumed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        grids = "; ".join(f"{'x'.join(map(str, k.grid))} ({k.per_sm}, {k.waves:g})" for k in c.kernels)
        lines.append(f"| {c.backend} | {c.shape} | {c.dtype} | {c.layout} | {c.op} | {c.launches} | {grids} | "
                     f"{c.dram_bytes / c.floor_bytes:.2f} | {_fmt(c.floor_pct_bound, '.0f')}% | "
                     f"{_fmt(c.wave_pct_bound, '.0f')}% | {_fmt(c.issue_headroom, '.1f')}× | "
                     f"{c.min_bytes_in_flight_kb:.1f} / {c.min_bytes_at_once_kb:.1f} / {c.needed_in_flight_kb:.1f} | "
                     f"{c.host_us:.0f} |")
    return "\n".join(lines)


def fused_markdown(cases: list[CaseFigures]) -> str:
    """Each fused case's modelled DRAM bytes against the unfused sequence: the same backend's plain
    case (modelled) followed by an add and a ReLU at their floors (5 more passes)."""
    plain = {(c.backend, c.shape, c.dtype, c.layout, c.op): c for c in cases}
    lines = ["| backend | shape | dtype | layout | op | fused DRAM MB | unfused sequence DRAM MB | fused / unfused |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        if c.op not in FUSED_OPS:
            continue
        base = plain.get((c.backend, c.shape, c.dtype, c.layout, FUSED_OPS[c.op]))
        if base is None:
            continue
        tensor = base.floor_bytes / FLOOR_PASSES[base.op]
        unfused = base.dram_bytes + (UNFUSED_PASSES[c.op] - FLOOR_PASSES[base.op]) * tensor
        lines.append(f"| {c.backend} | {c.shape} | {c.dtype} | {c.layout} | {c.op} | {c.dram_bytes / 1e6:.1f} | "
                     f"{unfused / 1e6:.1f} | {c.dram_bytes / unfused:.2f} |")
    return "\n".join(lines)


def kernels_markdown(cases: list[CaseFigures]) -> str:
    seen = {}
    for c in cases:
        for k in c.kernels:
            seen.setdefault((k.backend, k.variant), k)
    lines = ["| backend | kernel variant | threads | registers | spills B | shared B | programs/SM | "
             "loads (bits) | loads at once (bytes) | stores (bits) | barriers / iteration | SASS instr / element |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (backend, variant), k in sorted(seen.items()):
        lines.append(f"| {backend} | {variant} | {k.threads} | {k.registers} | {k.spill_bytes} | {k.shared_bytes} | "
                     f"{k.per_sm} | {k.load_widths} | {k.loads_at_once_bytes} | {k.store_widths} | "
                     f"{k.barriers_per_iteration} | "
                     f"{_fmt(k.instructions_per_element, '.1f')} |")
    return "\n".join(lines)


def header_markdown(target: Target, versions: dict) -> str:
    assumed = ", ".join(f"{name} = {getattr(target, name)}" for name in ASSUMED)
    return "\n".join([
        f"# Static model: {target.name} (sm_{target.capability})",
        "",
        f"Computed {versions['date']} on a machine without a GPU (no kernel ran): torch {versions['torch']}, "
        f"triton {versions['triton']}, {versions['nvcc']}.",
        "",
        f"Target: {target.sms} SMs, {target.l2_mb:g} MB L2, {target.smem_per_sm_kb} KB shared memory and "
        f"{target.regs_per_sm} registers per SM, {target.bandwidth_tbs} TB/s copy bandwidth, "
        f"{target.clock_ghz} GHz. Assumed: {assumed}.",
        "",
        "How each figure is computed: launches and grids are recorded from the backends' own orchestration "
        "on meta tensors; registers, spills and shared memory come from `cuobjdump --dump-resource-usage` of "
        "each kernel compiled for the target as it launches; loop figures from its SASS (the loop with the "
        "largest streaming global loads per iteration -- not the fused finalize's coherent loads of partials, "
        "and a warp-divergence fallback's jump back is no loop; a software-pipelined loop before the loop "
        "holding its prologue: its instructions, load/store widths, barriers); instructions per "
        "element = loop instructions / elements loaded per iteration. DRAM bytes: each kernel's streams "
        "(x, dy read; y/dx written), a second read counted as an L2 hit only when what it re-reads fits the "
        "assumed reusable L2. bound % floor = floor bytes / modelled DRAM bytes (the best the plan can reach at "
        "copy bandwidth); with partial waves: the same with each kernel's DRAM time × ceil(waves) / waves above "
        "one wave (its last, partial wave runs as long as a full one). issue headroom = memory time / issue "
        "time at 128 thread-instructions per clock per SM (≥ 2 leaves margin). In flight = bytes of global "
        "loads per loop iteration × threads × resident programs, against bandwidth per SM × latency. At once = "
        "the same with the loads a thread issues before it waits on one (asynchronous copies: by group), and "
        "for the CUDA C channels-first walks no more than its groups per trip to memory from the plan "
        "(`walk_trips`).",
    ])


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    nvcc = tool("nvcc")
    nvcc_version = "nvcc not found"
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"release (\S+),", out)
        nvcc_version = f"nvcc {match.group(1) if match else '?'}"
    return dict(date=datetime.date.today().isoformat(), torch=torch.__version__, triton=triton_version,
                nvcc=nvcc_version)


def run_model(target: Target, shapes, dtypes, layouts, ops, backends, workdir: str,
              progress=None) -> list[CaseFigures]:
    """The figures of every case; progress(done, total, label), if given, after each."""
    compiler = Compiler(target, workdir)
    jobs = [(backend, shape, dtype, layout, op)
            for shape in shapes for dtype in dtypes for layout in (layouts if len(shape) > 2 else ["contiguous"])
            for op in ops for backend in backends]
    cases = []
    for backend, shape, dtype, layout, op in jobs:
        cases.append(model_case(backend, shape, dtype, layout, op, target, compiler))
        if progress is not None:
            label = f"{backend} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} {layout} {op}"
            progress(len(cases), len(jobs), label)
    return cases


def missing_tools(backends) -> list[str]:
    needed = ["cuobjdump"] + (["nvcc"] if "cupy" in backends else [])
    missing = [name for name in needed if tool(name) is None]
    try:
        import triton  # noqa: F401
    except ImportError:
        missing.append("triton")
    return missing


def run(args) -> int:
    os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU target, whatever the tests set
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default up to 3.9, as the JIT compiles
    target = dataclasses.replace(TARGETS[args.target], **({"sms": args.sms} if args.sms else {}))
    missing = missing_tools(args.backends)
    if missing:
        print(f"bn_gpu model: needs {', '.join(missing)} (Triton's NVIDIA backend ships cuobjdump; nvcc comes "
              "with the CUDA toolkit)", file=sys.stderr)
        return 2
    dtypes = [DTYPES[d] for d in args.dtypes]
    started = time.monotonic()

    def progress(done, total, label):
        print(f"[{done}/{total}] {label} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        cases = run_model(target, args.shapes, dtypes, args.layouts, args.ops, args.backends, workdir, progress)
    versions = _versions()
    text = (header_markdown(target, versions) + "\n\n## Cases\n\n" + cases_markdown(cases)
            + "\n\n## Fused epilogue against the unfused sequence\n\n" + fused_markdown(cases)
            + "\n\n## Kernel variants\n\n" + kernels_markdown(cases) + "\n")
    os.makedirs(args.out, exist_ok=True)
    stem = unused_stem(os.path.join(args.out, f"model-{args.target}-{datetime.datetime.now():%Y%m%d-%H%M%S}"))
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(dict(target=dataclasses.asdict(target), assumed=list(ASSUMED), versions=versions,
                       cases=[dataclasses.asdict(c) for c in cases]), f, indent=1, default=str)
    if args.write_model_md:
        with open(args.write_model_md, "w") as f:
            f.write(text)
    print(text)
    written = [stem + ".md", stem + ".json"] + ([args.write_model_md] if args.write_model_md else [])
    print("written: " + ", ".join(os.path.abspath(path) for path in written), file=sys.stderr)
    return 0


def unused_stem(stem: str) -> str:
    """stem, or stem-2, stem-3, ...: the first whose .md and .json do not exist (a run never
    overwrites an earlier one's files)."""
    candidate, n = stem, 1
    while os.path.exists(candidate + ".md") or os.path.exists(candidate + ".json"):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=sorted(TARGETS), default="h200", help="the GPU the model describes")
    parser.add_argument("--sms", type=cli.positive_int, default=None, help="override the target's multiprocessor count")
    parser.add_argument("--shapes", nargs="+", type=cli.shape, default=[cli.shape(s) for s in DEFAULT_SHAPES],
                        metavar="SHAPE", help=f"shapes N x C x spatial... (default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="input dtypes")
    parser.add_argument("--layouts", nargs="+", choices=["contiguous", "channels_last"],
                        default=["contiguous", "channels_last"], help="memory layouts of the 3-D and wider shapes")
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS), help="the ops modelled")
    parser.add_argument("--backends", nargs="+", choices=["triton", "cupy"], default=["triton", "cupy"],
                        help="whose kernels are compiled and modelled")
    parser.add_argument("--out", default=os.path.join("profiling", "results"),
                        help="folder for the .md and .json, named by target and time (never overwritten)")
    parser.add_argument("--write-model-md", default=None, metavar="PATH",
                        help="also write the tables to PATH (make model: profiling/MODEL.md)")
