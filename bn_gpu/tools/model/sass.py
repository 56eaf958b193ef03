"""SASS analysis: main loops, their loads, stores, barriers and instructions per element."""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass


from .toolchain import tool

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
    tl.range(num_stages=...); CUDA C's cp.async) are waited on by group instead (`_copies_at_once`)."""
    pending: set = set()
    best = current = 0
    if any(ins.opcode.startswith("LDGSTS") for ins in body):
        best = _copies_at_once(body)
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


def _copies_at_once(body: list[Instruction]) -> int:
    """The most bits of asynchronous copies in flight at a wait of the loop body. Copies are closed
    into groups (LDGDEPBAR) and waited on by group: `DEPBAR.LE SB0, n` waits until n groups are
    left, so at a wait the groups in flight are those closed since the wait before it plus the n
    that wait left. The body is taken as a cycle (walked from after its last wait, turn after turn
    until the groups a wait leaves have been closed, the waits of the last turn counted): a loop
    that issues one group and waits with n left has n + 1 in flight; a loop that closes several groups an iteration (two streams; CUDA C's double buffer of
    half tiles) has the closed ones and those left; a prologue that issues all its groups and waits
    for them all has them all. With no wait in the body, every copy of it."""
    events = []
    for ins in body:
        left = _groups_left(ins)
        if ins.opcode.startswith("LDGSTS"):
            events.append(("copy", _width(ins.opcode)))
        elif ins.opcode.startswith("LDGDEPBAR"):
            events.append(("close", 0))
        elif left is not None:
            events.append(("wait", left))
    waits = [k for k, (kind, _) in enumerate(events) if kind == "wait"]
    if not waits:
        return sum(bits for kind, bits in events if kind == "copy")
    start = waits[-1] + 1
    cycle = events[start:] + events[:start]
    groups, open_bits, closed, left, best = [], 0, 0, 0, 0
    turns = 2 + max(events[k][1] for k in waits)
    for turn in range(turns):
        for kind, value in cycle:
            if kind == "copy":
                open_bits += value
            elif kind == "close":
                groups.append(open_bits)
                open_bits, closed = 0, closed + 1
            else:
                if turn == turns - 1:
                    best = max(best, sum(groups[max(0, len(groups) - closed - left):]))
                closed, left = 0, value
    return best


def _groups_left(ins: Instruction) -> int | None:
    """n of a `DEPBAR.LE SB0, n`: the groups of asynchronous copies it leaves in flight."""
    match = _GROUPS_LEFT.search(ins.operands) if ins.opcode.startswith("DEPBAR") else None
    return int(match.group(1), 16) if match else None


def _pipelined(body: list[Instruction]) -> bool:
    """A loop that copies into shared memory asynchronously and waits with copies left in flight."""
    return (any(ins.opcode.startswith("LDGSTS") for ins in body)
            and any((_groups_left(ins) or 0) > 0 for ins in body))


def loop_ranges(instructions: list[Instruction]) -> list[tuple[int, int]]:
    """(first, last) addresses of each loop: every backward branch closes a loop [target, branch],
    except the return of a divergence fallback (`_divergence_returns`)."""
    loops = []
    not_loops = _divergence_returns(instructions)
    for ins in instructions:
        if not ins.opcode.startswith("BRA") or ins.address in not_loops:
            continue
        start = _branch_target(ins)
        if start is not None and start < ins.address:
            loops.append((start, ins.address))
    return loops


def main_loops(instructions: list[Instruction]) -> list[LoopStats]:
    """The loops with global loads: every backward branch closes a loop [target, branch] (except
    the return of a divergence fallback, `_divergence_returns`); nested loops count in their own
    body only. Sorted by bytes streamed per iteration (`_streams`), then by bytes loaded, largest
    first: a fused finalize's loops over partials come after the streaming loop, however much
    they load. A software-pipelined loop (one that waits with copies left in flight, `_pipelined`)
    comes first: the loop around it holds the pipeline's prologue, which copies several tiles ahead
    once per trip of the inner loop, not once per tile."""
    loops = loop_ranges(instructions)
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


def cuobjdump(cubin_path: str) -> tuple[dict, dict]:
    binary = tool("cuobjdump")
    resources = subprocess.run([binary, "--dump-resource-usage", cubin_path], capture_output=True, text=True,
                               check=True).stdout
    sass = subprocess.run([binary, "-sass", cubin_path], capture_output=True, text=True, check=True).stdout
    return parse_resources(resources), parse_sass(sass)
