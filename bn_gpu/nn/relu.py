"""BatchNorm + ReLU (+ residual) in one pass: the fused epilogue as drop-in modules."""
from __future__ import annotations

import torch

from .batch_norm import BatchNormMixin


class BatchNormReLU(BatchNormMixin):
    """relu(batch_norm(input) + residual) in the normalize pass: torch.nn.BatchNorm*'s constructor,
    buffers and state_dict, plus backend; forward(input, residual=None). Saves two passes over the
    activation against BatchNorm followed by add and ReLU (each reads and writes it once)."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._normalized(input, "relu", residual)


class BatchNormReLU1d(BatchNormReLU, torch.nn.BatchNorm1d):
    """relu(BatchNorm1d(input) + residual), fused."""


class BatchNormReLU2d(BatchNormReLU, torch.nn.BatchNorm2d):
    """relu(BatchNorm2d(input) + residual), fused."""


class BatchNormReLU3d(BatchNormReLU, torch.nn.BatchNorm3d):
    """relu(BatchNorm3d(input) + residual), fused."""
