"""The command line: bn-gpu (or python -m bn_gpu) {demo, preflight, bench, plot, model}."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .cli import DefaultsFormatter, Parser, program_name


def _parser() -> argparse.ArgumentParser:
    from .. import __version__
    formatter = DefaultsFormatter
    parser = Parser(prog=program_name(), formatter_class=formatter,
                    description="BatchNorm for PyTorch on NVIDIA GPUs: Triton and CUDA C kernels.")
    parser.add_argument("--version", action="version", version=f"bn_gpu {__version__}")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", formatter_class=formatter,
                        help="the seed's worked example through the real kernels, next to the reference")
    commands.add_parser("preflight", formatter_class=formatter,
                        help="one tiny case of every op, backend, layout and kernel path against float64, a line "
                             "each (on a CPU: the Triton interpreter)")
    bench = commands.add_parser("bench", formatter_class=formatter,
                                help="bn_gpu against cuDNN, PyTorch's native kernels and torch.compile")
    from .bench import add_arguments
    add_arguments(bench)
    plot = commands.add_parser("plot", formatter_class=formatter,
                               help="Markdown table and PNG plot again from a results .json file")
    plot.add_argument("file", help="a bench-*.json or smoke-*.json file written by the bench command")
    model = commands.add_parser("model", formatter_class=formatter,
                                help="static performance model of every launch on a described GPU (no GPU needed)")
    from .model import add_arguments as add_model_arguments
    add_model_arguments(model)
    return parser


def _plot(path: str) -> int:
    from .report import load, plot as plot_png, save
    try:
        rows, meta = load(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"{program_name()} plot: {path} is not a results file of the bench command "
              f"({type(error).__name__}: {error})", file=sys.stderr)
        return 2
    stem = path[:-5] if path.endswith(".json") else path
    paths = save(stem, rows, meta)
    paths["png"] = plot_png(rows, meta, stem + ".png")
    for kind, written in paths.items():
        print(f"{kind}: {written}")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    if args.command == "demo":
        from .demo import run
        return 0 if run() < 1e-4 else 1
    if args.command == "preflight":
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported
        from .preflight import run as preflight
        return 1 if preflight() else 0
    if args.command == "bench":
        from .bench import run
        run(args)
        return 0
    if args.command == "model":
        from .model import run as run_model
        return run_model(args)
    return _plot(args.file)
