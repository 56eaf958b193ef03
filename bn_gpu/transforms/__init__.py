"""Model transforms: whole models rewritten around their BatchNorms.

    tracing.py   the torch.fx tracer they share (BatchNorms kept whole; nn.Sequential order as fallback)
    folding.py   fold_batch_norms: eval BatchNorms folded into the Conv/Linear before them
    fusion.py    fuse_batch_norm_relu: BatchNorm -> (add ->) ReLU onto the fused modules
    export.py    the eval op's decomposition for torch.onnx.export
"""
from . import export  # noqa: F401  (registers the eval op's ONNX decomposition)
from .folding import FoldReport, fold_batch_norms
from .fusion import FusionReport, fuse_batch_norm_relu

__all__ = ["FoldReport", "FusionReport", "fold_batch_norms", "fuse_batch_norm_relu"]
