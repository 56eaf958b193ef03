"""The Triton backend: the kernels of bn_gpu.kernels, launched through bn_gpu.backends.orchestration.

    launcher.py   JIT launches, then compiled kernels called directly (Site, Launcher, launch)
    sites.py      one launch site per kernel, geometry and set of flags; the tuning rules; the kernel table
    table.py      TritonKernels: the orchestration's kernel table, marshalling each kernel's arguments

Each Launcher keeps the replays of the signatures it has seen (bn_gpu.backends.replay).
"""
from __future__ import annotations

import functools

import torch

from .. import ghost, orchestration, replay
from ..plan import interpreting
from . import launcher
from .table import KERNELS, TritonKernels  # noqa: F401  (the backend's kernel table)

# The normalize and input-gradient passes walk their tiles in the reverse of the order the
# statistics (gradient sums) read them, so their first tiles are still in L2 (the static model counts it).
SECOND_PASS_REVERSED = True


def check_available(device: torch.device) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors; got tensors on {device}. Move them to a GPU, use "
        "backend='cpu', or run the Triton kernels in the interpreter on CPU tensors by setting "
        "TRITON_INTERPRET=1 before importing bn_gpu (slow: for testing).")


replay.register("triton", launcher)

forward_train = functools.partial(orchestration.forward_train, KERNELS)
forward_eval = functools.partial(orchestration.forward_eval, KERNELS)
backward = functools.partial(orchestration.backward, KERNELS)
local_moments = functools.partial(orchestration.local_moments, KERNELS)
merge_ranks = functools.partial(orchestration.merge_ranks, KERNELS)
normalize = functools.partial(orchestration.normalize, KERNELS)
gradient_totals = functools.partial(orchestration.gradient_totals, KERNELS)
input_gradient = functools.partial(orchestration.input_gradient, KERNELS)
ghost_forward_train = functools.partial(ghost.forward_train, KERNELS)
ghost_backward = functools.partial(ghost.backward, KERNELS)
