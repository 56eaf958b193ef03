"""The CuPy backend: the CUDA C kernels of kernels/cuda/, launched through bn_gpu.backends.orchestration.

    compilation.py   kernel names, the source with its headers, NVRTC compilation (cached), streams
    launcher.py      launches on torch's current stream, and the replays of seen call signatures
    table.py         CudaKernels: the orchestration's kernel table, marshalling each kernel's arguments

Importing it never needs CuPy; check_available says what is missing.
"""
from __future__ import annotations

import functools

import torch

from .. import ghost, orchestration, replay
from . import compilation, launcher
from .table import KERNELS, CudaKernels  # noqa: F401  (the backend's kernel table)

# The normalize and input-gradient passes walk their tiles (channels-last: rows) in the reverse of
# the order the statistics (gradient sums) read them, so they start with what is still in L2 (the
# static model counts it).
SECOND_PASS_REVERSED = True


def check_available(device: torch.device) -> None:
    compilation.import_cupy()
    if device.type != "cuda":
        raise RuntimeError(f"backend='cupy' needs CUDA tensors and a GPU; got tensors on {device}. "
                           "Use backend='cpu' for CPU tensors.")


replay.register("cupy", launcher)

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
