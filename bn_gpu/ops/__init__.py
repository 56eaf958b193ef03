"""The torch ops of namespace ``bn_gpu``, registered on import.

    library.py      schemas (torch.library) and the shapes of the ops' results
    kernels.py      CPU and CUDA kernels: validation, a backend's launches, the replay of a seen signature
    fake.py         fake kernels (torch.compile, meta tensors)
    vmap.py         batching rules
    autograd.py     autograd.Function and the Autograd kernels; derivatives.py, its higher-order formulas
    eager.py        forward_train / forward_eval: the entry points, with the eager fast path
"""
from . import library  # noqa: F401,I001  (defines the ops: first)
from . import autograd, fake, kernels, vmap  # noqa: F401  (register the ops' kernels)
from .eager import forward_eval, forward_train, plain_eager

__all__ = ["forward_eval", "forward_train", "plain_eager"]
