"""Drop-in replacements for torch.nn.BatchNorm1d/2d/3d, and the forward every bn_gpu BatchNorm module shares."""
from __future__ import annotations

import torch

from ..backends import check_name
from ..functional import batch_norm


class BatchNormMixin:
    """forward() of torch's _BatchNorm, with the work done by bn_gpu and the batch counted on the device."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = check_name(backend)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._normalized(input)

    def _normalized(self, input: torch.Tensor, activation: str | None = None, residual=None) -> torch.Tensor:
        self._check_input_dim(input)
        # Same buffer/mode logic as torch.nn.modules.batchnorm._BatchNorm.forward. Each parameter and
        # buffer read once: every nn.Module.__getattr__ is a Python call.
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


class BatchNorm1d(BatchNormMixin, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d on bn_gpu kernels; same constructor plus backend="auto"."""


class BatchNorm2d(BatchNormMixin, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d on bn_gpu kernels; same constructor plus backend="auto"."""


class BatchNorm3d(BatchNormMixin, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d on bn_gpu kernels; same constructor plus backend="auto"."""
