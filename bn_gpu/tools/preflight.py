"""python -m bn_gpu preflight: one tiny case of every op, backend, layout and kernel path, against float64.

Meant as the first step of a time-boxed GPU run (profiling/gpu_check.sh): within seconds it says,
one line per case, whether each kernel compiles and computes the right thing, so a broken kernel
shows before the tests and the benchmark spend the budget on it. Each line:

    ok    triton  channels_last  split        float32   fwd 2.4e-07  eval 1.2e-07  bwd 3.1e-07  (0.41 s)

with the largest error of y (training), y (eval) and dx (training backward) relative to the largest
reference value; dweight, dbias, mean, invstd and the running statistics are checked too. On a CPU
it runs the Triton kernels in the interpreter (TRITON_INTERPRET=1, set before bn_gpu is imported)
and the "cpu" backend. Exit status 1 if any case fails.
"""
from __future__ import annotations

import math
import sys
import time

import torch

from ..backends.layout import arranged

# (name, shape, layout): the GPU plans send the first of each pair down the split path (several
# programs per channel) and the second down the single-pass path; the line says which ran.
CASES = [
    ("contiguous", (8, 4, 64, 64), "contiguous"),
    ("contiguous", (4, 64, 7, 7), "contiguous"),
    ("channels_last", (8, 4, 64, 64), "channels_last"),
    ("channels_last", (2, 96, 2, 2), "channels_last"),
    ("(N, C)", (4096, 8), "contiguous"),
    ("(N, C)", (12, 96), "contiguous"),
]
# Rehearsal on a CPU: the interpreter is slow, so smaller shapes (its own tuning still splits the first).
CPU_CASES = [
    ("contiguous", (4, 3, 12, 12), "contiguous"),
    ("contiguous", (2, 8, 3, 3), "contiguous"),
    ("channels_last", (4, 3, 12, 12), "channels_last"),
    ("channels_last", (2, 8, 1, 2), "channels_last"),
    ("(N, C)", (256, 3), "contiguous"),
    ("(N, C)", (3, 5), "contiguous"),
]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = max(1.0, expected.abs().max().item())
    error = (actual.double() - expected).abs().max().item()
    return math.inf if math.isnan(error) else error / scale


def _path(backend: str, x: torch.Tensor) -> str:
    """"split" or "single-pass": the path the backend's plan takes for x."""
    if backend == "cpu":
        return "torch ops"
    from .. import backends
    return "single-pass" if backends.implementation(backend, x.device).KERNELS.geometry(x).single_pass else "split"


def check_case(backend: str, shape, layout: str, dtype: torch.dtype, device: torch.device) -> dict:
    """Errors of one case: forward (train), eval and backward, relative to the largest reference value."""
    from .. import reference as ref
    g = torch.Generator().manual_seed(0)
    C = shape[1]
    x = arranged((torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(device, dtype), layout)
    dy = arranged(torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype), layout)
    weight = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).float().to(device)
    bias = torch.randn(C, generator=g, dtype=torch.float64).float().to(device)
    running_mean = torch.randn(C, generator=g, dtype=torch.float64).float().to(device)
    running_var = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).float().to(device)
    rm0, rv0 = running_mean.clone(), running_var.clone()
    tracked = torch.zeros((), dtype=torch.int64, device=device)
    ops = torch.ops.bn_gpu

    y, mean, invstd = ops.forward_train(x, weight, bias, running_mean, running_var, tracked, 0.1, 1e-5, backend)
    y_ref, mean_ref, var_ref, invstd_ref = ref.forward_train(x, weight, bias)
    rm_ref, rv_ref = ref.update_running_stats(rm0, rv0, mean_ref, var_ref, x.numel() // C, 0.1)
    stats = max(_relative_error(t, r) for t, r in ((mean, mean_ref), (invstd, invstd_ref),
                                                   (running_mean, rm_ref), (running_var, rv_ref)))
    forward = max(_relative_error(y, y_ref), stats)
    if tracked.item() != 1:
        forward = math.inf

    y_eval, _, _ = ops.forward_eval(x, weight, bias, rm0, rv0, 1e-5, backend)
    evaluation = _relative_error(y_eval, ref.forward_eval(x, rm0, rv0, weight, bias))

    dx, dweight, dbias = ops.backward(dy, x, weight, mean, invstd, True, True, True, backend)
    dx_ref, dweight_ref, dbias_ref = ref.backward_train(dy, x, weight)
    per_channel = dy.double().abs().sum().item() / C  # sums over m values: compare at their scale
    backward = max(_relative_error(dx, dx_ref), _relative_error(dweight / per_channel, dweight_ref / per_channel),
                   _relative_error(dbias / per_channel, dbias_ref / per_channel))
    return dict(fwd=forward, eval=evaluation, bwd=backward)


def _backends(device: torch.device) -> list[str]:
    if device.type == "cpu":
        from ..backends.plan import interpreting
        return ["cpu", "triton"] if interpreting() else ["cpu"]
    names = ["triton"]
    try:
        import cupy  # noqa: F401
        names.append("cupy")
    except ImportError:
        print("cupy    not installed: CuPy backend not checked", flush=True)
    return names


def run(device: torch.device | None = None, dtypes=(torch.float32, torch.bfloat16)) -> int:
    """Print one verdict per case; the number of failed cases."""
    from .. import ops  # noqa: F401  (registers the ops)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = CASES if device.type == "cuda" else CPU_CASES
    failed = 0
    print(f"preflight on {device}: each case against float64; fwd, eval, bwd: largest error relative to the "
          "largest reference value", flush=True)
    print(f"{'':<6}{'backend':<8}{'case':<15}{'path':<13}{'dtype':<10}{'shape':<14}errors", flush=True)
    for backend in _backends(device):
        for name, shape, layout in cases:
            for dtype in dtypes:
                start = time.perf_counter()
                label = f"{backend:<7} {name:<14}"
                dims = "x".join(map(str, shape))
                try:
                    probe = arranged(torch.empty(shape, dtype=dtype, device=device), layout)
                    label += f" {_path(backend, probe):<12} {str(dtype)[6:]:<9} {dims:<13}"
                    errors = check_case(backend, shape, layout, dtype, device)
                except Exception as error:  # report and go on: one broken kernel must not hide the rest
                    failed += 1
                    message = f"{type(error).__name__}: {error}".splitlines()[0][:160]
                    print(f"FAIL  {label} {message}", flush=True)
                    continue
                ok = all(e <= TOLERANCE[dtype] for e in errors.values())
                failed += not ok
                figures = "  ".join(f"{k} {v:.1e}" for k, v in errors.items())
                print(f"{'ok  ' if ok else 'FAIL'}  {label} {figures}  ({time.perf_counter() - start:.2f} s)",
                      flush=True)
    print(f"preflight: {failed} failed", flush=True)
    return failed


def main() -> int:
    return 1 if run() else 0


if __name__ == "__main__":
    sys.exit(main())
