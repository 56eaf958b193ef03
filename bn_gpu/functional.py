"""bn_gpu.batch_norm: torch.nn.functional.batch_norm's signature, plus a backend choice."""
from __future__ import annotations

import torch

from . import backends, ops


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float | None = 0.1, eps: float = 1e-5, *, backend: str = "auto",
               num_batches_tracked: torch.Tensor | None = None, activation: str | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """Batch normalization over dim 1 of an (N, C) or (N, C, *spatial) input.

    Same semantics as torch.nn.functional.batch_norm. Beyond it:
      backend: "auto" (the process default for CUDA tensors, "cpu" for CPU tensors), "triton",
        "cupy" or "cpu" -- see bn_gpu.backends.
      num_batches_tracked: a 0-dim int64 tensor, as the modules keep. In training it is
        incremented in place (on the device), and momentum=None then averages cumulatively with
        factor 1 / num_batches_tracked, without a host synchronization.
      activation, residual: the fused epilogue, output = activation(batch_norm(input) + residual)
        -- F.relu(bn(x) + residual) in the normalize pass, without the two extra passes over the
        activation that the separate ops make. activation: None or "relu"; residual: None or a
        tensor of the input's shape and dtype (any layout). Its gradient is returned as well.
    """
    if activation not in (None, "relu"):
        raise ValueError(f"batch_norm: activation must be None or 'relu', got {activation!r}")
    name = backends.resolve(backend, input.device)
    relu = activation == "relu"
    if training:
        return ops.forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum,
                                 eps, name, residual, relu)[0]
    if running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    return ops.forward_eval(input, weight, bias, running_mean, running_var, eps, name, residual, relu)[0]
