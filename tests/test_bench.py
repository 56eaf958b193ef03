"""The benchmark's row logic (floor, speed-up, correctness flag) and its smoke run, without a GPU."""
import json
import math
import os
import subprocess
import sys
import time

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


@pytest.mark.parametrize("mode", ["train_fwd", "train_fwdbwd", "train_fwd_add_relu", "train_fwdbwd_add_relu"])
def test_a_wrong_implementation_is_marked_wrong(mode):
    def wrong(x, w, b, rm, rv, training, residual=None):
        return bench._torch_sequence(x, w, b, rm, rv, training, residual) * 1.01

    right = bench._torch_batch_norm(cudnn=False)
    device = torch.device("cpu")
    bad = bench.measure_case("torch-native", wrong, (4, 3, 5), torch.float32, "contiguous", mode, device, True)
    good = bench.measure_case("torch-native", right, (4, 3, 5), torch.float32, "contiguous", mode, device, True)
    assert not bad.correct and bad.max_error > 1e-3
    assert good.correct and good.max_error < 1e-5 and good.us > 0, good.note


def test_a_flip_at_the_relu_boundary_is_not_called_wrong():
    """cuDNN and PyTorch were marked wrong on an H100 (2026-11-26) for BN + add + ReLU fwd+bwd: an
    element whose pre-activation rounds to either side of zero takes the other branch of the ReLU.
    Such elements are left out of the check; an error anywhere else still counts."""
    shape, dtype = (16, 3, 20), torch.bfloat16
    x, w, b, rm, rv, dy, residual = bench._inputs(shape, dtype, "contiguous", torch.device("cpu"))
    from bn_gpu import reference
    y = reference.forward_train(x, w, b)[0]
    # The residual cancels the normalized output to within bf16 rounding on a few elements.
    boundary = torch.zeros(shape, dtype=torch.bool)
    boundary.view(-1)[::97] = True
    residual = torch.where(boundary, -y, residual.double()).to(dtype)
    unchecked = bench._reference(x, w, b, rm, rv, "train_fwdbwd_add_relu", dy, residual)[1]
    assert unchecked is not None and unchecked[boundary].float().mean() > 0.5
    assert not unchecked[~boundary & ((y + residual.double()).abs() > 0.5)].any()
    assert bench._reference(x, w, b, rm, rv, "train_fwdbwd", dy, residual)[1] is None

    def flips_at_the_boundary(x, w, b, rm, rv, training, residual=None):
        y = bench._torch_sequence(x, w, b, rm, rv, training, None)
        return torch.relu(y + residual + torch.where(boundary, 1e-2, 0.0).to(y.dtype))

    def off_by_half(x, w, b, rm, rv, training, residual=None):
        return bench._torch_sequence(x, w, b, rm, rv, training, residual) * 1.5

    original = bench._inputs
    try:
        bench._inputs = lambda *args: (x, w, b, rm, rv, dy, residual)
        flipped = bench.measure_case("torch-native", flips_at_the_boundary, shape, dtype, "contiguous",
                                     "train_fwdbwd_add_relu", torch.device("cpu"), True)
        wrong = bench.measure_case("torch-native", off_by_half, shape, dtype, "contiguous",
                                   "train_fwdbwd_add_relu", torch.device("cpu"), True)
    finally:
        bench._inputs = original
    assert flipped.correct, flipped.max_error
    assert not wrong.correct


def test_smoke_run_writes_results_and_the_plot_renders(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install -e .[bench])")
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


def _jobs(*impls):
    return [(impl, None, (4, 3), torch.float32, "contiguous", f"job{i}") for i, impl in enumerate(impls)]


def test_budget_drops_torch_compile_first_then_the_last_jobs():
    jobs = _jobs("bn_gpu-triton", "torch-inductor", "torch-cudnn", "torch-inductor", "bn_gpu-triton")
    cheap = bench.job_cost_s("bn_gpu-triton")
    kept, dropped = bench.fit_budget(jobs, budget_s=3 * cheap + bench.job_cost_s("torch-inductor") - 0.01)
    assert [j[5] for j in dropped] == ["job3", "job1"]  # both compile jobs, the later one first
    assert [j[5] for j in kept] == ["job0", "job2", "job4"]
    kept, dropped = bench.fit_budget(jobs, budget_s=2 * cheap)
    assert [j[5] for j in kept] == ["job0", "job2"]
    assert bench.fit_budget(jobs, budget_s=None) == (jobs, [])


def _bench_args(tmp_path, budget_s):
    import argparse
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(["--smoke", "--out", str(tmp_path), "--shapes", "4x3x6x6", "5x3", "--dtypes", "float32",
                              "--impls", "bn_gpu-triton", "torch-native", "--budget-s", str(budget_s)])


def test_results_are_written_after_every_job(tmp_path, monkeypatch):
    """A run cut off by a timeout keeps every job it finished: the JSON on disk grows job by job."""
    rows_on_disk = []

    def fake_measure(name, call, shape, dtype, layout, mode, device, smoke):
        files = list(tmp_path.glob("*.json"))
        rows_on_disk.append(len(json.loads(files[0].read_text())["rows"]) if files else 0)
        return Row(impl=name, shape="x".join(map(str, shape)), dtype="float32", layout=layout, mode=mode,
                   numel=12, itemsize=4, us=1.0, correct=True)

    monkeypatch.setattr(bench, "measure_case", fake_measure)
    monkeypatch.setattr(bench, "plot", lambda rows, meta, path: path)
    bench.run(_bench_args(tmp_path, budget_s=1000))
    jobs = 3 * 2 * 5  # 4x3x6x6 in two layouts and 5x3 in one, 2 impls, 5 modes (2 of them fused)
    assert rows_on_disk == list(range(jobs))
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert len(data["rows"]) == jobs and data["meta"]["dropped"] == []


def test_a_run_out_of_time_stops_and_lists_what_it_dropped(tmp_path, monkeypatch):
    def slow_measure(name, call, shape, dtype, layout, mode, device, smoke):
        time.sleep(0.3)
        return Row(impl=name, shape="x".join(map(str, shape)), dtype="float32", layout=layout, mode=mode,
                   numel=12, itemsize=4, us=1.0, correct=True)

    monkeypatch.setattr(bench, "measure_case", slow_measure)
    monkeypatch.setattr(bench, "plot", lambda rows, meta, path: path)
    monkeypatch.setattr(bench, "DEFAULT_JOB_COST_S", 0.01)  # the up-front estimate keeps every job
    start = time.monotonic()
    bench.run(_bench_args(tmp_path, budget_s=1.0))
    assert time.monotonic() - start < 1.0 + 0.3 + 5  # stops after the job that crossed the budget
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    measured = len(data["rows"])
    jobs = 3 * 2 * 5  # as in test_results_are_written_after_every_job
    assert 2 <= measured < jobs
    assert len(data["meta"]["dropped"]) == jobs - measured
    assert all(d.endswith("(out of time)") for d in data["meta"]["dropped"])
    assert "dropped to fit the budget" in next(tmp_path.glob("*.md")).read_text()


def test_bench_without_a_gpu_refuses_unless_smoke(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark runs")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-m", "bn_gpu", "bench", "--out", str(tmp_path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "needs a CUDA GPU" in result.stderr and "--smoke" in result.stderr
    assert not list(tmp_path.iterdir())


def test_gpu_check_rehearsal_keeps_its_budget(tmp_path):
    """profiling/gpu_check.sh --rehearse: every step under the budget, results written, a summary."""
    script = os.path.join(os.path.dirname(__file__), "..", "profiling", "gpu_check.sh")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    budget = 60
    start = time.monotonic()
    result = subprocess.run(["bash", script, "--rehearse", "--budget-s", str(budget), "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=budget + 60)
    took = time.monotonic() - start
    assert result.returncode == 0, result.stdout + result.stderr
    assert took <= budget + 15, took  # each step's timeout is cut to what the budget leaves
    summary = (tmp_path / "summary.md").read_text()
    for step in ("preflight: exit 0", "gpu-tests:", "bench:", "host-overhead:"):
        assert step in summary, summary
    assert "0 failed" in summary and "## Summary: µs (% of floor)" in summary
    assert list((tmp_path / "bench").glob("*.json"))


def test_command_line_version_and_help():
    import bn_gpu
    result = subprocess.run([sys.executable, "-m", "bn_gpu", "--version"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == f"bn_gpu {bn_gpu.__version__}"
    result = subprocess.run([sys.executable, "-m", "bn_gpu", "bench", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "python -m bn_gpu bench" in result.stdout
    assert "(default: profiling/results)" in " ".join(result.stdout.split())  # defaults shown


def test_plot_of_a_file_that_is_not_a_results_file_says_so(tmp_path):
    bad = tmp_path / "notes.json"
    bad.write_text('{"something": 1}')
    result = subprocess.run([sys.executable, "-m", "bn_gpu", "plot", str(bad)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert "is not a results file of the bench command" in result.stderr and "Traceback" not in result.stderr


def test_results_file_names_have_no_odd_characters():
    assert bench.results_tag("NVIDIA H100 80GB HBM3 (MIG 1g.10gb)") == "NVIDIA-H100-80GB-HBM3-MIG-1g.10gb"
    assert bench.results_tag("NVIDIA H200") == "NVIDIA-H200"
