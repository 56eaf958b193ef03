"""Conversions of a whole model: convert_model, revert_model, convert_sync_batchnorm.

Each replaces modules in place by their twins, sharing parameters and buffers (the same tensors),
mode and hooks; the tables below say which class stands for which.
"""
from __future__ import annotations

import torch

from ..backends import check_name
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormMixin
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .sync import SyncBatchNorm

_REPLACEMENTS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                 torch.nn.BatchNorm3d: BatchNorm3d}


_FROZEN = {torch.nn.BatchNorm1d: FrozenBatchNorm1d, torch.nn.BatchNorm2d: FrozenBatchNorm2d,
           torch.nn.BatchNorm3d: FrozenBatchNorm3d, BatchNorm1d: FrozenBatchNorm1d, BatchNorm2d: FrozenBatchNorm2d,
           BatchNorm3d: FrozenBatchNorm3d}


def _frozen(module, backend: str) -> FrozenBatchNorm:
    """A FrozenBatchNorm sharing the storage of module's parameters and statistics."""
    C = module.num_features
    frozen = _FROZEN[type(module)](C, module.eps, backend=backend)
    like = module.running_mean if module.running_mean is not None else module.weight
    defaults = {"weight": torch.ones, "bias": torch.zeros, "running_mean": torch.zeros, "running_var": torch.ones}
    for name, default in defaults.items():
        value = getattr(module, name)
        if value is None:  # no affine parameters, or batch statistics only: the identity's values
            value = default(C, dtype=like.dtype if like is not None else None,
                            device=like.device if like is not None else None)
        setattr(frozen, name, value.detach())
    frozen.train(module.training)
    return frozen


def _converted(module: torch.nn.modules.batchnorm._BatchNorm, backend: str) -> torch.nn.Module:
    new = _REPLACEMENTS[type(module)].__new__(_REPLACEMENTS[type(module)])
    new.__dict__.update(module.__dict__)  # parameters, buffers, hooks, mode: the same objects
    new.backend = backend
    return new


def convert_model(model: torch.nn.Module, backend: str = "auto", *, frozen: bool = False) -> torch.nn.Module:
    """Replace every torch.nn.BatchNorm1d/2d/3d in `model` (in place) by its bn_gpu twin.

    The replacements share the originals' parameters and buffers (same tensors, device and dtype)
    and keep train/eval mode and hooks. Returns `model`, or the replacement when `model` itself is
    a BatchNorm module. Subclasses of torch's BatchNorm (e.g. SyncBatchNorm) are left alone.
    frozen=True: torch's and bn_gpu's BatchNorm1d/2d/3d become FrozenBatchNorm1d/2d/3d instead, their
    parameters turned into buffers (the same storage, detached: no longer trained), as detection
    models freeze a pretrained backbone.
    """
    check_name(backend)
    table = _FROZEN if frozen else _REPLACEMENTS
    replace = _frozen if frozen else _converted
    if type(model) in table:
        return replace(model, backend)
    for name, child in model.named_children():
        if type(child) in table:
            setattr(model, name, replace(child, backend))
        else:
            convert_model(child, backend, frozen=frozen)
    return model


_ORIGINALS = {new: old for old, new in _REPLACEMENTS.items()}


def _original(module) -> type | None:
    """The torch.nn class a bn_gpu module stands for (SyncBatchNorm's too), else None."""
    if type(module) in _ORIGINALS:
        return _ORIGINALS[type(module)]
    return torch.nn.SyncBatchNorm if type(module) is SyncBatchNorm else None


def _reverted(module: BatchNormMixin) -> torch.nn.Module:
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


def _is_convertible(module) -> bool:
    """torch.nn's BatchNorm1d/2d/3d and SyncBatchNorm, bn_gpu's modules: not other subclasses
    (torch.nn.LazyBatchNorm*, third-party variants with a forward of their own)."""
    return type(module) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
                            BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm)


def _synchronized(module, process_group, backend: str) -> SyncBatchNorm:
    new = SyncBatchNorm.__new__(SyncBatchNorm)
    new.__dict__.update(module.__dict__)  # parameters, buffers, hooks, mode: the same objects
    new.process_group = process_group
    new.backend = backend
    return new


def convert_sync_batchnorm(module: torch.nn.Module, process_group=None, backend: str = "auto") -> torch.nn.Module:
    """Replace every BatchNorm of `module` (torch.nn.BatchNorm1d/2d/3d, torch.nn.SyncBatchNorm and
    bn_gpu's modules) by bn_gpu.SyncBatchNorm, in place, sharing parameters and buffers and keeping
    train/eval mode and device. Returns `module`, or the replacement when `module` is a BatchNorm.
    Other _BatchNorm subclasses are left alone."""
    backend = check_name(backend)
    if _is_convertible(module):
        return _synchronized(module, process_group, backend)
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, process_group, backend)
        if converted is not child:
            setattr(module, name, converted)
    return module
