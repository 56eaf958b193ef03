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
_MODULES = {"triton": "bn_gpu.backends.triton", "cupy": "bn_gpu.backends.cupy", "cpu": "bn_gpu.backends.cpu"}


def _checked(name, allowed, what: str = "backend") -> str:
    """name, lower-cased, if it is one of `allowed`; else a ValueError naming `what` was given."""
    if isinstance(name, str) and name.lower() in allowed:
        return name.lower()
    raise ValueError(f"bn_gpu: unknown {what} {name!r}; choose one of {', '.join(map(repr, allowed))}")


def _default_from_environment() -> str:
    """BN_GPU_BACKEND: "triton" (the default) or "cupy", in any case. Checked at import: a bad value
    stops `import bn_gpu` with one message naming the variable."""
    value = os.environ.get("BN_GPU_BACKEND", "triton")
    return _checked(value.strip(), _GPU_BACKENDS, "BN_GPU_BACKEND value (the default backend for CUDA tensors)")


_default_gpu_backend = _default_from_environment()


def check_name(name: str) -> str:
    """A backend a module or call may ask for: "auto" or one of BACKENDS (in any case)."""
    return _checked(name, ("auto", *BACKENDS))


def set_backend(name: str) -> None:
    """Process-wide backend that backend="auto" uses for CUDA tensors: "triton" or "cupy". ("cpu" runs
    CPU tensors only, which "auto" gives them already: it is refused here, with that reason.)"""
    global _default_gpu_backend
    if isinstance(name, str) and name.lower() == "cpu":
        raise ValueError("bn_gpu.set_backend: 'cpu' is not a backend for CUDA tensors; backend='auto' already "
                         "runs CPU tensors on it. For CUDA tensors choose 'triton' or 'cupy'")
    _default_gpu_backend = _checked(name, _GPU_BACKENDS)


def get_backend() -> str:
    return _default_gpu_backend


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for a call on tensors of `device`."""
    if name != "auto" and name not in BACKENDS:
        name = check_name(name)  # another case of a name, or an error naming the choices
    if name == "auto":
        return _default_gpu_backend if device.type == "cuda" else "cpu"
    return name


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
