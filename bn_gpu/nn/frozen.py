"""FrozenBatchNorm: fixed statistics and affine parameters, on bn_gpu's eval op (one pass); nothing
saved for the backward but the per-channel scale."""
from __future__ import annotations

import torch

from ..backends import check_name
from ..functional import batch_norm


def frozen_batch_norm(input, weight, bias, running_mean, running_var, eps: float = 1e-5, *,
                      backend: str = "auto") -> torch.Tensor:
    """y = input * scale + shift with scale = weight / sqrt(running_var + eps) and
    shift = bias - running_mean * scale: torchvision's FrozenBatchNorm2d, on bn_gpu's eval op."""
    return batch_norm(input, running_mean, running_var, weight, bias, training=False, eps=eps, backend=backend)


class FrozenBatchNorm(torch.nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d on bn_gpu's eval op: the same buffers (weight, bias,
    running_mean, running_var), eps attribute and state_dict keys (a num_batches_tracked entry of a
    BatchNorm checkpoint is dropped, as torchvision drops it), plus backend="auto". One pass
    forward; the backward computes dx = dy * scale and keeps no activation."""

    _DIMS: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, *, backend: str = "auto"):
        super().__init__()
        self.eps = eps
        self.backend = check_name(backend)
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() not in self._DIMS:
            raise ValueError(f"expected {' or '.join(f'{d}D' for d in self._DIMS)} input (got {input.dim()}D input)")
        return batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                          eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, backend={self.backend!r}"


class FrozenBatchNorm1d(FrozenBatchNorm):
    """FrozenBatchNorm for (N, C) and (N, C, L) inputs."""
    _DIMS = (2, 3)


class FrozenBatchNorm2d(FrozenBatchNorm):
    """Drop-in for torchvision.ops.misc.FrozenBatchNorm2d, on bn_gpu's kernels."""
    _DIMS = (4,)


class FrozenBatchNorm3d(FrozenBatchNorm):
    """FrozenBatchNorm for (N, C, D, H, W) inputs."""
    _DIMS = (5,)
