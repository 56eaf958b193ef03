"""What the launch plans need to know of a GPU beyond its kind: the multiprocessors this process
can count on."""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    """The device's SMs, or under MPS the share of them that CUDA_MPS_ACTIVE_THREAD_PERCENTAGE in this
    process's environment gives it, rounded down. The grids are sized from it, and an exchanging on-chip
    grid, whose programs wait for each other at a barrier, must be resident at once: counted on the whole
    device, a limited MPS client would leave programs unscheduled behind the waiting ones. A share set
    through the MPS control daemon alone is not visible here (BN_GPU_TUNING=on_chip_bytes=0 turns the
    on-chip kernels off)."""
    count = torch.cuda.get_device_properties(device_index).multi_processor_count
    text = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "").strip()
    try:
        share = float(text) if text else 100.0
    except ValueError:
        share = 100.0  # not a number: taken as no share
    return max(1, min(count, int(count * share / 100)))
