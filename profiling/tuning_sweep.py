"""Kernel time of the Triton backend under several planner tunings, side by side (needs a GPU).

    python profiling/tuning_sweep.py [--variants "" "num_warps=4" ...] [--out FILE] [kernel_times options]

Runs profiling/kernel_times.py once per variant of BN_GPU_TUNING (the planner's Tuning fields,
see bn_gpu/backends/plan.py; "" is the default), each in a fresh process, and prints one table: a row per
case and op, a column per variant, kernel µs per call (L2 flushed). The table is rewritten to
--out after every variant, so a run cut short keeps what it measured. A new tuning compiles its
own kernels: count ~20 s of compilation per variant.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

LINE = re.compile(r"^(?P<case>.+?): kernels (?P<us>[0-9.]+) µs \((?P<pct>[0-9na]+)%\)")
# The open questions (profiling/RESULTS.md): the split reductions' software pipeline against their
# plain loops (load_stages=0) and one stage more, the register cap off, more bytes per tile, fewer
# warps per program.
DEFAULT_VARIANTS = ["", "load_stages=0", "load_stages=4", "split_max_registers=0", "tile_bytes=32768",
                    "num_warps=4"]


def measure(variant: str, kernel_times_args: list[str]) -> dict:
    """{case and op: (kernel µs, % of copy)} for one tuning."""
    env = dict(os.environ, BN_GPU_TUNING=variant)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_times.py")
    done = subprocess.run([sys.executable, script, *kernel_times_args], env=env, capture_output=True, text=True,
                          check=False)
    results = {}
    for line in done.stdout.splitlines():
        match = LINE.match(line)
        if match:
            results[match["case"]] = (float(match["us"]), match["pct"])
    if done.returncode != 0 or not results:
        print(f"variant {variant or 'default'!r}: exit {done.returncode}\n{done.stderr[-2000:]}", file=sys.stderr)
    return results


def table(variants: list[str], results: dict) -> str:
    names = [v or "default" for v in variants]
    cases = list(dict.fromkeys(case for variant in variants for case in results.get(variant, {})))
    lines = ["| case | op | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for case in cases:
        label, op = case.rsplit(" ", 1)
        cells = []
        for variant in variants:
            us_pct = results.get(variant, {}).get(case)
            cells.append(f"{us_pct[0]:.1f} ({us_pct[1]}%)" if us_pct else "")
        lines.append(f"| {label} | {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                        help='BN_GPU_TUNING values, e.g. "" "num_warps=4" "tile_bytes=8192,num_warps=4"')
    parser.add_argument("--out", default=None, help="a Markdown file rewritten after every variant")
    args, kernel_times_args = parser.parse_known_args()
    kernel_times_args = [a for a in kernel_times_args if a != "--"] or ["--backends", "triton", "--ops", "train_fwd", "backward"]
    results = {}
    for variant in args.variants:
        results[variant] = measure(variant, kernel_times_args)
        text = table(args.variants, results)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
        print(f"variant {variant or 'default'!r}: {len(results[variant])} cases", flush=True)
    print(table(args.variants, results))


if __name__ == "__main__":
    main()
