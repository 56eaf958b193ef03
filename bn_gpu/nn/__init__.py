"""bn_gpu's modules and the BatchNorm family, each function beside its modules.

    batch_norm.py   BatchNorm1d/2d/3d, and BatchNormMixin: the forward every module here shares
    relu.py         BatchNormReLU1d/2d/3d: relu(bn(x) + residual) in the normalize pass
    frozen.py       frozen_batch_norm, FrozenBatchNorm1d/2d/3d
    renorm.py       batch_renorm, BatchRenorm1d/2d/3d
    ghost.py        ghost_batch_norm, GhostBatchNorm1d/2d
    sync.py         sync_batch_norm, SyncBatchNorm (torch.distributed)
    convert.py      convert_model, revert_model, convert_sync_batchnorm
"""
from .batch_norm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormMixin
from .convert import convert_model, convert_sync_batchnorm, revert_model
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, frozen_batch_norm
from .ghost import GhostBatchNorm, GhostBatchNorm1d, GhostBatchNorm2d, ghost_batch_norm
from .relu import BatchNormReLU, BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d
from .renorm import BatchRenorm, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, batch_renorm
from .sync import SyncBatchNorm, sync_batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormMixin", "BatchNormReLU", "BatchNormReLU1d",
           "BatchNormReLU2d", "BatchNormReLU3d", "BatchRenorm", "BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d",
           "FrozenBatchNorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d", "GhostBatchNorm",
           "GhostBatchNorm1d", "GhostBatchNorm2d", "SyncBatchNorm", "batch_renorm", "convert_model",
           "convert_sync_batchnorm", "frozen_batch_norm", "ghost_batch_norm", "revert_model", "sync_batch_norm"]
