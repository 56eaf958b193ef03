"""The benchmark's row logic (floor, speed-up, correctness flag) and its smoke run, without a GPU."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bn_gpu import bench, report
from bn_gpu.report import Row


def _row(impl, us, correct=True, shape="64x64x112x112", mode="train_fwd", host_us=math.nan):
    return Row(impl=impl, shape=shape, dtype="float32", layout="contiguous", mode=mode, numel=1000,
               itemsize=4, us=us, correct=correct, host_us=host_us)


def test_floor_bytes_by_mode():
    assert report.floor_bytes(1000, 4, "train_fwd") == 8000
    assert report.floor_bytes(1000, 2, "eval_fwd") == 4000
    assert report.floor_bytes(1000, 4, "train_fwdbwd") == 20000


def test_metrics_against_the_best_correct_torch_implementation():
    rows = [_row("torch-cudnn", 20.0), _row("torch-native", 10.0, correct=False), _row("torch-inductor", 16.0),
            _row("bn_gpu-triton", 8.0), _row("bn_gpu-cupy", 4.0, correct=False)]
    report.fill_metrics(rows, copy_gbps=2.0)
    by = {r.impl: r for r in rows}
    # 8000 bytes in 8 us = 1 GB/s; the copy moves 2 GB/s: 50 % of the floor.
    assert by["bn_gpu-triton"].gbps == pytest.approx(1.0)
    assert by["bn_gpu-triton"].pct_floor == pytest.approx(50.0)
    # The wrong torch-native (10 us) is not the baseline; the best correct torch is inductor (16 us).
    assert by["bn_gpu-triton"].speedup == pytest.approx(2.0)
    assert report.is_win(by["bn_gpu-triton"])
    # A wrong result is never a win, however fast.
    assert by["bn_gpu-cupy"].speedup == pytest.approx(4.0)
    assert not report.is_win(by["bn_gpu-cupy"])


def test_target_gaps():
    rows = [_row("torch-cudnn", 10.0), _row("bn_gpu-triton", 12.0),
            _row("torch-cudnn", 10.0, shape="5x3", host_us=20.0), _row("bn_gpu-triton", 9.0, shape="5x3", host_us=35.0)]
    report.fill_metrics(rows, copy_gbps=1.0)  # 8000 bytes in 12 us = 0.67 GB/s: 67 % of floor
    gaps = {g["case"][0]: dict((name, met) for name, met, _ in g["checks"]) for g in report.target_gaps(rows)}
    assert gaps["64x64x112x112"] == {"≥ 60% of floor": True, "≥ 1.0× best torch": False}
    assert gaps["5x3"]["≥ 1.0× best torch"] is True
    assert gaps["5x3"]["per call ≤ 1.5× eager torch"] is False  # 35 us > 1.5 * 20 us
    markdown = report.gaps_markdown(rows)
    assert "**no**" in markdown and "bn_gpu-triton" in markdown


def test_a_wrong_implementation_is_marked_wrong():
    def wrong(x, w, b, rm, rv, training):
        return torch.nn.functional.batch_norm(x, rm, rv, w, b, training) * 1.01

    right = bench._torch_batch_norm(cudnn=False)
    device = torch.device("cpu")
    bad = bench.measure_case("torch-native", wrong, (4, 3, 5), torch.float32, "contiguous", "train_fwd", device, True)
    good = bench.measure_case("torch-native", right, (4, 3, 5), torch.float32, "contiguous", "train_fwd", device, True)
    assert not bad.correct and bad.max_error > 1e-3
    assert good.correct and good.max_error < 1e-5 and good.us > 0


def test_smoke_run_writes_results_and_the_plot_renders(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "bn_gpu", "bench", "--smoke", "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    files = {p.suffix: p for p in tmp_path.iterdir()}
    assert {".json", ".csv", ".md", ".png"} <= set(files)
    data = json.loads(files[".json"].read_text())
    assert data["meta"]["smoke"] is True and data["meta"]["torch"] == torch.__version__
    impls = {r["impl"] for r in data["rows"]}
    assert {"bn_gpu-triton", "torch-native"} <= impls
    assert all(r["correct"] for r in data["rows"]), [r for r in data["rows"] if not r["correct"]]
    assert {r["mode"] for r in data["rows"]} == set(report.MODES)
    assert "not meaningful" in files[".md"].read_text()
    files[".png"].unlink()
    replot = subprocess.run([sys.executable, "-m", "bn_gpu", "plot", str(files[".json"])], env=env,
                            capture_output=True, text=True, timeout=300)
    assert replot.returncode == 0, replot.stderr
    assert files[".png"].exists() and files[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
