"""python -m bn_gpu bench: bn_gpu against cuDNN, PyTorch's native kernels and torch.compile.

Every implementation of a case runs in the same process, on the same inputs: median of
triton.testing.do_bench (which flushes the L2 between calls); for small shapes also the time per
call replayed from a CUDA graph and the host wall time per eager call; a device-to-device copy
measured in the same run gives the bandwidth behind "% of floor". Each implementation's result is
checked against float64 first: a wrong result is marked wrong, never counted as a win.

--smoke runs the whole path on a CPU machine (tiny shapes, Triton interpreter), so CI keeps the
suite working; its timings are flagged as not meaningful.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import math
import os
import re
import subprocess
import time

import torch

from . import cli
from ..backends.layout import arranged
from .report import EPILOGUE_SUFFIX, MODES, Row, fill_metrics, plot, save

log = logging.getLogger("bn_gpu.bench")

DEFAULT_SHAPES = ["64x64x112x112", "64x256x56x56", "64x2048x7x7", "16384x2048", "8x64x16x56x56", "5x3"]
SMOKE_SHAPES = ["4x3x6x6", "5x3"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMPLS = ["bn_gpu-triton", "bn_gpu-cupy", "torch-cudnn", "torch-native", "torch-inductor"]
SMALL_NUMEL = 1 << 16  # host-time measurements below this size
# Output tolerance of the correctness check (sums over up to 800k values in the backward).
CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 6e-2, torch.float16: 2e-2}


def layouts_for(shape) -> list[str]:
    return ["contiguous", "channels_last"] if len(shape) >= 4 else ["contiguous"]


# ---- implementations ------------------------------------------------------------------------

# Every implementation is a call(x, w, b, rm, rv, training, residual): with a residual, the case is
# the fused epilogue relu(bn(x) + residual) -- for torch, BatchNorm then add then ReLU.

def _torch_sequence(x, w, b, rm, rv, training, residual):
    y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)
    return y if residual is None else torch.relu(y + residual)


def _torch_batch_norm(cudnn: bool):
    def call(x, w, b, rm, rv, training, residual=None):
        with torch.backends.cudnn.flags(enabled=cudnn):
            return _torch_sequence(x, w, b, rm, rv, training, residual)
    return call


def _inductor():
    # A fresh compile for every case: dynamo's caches hang on the code object, and past its
    # recompile limit it would silently run eager code under this name.
    torch._dynamo.reset()
    compiled = {}

    def call(x, w, b, rm, rv, training, residual=None):
        key = (training, residual is None)
        if key not in compiled:
            compiled[key] = torch.compile(
                lambda x, w, b, rm, rv, r: _torch_sequence(x, w, b, rm, rv, training, r), dynamic=False)
        return compiled[key](x, w, b, rm, rv, residual)
    return call


def _bn_gpu(backend: str):
    from ..functional import batch_norm

    def call(x, w, b, rm, rv, training, residual=None):
        return batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, backend=backend,
                          activation=None if residual is None else "relu", residual=residual)
    return call


def available_impls(device: torch.device, wanted: list[str]) -> dict:
    """{name: factory of a call(x, w, b, rm, rv, training)} for the implementations that can run here."""
    impls = {}
    for name in wanted:
        if name == "bn_gpu-triton":
            impls[name] = lambda: _bn_gpu("triton")
        elif name == "bn_gpu-cupy":
            try:
                import cupy  # noqa: F401
            except ImportError:
                continue
            if device.type == "cuda":
                impls[name] = lambda: _bn_gpu("cupy")
        elif name == "torch-cudnn" and device.type == "cuda":
            impls[name] = lambda: _torch_batch_norm(cudnn=True)
        elif name == "torch-native":  # on CPU: PyTorch's CPU kernels
            impls[name] = lambda: _torch_batch_norm(cudnn=False)
        elif name == "torch-inductor" and device.type == "cuda":
            impls[name] = _inductor
    return impls


# ---- measurement ----------------------------------------------------------------------------

def _base_mode(mode: str) -> str:
    return mode[:-len(EPILOGUE_SUFFIX)] if mode.endswith(EPILOGUE_SUFFIX) else mode


def _runner(call, x, w, b, rm, rv, mode, dy, residual):
    """A no-argument function doing one step of `mode` and returning what is checked: y, or dx."""
    residual = residual if mode.endswith(EPILOGUE_SUFFIX) else None
    base = _base_mode(mode)
    if base != "train_fwdbwd":
        return lambda: call(x, w, b, rm, rv, base == "train_fwd", residual)
    xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
    rg = residual.detach().requires_grad_() if residual is not None else None
    inputs = (xg, wg, bg) + ((rg,) if rg is not None else ())

    def step():
        y = call(xg, wg, bg, rm, rv, True, rg)
        return torch.autograd.grad(y, inputs, dy)[0]
    return step


def time_us(fn, device: torch.device, smoke: bool) -> float:
    if device.type == "cuda":
        import triton.testing
        return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    import torch.utils.benchmark
    fn()
    timer = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return 1e6 * timer.timeit(3 if smoke else 20).median


def graph_us(fn) -> float:
    import triton.testing
    try:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    except Exception:  # an implementation that cannot be captured
        return math.nan


def kernel_sum_us(fn, calls: int = 10) -> float:
    """The GPU time of every kernel one call launches, summed (torch.profiler): the GPU clock of a
    call that cannot be captured into a CUDA graph."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = sum(getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
                for event in prof.key_averages())
    return total / calls


def gpu_us(fn) -> tuple[float, str]:
    """(GPU µs per call, which clock): a CUDA-graph replay, or the profiler's kernel sum."""
    us = graph_us(fn)
    if not math.isnan(us):
        return us, "graph"
    try:
        return kernel_sum_us(fn), "kernels"
    except Exception:  # noqa: BLE001 -- no GPU clock for this call
        return math.nan, ""


def host_us(fn, device: torch.device, calls: int = 200) -> float:
    for _ in range(min(calls, 20)):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / calls


def copy_gbps(device: torch.device, smoke: bool) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    n = (1 << 20) if smoke else (1 << 28)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    us = time_us(lambda: dst.copy_(src), device, smoke)
    return 2 * n * 4 / (us * 1e-6) / 1e9


def _reference(x, w, b, rm, rv, mode, dy, residual):
    """(float64 result, mask of the elements not checked or None). With a ReLU after the residual
    add, an element whose pre-activation is within the input dtype's rounding of zero may take
    either side of the ReLU in a correct implementation -- cuDNN's and PyTorch's too -- and its
    input gradient then differs by |dy * weight * invstd|: such elements are left out of the check."""
    from .. import reference as ref
    fused = mode.endswith(EPILOGUE_SUFFIX)
    base = _base_mode(mode)
    if base == "eval_fwd":
        return ref.forward_eval(x, rm, rv, w, b), None
    y = ref.forward_train(x, w, b)[0]
    ambiguous = None
    if fused:
        # Relative to the terms' magnitude: the roundings of y and of the sum to x's dtype, and the
        # fp32 statistics' own error (PyTorch's native channels-last fp32 kernel flipped an element
        # beyond the roundings alone on an H200, 2026-11-26).
        pre_activation = y + residual.double()
        band = 2 * torch.finfo(x.dtype).eps + 3e-5
        ambiguous = pre_activation.abs() <= band * (y.abs() + residual.double().abs() + 1)
        y = ref.epilogue(y, residual, relu=True)
    if base == "train_fwd":
        return y, None
    return ref.backward_train(ref.epilogue_backward(dy, y, relu=fused), x, w)[0], ambiguous


def _inputs(shape, dtype, layout, device):
    """x ~ normal(3, 2) and weight in [0.5, 1.5), as the baseline numbers (docs); dy and the
    residual ~ normal(0, 1) in x's layout. Drawn on the device from a fixed seed: every
    implementation of a case gets the same values."""
    g = torch.Generator(device=device).manual_seed(0)
    x = arranged((torch.randn(shape, generator=g, device=device) * 2 + 3).to(dtype), layout)
    dy = arranged(torch.randn(shape, generator=g, device=device).to(dtype), layout)
    residual = arranged(torch.randn(shape, generator=g, device=device).to(dtype), layout)
    C = shape[1]
    w = torch.rand(C, generator=g, device=device) + 0.5
    b = torch.randn(C, generator=g, device=device)
    rm, rv = torch.zeros(C, device=device), torch.ones(C, device=device)
    return x, w, b, rm, rv, dy, residual


def measure_case(name, call, shape, dtype, layout, mode, device, smoke) -> Row:
    x, w, b, rm, rv, dy, residual = _inputs(shape, dtype, layout, device)
    run = _runner(call, x, w, b, rm, rv, mode, dy, residual)
    row = Row(impl=name, shape="x".join(map(str, shape)), dtype=str(dtype).replace("torch.", ""), layout=layout,
              mode=mode, numel=x.numel(), itemsize=x.element_size(), us=math.nan, correct=False)
    try:
        out = run()
        expected, unchecked = _reference(x, w, b, rm, rv, mode, dy, residual)  # training: rm, rv unread
        error = (out.double() - expected).abs()
        if unchecked is not None:
            error = error.masked_fill(unchecked, 0)
        row.max_error = error.max().item()
        row.correct = bool(row.max_error <= CHECK_TOLERANCE[dtype] * max(1.0, expected.abs().max().item()))
        row.us = time_us(run, device, smoke)
        if device.type == "cuda":
            row.gpu_us, row.gpu_clock = gpu_us(run)
            row.graph_us = row.gpu_us if row.gpu_clock == "graph" else math.nan
        if x.numel() <= SMALL_NUMEL or smoke:
            row.host_us = host_us(run, device, calls=5 if smoke else 200)
    except Exception as error:  # report, don't abort the whole run
        row.note = f"{type(error).__name__}: {error}"[:200]
    return row


# ---- driver ---------------------------------------------------------------------------------

def metadata(device: torch.device, smoke: bool, copy: float) -> dict:
    import triton
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), smoke=smoke,
                torch=torch.__version__, triton=triton.__version__, copy_gbps=round(copy, 1))
    try:
        import cupy
        meta["cupy"] = cupy.__version__
    except ImportError:
        meta["cupy"] = None
    if device.type == "cuda":
        meta["device"] = torch.cuda.get_device_name(device)
        meta["cudnn"] = torch.backends.cudnn.version()
        try:
            meta["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            meta["driver"] = None
    else:
        meta["device"] = "CPU (Triton interpreter)"
        meta["driver"] = None
        meta["cudnn"] = None
    return meta


# Rough cost of one job in seconds, for fitting a run into --budget-s: a torch.compile build
# dominates (a fresh compile per case); the other implementations cost a warm-up, ~0.1 s of timing
# and the float64 check. Measured (2026-11-26): 0.18-0.20 s per job over 148-244 jobs on an H200
# machine and 0.20 s over 250 on an H100 one; about 4 s per torch.compile job. The budget is also
# enforced as the run goes: these only choose what to drop before it starts.
JOB_COST_S = {"torch-inductor": 6.0}
DEFAULT_JOB_COST_S = 0.25


def job_cost_s(impl: str) -> float:
    return JOB_COST_S.get(impl, DEFAULT_JOB_COST_S)


def fit_budget(jobs: list, budget_s: float | None) -> tuple[list, list]:
    """(kept, dropped): the jobs whose estimated cost fits `budget_s`, dropping the costliest
    implementation's jobs first, then jobs from the end of the list (the list is in priority order)."""
    if budget_s is None:
        return list(jobs), []
    kept = list(jobs)
    dropped = []
    total = sum(job_cost_s(job[0]) for job in kept)
    while kept and total > budget_s + 1e-9:
        costliest = max(job_cost_s(job[0]) for job in kept)
        index = max(i for i, job in enumerate(kept) if job_cost_s(job[0]) == costliest)
        job = kept.pop(index)
        total -= job_cost_s(job[0])
        dropped.append(job)
    return kept, dropped


def results_tag(device_name: str) -> str:
    """The device's name as it goes into results file names: letters, digits, dots and dashes."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", device_name).strip("-")


def job_label(job) -> str:
    name, _, shape, dtype, layout, mode = job
    return f"{name} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} {layout} {mode}"


def _save_rows(stem: str, rows: list, copy: float, meta: dict) -> dict:
    """Write the rows measured so far: a run cut short by a timeout keeps them."""
    fill_metrics(rows, copy)
    return save(stem, rows, meta)


def run(args, clock=time.monotonic) -> dict:
    """Measure every job of args in turn, writing the results after each. clock: the seconds that
    --budget-s is counted in (a test passes its own)."""
    smoke = args.smoke
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        raise SystemExit("python -m bn_gpu bench needs a CUDA GPU and none is present; "
                         "--smoke runs the whole path on a CPU (Triton interpreter, timings not meaningful)")
    device = torch.device("cpu" if smoke else "cuda")
    shapes = args.shapes or [cli.shape(s) for s in (SMOKE_SHAPES if smoke else DEFAULT_SHAPES)]
    dtypes = [DTYPES[d] for d in (args.dtypes or (["float32", "bfloat16"] if smoke else list(DTYPES)))]
    modes = args.modes or list(MODES)
    impls = available_impls(device, args.impls or IMPLS)
    jobs = [(name, factory, shape, dtype, layout, mode)
            for shape in shapes for dtype in dtypes for layout in layouts_for(shape)
            for mode in modes for name, factory in impls.items()]
    start = clock()
    jobs, dropped = fit_budget(jobs, args.budget_s)
    copy = copy_gbps(device, smoke)
    meta = metadata(device, smoke, copy)
    meta["budget_s"] = args.budget_s
    meta["dropped"] = [job_label(job) + " (over the budget)" for job in dropped]
    out = args.out or default_results_folder()
    os.makedirs(out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = os.path.join(out, f"smoke-{stamp}" if smoke else f"bench-{stamp}-{results_tag(meta['device'])}")
    log.info("%d jobs; results in %s as each job ends", len(jobs), os.path.abspath(out))
    rows = []
    for i, job in enumerate(jobs):
        if args.budget_s is not None and clock() - start > args.budget_s:
            meta["dropped"] += [job_label(j) + " (out of time)" for j in jobs[i:]]
            break
        name, factory, shape, dtype, layout, mode = job
        row = measure_case(name, factory(), shape, dtype, layout, mode, device, smoke)
        rows.append(row)
        verdict = "ok" if row.correct else ("ERROR " + row.note if row.note else f"WRONG ({row.max_error:.1e})")
        log.info("[%d/%d] %s: %.1f us %s", i + 1, len(jobs), job_label(job), row.us, verdict)
        meta["elapsed_s"] = round(clock() - start, 1)
        paths = _save_rows(stem, rows, copy, meta)
    meta["elapsed_s"] = round(clock() - start, 1)
    paths = _save_rows(stem, rows, copy, meta)
    for label in meta["dropped"]:
        log.info("dropped: %s", label)
    try:
        paths["png"] = plot(rows, meta, stem + ".png")
    except ImportError:
        log.warning("matplotlib is not installed (pip install -e .[bench]): no plot")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return paths


def default_results_folder() -> str:
    """profiling/results of the source tree bn_gpu runs from, when it runs from one; else
    bn_gpu-results in the current directory."""
    package = os.path.dirname(os.path.abspath(__file__))
    profiling = os.path.join(os.path.dirname(package), "profiling")
    return os.path.join(profiling, "results") if os.path.isdir(profiling) else "bn_gpu-results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in the Triton interpreter on CPU (CI)")
    parser.add_argument("--shapes", nargs="+", type=cli.shape, metavar="SHAPE",
                        help=f"shapes N x C x spatial... (default: {' '.join(DEFAULT_SHAPES)}; "
                             f"with --smoke: {' '.join(SMOKE_SHAPES)})")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                        help="input dtypes (default: all three; with --smoke: float32 bfloat16)")
    parser.add_argument("--modes", nargs="+", choices=list(MODES),
                        help="what is timed: training forward, eval forward, training forward + backward, and the "
                             "fused epilogue relu(bn(x) + residual) forward and forward + backward (default: all)")
    parser.add_argument("--impls", nargs="+", choices=IMPLS,
                        help="implementations compared; those that cannot run here (CuPy not installed, "
                             "torch.compile on a CPU) are left out (default: all)")
    parser.add_argument("--out", default=None,
                        help="folder for the results files (default: profiling/results of the source tree bn_gpu "
                             "runs from, else ./bn_gpu-results)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="fit the run into this many seconds: torch.compile jobs are dropped first, then "
                             "the last jobs; the dropped ones are listed (results are written after every job)")
