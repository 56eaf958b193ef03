"""Argument checks shared by every public entry (functional API, modules, ops, fake kernels).

They look at metadata only (no device synchronization) and run before anything is written, so a
refused call leaves the running statistics and num_batches_tracked as they were. Exception types
and wording follow PyTorch where PyTorch has them.
"""
from __future__ import annotations

import numbers

import torch

from .dtypes import SUPPORTED_DTYPES

_C10_NAMES = {
    torch.bool: "Bool", torch.uint8: "Byte", torch.int8: "Char", torch.int16: "Short",
    torch.int32: "Int", torch.int64: "Long", torch.complex32: "ComplexHalf",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}


def is_empty_1d(x: torch.Tensor) -> bool:
    """A 1-D input of shape (0,): PyTorch returns an empty output for it, whatever the parameters."""
    return x.dim() == 1 and x.numel() == 0


def check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"batch_norm: input must be a Tensor, got {type(x).__name__}")
    if x.dim() < 2 and not is_empty_1d(x):
        raise ValueError(f"batch_norm: expected input of at least 2 dims (N, C, ...), got {x.dim()}D input")
    if x.dtype not in SUPPORTED_DTYPES:
        raise NotImplementedError(f"\"batch_norm\" not implemented for '{_C10_NAMES.get(x.dtype, x.dtype)}'")


def _check_per_channel(name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    if t is None:
        return
    C = x.shape[1]
    if t.numel() != C:
        raise RuntimeError(f"{name} should contain {C} elements not {t.numel()}")
    if t.dim() != 1:
        raise RuntimeError(f"{name} should be a 1-D tensor of {C} elements, got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                           f"{x.device} and {t.device}! (batch_norm: input and {name})")
    # As PyTorch, an empty batch is not checked for dtypes (a float32 module takes an empty float64 batch).
    if x.numel() != 0 and t.dtype != x.dtype and not (
            t.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)):
        raise RuntimeError(f"batch_norm: {name} has dtype {t.dtype}; expected the input's dtype {x.dtype}"
                           + (" or torch.float32" if x.dtype in (torch.float16, torch.bfloat16) else ""))


def _accepted_dtypes(x: torch.Tensor) -> tuple:
    return (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)


def _per_channel_fine(t, C: int, device, accepted) -> bool:
    """The common case in one cheap test (the detailed checks give the error message otherwise)."""
    return t is None or (t.shape == (C,) and t.dtype in accepted and t.device == device)


def check_batch_norm_args(x, running_mean, running_var, weight, bias, training: bool, momentum, eps: float,
                          num_batches_tracked=None, synchronized: bool = False) -> None:
    """Every check of a batch_norm call; raises before any state changes. synchronized: the
    statistics span several processes (SyncBatchNorm), so one value per channel here is fine."""
    if (isinstance(x, torch.Tensor) and x.dim() >= 2 and x.dtype in SUPPORTED_DTYPES and x.numel() != 0
            and (momentum is None or type(momentum) in (float, int))
            and (not training or (eps > 0 and (synchronized or x.numel() != x.shape[1])))):
        C, device, accepted = x.shape[1], x.device, _accepted_dtypes(x)
        if (_per_channel_fine(weight, C, device, accepted) and _per_channel_fine(bias, C, device, accepted)
                and (running_mean is None) == (running_var is None)
                and _per_channel_fine(running_mean, C, device, accepted)
                and (running_mean is None or (running_var.shape == (C,) and running_var.dtype == running_mean.dtype
                                              and running_var.device == device))
                and (not training or running_mean is None or momentum is not None
                     or (num_batches_tracked is not None and num_batches_tracked.device == device))):
            return
    _check_batch_norm_args(x, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
                           synchronized)


def _check_batch_norm_args(x, running_mean, running_var, weight, bias, training: bool, momentum, eps: float,
                           num_batches_tracked=None, synchronized: bool = False) -> None:
    check_input(x)
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))):
        # Any real number is accepted, as PyTorch applies momenta outside [0, 1] as given.
        raise TypeError(f"batch_norm: argument 'momentum' must be a float or None, got {type(momentum).__name__}")
    if (running_mean is None) != (running_var is None):
        raise RuntimeError("batch_norm: running_mean and running_var must be given together")
    if not training and running_mean is None:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    if is_empty_1d(x):
        return  # nothing to normalize; PyTorch checks no parameter here
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_per_channel(name, t, x)
    if running_mean is not None and running_mean.dtype != running_var.dtype:
        raise RuntimeError(f"batch_norm: running_mean ({running_mean.dtype}) and running_var "
                           f"({running_var.dtype}) must have the same dtype")
    if not training:
        return
    if x.numel() != 0 and x.numel() // x.shape[1] == 1 and not synchronized:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    if not eps > 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if running_mean is None:
        return
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("batch_norm: momentum=None (cumulative average) needs num_batches_tracked")
        if num_batches_tracked.device != x.device:
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"{x.device} and {num_batches_tracked.device}! (batch_norm: input and num_batches_tracked)")


def check_renorm_limits(r_max, d_max, warmup_steps) -> None:
    """Batch Renormalization's clipping limits: r is clipped to [1/r_max, r_max] and d to
    [-d_max, d_max], empty ranges unless r_max >= 1 and d_max >= 0."""
    if not (r_max >= 1 and d_max >= 0):
        raise ValueError(f"batch_renorm: r_max must be >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
        raise ValueError(f"batch_renorm: warmup_steps must be a non-negative integer, got {warmup_steps!r}")
