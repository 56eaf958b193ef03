"""Drop-in replacements for torch.nn.BatchNorm1d/2d/3d, and convert_model."""
from __future__ import annotations

import torch

from .backends import check_name
from .functional import batch_norm


class _BatchNormMixin:
    """forward() of torch's _BatchNorm, with the work done by bn_gpu and the batch counted on the device."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_name(backend)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        # Same buffer/mode logic as torch.nn.modules.batchnorm._BatchNorm.forward.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        count_batch = self.training and self.track_running_stats and self.num_batches_tracked is not None
        return batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight, self.bias, use_batch_stats, self.momentum, self.eps,
            backend=self.backend,
            num_batches_tracked=self.num_batches_tracked if count_batch else None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling it: say what to do instead
        # of failing deep inside the compiler on bn_gpu's Python entry points.
        raise RuntimeError(
            f"torch.jit.script cannot compile bn_gpu's {type(self).__name__} (its forward calls Python "
            "kernel launchers). Use torch.export.export(model, args) -- bn_gpu's ops export as they "
            "are, and to ONNX with torch.onnx.export -- or bn_gpu.revert_model(model) to script a "
            "model with torch.nn's BatchNorm modules.")


class BatchNorm1d(_BatchNormMixin, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bn_gpu kernels; same constructor plus backend="auto"."""


class BatchNorm2d(_BatchNormMixin, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bn_gpu kernels; same constructor plus backend="auto"."""


class BatchNorm3d(_BatchNormMixin, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bn_gpu kernels; same constructor plus backend="auto"."""


_REPLACEMENTS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                 torch.nn.BatchNorm3d: BatchNorm3d}


def _converted(module: torch.nn.modules.batchnorm._BatchNorm, backend: str) -> torch.nn.Module:
    new = _REPLACEMENTS[type(module)].__new__(_REPLACEMENTS[type(module)])
    new.__dict__.update(module.__dict__)  # parameters, buffers, hooks, mode: the same objects
    new.backend = backend
    return new


def convert_model(model: torch.nn.Module, backend: str = "auto") -> torch.nn.Module:
    """Replace every torch.nn.BatchNorm1d/2d/3d in `model` (in place) by its bn_gpu twin.

    The replacements share the originals' parameters and buffers (same tensors, device and dtype)
    and keep train/eval mode and hooks. Returns `model`, or the replacement when `model` itself is
    a BatchNorm module. Subclasses of torch's BatchNorm (e.g. SyncBatchNorm) are left alone.
    """
    check_name(backend)
    if type(model) in _REPLACEMENTS:
        return _converted(model, backend)
    for name, child in model.named_children():
        if type(child) in _REPLACEMENTS:
            setattr(model, name, _converted(child, backend))
        else:
            convert_model(child, backend)
    return model


_ORIGINALS = {new: old for old, new in _REPLACEMENTS.items()}


def _original(module) -> type | None:
    """The torch.nn class a bn_gpu module stands for (SyncBatchNorm's too), else None."""
    if type(module) in _ORIGINALS:
        return _ORIGINALS[type(module)]
    from .sync_batch_norm import SyncBatchNorm  # imports this module
    return torch.nn.SyncBatchNorm if type(module) is SyncBatchNorm else None


def _reverted(module: _BatchNormMixin) -> torch.nn.Module:
    original = _original(module)
    new = original.__new__(original)
    new.__dict__.update(module.__dict__)  # parameters, buffers, hooks, mode: the same objects
    del new.__dict__["backend"]
    return new


def revert_model(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every bn_gpu BatchNorm1d/2d/3d and SyncBatchNorm in `model` (in place) by the torch.nn
    module it stands for.

    The inverse of convert_model, for checkpoints and tools that expect torch types
    (torch.jit.script, torch.onnx's TorchScript exporter, quantization): the torch.nn modules
    share the bn_gpu modules' parameters and buffers and keep mode and hooks. Returns `model`, or
    the replacement when `model` itself is a bn_gpu BatchNorm module.
    """
    if _original(model) is not None:
        return _reverted(model)
    for name, child in model.named_children():
        if _original(child) is not None:
            setattr(model, name, _reverted(child))
        else:
            revert_model(child)
    return model
