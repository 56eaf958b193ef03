"""Row logic of the benchmark (floor, bandwidth, speed-up, correctness) and its reports:
Markdown tables, the gap to the performance targets, and a PNG plot of % of floor.

Floor = the fewest bytes an operation must move, at the copy bandwidth measured in the same run:
2 |x| for training forward and eval (read x, write y), 5 |x| for training forward + backward
(forward: read x, write y; backward: read x and dy, write dx). See docs/baselines.md. The fused
cases relu(bn(x) + residual) ("_add_relu"): 3 |x| forward (read x and the residual, write y), 8 |x|
forward + backward (the backward also reads the ReLU's mask source and writes the residual's gradient).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

MODES = ("train_fwd", "eval_fwd", "train_fwdbwd", "train_fwd_add_relu", "train_fwdbwd_add_relu")
FLOOR_PASSES = {"train_fwd": 2, "eval_fwd": 2, "train_fwdbwd": 5, "train_fwd_add_relu": 3, "train_fwdbwd_add_relu": 8}
EPILOGUE_SUFFIX = "_add_relu"  # modes of the fused epilogue relu(bn(x) + residual)
TORCH_IMPLS = ("torch-cudnn", "torch-native", "torch-inductor")
BN_GPU_IMPLS = ("bn_gpu-triton", "bn_gpu-cupy")
# Targets (issue "Profiling suite"): % of floor by mode on the large shapes, speed-up on every row,
# and the seed's (5, 3) per call against eager torch.
FLOOR_TARGETS = {"train_fwd": 60.0, "train_fwdbwd": 45.0, "eval_fwd": 85.0}
LARGE_SHAPES = ("64x64x112x112", "64x256x56x56", "64x2048x7x7", "16384x2048")
SEED_SHAPE = "5x3"
SEED_PER_CALL_FACTOR = 1.5


def floor_bytes(numel: int, itemsize: int, mode: str) -> int:
    return FLOOR_PASSES[mode] * numel * itemsize


@dataclass
class Row:
    impl: str
    shape: str
    dtype: str
    layout: str
    mode: str
    numel: int
    itemsize: int
    us: float                       # eager wall time per call (median, L2 flushed), microseconds
    correct: bool                   # output within tolerance of the float64 reference
    max_error: float = math.nan
    graph_us: float = math.nan      # per call replayed from a CUDA graph (NaN where it cannot be captured)
    host_us: float = math.nan       # wall time per call in a loop of eager calls (small shapes)
    gbps: float = math.nan
    pct_floor: float = math.nan
    speedup: float = math.nan       # best correct torch time / this time (eager wall clock)
    note: str = ""
    gpu_us: float = math.nan        # GPU time per call: graph_us, or the profiler's kernel sum where no graph
    gpu_clock: str = ""             # "graph" or "kernels": which of the two gpu_us is
    gpu_speedup: float = math.nan   # best correct torch GPU time / this GPU time

    @property
    def case(self) -> tuple:
        return (self.shape, self.dtype, self.layout, self.mode)


def fill_metrics(rows: list[Row], copy_gbps: float) -> list[Row]:
    """GB/s, % of floor and speed-up against the best correct torch implementation of each case, by
    both clocks: eager wall time (speedup) and GPU time (gpu_speedup)."""
    best_torch, best_torch_gpu = {}, {}
    for row in rows:
        if row.impl in TORCH_IMPLS and row.correct:
            if not math.isnan(row.us):
                best_torch[row.case] = min(best_torch.get(row.case, math.inf), row.us)
            if not math.isnan(row.gpu_us):
                best_torch_gpu[row.case] = min(best_torch_gpu.get(row.case, math.inf), row.gpu_us)
    for row in rows:
        if not math.isnan(row.gpu_us) and row.gpu_us > 0 and row.case in best_torch_gpu:
            row.gpu_speedup = best_torch_gpu[row.case] / row.gpu_us
        if math.isnan(row.us) or row.us <= 0:
            continue
        moved = floor_bytes(row.numel, row.itemsize, row.mode)
        row.gbps = moved / (row.us * 1e-6) / 1e9
        row.pct_floor = 100.0 * row.gbps / copy_gbps if copy_gbps > 0 else math.nan
        torch_us = best_torch.get(row.case)
        row.speedup = torch_us / row.us if torch_us else math.nan
    return rows


def is_win(row: Row) -> bool:
    """A speed-up counts only for a correct result."""
    return row.correct and row.speedup >= 1.0


def _fmt(value: float, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| shape | dtype | layout | mode | impl | µs | GB/s | % floor | vs best torch | GPU µs | vs best torch (GPU) "
             "| host µs/call | correct |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.correct:
            correct = "yes"
        elif r.note:  # it raised: the error, not a wrong result
            correct = f"**ERROR**: {r.note.replace('|', '/')}"
        else:
            correct = f"**WRONG** ({_fmt(r.max_error, '.1e')})"
        lines.append(f"| {r.shape} | {r.dtype} | {r.layout} | {r.mode} | {r.impl} | {_fmt(r.us, '.1f')} | "
                     f"{_fmt(r.gbps, '.0f')} | {_fmt(r.pct_floor, '.0f')} | {_fmt(r.speedup, '.2f')}× | "
                     f"{_gpu_cell(r)} | {_fmt(r.gpu_speedup, '.2f')}× | {_fmt(r.host_us, '.1f')} | {correct} |")
    return "\n".join(lines)


def _gpu_cell(row: Row) -> str:
    """GPU µs, marked † where it is the profiler's kernel sum rather than a CUDA-graph replay."""
    return _fmt(row.gpu_us, ".1f") + ("†" if row.gpu_clock == "kernels" else "")


def _best_speedup(rows: list[Row], field: str) -> str:
    values = [getattr(r, field) for r in rows if not math.isnan(getattr(r, field))]
    return f"{max(values):.2f}×" if values else "—"


def compact_markdown(rows: list[Row]) -> str:
    """One line per case: each implementation's µs and % of floor, and best bn_gpu against best torch."""
    impls = [i for i in (*BN_GPU_IMPLS, *TORCH_IMPLS) if any(r.impl == i for r in rows)]
    cases = {}
    for r in rows:
        cases.setdefault(r.case, {})[r.impl] = r
    lines = ["| shape | dtype | layout | mode | " + " | ".join(impls) + " | bn_gpu vs best torch, wall | GPU |",
             "|---|---|---|---|" + "---|" * (len(impls) + 2)]
    for case, by_impl in cases.items():
        cells = []
        for impl in impls:
            r = by_impl.get(impl)
            if r is None:
                cells.append("")
            elif not r.correct:
                cells.append("**WRONG**" if not r.note else "**ERROR**")
            else:
                cells.append(f"{_fmt(r.us, '.1f')} ({_fmt(r.pct_floor, '.0f')}%)")
        ours = [r for r in by_impl.values() if r.impl in BN_GPU_IMPLS and r.correct]
        lines.append("| " + " | ".join(case) + " | " + " | ".join(cells)
                     + f" | {_best_speedup(ours, 'speedup')} | {_best_speedup(ours, 'gpu_speedup')} |")
    return "\n".join(lines)


def target_gaps(rows: list[Row]) -> list[dict]:
    """Per case, the best correct bn_gpu backend against the targets."""
    cases = {}
    for r in rows:
        cases.setdefault(r.case, []).append(r)
    gaps = []
    for case, case_rows in cases.items():
        ours = [r for r in case_rows if r.impl in BN_GPU_IMPLS and r.correct and not math.isnan(r.us)]
        torch_rows = [r for r in case_rows if r.impl in TORCH_IMPLS and r.correct and not math.isnan(r.us)]
        if not ours:
            gaps.append(dict(case=case, impl=None, checks=[("correct bn_gpu result", False, "none")]))
            continue
        best = min(ours, key=lambda r: r.us)
        checks = []
        shape, _, _, mode = case
        if shape in LARGE_SHAPES and mode in FLOOR_TARGETS:
            target = FLOOR_TARGETS[mode]
            checks.append((f"≥ {target:.0f}% of floor", best.pct_floor >= target, f"{best.pct_floor:.0f}%"))
        if torch_rows:
            checks.append(("≥ 1.0× best torch", is_win(best), f"{best.speedup:.2f}×"))
        if shape == SEED_SHAPE:
            eager = [r for r in torch_rows if r.impl in ("torch-cudnn", "torch-native") and not math.isnan(r.host_us)]
            if eager and not math.isnan(best.host_us):
                limit = SEED_PER_CALL_FACTOR * min(r.host_us for r in eager)
                checks.append((f"per call ≤ {SEED_PER_CALL_FACTOR}× eager torch", best.host_us <= limit,
                               f"{best.host_us:.1f} µs vs {limit:.1f} µs"))
        gaps.append(dict(case=case, impl=best.impl, checks=checks))
    return gaps


def gaps_markdown(rows: list[Row]) -> str:
    lines = ["| shape | dtype | layout | mode | best bn_gpu | target | measured | met |", "|---|---|---|---|---|---|---|---|"]
    for gap in target_gaps(rows):
        shape, dtype, layout, mode = gap["case"]
        for name, met, measured in gap["checks"]:
            lines.append(f"| {shape} | {dtype} | {layout} | {mode} | {gap['impl'] or '—'} | {name} | {measured} | "
                         f"{'yes' if met else '**no**'} |")
    return "\n".join(lines)


def save(path_stem: str, rows: list[Row], meta: dict) -> dict:
    """Write <stem>.json, <stem>.csv and <stem>.md; returns the paths."""
    import csv
    paths = dict(json=f"{path_stem}.json", csv=f"{path_stem}.csv", md=f"{path_stem}.md")
    with open(paths["json"], "w") as f:
        json.dump(dict(meta=meta, rows=[asdict(r) for r in rows]), f, indent=1)
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0]).keys()) if rows else ["impl"])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    with open(paths["md"], "w") as f:
        f.write(header_markdown(meta) + "\n\n## Summary: µs (% of floor) per implementation\n\n"
                + compact_markdown(rows) + "\n\n## Gap to the targets\n\n" + gaps_markdown(rows)
                + "\n\n## Every row\n\n" + markdown_table(rows) + "\n")
    return paths


def load(path: str) -> tuple[list[Row], dict]:
    with open(path) as f:
        data = json.load(f)
    return [Row(**r) for r in data["rows"]], data["meta"]


def header_markdown(meta: dict) -> str:
    lines = [f"# bn_gpu benchmark: {meta.get('device', '?')}", ""]
    if meta.get("smoke"):
        lines.append("**Smoke run: tiny shapes, Triton interpreter on CPU -- timings are not meaningful.**\n")
    for key in ("date", "device", "driver", "torch", "triton", "cupy", "cudnn", "copy_gbps", "budget_s", "elapsed_s"):
        if key in meta:
            lines.append(f"- {key}: {meta.get(key)}")
    dropped = meta.get("dropped") or []
    if dropped:
        lines.append(f"- dropped to fit the budget ({len(dropped)} jobs): " + "; ".join(dropped))
    return "\n".join(lines)


def _case_label(case: tuple) -> str:
    shape, dtype, layout, _ = case
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    return f"{shape} {short}" + (" CL" if layout == "channels_last" else "")


def plot(rows: list[Row], meta: dict, path: str) -> str:
    """Time per call relative to the fastest implementation of each case (1 = fastest), on a log
    axis, one panel per mode: readable whatever the absolute times. Wrong or failed results are
    hatched red; the right-hand labels give bn_gpu's best % of floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    modes = [m for m in MODES if any(r.mode == m for r in rows)]
    impls = [i for i in (*BN_GPU_IMPLS, *TORCH_IMPLS) if any(r.impl == i for r in rows)]
    colors = dict(zip(impls, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    cases_by_mode = {m: list(dict.fromkeys(r.case for r in rows if r.mode == m)) for m in modes}
    height = max(len(c) for c in cases_by_mode.values()) if modes else 1
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(6 * max(1, len(modes)), 1.2 + 0.45 * height * len(impls) / 2),
                             squeeze=False)
    bar = 0.8 / max(1, len(impls))
    for ax, mode in zip(axes[0], modes):
        cases = cases_by_mode[mode]
        for j, case in enumerate(cases):
            case_rows = [r for r in rows if r.case == case and not math.isnan(r.us) and r.us > 0]
            fastest = min((r.us for r in case_rows if r.correct), default=None)
            for i, impl in enumerate(impls):
                r = next((r for r in case_rows if r.impl == impl), None)
                if r is None or fastest is None:
                    continue
                y = j + (i - (len(impls) - 1) / 2) * bar
                good = r.correct
                ax.barh(y, r.us / fastest, bar, left=0, color=colors[impl] if good else "red",
                        hatch=None if good else "//", label=impl if j == 0 else None)
            ours = [r for r in case_rows if r.impl in BN_GPU_IMPLS and r.correct]
            if ours and not meta.get("smoke"):
                best = max(r.pct_floor for r in ours)
                ax.annotate(f"{best:.0f}% floor", (1.0, j), xycoords=("axes fraction", "data"), xytext=(4, 0),
                            textcoords="offset points", va="center", fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=2))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}×"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks(range(len(cases)))
        ax.set_yticklabels([_case_label(c) for c in cases], fontsize=9)
        ax.invert_yaxis()
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("time / fastest correct time of the case (log)", fontsize=9)
        ax.set_title(mode, fontsize=10)
    if modes:
        axes[0][0].legend(fontsize=8, loc="lower right")
    title = f"bn_gpu vs torch on {meta.get('device', '?')} ({meta.get('date', '')})"
    if meta.get("smoke"):
        title += " -- smoke run, timings not meaningful"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
