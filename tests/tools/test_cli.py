"""The command line's own mistakes: each gets one line on stderr and exit code 2, before any work
(the GPU check included)."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from bn_gpu.tools import cli, model


def _run(*args, timeout=300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "bn_gpu", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command", ["bench", "model"])
@pytest.mark.slow
@pytest.mark.parametrize("shape, message", [("64xfoo", "integers joined by 'x'"), ("64", "2 to 5 numbers"),
                                            ("0x3", "at least 1"), ("4x3x0x5", "at least 1"),
                                            ("1x3", "more than 1 value per channel"),
                                            ("2x3x4x5x6x7", "2 to 5 numbers")])
def test_a_malformed_shape_is_one_line_and_exit_2(command, shape, message):
    result = _run(command, "--shapes", "4x3x6x6", shape)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and shape in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "needs a CUDA GPU" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args", [["bench", "--dtypes", "float8"], ["bench", "--modes", "train"],
                                  ["bench", "--budget-s", "soon"], ["model", "--sms", "-3"], ["nonsense"], []])
def test_other_usage_errors_are_one_line_and_exit_2(args):
    result = _run(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "error:" in result.stderr, result.stderr


def test_shapes_parse():
    assert cli.shape("64x64x112x112") == (64, 64, 112, 112)
    assert cli.shape("16384X2048") == (16384, 2048)
    with pytest.raises(argparse.ArgumentTypeError):
        cli.shape("64x")


def test_model_help_shows_defaults_once():
    result = _run("model", "--help")
    text = " ".join(result.stdout.split())
    assert result.returncode == 0 and "(default: None)" not in text
    assert "--layouts" in text and "memory layouts" in text


def test_model_files_of_a_second_run_do_not_overwrite_the_first(tmp_path):
    stem = str(tmp_path / "model-h200-20261206-120000")
    assert model.unused_stem(stem) == stem
    (tmp_path / "model-h200-20261206-120000.json").write_text("{}")
    assert model.unused_stem(stem) == stem + "-2"
    (tmp_path / "model-h200-20261206-120000-2.md").write_text("")
    assert model.unused_stem(stem) == stem + "-3"
