"""The benchmark's row logic (floor, speed-up, correctness flag) and its smoke run, without a GPU."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from bn_gpu.tools import bench, report
from bn_gpu.tools.report import Row


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


def test_both_clocks_against_the_best_torch_implementation():
    """Eager wall time and GPU time each against torch's best by the same clock: a host-bound case
    loses by the first and wins by the second."""
    rows = [_row("torch-cudnn", 100.0), _row("torch-native", 120.0), _row("bn_gpu-triton", 200.0),
            _row("bn_gpu-cupy", 150.0, correct=False)]
    for row, gpu in zip(rows, (40.0, 30.0, 20.0, 10.0)):
        row.gpu_us, row.gpu_clock = gpu, "graph"
    rows[1].gpu_clock = "kernels"
    report.fill_metrics(rows, copy_gbps=2.0)
    by = {r.impl: r for r in rows}
    assert by["bn_gpu-triton"].speedup == pytest.approx(0.5)       # 100 / 200 by the wall clock
    assert by["bn_gpu-triton"].gpu_speedup == pytest.approx(1.5)   # 30 / 20 by GPU time (the wrong row is no baseline)
    table = report.markdown_table(rows)
    assert "| GPU µs | vs best torch (GPU) |" in table and "| 30.0† | 1.00× |" in table
    compact = report.compact_markdown(rows)
    assert "bn_gpu vs best torch, wall | GPU |" in compact and "| 0.50× | 1.50× |" in compact


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


@pytest.mark.slow
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
    (results,) = tmp_path.glob("*.json")
    assert re.fullmatch(r"smoke-\d{8}-\d{6}\.json", results.name), results.name  # the kind named once
    data = json.loads(results.read_text())
    assert len(data["rows"]) == jobs and data["meta"]["dropped"] == []


def test_a_run_out_of_time_stops_and_lists_what_it_dropped(tmp_path, monkeypatch):
    """Each job takes 0.3 s of a clock the test keeps: a 1 s budget is crossed by the fourth job,
    after which the run stops and lists the rest as dropped."""
    elapsed = [0.0]

    def measure(name, call, shape, dtype, layout, mode, device, smoke):
        elapsed[0] += 0.3
        return Row(impl=name, shape="x".join(map(str, shape)), dtype="float32", layout=layout, mode=mode,
                   numel=12, itemsize=4, us=1.0, correct=True)

    monkeypatch.setattr(bench, "measure_case", measure)
    monkeypatch.setattr(bench, "plot", lambda rows, meta, path: path)
    monkeypatch.setattr(bench, "DEFAULT_JOB_COST_S", 0.01)  # the up-front estimate keeps every job
    bench.run(_bench_args(tmp_path, budget_s=1.0), clock=lambda: elapsed[0])
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    jobs = 3 * 2 * 5  # as in test_results_are_written_after_every_job
    assert len(data["rows"]) == 4  # 0.3, 0.6, 0.9 within the budget; the fourth starts at 0.9 and ends at 1.2
    assert len(data["meta"]["dropped"]) == jobs - 4
    assert all(d.endswith("(out of time)") for d in data["meta"]["dropped"])
    assert data["meta"]["elapsed_s"] == 1.2
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


_STUB_STEP = """#!/usr/bin/env bash
# NAME LIMIT: record the step, then advance the test's clock by its cost (STUB_COSTS, default 1 s);
# a cost over the limit is cut there, as timeout would cut it (exit 124).
name=$1 limit=$2 cost=1
for pair in $STUB_COSTS; do [ "${pair%%=*}" = "$name" ] && cost=${pair#*=}; done
echo "$name $limit" >> "$STUB_RECORD"
clock=$(cat "$GPU_CHECK_CLOCK")
if [ "$cost" -gt "$limit" ]; then echo $(( clock + limit )) > "$GPU_CHECK_CLOCK"; exit 124; fi
echo $(( clock + cost )) > "$GPU_CHECK_CLOCK"
"""


def _gpu_check(tmp_path, budget: int, costs: dict, *options) -> tuple[list, str]:
    """profiling/gpu_check.sh with every step stubbed and a clock the test keeps: the (step, limit)
    pairs it ran, in order, and its summary."""
    stub, clock, record = tmp_path / "stub.sh", tmp_path / "clock", tmp_path / "steps"
    stub.write_text(_STUB_STEP)
    stub.chmod(0o755)
    clock.write_text("0\n")
    record.write_text("")
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_STUB=str(stub), GPU_CHECK_CLOCK=str(clock),
               STUB_RECORD=str(record), STUB_COSTS=" ".join(f"{k}={v}" for k, v in costs.items()))
    env.pop("TRITON_INTERPRET", None)
    script = os.path.join(os.path.dirname(__file__), "..", "..", "profiling", "gpu_check.sh")
    out = tmp_path / "out"
    result = subprocess.run(["bash", script, *options, "--budget-s", str(budget), "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [(name, int(limit)) for name, limit in (line.split() for line in record.read_text().splitlines())]
    return steps, (out / "summary.md").read_text()


def test_gpu_check_rehearsal_cuts_each_step_to_what_the_budget_leaves(tmp_path):
    # preflight: min(30, 60 - 0 - 40% of 60) = 30; gpu-tests: min(20, 60 - 25 - 24) = 11, cut there;
    # bench: what is left less 15% = 60 - 36 - 9 = 15; host-overhead: min(10, 60 - 37 - 6);
    # train-step: min(15, 60 - 38).
    steps, summary = _gpu_check(tmp_path, 60, {"preflight": 25, "gpu-tests": 100}, "--rehearse")
    assert steps == [("preflight", 30), ("gpu-tests", 11), ("bench", 15), ("host-overhead", 10), ("train-step", 15)]
    assert "- preflight: exit 0, 25 s of 30 s" in summary
    assert "- gpu-tests: stopped at its 11 s limit (exit 124), 11 s of 11 s" in summary
    assert "budget 60 s, took 39 s" in summary


def test_gpu_check_skips_a_step_the_budget_cannot_hold(tmp_path):
    # preflight uses all of its 24 s (40 - 40% of 40): nothing is left for gpu-tests before its reserve;
    # after the bench's 10 s, host-overhead's 2 s past its reserve are too few; train-step takes the last 6.
    steps, summary = _gpu_check(tmp_path, 40, {"preflight": 24, "bench": 10}, "--rehearse")
    assert steps == [("preflight", 24), ("bench", 10), ("train-step", 6)]
    assert "- gpu-tests: not run (budget spent)" in summary and "- host-overhead: not run (budget spent)" in summary
    assert "budget 40 s, took 35 s" in summary


def test_gpu_check_on_a_gpu_machine_keeps_its_budget(tmp_path):
    steps, summary = _gpu_check(tmp_path, 480, {"gpu-tests": 300})
    assert steps == [("install", 60), ("cupy-compile", 90), ("gpu-tests", 240), ("host-overhead", 30),
                     ("host-overhead-jit", 30), ("kernel-times", 60), ("kernel-times-on-chip", 40), ("train-step", 120),
                     ("bench", 219)]
    assert "- preflight: skipped (the GPU tests passed)" in summary
    assert "budget 480 s, took 248 s" in summary


def test_command_line_version_and_help():
    import bn_gpu
    result = subprocess.run([sys.executable, "-m", "bn_gpu", "--version"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == f"bn_gpu {bn_gpu.__version__}"
    result = subprocess.run([sys.executable, "-m", "bn_gpu", "bench", "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "python -m bn_gpu bench" in result.stdout
    help_text = " ".join(result.stdout.split())
    assert "(default: None)" not in help_text
    for option in ("--dtypes", "--modes", "--impls", "--out"):  # each explained, its default named
        assert option in help_text
    assert help_text.count("(default:") >= 5, help_text


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
