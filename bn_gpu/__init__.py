"""bn_gpu: BatchNorm for PyTorch on NVIDIA GPUs, from Triton kernels (and a CuPy backend).

    bn_gpu.batch_norm(...)                     torch.nn.functional.batch_norm plus backend=
    bn_gpu.BatchNorm1d / 2d / 3d               drop-in torch.nn.BatchNorm* modules
    bn_gpu.convert_model(model)                swap every torch.nn.BatchNorm* in a model
    bn_gpu.revert_model(model)                 and back to torch.nn
    bn_gpu.fold_batch_norms(model)             fold eval-mode BatchNorms into the layers before them
    bn_gpu.SyncBatchNorm, convert_sync_batchnorm   BatchNorm over every rank of a data-parallel job
    bn_gpu.FrozenBatchNorm*d, BatchRenorm*d, GhostBatchNorm*d   the BatchNorm family
    bn_gpu.BatchNormReLU*d, fuse_batch_norm_relu(model)         relu(bn(x) + residual) in one pass
    bn_gpu.set_backend("triton" | "cupy")      process-wide default for CUDA tensors
    torch.ops.bn_gpu.{forward_train, forward_eval, backward}   the registered ops
"""
import importlib.metadata

from . import ops  # noqa: F401  (registers torch.ops.bn_gpu)
from .backends import BACKENDS, get_backend, set_backend
from .functional import batch_norm
from .nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d,
                 BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d,
                 GhostBatchNorm1d, GhostBatchNorm2d, SyncBatchNorm, batch_renorm, convert_model,
                 convert_sync_batchnorm, frozen_batch_norm, ghost_batch_norm, revert_model, sync_batch_norm)
from .transforms import FoldReport, FusionReport, fold_batch_norms, fuse_batch_norm_relu

__all__ = ["BACKENDS", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d",
           "BatchNormReLU3d", "FusionReport", "fuse_batch_norm_relu", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "FoldReport", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "GhostBatchNorm1d",
           "GhostBatchNorm2d", "SyncBatchNorm", "batch_norm", "batch_renorm", "convert_model",
           "convert_sync_batchnorm", "fold_batch_norms", "frozen_batch_norm", "get_backend", "ghost_batch_norm",
           "revert_model", "set_backend", "sync_batch_norm"]
try:
    __version__ = importlib.metadata.version("bn_gpu")
except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"
