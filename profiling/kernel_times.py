"""GPU time of every kernel an op launches, next to the op's wall time per call (needs a GPU).

    python profiling/kernel_times.py [--shapes 64x64x112x112 ...] [--dtypes float32 bfloat16]
                                     [--layouts contiguous channels_last] [--backends triton cupy]
                                     [--ops train_fwd eval_fwd backward backward_relu ghost_fwd ghost_bwd]

For each case, backend and op (training forward, eval forward, training backward with dx, dweight
and dbias; with --ops backward_relu also the backward of BatchNorm + ReLU, dy through the ReLU's
mask recomputed from x; ghost_fwd and ghost_bwd Ghost BatchNorm's training forward and backward on
the backend's kernels in GHOST_VIRTUAL_BATCHES virtual batches, N a multiple of them), the kernels'
GPU time per call from torch.profiler (L2 flushed between calls), the op's wall time per call in an
eager loop, and the fewest bytes the op must move (forward and eval 2|x|, backward 3|x|) over the
kernels' time, as % of a device-to-device copy measured in the same run. Wall time far above kernel time means the op is host-bound at that size. Kernel-time lines
say where the GPU time goes without Nsight Compute (which a GPU machine may lack).
"""
from __future__ import annotations

import argparse
import time

import torch

OPS = ("train_fwd", "eval_fwd", "backward", "backward_relu", "ghost_fwd", "ghost_bwd")
DEFAULT_OPS = ("train_fwd", "eval_fwd", "backward")
FLOOR_PASSES = {"train_fwd": 2, "eval_fwd": 2, "backward": 3, "backward_relu": 3, "ghost_fwd": 2, "ghost_bwd": 3}
GHOST_VIRTUAL_BATCHES = 4  # as the static model's Ghost BatchNorm cases


def _op_call(op: str, backend: str, x, dy):
    C = x.shape[1]
    w = torch.rand(C, device=x.device) + 0.5
    b = torch.randn(C, device=x.device)
    rm, rv = torch.zeros(C, device=x.device), torch.ones(C, device=x.device)
    if op.startswith("ghost_"):
        return _ghost_call(op, backend, x, dy, w, b, rm, rv)
    ops = torch.ops.bn_gpu
    _, mean, invstd = ops.forward_train(x, w, b, rm, rv, None, 0.1, 1e-5, backend)
    if op == "train_fwd":
        return lambda: ops.forward_train(x, w, b, rm, rv, None, 0.1, 1e-5, backend)
    if op == "eval_fwd":
        return lambda: ops.forward_eval(x, w, b, rm, rv, 1e-5, backend)
    if op == "backward_relu":
        return lambda: ops.backward(dy, x, w, mean, invstd, True, True, True, backend, b, True)
    return lambda: ops.backward(dy, x, w, mean, invstd, True, True, True, backend)


def _ghost_call(op: str, backend: str, x, dy, w, b, rm, rv):
    """Ghost BatchNorm's forward or backward on the backend's kernels (bn_gpu/backends/ghost.py)."""
    from bn_gpu import backends
    module = backends.implementation(backend, x.device)
    chunks = GHOST_VIRTUAL_BATCHES
    if x.shape[0] % chunks:
        raise ValueError(f"Ghost BatchNorm's cases need N a multiple of {chunks}, got N = {x.shape[0]}")
    _, mean, invstd = module.ghost_forward_train(x, w, b, rm, rv, None, 0.1, 1e-5, chunks)
    if op == "ghost_fwd":
        return lambda: module.ghost_forward_train(x, w, b, rm, rv, None, 0.1, 1e-5, chunks)
    return lambda: module.ghost_backward(dy, x, w, mean, invstd, chunks, w.dtype)


def flusher(how: str):
    """What runs before each timed call to empty the L2 of the op's data. "write" (as
    triton.testing.do_bench does) leaves the L2 full of dirty lines, which the op's first kernel pays
    to write back; "read" leaves it full of clean lines; "none" leaves the previous call's data."""
    buffer = torch.empty(64 << 20, dtype=torch.int32, device="cuda")  # 256 MB: more than the L2
    sink = torch.empty((), dtype=torch.int32, device="cuda")
    return {"write": buffer.zero_, "read": lambda: torch.amax(buffer, dim=0, out=sink), "none": lambda: None}[how]


def kernel_us(fn, iters: int, flush) -> dict:
    """{kernel name: device µs per call of fn}, flush() before each call."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            flush()
            fn()
        torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        # The flushes' own kernels: a fill or memset (write), torch's reduction kernel (read).
        if total and not any(word in event.key.lower() for word in ("fill", "memset", "reduce_kernel")):
            times[event.key] = total / iters
    return times


def wall_us(fn, calls: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


def copy_gbps() -> float:
    import triton.testing
    src = torch.empty(1 << 28, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _cases(args):
    """(label, op, backend, x, dy) for every case the arguments name."""
    from bn_gpu.backends.layout import arranged
    for shape_text in args.shapes:
        shape = tuple(int(v) for v in shape_text.split("x"))
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for layout in (args.layouts if len(shape) > 2 else ["contiguous"]):
                g = torch.Generator(device="cuda").manual_seed(0)
                x = arranged((torch.randn(shape, generator=g, device="cuda") * 2 + 3).to(dtype), layout)
                dy = arranged(torch.randn(shape, generator=g, device="cuda").to(dtype), layout)
                for backend in args.backends:
                    for op in args.ops:
                        yield f"{shape_text} {dtype_name} {layout} {backend} {op}", op, backend, x, dy


def run_for_profiler(args, flush) -> None:
    for label, op, backend, x, dy in _cases(args):
        fn = _op_call(op, backend, x, dy)
        for _ in range(args.iters):
            flush()
            fn()
        torch.cuda.synchronize()
        print(label, "ran", args.iters, "times", flush=True)


def main() -> None:
    import bn_gpu  # noqa: F401  (registers the ops)
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["64x64x112x112", "64x256x56x56", "64x2048x7x7", "16384x2048"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"])
    parser.add_argument("--backends", nargs="+", default=["triton", "cupy"])
    parser.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS), choices=OPS)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--flush", choices=("write", "read", "none"), default="write",
                        help="how the L2 is emptied before each call (see flusher)")
    parser.add_argument("--for-profiler", action="store_true",
                        help="only run each op --iters times (flushed), untimed: for a run under ncu")
    args = parser.parse_args()
    flush = flusher(args.flush)
    if args.for_profiler:
        run_for_profiler(args, flush)
        return
    copy = copy_gbps()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, copy {copy:.0f} GB/s; "
          "per op: kernel µs per call (% of copy bandwidth for the op's floor bytes), wall µs per call")
    for label, op, backend, x, dy in _cases(args):
        try:
            fn = _op_call(op, backend, x, dy)
            kernels = kernel_us(fn, args.iters, flush)
            wall = wall_us(fn)
        except Exception as error:  # report, go on
            print(f"{label}: {type(error).__name__}: {error}"[:300])
            continue
        total = sum(kernels.values())
        floor = FLOOR_PASSES[op] * x.numel() * x.element_size()
        pct = 100 * floor / (total * 1e-6) / 1e9 / copy if total else float("nan")
        print(f"{label}: kernels {total:.1f} µs ({pct:.0f}%), wall {wall:.1f} µs")
        for name, us in sorted(kernels.items(), key=lambda kv: -kv[1]):
            print(f"    {us:9.1f} µs  {name[:110]}")


if __name__ == "__main__":
    main()
