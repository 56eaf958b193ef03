"""Target GPUs: the figures the model assumes of each (SMs, bandwidth, latency, limits)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


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

# 32x128x14x14 and 32x256x14x14: inputs the on-chip kernels hold on an H200 (3.2 and 6.4 MB of fp32 x:
# the forward and backward of the first, the forward of the second). 128x24x56x56: a MobileNetV3 layer,
# whose 24 channels-last channels start rows on 16 bytes that the Triton JIT cannot see (ALIGN).
DEFAULT_SHAPES = ["64x64x112x112", "64x256x56x56", "64x2048x7x7", "16384x2048", "8x64x16x56x56", "32x128x14x14",
                  "32x256x14x14", "128x24x56x56", "5x3"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = ("train_fwd", "eval_fwd", "train_bwd", "train_fwd_add_relu", "train_bwd_relu", "ghost_train_fwd",
       "ghost_train_bwd")
# Fused ops: (the plain op they extend, what the epilogue adds). The forward relu(bn(x) + residual)
# reads the residual as one more stream; the backward of BN + ReLU recomputes the ReLU's mask from x,
# which its kernels read anyway.
FUSED_OPS = {"train_fwd_add_relu": "train_fwd", "train_bwd_relu": "train_bwd"}
# Passes over the activation of the unfused sequence of a fused op: BatchNorm at its floor, then the
# add (read two, write one) and the ReLU (read, write) as kernels of their own; backward: the ReLU's
# (read y and dy, write the gradient), then BatchNorm's.
UNFUSED_PASSES = {"train_fwd_add_relu": 2 + 3 + 2, "train_bwd_relu": 3 + 3}
FLOOR_PASSES = {"train_fwd": 2, "eval_fwd": 2, "train_bwd": 3, "train_fwd_add_relu": 3, "train_bwd_relu": 3,
                "ghost_train_fwd": 2, "ghost_train_bwd": 3}
# Ghost BatchNorm's ops in VIRTUAL_BATCHES virtual batches, and the plain op whose kernels they
# launch with the two-level channel index. Modelled where N is a multiple of the virtual batches.
GHOST_OPS = {"ghost_train_fwd": "train_fwd", "ghost_train_bwd": "train_bwd"}
VIRTUAL_BATCHES = 4

# Per kernel: which tensors it streams, as (name, passes): "x" read, "dy" read, "y" written;
# "x2" / "dy2" a second read of the same data in the same kernel (single-pass kernels).
STREAMS = {
    "statistics": ["x"],
    "normalize": ["x", "y"],
    "single_pass_forward": ["x", "x2", "y"],
    "gradient_sums": ["dy", "x"],
    "input_gradient": ["dy", "x", "y"],
    "single_pass_backward": ["dy", "x", "dy2", "x2", "y"],
    "on_chip_forward": ["x", "y"],              # x held on chip: read once
    "on_chip_backward": ["dy", "x", "y"],
}


def plain_op(op: str) -> str:
    """The plain op whose kernels a fused or Ghost BatchNorm op runs."""
    return FUSED_OPS.get(op) or GHOST_OPS.get(op, op)


def modelled(backend: str, shape, op: str) -> bool:
    """Whether the backend runs this op on its kernels for this shape."""
    return op not in GHOST_OPS or shape[0] % VIRTUAL_BATCHES == 0


def job_of(name: str) -> str:
    return name.replace("_channels_first", "").replace("_channels_last", "")
