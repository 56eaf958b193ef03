"""Whole-model training steps: torch.nn's BatchNorm (cuDNN) against bn_gpu's, on real models.

    python profiling/train_step.py [--models resnet50 resnet18 mobilenet_v3_large] [--batch-sizes 32 256]
                                   [--layouts contiguous channels_last] [--precisions fp32 bf16]
                                   [--impls torch bn_gpu-triton bn_gpu-cupy bn_gpu-triton-fused]
                                   [--modes eager compile cudagraph] [--steps 20] [--out DIR] [--budget-s S]
    python profiling/train_step.py --smoke      # CPU, a tiny model, 2 steps: the whole path, timings meaningless

One row per (model, batch size, layout, precision, implementation, mode): a training step is the
forward under autocast (bf16) or not (fp32), cross-entropy, backward and an SGD step, on synthetic
images. Each row reports

  ms/step       median over the timed steps, after warm-up (the synchronized wall time of one step)
  images/s      batch size / that median
  peak MiB      torch.cuda.max_memory_allocated over the timed steps (GPU only)
  BN share      the BatchNorm kernels' share of the GPU kernel time of one profiled step (torch.profiler;
                eager and compile modes on a GPU)
  agrees        after the run, the losses of every step and the running statistics against torch.nn's
                (same weights, same batches, eager) within the precision's tolerance

Implementations: "torch" is torch.nn as it is (cuDNN on a GPU); "bn_gpu-<backend>" is
bn_gpu.convert_model(model, backend); "-fused" adds bn_gpu.fuse_batch_norm_relu. Modes: eager,
torch.compile (default mode) and CUDA graphs (torch.cuda.make_graphed_callables over the model's
forward and backward; the optimizer step stays outside). Models come from torchvision when it is
installed; without it only the tiny model runs. Results are written after every row, as JSON and
Markdown, under --out.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

import bn_gpu
from bn_gpu.tools import cli

PRECISIONS = ("fp32", "bf16")
IMPLS = ("torch", "bn_gpu-triton", "bn_gpu-cupy", "bn_gpu-triton-fused")
MODES = ("eager", "compile", "cudagraph")
MODELS = ("resnet50", "resnet18", "mobilenet_v3_large", "tiny")
DEFAULT_MODELS = ("resnet50", "resnet18", "mobilenet_v3_large")
# Agreement with torch.nn after the run: losses relative to max(1, |loss|), running statistics absolute.
TOLERANCE = {"fp32": (1e-3, 1e-3), "bf16": (5e-2, 5e-2)}
# Kernel names of BatchNorm: cuDNN's and PyTorch's native ones, bn_gpu's Triton kernels and CUDA C ones.
BN_KERNEL_WORDS = ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "bn_", "statistics_channels", "normalize_channels",
                   "gradient_sums_channels", "input_gradient_channels", "single_pass_", "finalize_", "merge_ranks")


class TinyNet(torch.nn.Module):
    """Conv -> BN -> ReLU, a residual block (BN -> add -> ReLU), pool and a linear head: every
    pattern the BatchNorm modules and the fusion meet in the real models, at a size a CPU runs."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU())
        self.conv1, self.bn1 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.head(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def build_model(name: str, num_classes: int) -> torch.nn.Module:
    if name == "tiny":
        return TinyNet(num_classes)
    import torchvision
    return getattr(torchvision.models, name)(num_classes=num_classes)


def has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 -- a broken torchvision install counts as none
        return False
    return True


# ---- one row ------------------------------------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prepared(model: torch.nn.Module, impl: str, layout: str, device: torch.device) -> torch.nn.Module:
    model = copy.deepcopy(model).to(device)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    if impl != "torch":  # on a CPU (--smoke), bn_gpu's cpu backend: the interpreter would take minutes
        model = bn_gpu.convert_model(model, backend=impl.split("-")[1] if device.type == "cuda" else "cpu")
        if impl.endswith("-fused"):
            model, _ = bn_gpu.fuse_batch_norm_relu(model)
    return model.train()


class Step:
    """One SGD training step of a model in a mode, on (images, labels)."""

    def __init__(self, model, precision: str, mode: str, device: torch.device, sample_images: torch.Tensor):
        self.model, self.device, self.mode = model, device, mode
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        # make_graphed_callables needs autocast's cast cache off.
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=mode != "cudagraph")
                         if precision == "bf16" else contextlib.nullcontext())
        self.forward = model
        if mode == "compile":
            self.forward = torch.compile(model)
        elif mode == "cudagraph":
            with self.autocast:
                self.forward = torch.cuda.make_graphed_callables(model, (sample_images,))

    def __call__(self, images, labels) -> torch.Tensor:
        with self.autocast:
            loss = torch.nn.functional.cross_entropy(self.forward(images), labels)
        self.optimizer.zero_grad(set_to_none=False)  # gradients stay where a CUDA graph wrote them
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def _batches(count: int, batch_size: int, image_size: int, num_classes: int, layout: str, device: torch.device):
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(count):
        images = (torch.randn(batch_size, 3, image_size, image_size, generator=g) * 1.5 + 0.2).to(device)
        if layout == "channels_last":
            images = images.contiguous(memory_format=torch.channels_last)
        batches.append((images, torch.randint(0, num_classes, (batch_size,), generator=g).to(device)))
    return batches


def _bn_share(step: Step, images, labels) -> float | None:
    """BatchNorm's share of the GPU kernel time of one step, from torch.profiler."""
    if step.device.type != "cuda" or step.mode == "cudagraph":
        return None  # a replayed graph shows as one launch, not as its kernels
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(images, labels)
        _synchronize(step.device)
    total = bn = 0.0
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)
        total += device_us
        if any(word in event.key.lower() for word in BN_KERNEL_WORDS):
            bn += device_us
    return bn / total if total else None


def _running_stats(model) -> list[torch.Tensor]:
    return [b.detach().double().cpu() for name, b in model.named_buffers()
            if name.endswith(("running_mean", "running_var"))]


def measure(base_model, case: dict, args, device: torch.device, reference: dict) -> dict:
    """The row of one case; reference: the eager torch.nn losses and running statistics of the same
    (model, batch size, layout, precision), filled by the first implementation measured."""
    row = dict(case)
    batches = _batches(args.warmup + args.steps, case["batch_size"], args.image_size, args.num_classes,
                       case["layout"], device)
    model = _prepared(base_model, case["impl"], case["layout"], device)
    try:
        step = Step(model, case["precision"], case["mode"], device, batches[0][0])
        losses, seconds = [], []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i, (images, labels) in enumerate(batches):
            _synchronize(device)
            start = time.perf_counter()
            losses.append(step(images, labels))
            _synchronize(device)
            if i >= args.warmup:
                seconds.append(time.perf_counter() - start)
        row["bn_share"] = _bn_share(step, *batches[-1])
    except Exception as error:  # noqa: BLE001 -- one failing case must not stop the run
        row.update(error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:300])
        return row
    ms = 1e3 * statistics.median(seconds)
    row.update(ms_per_step=round(ms, 3), images_per_s=round(case["batch_size"] / ms * 1e3, 1),
               peak_mib=round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None)
    losses = [float(loss) for loss in losses[:len(batches)]]
    key = (case["model"], case["batch_size"], case["layout"], case["precision"])
    if case["impl"] == "torch" and case["mode"] == "eager":
        reference[key] = (losses, _running_stats(model))
    if key in reference:
        expected_losses, expected_stats = reference[key]
        loss_tolerance, stat_tolerance = TOLERANCE[case["precision"]]
        loss_error = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses, expected_losses))
        stat_error = max(((a - b).abs().max().item() for a, b in zip(_running_stats(model), expected_stats)),
                         default=0.0)
        row.update(loss_error=loss_error, stat_error=stat_error,
                   agrees=loss_error <= loss_tolerance and stat_error <= stat_tolerance)
    return row


# ---- the run --------------------------------------------------------------------------------------

def _cases(args, device: torch.device) -> tuple[list[dict], list[str]]:
    """The cases to run, torch's eager case first in each group (it is the reference), then every
    implementation eager, then each further mode in turn (a run cut short by --budget-s keeps the
    cheap modes), and the ones left out with why."""
    impls = [impl for impl in args.impls if device.type == "cuda" or impl != "bn_gpu-cupy"]
    modes = [mode for mode in args.modes if device.type == "cuda" or mode == "eager"]
    left = [f"{impl}: needs a GPU" for impl in args.impls if impl not in impls]
    left += [f"mode {mode}: needs a GPU" for mode in args.modes if mode not in modes]
    if "bn_gpu-cupy" in impls:
        try:
            import cupy  # noqa: F401
        except ImportError:
            impls.remove("bn_gpu-cupy")
            left.append("bn_gpu-cupy: CuPy is not installed")
    cases = []
    for model in args.models:
        for batch_size in args.batch_sizes:
            for layout in args.layouts:
                for precision in args.precisions:
                    group = [("torch", "eager")] + [(i, m) for m in modes for i in impls if (i, m) != ("torch", "eager")]
                    cases += [dict(model=model, batch_size=batch_size, layout=layout, precision=precision, impl=impl,
                                   mode=mode) for impl, mode in group]
    return cases, left


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Training step: {meta['device']}, {meta['date']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}; {meta['steps']} timed steps "
             f"after {meta['warmup']} of warm-up, images {meta['image_size']}x{meta['image_size']}."
             + (" **Smoke run on a CPU (bn_gpu on its cpu backend): timings not meaningful.**" if meta["smoke"]
                else ""), ""]
    lines += ["| model | batch | layout | precision | impl | mode | ms/step | images/s | peak MiB | BN share | agrees |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            cells = ["ERROR: " + r["error"], "", "", "", ""]
        else:
            share = f"{100 * r['bn_share']:.0f}%" if r.get("bn_share") is not None else "-"
            agrees = {True: "yes", False: "**no**", None: "-"}[r.get("agrees")]
            cells = [f"{r['ms_per_step']:.2f}", f"{r['images_per_s']:.0f}",
                     f"{r['peak_mib']:.0f}" if r.get("peak_mib") is not None else "-", share, agrees]
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['layout']} | {r['precision']} | {r['impl']} | "
                     f"{r['mode']} | " + " | ".join(cells) + " |")
    if meta["left_out"]:
        lines += ["", "Left out: " + "; ".join(meta["left_out"]) + "."]
    return "\n".join(lines) + "\n"


def _write(stem: str, rows: list[dict], meta: dict) -> None:
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(rows, meta))


def parse_args(argv=None):
    parser = cli.Parser(prog="train_step.py", description=__doc__.split("\n\n")[0],
                        formatter_class=cli.DefaultsFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, the tiny model, batch 4, 2 steps: the whole path in seconds (timings meaningless)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=cli.positive_int, default=[32, 256])
    parser.add_argument("--layouts", nargs="+", choices=["contiguous", "channels_last"],
                        default=["contiguous", "channels_last"])
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="fp32, or bf16 autocast")
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=cli.positive_int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=cli.positive_int, default=3, help="steps before timing (compiles, captures)")
    parser.add_argument("--image-size", type=cli.positive_int, default=224)
    parser.add_argument("--num-classes", type=cli.positive_int, default=1000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="folder for train-step-<time>-<device>.{json,md}")
    parser.add_argument("--budget-s", type=cli.positive_float, default=None,
                        help="stop starting new rows after this many seconds (rows are written as they finish)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.batch_sizes, args.steps, args.warmup = ["tiny"], [4], 2, 1
        args.image_size, args.num_classes = 16, 10
    needs_torchvision = [m for m in args.models if m != "tiny"]
    if needs_torchvision and not has_torchvision():
        parser.error(f"{', '.join(needs_torchvision)} need torchvision, which is not installed (--models tiny runs "
                     "without it)")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU, and none is present; --smoke runs the whole path on a CPU")
    return args


def run(args, clock=time.monotonic) -> str:
    """Measure every case, writing the results after each; returns the results' path stem."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    cases, left = _cases(args, device)
    import triton
    meta = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                smoke=args.smoke, steps=args.steps, warmup=args.warmup, image_size=args.image_size, left_out=left)
    os.makedirs(args.out, exist_ok=True)
    tag = "smoke" if args.smoke else "".join(c if c.isalnum() else "-" for c in meta["device"]).strip("-")
    stem = os.path.join(args.out, f"train-step-{datetime.datetime.now():%Y%m%d-%H%M%S}-{tag}")
    print(f"{len(cases)} rows on {meta['device']}; results in {stem}.{{json,md}} as each row ends", flush=True)
    start, rows, reference, models = clock(), [], {}, {}
    for i, case in enumerate(cases):
        if args.budget_s is not None and clock() - start > args.budget_s:
            meta["left_out"] = left + [f"{len(cases) - i} rows: out of time (--budget-s {args.budget_s:g})"]
            break
        if case["model"] not in models:
            torch.manual_seed(0)
            models[case["model"]] = build_model(case["model"], args.num_classes)
        row = measure(models[case["model"]], case, args, device, reference)
        rows.append(row)
        _write(stem, rows, meta)
        verdict = row.get("error") or f"{row['ms_per_step']:.2f} ms/step, agrees: {row.get('agrees')}"
        print(f"[{i + 1}/{len(cases)}] {case['model']} {case['batch_size']} {case['layout']} {case['precision']} "
              f"{case['impl']} {case['mode']}: {verdict}", flush=True)
    _write(stem, rows, meta)
    return stem


def main(argv=None) -> int:
    args = parse_args(argv)
    stem = run(args)
    with open(stem + ".json") as f:
        rows = json.load(f)["rows"]
    return 1 if any("error" in r or r.get("agrees") is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
