"""Eager host time per call of bn_gpu against torch.nn.functional.batch_norm on a small input.

    python profiling/host_overhead.py [--device cuda|cpu] [--shape 5x3] [--calls 2000]

Wall time over many calls, synchronized once at the end: on a small layer this is the host cost
(Python, dispatcher, launches), whatever the kernels cost. On CUDA, bn_gpu uses its default
backend (Triton); on CPU, the "cpu" backend -- which measures the Python and dispatch path of
the ops, not the Triton launches.
"""
from __future__ import annotations

import argparse
import time

import torch

import bn_gpu


def per_call_us(fn, calls: int, device: torch.device) -> float:
    for _ in range(20):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="5x3")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.shape.split("x"))
    C = shape[1]
    x = torch.randn(shape, device=device)
    w, b = torch.ones(C, device=device), torch.zeros(C, device=device)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    tracked = torch.tensor(0, device=device)
    backend = "auto"
    name = bn_gpu.backends.resolve(backend, device)
    torch_module = torch.nn.BatchNorm1d(C).to(device) if len(shape) < 4 else torch.nn.BatchNorm2d(C).to(device)
    ours_module = bn_gpu.convert_model(torch.nn.BatchNorm1d(C) if len(shape) < 4 else torch.nn.BatchNorm2d(C)).to(device)
    cases = {
        "F.batch_norm, training": lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, True),
        "bn_gpu.batch_norm, training": lambda: bn_gpu.batch_norm(x, rm, rv, w, b, True),
        "torch.ops.bn_gpu.forward_train": lambda: torch.ops.bn_gpu.forward_train(x, w, b, rm, rv, tracked, 0.1, 1e-5, name),
        "F.batch_norm, eval": lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, False),
        "bn_gpu.batch_norm, eval": lambda: bn_gpu.batch_norm(x, rm, rv, w, b, False),
        "torch.nn module, training": lambda: torch_module(x),
        "bn_gpu module, training": lambda: ours_module(x),
    }
    title = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"host time per call, {args.shape} float32 on {title} (bn_gpu backend {name!r}), "
          f"torch {torch.__version__}, {args.calls} calls")
    for label, fn in cases.items():
        print(f"  {label:<34}{per_call_us(fn, args.calls, device):8.1f} us")


if __name__ == "__main__":
    main()
