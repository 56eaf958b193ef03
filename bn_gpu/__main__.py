"""Command line: python -m bn_gpu {demo, bench, plot}."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bn_gpu", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="the seed's worked example through the real kernels, next to the reference")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import run
        worst = run()
        return 0 if worst < 1e-4 else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
