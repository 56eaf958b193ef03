"""bn_gpu's ops outside eager PyTorch: ONNX export.

torch.export keeps bn_gpu's ops as they are (opaque custom ops with fake kernels). The ONNX
exporter (torch.onnx.export, torch.export-based) decomposes every op it has no translation for with
the decompositions in torch._decomp's table; the one registered here maps bn_gpu's eval op onto
aten's inference batch norm, which the exporter writes as ONNX BatchNormalization. Training-mode
ops have no ONNX form (ONNX BatchNormalization's training mode is not what inference runtimes run):
export a model in eval mode.
"""
from __future__ import annotations

import torch
import torch._decomp

from .. import ops  # noqa: F401  (defines the op decomposed here)
from ..dtypes import stat_dtype


@torch._decomp.register_decomposition(torch.ops.bn_gpu.forward_eval.default)
def _forward_eval_as_aten(input, weight, bias, running_mean, running_var, eps, backend, residual=None, relu=False):
    output = torch.ops.aten._native_batch_norm_legit_no_training.default(
        input, weight, bias, running_mean, running_var, 0.0, eps)[0]
    if residual is not None:
        output = output + residual
    if relu:
        output = torch.relu(output)
    stat = stat_dtype(input.dtype)
    return output, running_mean.to(stat, copy=True), torch.rsqrt(running_var.to(stat) + eps)
