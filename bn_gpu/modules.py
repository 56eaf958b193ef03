"""Drop-in replacements for torch.nn.BatchNorm1d/2d/3d, and convert_model."""
from __future__ import annotations

import torch

from .backends import check_name
from .functional import batch_norm
from .validation import check_renorm_limits


class _BatchNormMixin:
    """forward() of torch's _BatchNorm, with the work done by bn_gpu and the batch counted on the device."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_name(backend)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._normalized(input)

    def _normalized(self, input: torch.Tensor, activation: str | None = None, residual=None) -> torch.Tensor:
        self._check_input_dim(input)
        # Same buffer/mode logic as torch.nn.modules.batchnorm._BatchNorm.forward. Each parameter and
        # buffer read once: nn.Module.__getattr__ costs ~0.6 us a read (CPU host).
        training, running_mean, running_var = self.training, self.running_mean, self.running_var
        counter = self.num_batches_tracked
        use_batch_stats = training or (running_mean is None and running_var is None)
        use_running = not training or self.track_running_stats
        count_batch = training and self.track_running_stats and counter is not None
        return batch_norm(
            input,
            running_mean if use_running else None,
            running_var if use_running else None,
            self.weight, self.bias, use_batch_stats, self.momentum, self.eps,
            backend=self.backend,
            num_batches_tracked=counter if count_batch else None,
            activation=activation, residual=residual)

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


# ---- BatchNorm + ReLU, fused ----------------------------------------------------------------------

class _BatchNormReLU(_BatchNormMixin):
    """relu(batch_norm(input) + residual) in the normalize pass: torch.nn.BatchNorm*'s constructor,
    buffers and state_dict, plus backend; forward(input, residual=None). Saves two passes over the
    activation against BatchNorm followed by add and ReLU (each reads and writes it once)."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return self._normalized(input, "relu", residual)


class BatchNormReLU1d(_BatchNormReLU, torch.nn.BatchNorm1d):
    """relu(BatchNorm1d(input) + residual), fused."""


class BatchNormReLU2d(_BatchNormReLU, torch.nn.BatchNorm2d):
    """relu(BatchNorm2d(input) + residual), fused."""


class BatchNormReLU3d(_BatchNormReLU, torch.nn.BatchNorm3d):
    """relu(BatchNorm3d(input) + residual), fused."""


# ---- FrozenBatchNorm ----------------------------------------------------------------------------

class _FrozenBatchNorm(torch.nn.Module):
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


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """FrozenBatchNorm for (N, C) and (N, C, L) inputs."""
    _DIMS = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Drop-in for torchvision.ops.misc.FrozenBatchNorm2d, on bn_gpu's kernels."""
    _DIMS = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """FrozenBatchNorm for (N, C, D, H, W) inputs."""
    _DIMS = (5,)


_FROZEN = {torch.nn.BatchNorm1d: FrozenBatchNorm1d, torch.nn.BatchNorm2d: FrozenBatchNorm2d,
           torch.nn.BatchNorm3d: FrozenBatchNorm3d, BatchNorm1d: FrozenBatchNorm1d, BatchNorm2d: FrozenBatchNorm2d,
           BatchNorm3d: FrozenBatchNorm3d}


def _frozen(module, backend: str) -> _FrozenBatchNorm:
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


# ---- Batch Renormalization and Ghost BatchNorm ----------------------------------------------------

class _BatchRenorm(_BatchNormMixin, torch.nn.modules.batchnorm._BatchNorm):
    """Batch Renormalization (Ioffe, 2017): torch.nn.BatchNorm*'s constructor, buffers and
    state_dict, plus r_max, d_max, warmup_steps (batches trained as plain BatchNorm first) and
    backend. momentum defaults to 0.01, the paper's; a module without running statistics
    (track_running_stats=False) is BatchNorm with batch statistics."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.01, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, r_max: float = 3.0,
                 d_max: float = 5.0, warmup_steps: int = 0, backend: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, backend=backend)
        if momentum is None:
            raise ValueError("BatchRenorm needs a momentum (the running statistics are its reference)")
        check_renorm_limits(r_max, d_max, warmup_steps)
        self.r_max, self.d_max, self.warmup_steps = r_max, d_max, warmup_steps

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats and self.running_mean is not None):
            return super().forward(input)
        self._check_input_dim(input)
        from .variants import batch_renorm  # imports this module's functional dependencies
        return batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias, True, self.momentum,
                            self.eps, r_max=self.r_max, d_max=self.d_max, warmup_steps=self.warmup_steps,
                            num_batches_tracked=self.num_batches_tracked, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, warmup_steps={self.warmup_steps}"


class BatchRenorm1d(_BatchRenorm, torch.nn.BatchNorm1d):
    """Batch Renormalization for (N, C) and (N, C, L) inputs."""


class BatchRenorm2d(_BatchRenorm, torch.nn.BatchNorm2d):
    """Batch Renormalization for (N, C, H, W) inputs."""


class BatchRenorm3d(_BatchRenorm, torch.nn.BatchNorm3d):
    """Batch Renormalization for (N, C, D, H, W) inputs."""


class _GhostBatchNorm(_BatchNormMixin, torch.nn.modules.batchnorm._BatchNorm):
    """Ghost BatchNorm (Hoffer et al., 2017): torch.nn.BatchNorm*'s constructor, buffers and
    state_dict plus virtual_batch_size; in training each chunk of virtual_batch_size rows is
    normalized with its own statistics, and the running statistics are updated once per chunk in
    order (num_batches_tracked counts chunks), as the chunked implementation that calls BatchNorm
    on each chunk. Runs as torch operations (one segmented reduction), not on bn_gpu's kernels."""

    def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *,
                 backend: str = "auto"):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, backend=backend)
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be positive, got {virtual_batch_size}")
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        from .variants import ghost_batch_norm
        tracked = self.track_running_stats and self.running_mean is not None
        return ghost_batch_norm(input, self.running_mean if tracked else None, self.running_var if tracked else None,
                                self.weight, self.bias, True, self.momentum, self.eps,
                                virtual_batch_size=self.virtual_batch_size,
                                num_batches_tracked=self.num_batches_tracked if tracked else None,
                                backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNorm, torch.nn.BatchNorm1d):
    """Ghost BatchNorm for (N, C) and (N, C, L) inputs (TabNet's)."""


class GhostBatchNorm2d(_GhostBatchNorm, torch.nn.BatchNorm2d):
    """Ghost BatchNorm for (N, C, H, W) inputs."""
