"""What every command of `python -m bn_gpu` shares: one-line usage errors (exit code 2), help
texts that show real defaults only, and the shape argument."""
from __future__ import annotations

import argparse
import math
import os
import sys


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr and exit code 2 (argparse's own
    print the whole usage first). Subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" where an option has a default to show: not None, not False, and not
    where the help text names it already."""

    def _get_help_string(self, action):
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


MAX_SPATIAL_DIMS = 3


def shape(text: str) -> tuple[int, ...]:
    """argparse type of a shape written N x C x spatial...: 64x64x112x112, 16384x2048."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: write it as integers joined by 'x', e.g. 64x64x56x56") \
            from None
    if not 2 <= len(values) <= 2 + MAX_SPATIAL_DIMS:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected N x C and up to {MAX_SPATIAL_DIMS} spatial sizes "
                                         f"(2 to {2 + MAX_SPATIAL_DIMS} numbers), got {len(values)}")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"shape {text!r}: every size must be at least 1")
    if values[0] * math.prod(values[2:]) < 2:
        raise argparse.ArgumentTypeError(f"shape {text!r}: training needs more than 1 value per channel "
                                         "(N x spatial sizes >= 2)")
    return values


def positive_int(text: str) -> int:
    """argparse type of a count."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    """argparse type of a duration or a size."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def program_name() -> str:
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m bn_gpu" if invoked in ("__main__.py", "-m", "") else invoked
