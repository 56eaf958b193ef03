"""Command line: python -m bn_gpu {demo, preflight, bench, plot}."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bn_gpu")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="the seed's worked example through the real kernels, next to the reference")
    bench = commands.add_parser("bench", help="bn_gpu against cuDNN, PyTorch's native kernels and torch.compile")
    from .bench import add_arguments
    add_arguments(bench)
    commands.add_parser("preflight", help="one tiny case of every op, backend, layout and kernel path against "
                                          "float64, a line each (on a CPU: the Triton interpreter)")
    plot = commands.add_parser("plot", help="Markdown table and PNG plot from a results .json file")
    plot.add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run
        return 0 if run() < 1e-4 else 1
    if args.command == "preflight":
        import os

        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported
        from .preflight import run as preflight
        return 1 if preflight() else 0
    if args.command == "bench":
        from .bench import run
        run(args)
        return 0
    from .report import load, plot as plot_png, save
    rows, meta = load(args.file)
    stem = args.file[:-5] if args.file.endswith(".json") else args.file
    paths = save(stem, rows, meta)
    paths["png"] = plot_png(rows, meta, stem + ".png")
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
