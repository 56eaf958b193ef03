"""The model's reports: the command line, tables, MODEL.md, the JSON results."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from .. import cli
from .case import CaseFigures, model_case
from .compiled import Compiler
from .targets import (ASSUMED, DEFAULT_SHAPES, DTYPES, FLOOR_PASSES, FUSED_OPS, GHOST_OPS, OPS, TARGETS, UNFUSED_PASSES,
                      VIRTUAL_BATCHES, Target, modelled)
from .toolchain import tool


def _fmt(value, spec: str) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return "—" if math.isnan(value) else "∞"
    return format(value, spec)


def cases_markdown(cases: list[CaseFigures]) -> str:
    lines = ["| backend | shape | dtype | layout | op | launches | grid (programs/SM, waves) | DRAM / floor bytes | "
             "bound % floor | with partial waves | issue headroom | min in flight / at once / needed KB/SM | "
             "host µs (assumed) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        grids = "; ".join(f"{'x'.join(map(str, k.grid))} ({k.per_sm}, {k.waves:g})" for k in c.kernels)
        lines.append(f"| {c.backend} | {c.shape} | {c.dtype} | {c.layout} | {c.op} | {c.launches} | {grids} | "
                     f"{c.dram_bytes / c.floor_bytes:.2f} | {_fmt(c.floor_pct_bound, '.0f')}% | "
                     f"{_fmt(c.wave_pct_bound, '.0f')}% | {_fmt(c.issue_headroom, '.1f')}× | "
                     f"{c.min_bytes_in_flight_kb:.1f} / {c.min_bytes_at_once_kb:.1f} / {c.needed_in_flight_kb:.1f} | "
                     f"{c.host_us:.0f} |")
    return "\n".join(lines)


def fused_markdown(cases: list[CaseFigures]) -> str:
    """Each fused case's modelled DRAM bytes against the unfused sequence: the same backend's plain
    case (modelled) followed by an add and a ReLU at their floors (5 more passes)."""
    plain = {(c.backend, c.shape, c.dtype, c.layout, c.op): c for c in cases}
    lines = ["| backend | shape | dtype | layout | op | fused DRAM MB | unfused sequence DRAM MB | fused / unfused |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        if c.op not in FUSED_OPS:
            continue
        base = plain.get((c.backend, c.shape, c.dtype, c.layout, FUSED_OPS[c.op]))
        if base is None:
            continue
        tensor = base.floor_bytes / FLOOR_PASSES[base.op]
        unfused = base.dram_bytes + (UNFUSED_PASSES[c.op] - FLOOR_PASSES[base.op]) * tensor
        lines.append(f"| {c.backend} | {c.shape} | {c.dtype} | {c.layout} | {c.op} | {c.dram_bytes / 1e6:.1f} | "
                     f"{unfused / 1e6:.1f} | {c.dram_bytes / unfused:.2f} |")
    return "\n".join(lines)


def ghost_markdown(cases: list[CaseFigures]) -> str:
    """Each Ghost BatchNorm case against the same backend's plain op on the same input: the
    two-level channel index's cost in launches, DRAM bytes and partial waves."""
    plain = {(c.backend, c.shape, c.dtype, c.layout, c.op): c for c in cases}
    lines = [f"{VIRTUAL_BATCHES} virtual batches. Ghost / plain: launches, DRAM / floor bytes, bound % floor with "
             "partial waves.", "",
             "| backend | shape | dtype | layout | op | launches | DRAM / floor bytes | with partial waves |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        base = plain.get((c.backend, c.shape, c.dtype, c.layout, GHOST_OPS.get(c.op)))
        if base is None:
            continue
        lines.append(f"| {c.backend} | {c.shape} | {c.dtype} | {c.layout} | {c.op} | {c.launches} / {base.launches} | "
                     f"{c.dram_bytes / c.floor_bytes:.2f} / {base.dram_bytes / base.floor_bytes:.2f} | "
                     f"{_fmt(c.wave_pct_bound, '.0f')}% / {_fmt(base.wave_pct_bound, '.0f')}% |")
    return "\n".join(lines)


def kernels_markdown(cases: list[CaseFigures]) -> str:
    seen = {}
    for c in cases:
        for k in c.kernels:
            seen.setdefault((k.backend, k.variant), k)
    lines = ["| backend | kernel variant | threads | registers | spills B | shared B | programs/SM | "
             "loads (bits) | loads at once (bytes) | stores (bits) | barriers / iteration | SASS instr / element |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (backend, variant), k in sorted(seen.items()):
        lines.append(f"| {backend} | {variant} | {k.threads} | {k.registers} | {k.spill_bytes} | {k.shared_bytes} | "
                     f"{k.per_sm} | {k.load_widths} | {k.loads_at_once_bytes} | {k.store_widths} | "
                     f"{k.barriers_per_iteration} | "
                     f"{_fmt(k.instructions_per_element, '.1f')} |")
    return "\n".join(lines)


def header_markdown(target: Target, versions: dict) -> str:
    assumed = ", ".join(f"{name} = {getattr(target, name)}" for name in ASSUMED)
    return "\n".join([
        f"# Static model: {target.name} (sm_{target.capability})",
        "",
        f"Computed {versions['date']} on a machine without a GPU (no kernel ran): torch {versions['torch']}, "
        f"triton {versions['triton']}, {versions['nvcc']}. A model, not a measurement: the measurements are "
        "in RESULTS.md; the model's figures before and after each kernel change in journal/model-history.md.",
        "",
        f"Target: {target.sms} SMs, {target.l2_mb:g} MB L2, {target.smem_per_sm_kb} KB shared memory and "
        f"{target.regs_per_sm} registers per SM, {target.bandwidth_tbs} TB/s copy bandwidth, "
        f"{target.clock_ghz} GHz. Assumed: {assumed}.",
        "",
        "How each figure is computed: launches and grids are recorded from the backends' own orchestration "
        "on meta tensors; registers, spills and shared memory come from `cuobjdump --dump-resource-usage` of "
        "each kernel compiled for the target as it launches; loop figures from its SASS (the loop with the "
        "largest streaming global loads per iteration -- not the fused finalize's coherent loads of partials, "
        "and a warp-divergence fallback's jump back is no loop; a software-pipelined loop before the loop "
        "holding its prologue: its instructions, load/store widths, barriers); instructions per "
        "element = loop instructions / elements loaded per iteration. DRAM bytes: each kernel's streams "
        "(x, dy read; y/dx written), a second read counted as an L2 hit only when what it re-reads fits the "
        "assumed reusable L2. bound % floor = floor bytes / modelled DRAM bytes (the best the plan can reach at "
        "copy bandwidth); with partial waves: the same with each kernel's DRAM time × ceil(waves) / waves above "
        "one wave (its last, partial wave runs as long as a full one). issue headroom = memory time / issue "
        "time at 128 thread-instructions per clock per SM (≥ 2 leaves margin). In flight = bytes of global "
        "loads per loop iteration × threads × resident programs, against bandwidth per SM × latency. At once = "
        "the same with the loads a thread issues before it waits on one (asynchronous copies: by group), and "
        "for the CUDA C channels-first walks no more than its groups per trip to memory from the plan "
        "(`walk_trips`); for the CUDA C on-chip walks over channel groups (forward and backward), both are "
        "the slices its blocks copy ahead (stages - 1 of them a block).",
    ])


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    nvcc = tool("nvcc")
    nvcc_version = "nvcc not found"
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        match = re.search(r"release (\S+),", out)
        nvcc_version = f"nvcc {match.group(1) if match else '?'}"
    return dict(date=datetime.date.today().isoformat(), torch=torch.__version__, triton=triton_version,
                nvcc=nvcc_version)


def run_model(target: Target, shapes, dtypes, layouts, ops, backends, workdir: str,
              progress=None) -> list[CaseFigures]:
    """The figures of every case; progress(done, total, label), if given, after each."""
    compiler = Compiler(target, workdir)
    jobs = [(backend, shape, dtype, layout, op)
            for shape in shapes for dtype in dtypes for layout in (layouts if len(shape) > 2 else ["contiguous"])
            for op in ops for backend in backends if modelled(backend, shape, op)]
    cases = []
    for backend, shape, dtype, layout, op in jobs:
        cases.append(model_case(backend, shape, dtype, layout, op, target, compiler))
        if progress is not None:
            label = f"{backend} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} {layout} {op}"
            progress(len(cases), len(jobs), label)
    return cases


def missing_tools(backends) -> list[str]:
    needed = ["cuobjdump"] + (["nvcc"] if "cupy" in backends else [])
    missing = [name for name in needed if tool(name) is None]
    try:
        import triton  # noqa: F401
    except ImportError:
        missing.append("triton")
    return missing


def run(args) -> int:
    os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU target, whatever the tests set
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default up to 3.9, as the JIT compiles
    target = dataclasses.replace(TARGETS[args.target], **({"sms": args.sms} if args.sms else {}))
    missing = missing_tools(args.backends)
    if missing:
        print(f"bn_gpu model: needs {', '.join(missing)} (Triton's NVIDIA backend ships cuobjdump; nvcc comes "
              "with the CUDA toolkit)", file=sys.stderr)
        return 2
    dtypes = [DTYPES[d] for d in args.dtypes]
    started = time.monotonic()

    def progress(done, total, label):
        print(f"[{done}/{total}] {label} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        cases = run_model(target, args.shapes, dtypes, args.layouts, args.ops, args.backends, workdir, progress)
    versions = _versions()
    text = (header_markdown(target, versions) + "\n\n## Cases\n\n" + cases_markdown(cases)
            + "\n\n## Fused epilogue against the unfused sequence\n\n" + fused_markdown(cases)
            + "\n\n## Ghost BatchNorm against the plain op\n\n" + ghost_markdown(cases)
            + "\n\n## Kernel variants\n\n" + kernels_markdown(cases) + "\n")
    os.makedirs(args.out, exist_ok=True)
    stem = unused_stem(os.path.join(args.out, f"model-{args.target}-{datetime.datetime.now():%Y%m%d-%H%M%S}"))
    with open(stem + ".md", "w") as f:
        f.write(text)
    with open(stem + ".json", "w") as f:
        json.dump(dict(target=dataclasses.asdict(target), assumed=list(ASSUMED), versions=versions,
                       cases=[dataclasses.asdict(c) for c in cases]), f, indent=1, default=str)
    if args.write_model_md:
        with open(args.write_model_md, "w") as f:
            f.write(text)
    print(text)
    written = [stem + ".md", stem + ".json"] + ([args.write_model_md] if args.write_model_md else [])
    print("written: " + ", ".join(os.path.abspath(path) for path in written), file=sys.stderr)
    return 0


def unused_stem(stem: str) -> str:
    """stem, or stem-2, stem-3, ...: the first whose .md and .json do not exist (a run never
    overwrites an earlier one's files)."""
    candidate, n = stem, 1
    while os.path.exists(candidate + ".md") or os.path.exists(candidate + ".json"):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", choices=sorted(TARGETS), default="h200", help="the GPU the model describes")
    parser.add_argument("--sms", type=cli.positive_int, default=None, help="override the target's multiprocessor count")
    parser.add_argument("--shapes", nargs="+", type=cli.shape, default=[cli.shape(s) for s in DEFAULT_SHAPES],
                        metavar="SHAPE", help=f"shapes N x C x spatial... (default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="input dtypes")
    parser.add_argument("--layouts", nargs="+", choices=["contiguous", "channels_last"],
                        default=["contiguous", "channels_last"], help="memory layouts of the 3-D and wider shapes")
    parser.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS),
                        help="the ops modelled (Ghost BatchNorm's: N a multiple of the virtual batches)")
    parser.add_argument("--backends", nargs="+", choices=["triton", "cupy"], default=["triton", "cupy"],
                        help="whose kernels are compiled and modelled")
    parser.add_argument("--out", default=os.path.join("profiling", "results"),
                        help="folder for the .md and .json, named by target and time (never overwritten)")
    parser.add_argument("--write-model-md", default=None, metavar="PATH",
                        help="also write the tables to PATH (make model: profiling/MODEL.md)")
