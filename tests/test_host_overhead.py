"""profiling/host_overhead.py --breakdown on a CPU, the Triton backend's launches stubbed out: each
implementation's training step in four host intervals, and the replays the steps took."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "profiling" / "host_overhead.py"


def _run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_breakdown_stamps_every_phase_of_each_step_and_replays_bn_gpu():
    result = _run("--breakdown", "--stub-kernels", "--steps", "5", "--shape", "4x3x2x2")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["forward", "to", "backward", "backward",
                                                                        "back", "total"])
    rows = {}
    for line in lines[header + 1:header + 3]:
        label, numbers = re.match(r"\s+(\S+ ?\S*?)\s+([\d.\s]+)$", line).groups()
        rows[label.strip()] = [float(v) for v in numbers.split()]
    assert set(rows) == {"torch.nn", "bn_gpu triton"}, lines
    for label, values in rows.items():
        *phases, total = values
        assert len(phases) == 4 and all(v >= 0 for v in phases), (label, values)
        assert abs(sum(phases) - total) <= 0.25, (label, values)  # each printed to 0.1
        assert phases[0] > 0 and phases[2] > 0, (label, values)  # a forward and a backward ran
    # After the warm-up every training step replays: the forward's and the backward's signatures.
    replayed, seen = map(int, re.search(r"(\d+) of (\d+) call signatures replayed", result.stdout).groups())
    assert replayed == seen == 2, result.stdout


def test_a_mistake_on_the_command_line_is_one_line():
    result = _run("--breakdown", "--steps", "0")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--steps" in result.stderr
