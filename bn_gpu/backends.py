"""Backend choice: per call (`backend=`), per module, or process-wide (set_backend / BN_GPU_BACKEND).

    "auto"    the process default for CUDA tensors (Triton unless changed), "cpu" for CPU tensors
    "triton"  Triton kernels; CPU tensors run them in the Triton interpreter (TRITON_INTERPRET=1)
    "cupy"    CUDA C kernels compiled by CuPy (optional dependency)
    "cpu"     torch operations on CPU tensors
"""
from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("triton", "cupy", "cpu")
_GPU_BACKENDS = ("triton", "cupy")
_MODULES = {"triton": "bn_gpu.triton_backend", "cupy": "bn_gpu.cupy_backend", "cpu": "bn_gpu.cpu_backend"}


def _checked(name: str, allowed) -> str:
    if name not in allowed:
        raise ValueError(f"bn_gpu: unknown backend {name!r}; choose one of {', '.join(allowed)}")
    return name


_default_gpu_backend = _checked(os.environ.get("BN_GPU_BACKEND", "triton"), _GPU_BACKENDS)


def check_name(name: str) -> str:
    """A backend a module or call may ask for: "auto" or one of BACKENDS."""
    return _checked(name, ("auto", *BACKENDS))


def set_backend(name: str) -> None:
    """Process-wide backend that backend="auto" uses for CUDA tensors: "triton" or "cupy"."""
    global _default_gpu_backend
    _default_gpu_backend = _checked(name, _GPU_BACKENDS)


def get_backend() -> str:
    return _default_gpu_backend


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for a call on tensors of `device`."""
    if name == "auto":
        return _default_gpu_backend if device.type == "cuda" else "cpu"
    return _checked(name, BACKENDS)


_checked_modules: dict = {}


def implementation(name: str, device: torch.device):
    """The launch module of a concrete backend, after checking that it can run on `device`."""
    key = (name, device.type)
    module = _checked_modules.get(key)
    if module is None:
        module = importlib.import_module(_MODULES[_checked(name, BACKENDS)])
        module.check_available(device)  # raises: nothing cached
        _checked_modules[key] = module
    return module
