"""Triton launches: through the JIT once per specialization, then the compiled kernel directly.

The first launch of each specialization goes through Triton's JIT (which compiles and caches);
later launches with the same specialization call the compiled kernel's launcher directly (as
Inductor does), skipping the JIT's argument binding and specialization. Where that does not apply
(the interpreter, launch hooks registered, a Triton without that launcher API) every launch goes
through the JIT; BN_GPU_DIRECT_LAUNCH=0 forces the JIT path. Checked bitwise against the JIT on an
H100 with Triton 3.6 (tests/test_gpu.py::test_direct_launches_match_the_jit, 2026-11-26).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from .. import replay
from ..plan import interpreting
from . import interpreter


def no_launch_hooks() -> bool:
    """Whether no Triton launch hook (profilers set them) is registered. Recent Triton keeps each
    hook as a HookChain, empty by default (its `calls`); older ones keep None or the function."""
    if _RUNTIME_KNOBS is None:  # a Triton without knobs: its launcher API may differ, use the JIT
        return False
    enter, leave = _RUNTIME_KNOBS.launch_enter_hook, _RUNTIME_KNOBS.launch_exit_hook
    return not (getattr(enter, "calls", enter) or getattr(leave, "calls", leave))


_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)  # one object, its hooks set on it


def current_stream() -> int:
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
    resident: int = 0  # programs an SM must hold at once, for a grid whose programs wait for each
                       # other (the on-chip kernels' exchange), 0 for none: checked against the
                       # compiled kernel's occupancy before its first launch (check_residency)

    def args(self, pointers: tuple, floats: tuple) -> list:
        """The kernel's runtime arguments in parameter order: pointers, head, floats, tail."""
        return [*pointers, *self.head, *floats, *self.tail]


MAX_REMEMBERED = 8192  # compiled specializations kept for direct launches (a site each, at least)


class Launcher:
    """Launches JIT kernels, reusing the compiled kernel of a specialization once the JIT made it."""

    def __init__(self, direct: bool | None = None):
        self.compiled = {}    # specialization key -> (compiled kernel, grid dims, constexpr values in order)
        self.replays = {}     # a forward call's signature -> its bn_gpu.backends.replay.Replay (or why there is none)
        self.resident_checked = set()  # sites whose compiled kernel check_residency found resident
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
        if site.resident and not interpreting() and site not in self.resident_checked:
            check_residency(site, site.args(pointers, floats))
            if len(self.resident_checked) >= MAX_REMEMBERED:
                self.resident_checked.clear()
            self.resident_checked.add(site)
        try:  # (costs nothing unless it raises)
            key = None
            if self.direct and no_launch_hooks():
                key = self.key(site, pointers)
                entry = self.compiled.get(key)
                if entry is not None:
                    compiled, dims, constexprs = entry
                    try:
                        compiled.run(*dims, current_stream(), compiled.function, compiled.packed_metadata, None,
                                     None, None, *pointers, *site.head, *floats, *site.tail, *constexprs)
                        return
                    except (TypeError, AttributeError):  # a launcher API other than the one this knows
                        self.direct = False
                        self.compiled.clear()
            compiled = through_jit(site, site.args(pointers, floats))
            if key is not None and self.direct:
                self._remember(key, site, compiled, len(pointers) + len(site.head) + len(floats) + len(site.tail))
        except RuntimeError as error:
            if site.resident and "cooperative" in str(error).lower():
                raise refused_grid(site, error) from error
            raise

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


def through_jit(site: Site, args: list):
    """Launch through the JIT; its compiled kernel (None in the interpreter). The interpreter runs the
    programs of a grid that wait for each other (site.resident) concurrently, as a GPU does."""
    if site.resident and interpreting():
        interpreter.launch_concurrently(site.kernel, site.grid, args, site.meta)
        return None
    return site.kernel[site.grid](*args, **site.meta)


def resident_programs(n_regs: int, shared: int, num_warps: int, device: int) -> int:
    """Programs of a compiled kernel (registers a thread, bytes of shared memory) an SM holds at once."""
    props = torch.cuda.get_device_properties(device)
    threads = 32 * num_warps
    registers = -(-max(1, n_regs) // 8) * 8 * threads  # allocated 8 a thread at a time (256 a warp)
    limits = [getattr(props, "regs_per_multiprocessor", 65536) // registers,
              getattr(props, "max_threads_per_multi_processor", 2048) // threads]
    if shared:
        # Hopper and Ampere reserve 1 KB of each block's shared memory for the system.
        limits.append(getattr(props, "shared_memory_per_multiprocessor", 233472) // (shared + 1024))
    return min(limits)


def check_residency(site: Site, args: list) -> None:
    """Raise unless an SM holds site.resident programs of the site's compiled kernel: programs that wait
    for each other at a barrier would otherwise wait for programs that cannot start."""
    compiled = site.kernel.warmup(*args, grid=site.grid, **site.meta)
    getattr(compiled, "_init_handles", lambda: None)()
    n_regs, shared = getattr(compiled, "n_regs", 0), compiled.metadata.shared
    held = resident_programs(n_regs, shared, site.meta["num_warps"], torch.cuda.current_device())
    if held < site.resident:
        raise RuntimeError(f"bn_gpu: {site.kernel.__name__} compiled to {n_regs} registers a thread and {shared} "
                           f"bytes of shared memory: an SM holds {held} of its programs, its grid needs "
                           f"{site.resident}; set BN_GPU_TUNING=on_chip_bytes=0 to use the two-pass kernels")


def refused_grid(site: Site, error: Exception) -> RuntimeError:
    """The error of a cooperative launch (Site.meta's launch_cooperative_grid) that the driver refused:
    it starts every program of such a grid at once or none, and here it could not."""
    return RuntimeError(f"bn_gpu: the driver cannot start every program of {site.kernel.__name__}'s grid "
                        f"({site.grid[0]}) at once (other kernels or an MPS share hold its SMs): {error}; "
                        f"set BN_GPU_TUNING=on_chip_bytes=0 to use the two-pass kernels")


launch = Launcher()


def replay_launcher():
    """The launcher whose replays (bn_gpu.backends.replay) apply now, else None: direct launches
    only, and no launch hook registered."""
    if not isinstance(launch, Launcher) or not launch.direct or not no_launch_hooks():
        return None
    return launch


def recording_launch(recorded, seen):
    """A stand-in for `recorded` (the launcher) while a call is recorded (bn_gpu.backends.replay):
    each launch goes through it, then seen(entry, tensors, scalars) with its compiled kernel (None
    for a launch through the JIT) and arguments."""
    def launch_and_record(site, pointers, floats=()):
        entry = recorded.compiled.get(recorded.key(site, pointers)) if recorded.direct else None
        recorded(site, pointers, floats)
        seen(entry if recorded.direct else None, pointers, (*site.head, *floats, *site.tail))
    return launch_and_record


def replay_step(entry, operands, scalars) -> tuple:
    """(compiled kernel, grid dims, its pointers from the pool, its scalars then constexprs)."""
    compiled, dims, constexprs = entry
    return compiled, dims, replay.picker([index for index, _ in operands]), (*scalars, *constexprs)


def run_steps(steps, pool) -> None:
    stream = current_stream()
    for compiled, dims, pointers, arguments in steps:
        compiled.run(*dims, stream, compiled.function, compiled.packed_metadata, None, None, None, *pointers(pool),
                     *arguments)
