"""Eager host time per call of bn_gpu against torch.nn.functional.batch_norm on a small input.

    python profiling/host_overhead.py [--device cuda|cpu] [--shape 5x3] [--calls 2000] [--stub-kernels]
                                      [--profile CASE]

Wall time over many calls, synchronized once at the end: on a small layer this is the host cost
(Python, dispatcher, launches), whatever the kernels cost. On CUDA, bn_gpu uses its default
backend (Triton). On CPU it uses the "cpu" backend, whose torch operations dominate; with
--stub-kernels it runs the Triton backend's host path instead, with every kernel launch replaced
by a no-op at the last step (bn_gpu's launcher still builds each launch's key and finds the
kernel compiled): what bn_gpu's own Python costs per call. --profile runs one case
under cProfile afterwards and prints where its host time goes.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import types


class _EveryKeyCompiled(dict):
    """A launcher cache in which every specialization is found compiled, to a kernel whose launch
    does nothing."""

    def get(self, key, default=None):
        return _NO_OP_KERNEL, (1, 1, 1), ()


_NO_OP_KERNEL = types.SimpleNamespace(run=lambda *args: None, function=None, packed_metadata=None)


def _stub_triton_launches() -> None:
    """The Triton backend with every compiled kernel's launch a no-op: bn_gpu's launcher still
    builds each launch's specialization key, as on a GPU, but finds every kernel compiled."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors are accepted by the backend
    from bn_gpu.backends.triton import launcher
    stub = launcher.Launcher(direct=True)
    stub.direct = True  # the interpreter turned it off
    stub.compiled = _EveryKeyCompiled()
    launcher.current_stream = lambda: 0
    launcher.launch = stub


def ours_step(module, x, dy):
    """One training step's BatchNorm part: forward, then input and parameter gradients."""
    y = module(x)
    return torch.autograd.grad(y, (x, *module.parameters()), dy)


def one_thread_step(module, x, dy):
    with torch.autograd.set_multithreading_enabled(False):
        return ours_step(module, x, dy)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default=None)
    parser.add_argument("--shape", default="5x3")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds over all cases, interleaved; the median round is shown (a busy host is noisy)")
    parser.add_argument("--stub-kernels", action="store_true",
                        help="CPU only: Triton backend host path with no-op launches")
    parser.add_argument("--profile", metavar="CASE", default=None,
                        help="afterwards, the cProfile of one case (a label below, e.g. 'bn_gpu module, fwd+bwd')")
    args = parser.parse_args()
    if args.stub_kernels:
        _stub_triton_launches()
    global torch
    import torch

    import bn_gpu
    from bn_gpu.tools.bench import host_us

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = tuple(int(v) for v in args.shape.split("x"))
    C = shape[1]
    x = torch.randn(shape, device=device)
    x_grad = x.detach().requires_grad_()
    dy = torch.randn(shape, device=device)
    w, b = torch.ones(C, device=device), torch.zeros(C, device=device)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    tracked = torch.tensor(0, device=device)
    backend = "triton" if args.stub_kernels else "auto"
    name = bn_gpu.backends.resolve(backend, device)
    torch_cls = torch.nn.BatchNorm1d if len(shape) < 4 else torch.nn.BatchNorm2d
    torch_module = torch_cls(C).to(device)
    ours_module = bn_gpu.convert_model(torch_cls(C), backend=backend).to(device)
    cases = {
        "F.batch_norm, training": lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, True),
        "bn_gpu.batch_norm, training": lambda: bn_gpu.batch_norm(x, rm, rv, w, b, True, backend=backend),
        "torch.ops.bn_gpu.forward_train": lambda: torch.ops.bn_gpu.forward_train(x, w, b, rm, rv, tracked, 0.1, 1e-5, name),
        "F.batch_norm, eval": lambda: torch.nn.functional.batch_norm(x, rm, rv, w, b, False),
        "bn_gpu.batch_norm, eval": lambda: bn_gpu.batch_norm(x, rm, rv, w, b, False, backend=backend),
        "torch.nn module, training": lambda: torch_module(x),
        "bn_gpu module, training": lambda: ours_module(x),
        "torch.nn module, fwd+bwd": lambda: ours_step(torch_module, x_grad, dy),
        "bn_gpu module, fwd+bwd": lambda: ours_step(ours_module, x_grad, dy),
        # The autograd engine hands CUDA work to its device thread; these keep it on the caller's.
        "torch.nn module, fwd+bwd, one thread": lambda: one_thread_step(torch_module, x_grad, dy),
        "bn_gpu module, fwd+bwd, one thread": lambda: one_thread_step(ours_module, x_grad, dy),
    }
    title = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    what = "Triton host path, launches stubbed out" if args.stub_kernels else f"bn_gpu backend {name!r}"
    print(f"host time per call, {args.shape} float32 on {title} ({what}), torch {torch.__version__}, "
          f"median of {args.repeats} rounds of {args.calls} calls")
    rounds = {label: [] for label in cases}
    for _ in range(args.repeats):
        for label, fn in cases.items():
            rounds[label].append(host_us(fn, device, args.calls))
    for label, times in rounds.items():
        print(f"  {label:<34}{sorted(times)[len(times) // 2]:8.1f} us")
    if args.profile:
        fn = cases[args.profile]
        profile = cProfile.Profile()
        profile.runcall(host_us, fn, device, args.calls)
        print(f"cProfile of {args.profile!r}, {args.calls} calls (times include the profiler's own cost):")
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    if name == "triton" and (device.type == "cuda" or args.stub_kernels):
        from bn_gpu.backends import replay
        from bn_gpu.backends.triton.launcher import launch
        replayed = sum(type(found) is replay.Replay for found in launch.replays.values())
        print(f"  Triton launches through the compiled launcher: {'yes' if launch.direct else 'no (JIT)'}, "
              f"{len(launch.compiled)} specializations; {replayed} of {len(launch.replays)} call signatures "
              "replayed (bn_gpu/backends/replay.py)")


if __name__ == "__main__":
    main()
