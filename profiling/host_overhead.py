"""Eager host time per call of bn_gpu against torch.nn.functional.batch_norm on a small input.

    python profiling/host_overhead.py [--device cuda|cpu] [--shape 5x3] [--calls 2000] [--stub-kernels]
                                      [--profile CASE] [--breakdown [--steps 2000]]

Wall time over many calls, synchronized once at the end: on a small layer this is the host cost
(Python, dispatcher, launches), whatever the kernels cost. On CUDA, bn_gpu uses its default
backend (Triton). On CPU it uses the "cpu" backend, whose torch operations dominate; with
--stub-kernels it runs the Triton backend's host path instead, with every kernel launch replaced
by a no-op at the last step (bn_gpu's launcher still builds each launch's key and finds the
kernel compiled): what bn_gpu's own Python costs per call. --profile runs one case
under cProfile afterwards and prints where its host time goes.

--breakdown stamps each training step of a module (forward, then torch.autograd.grad of x and the
parameters) instead, for torch.nn and bn_gpu on each backend that can run here, into four host
intervals, median over the steps:

    forward       the module call, on the calling thread
    to backward   from torch.autograd.grad's call to the first stamp inside the backward (a hook on the
                  output's gradient): the engine's set-up and, for CUDA tensors, the hand-off to its
                  device thread
    backward      from there to the input gradient's hook: the BatchNorm backward node's own host time,
                  on the thread the engine runs it on
    back          from the input gradient's hook to grad's return: the hand-off back and the engine's end

The same hooks are put on both implementations, so their cost is in both. No synchronization per
step: these are host times, whatever the kernels cost. The replayed signatures of the Triton backend
are counted at the end.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import time
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


PHASES = ("forward", "to backward", "backward", "back")


def stamped_steps(module, x, dy, steps: int) -> dict:
    """{phase: median µs} of `steps` training steps of `module` on x (a leaf that requires grad)."""
    stamps = {}
    clock = time.perf_counter_ns
    hook = x.register_hook(lambda grad: stamps.__setitem__("input gradient", clock()))
    params = tuple(p for p in module.parameters() if p.requires_grad)
    phases = {phase: [] for phase in PHASES}
    try:
        for _ in range(steps):
            start = clock()
            y = module(x)
            forward_end = clock()
            y.register_hook(lambda grad: stamps.__setitem__("output gradient", clock()))
            grad_call = clock()
            torch.autograd.grad(y, (x, *params), dy)
            done = clock()
            phases["forward"].append(forward_end - start)
            phases["to backward"].append(stamps["output gradient"] - grad_call)
            phases["backward"].append(stamps["input gradient"] - stamps["output gradient"])
            phases["back"].append(done - stamps["input gradient"])
    finally:
        hook.remove()
    return {phase: statistics.median(values) / 1000 for phase, values in phases.items()}


def breakdown(device, shape, steps: int, backends: list) -> list:
    """[(label, {phase: µs})] for torch.nn and bn_gpu on each backend, warmed up first (replays
    record on the first calls of a signature)."""
    import bn_gpu
    C = shape[1]
    cls = torch.nn.BatchNorm1d if len(shape) < 4 else torch.nn.BatchNorm2d
    x = torch.randn(shape, device=device, requires_grad=True)
    dy = torch.randn(shape, device=device)
    modules = [("torch.nn", cls(C).to(device))]
    modules += [(f"bn_gpu {name}", bn_gpu.convert_model(cls(C), backend=name).to(device)) for name in backends]
    rows = []
    for label, module in modules:
        stamped_steps(module, x, dy, 10)  # warm-up: the JIT, the replays' recordings
        rows.append((label, stamped_steps(module, x, dy, steps)))
    return rows


def _gpu_backends(device, stub_kernels: bool) -> list:
    """The bn_gpu backends that run training steps here: Triton on a GPU or stubbed on a CPU, CuPy
    on a GPU where it is installed; the cpu backend on a CPU otherwise."""
    if stub_kernels:
        return ["triton"]
    if device.type != "cuda":
        return ["cpu"]
    import importlib.util
    return ["triton"] + (["cupy"] if importlib.util.find_spec("cupy") else [])


def _replay_counts() -> str:
    from bn_gpu.backends import replay
    from bn_gpu.backends.triton.launcher import launch
    replayed = sum(type(found) is replay.Replay for found in launch.replays.values())
    return (f"Triton launches through the compiled launcher: {'yes' if launch.direct else 'no (JIT)'}, "
            f"{len(launch.compiled)} specializations; {replayed} of {len(launch.replays)} call signatures "
            "replayed (bn_gpu/backends/replay.py)")


def _parser():
    from bn_gpu.tools import cli
    parser = cli.Parser(prog="host_overhead.py", description=__doc__.split("\n\n")[0],
                        formatter_class=cli.DefaultsFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda where there is one)")
    parser.add_argument("--shape", type=cli.shape, default=(5, 3), help="NxC or NxCxHxW")
    parser.add_argument("--calls", type=cli.positive_int, default=2000)
    parser.add_argument("--repeats", type=cli.positive_int, default=5,
                        help="rounds over all cases, interleaved; the median round is shown (a busy host is noisy)")
    parser.add_argument("--stub-kernels", action="store_true",
                        help="CPU only: Triton backend host path with no-op launches")
    parser.add_argument("--profile", metavar="CASE", default=None,
                        help="afterwards, the cProfile of one case (a label below, e.g. 'bn_gpu module, fwd+bwd')")
    parser.add_argument("--breakdown", action="store_true",
                        help="the host intervals of a module's training step instead (see above)")
    parser.add_argument("--steps", type=cli.positive_int, default=2000, help="--breakdown: steps per implementation")
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.stub_kernels:
        _stub_triton_launches()
    global torch
    import torch

    import bn_gpu
    from bn_gpu.tools.bench import host_us

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shape = args.shape
    shape_text = "x".join(map(str, shape))
    if args.breakdown:
        title = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        stub = ", Triton launches stubbed out" if args.stub_kernels else ""
        print(f"host time per training step (module forward + autograd.grad), {shape_text} float32 on {title}"
              f"{stub}, torch {torch.__version__}, median of {args.steps} steps, us")
        print(f"  {'':<16}" + "".join(f"{phase:>13}" for phase in PHASES) + f"{'total':>13}")
        backends = _gpu_backends(device, args.stub_kernels)
        for label, phases in breakdown(device, shape, args.steps, backends):
            print(f"  {label:<16}" + "".join(f"{phases[p]:13.1f}" for p in PHASES) + f"{sum(phases.values()):13.1f}")
        if "triton" in backends:
            print("  " + _replay_counts())
        return
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
    print(f"host time per call, {shape_text} float32 on {title} ({what}), torch {torch.__version__}, "
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
        print("  " + _replay_counts())


if __name__ == "__main__":
    main()
