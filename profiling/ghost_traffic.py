"""Launches and bytes of a Ghost BatchNorm training step (forward + backward): its torch operations
(the general path of bn_gpu/nn/ghost.py) against the Triton kernels (bn_gpu/backends/ghost.py).

Counted on CPU, without a GPU: every aten op dispatched (a TorchDispatchMode) and every Triton launch
(run in the interpreter) is one launch; its bytes are the sizes of the tensors it takes and returns,
each counted once -- what an eager kernel of that op reads and writes at least, cache aside. Both
paths are counted the same way, so the ratio is the point; no time is measured.

    TRITON_INTERPRET=1 python profiling/ghost_traffic.py [--shape 1024,64] [--virtual-batch-size 128]
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import bn_gpu  # noqa: E402
from bn_gpu.backends.triton import launcher  # noqa: E402
from bn_gpu.tools.cli import Parser  # noqa: E402


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


# Ops that move no data: views and allocations.
VIEWS = ("detach", "view", "_unsafe_view", "as_strided", "t", "expand", "alias", "empty", "empty_strided", "slice",
         "select", "unsqueeze")


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches, self.bytes = 0, 0
        self.paused = False  # inside a Triton launch: the interpreter's own tensor copies are not launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and func.__name__.split(".")[0] not in VIEWS:
            self.launches += 1
            self.bytes += _bytes(tree_flatten((args, kwargs, out))[0])
        return out


def step(backend: str, shape, virtual_batch_size: int) -> tuple[int, int]:
    module_type = bn_gpu.GhostBatchNorm2d if len(shape) == 4 else bn_gpu.GhostBatchNorm1d
    module = module_type(shape[1], virtual_batch_size, backend=backend)
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    counter, real = Count(), launcher.launch

    def counted(site, pointers, floats=()):
        counter.launches += 1
        counter.bytes += _bytes(pointers)
        counter.paused = True
        try:
            return real(site, pointers, floats)
        finally:
            counter.paused = False

    launcher.launch = counted
    try:
        with counter:
            module(x).backward(grad)
    finally:
        launcher.launch = real
    return counter.launches, counter.bytes


def main(argv=None) -> int:
    parser = Parser(prog="ghost_traffic.py", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1024,64")
    parser.add_argument("--virtual-batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        shape = tuple(int(s) for s in args.shape.split(","))
    except ValueError:
        parser.error(f"--shape must be integers separated by commas, got {args.shape!r}")
    rows = args.virtual_batch_size
    if len(shape) not in (2, 3, 4) or min(shape) < 1 or rows < 2 or shape[0] % rows or shape[0] == rows:
        parser.error(f"--shape {args.shape} and --virtual-batch-size {args.virtual_batch_size}: 2 to 4 positive sizes "
                     "whose first is a multiple (not 1) of a virtual batch of at least 2 rows")
    x_bytes = torch.Size(shape).numel() * 4
    print(f"Ghost BatchNorm training step (forward + backward), fp32 {'x'.join(map(str, shape))}, "
          f"virtual_batch_size {args.virtual_batch_size}; |x| = {x_bytes} bytes")
    for name, backend in (("torch operations", "cpu"), ("Triton kernels", "triton")):
        launches, moved = step(backend, shape, args.virtual_batch_size)
        print(f"  {name:17s} {launches:4d} launches {moved:12d} bytes ({moved / x_bytes:.1f} |x|)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
