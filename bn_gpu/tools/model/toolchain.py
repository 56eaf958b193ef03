"""The CUDA tools the model runs (nvcc, cuobjdump, nvdisasm), found on PATH or in the nvidia wheels."""
from __future__ import annotations

import functools
import os
import shutil


@functools.lru_cache(maxsize=None)
def tool(name: str) -> str | None:
    """cuobjdump / nvcc / c++filt: Triton's bundled NVIDIA tools first, then the PATH and CUDA."""
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    for root in (os.environ.get("CUDA_PATH", ""), "/usr/local/cuda"):
        candidate = os.path.join(root, "bin", name)
        if root and os.path.exists(candidate):
            return candidate
    return None
