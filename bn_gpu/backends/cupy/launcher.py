"""CuPy launches: a compiled kernel called on torch's current stream, and the replays of the call
signatures seen (bn_gpu.backends.replay).

A launch's arguments are numpy scalars, its pointers np.uint64 addresses of torch-allocated memory;
a replay traces each address back to the call argument or buffer it points into and launches the
same kernels with the same scalars and the new call's addresses."""
from __future__ import annotations

import functools

import numpy as np
import torch

from .. import replay
from .compilation import import_cupy, stream


def current_stream():
    """CuPy's view of torch's current stream on the current device."""
    device_index = torch.cuda.current_device()
    return stream(device_index, torch.cuda.current_stream(device_index).cuda_stream)


class Launcher:
    """Calls a compiled kernel on the current stream; keeps the replays of the signatures it has seen."""

    def __init__(self):
        self.replays = {}  # a call's signature -> its bn_gpu.backends.replay.Replay (or why there is none)

    def __call__(self, kernel, grid, block, args) -> None:
        kernel(grid, block, tuple(args), stream=current_stream())


launch = Launcher()


class WithSharedMemory:
    """A kernel launched with `shared_mem` bytes of dynamic shared memory (a copy ring larger than
    static shared memory holds); called as a compiled kernel is, so launches and replays take it as one."""

    def __init__(self, kernel, shared_mem: int):
        self.kernel, self.shared_mem = kernel, shared_mem

    def __call__(self, grid, block, args, stream=None):
        self.kernel(tuple(grid), tuple(block), args, shared_mem=self.shared_mem, stream=stream)


@functools.lru_cache(maxsize=256)
def with_shared_memory(kernel, shared_mem: int) -> WithSharedMemory:
    """`kernel` (a cupy.RawKernel) with its dynamic shared memory limit raised to shared_mem: above
    48 KB a block, static and dynamic together, a launch needs the kernel's opt-in."""
    if shared_mem > kernel.max_dynamic_shared_size_bytes:
        kernel.max_dynamic_shared_size_bytes = shared_mem
    return WithSharedMemory(kernel, shared_mem)


class Cooperative:
    """A kernel launched cooperatively -- the driver starts every block at once or refuses the
    launch -- with `shared_mem` bytes of dynamic shared memory: the on-chip kernels, whose blocks
    wait for each other (kernels/cuda/on_chip.cuh). Called as a compiled kernel is, so launches
    and replays take it as one."""

    def __init__(self, kernel, shared_mem: int):
        self.kernel, self.shared_mem = kernel, shared_mem

    def __call__(self, grid, block, args, stream=None):
        self.kernel.kernel(tuple(grid), tuple(block), args, shared_mem=self.shared_mem, stream=stream,
                           enable_cooperative_groups=True)


@functools.lru_cache(maxsize=256)
def cooperative(kernel, role: str, shared_mem: int, threads: int, blocks: int, sms: int) -> Cooperative:
    """`kernel` (a cupy.RawKernel, compiled for the current device) as a Cooperative launch of
    `blocks` blocks of `threads` threads, once its dynamic shared memory limit is raised to
    shared_mem and its occupancy found to hold them all at once on the device's `sms` SMs: else an
    error naming the way back to the two-pass kernels (a cooperative launch that does not fit fails
    in the driver, with less to go on)."""
    if shared_mem > kernel.max_dynamic_shared_size_bytes:
        kernel.max_dynamic_shared_size_bytes = shared_mem
    per_sm = import_cupy().cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(kernel.kernel.ptr, threads,
                                                                                 shared_mem)
    if per_sm * sms < blocks:
        raise RuntimeError(f"{role}: the on-chip kernel needs its {blocks} blocks resident at once, but this GPU "
                           f"holds {per_sm} a multiprocessor ({per_sm * sms} in all) with {shared_mem} bytes of "
                           f"shared memory each; set BN_GPU_TUNING=on_chip_bytes=0 to use the two-pass kernels")
    return Cooperative(kernel, shared_mem)


def replay_launcher():
    """The launcher whose replays apply now (none while a recording stands in for it)."""
    return launch if isinstance(launch, Launcher) else None


def recording_launch(recorded, seen):
    """A stand-in for `recorded` while a call is recorded: each launch goes through it, then
    seen(entry, addresses, ()) with the kernel, grid, block and arguments as entry."""
    def launch_and_record(kernel, grid, block, args):
        recorded(kernel, grid, block, args)
        seen((kernel, tuple(grid), tuple(block), tuple(args)),
             [replay.Address(int(a)) for a in args if type(a) is np.uint64], ())
    return launch_and_record


def replay_step(entry, operands, scalars) -> tuple:
    """(kernel, grid, block, the recorded arguments, (argument position, pool index, byte offset)
    of each pointer)."""
    kernel, grid, block, args = entry
    positions = [k for k, a in enumerate(args) if type(a) is np.uint64]
    return kernel, grid, block, args, tuple((k, index, offset) for k, (index, offset) in zip(positions, operands))


def run_steps(steps, pool) -> None:
    cuda_stream = current_stream()
    for kernel, grid, block, recorded_args, pointers in steps:
        args = list(recorded_args)
        for k, index, offset in pointers:
            t = pool[index]
            args[k] = np.uint64(0 if t is None else t.data_ptr() + offset)
        kernel(grid, block, tuple(args), stream=cuda_stream)
