"""profiling/train_step.py: its smoke run on a CPU (the tiny model, every implementation and
precision that runs there, both layouts), and its command-line mistakes."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "profiling" / "train_step.py"


def _run(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_smoke_run_agrees_with_torch_and_writes_as_it_goes(tmp_path):
    result = _run("--smoke", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    (results,) = tmp_path.glob("train-step-*-smoke.json")
    data = json.loads(results.read_text())
    rows = data["rows"]
    assert {(r["layout"], r["precision"]) for r in rows} == {(layout, precision) for layout in
                                                             ("contiguous", "channels_last")
                                                             for precision in ("fp32", "bf16")}
    assert {r["impl"] for r in rows} == {"torch", "bn_gpu-triton", "bn_gpu-triton-fused"}
    for row in rows:
        assert "error" not in row, row
        assert row["agrees"] is True and row["ms_per_step"] > 0 and row["images_per_s"] > 0, row
    assert data["meta"]["smoke"] is True and "mode compile: needs a GPU" in data["meta"]["left_out"]
    markdown = results.with_suffix(".md").read_text()
    assert "timings not meaningful" in markdown and markdown.count("| yes |") == len(rows)
    assert f"[{len(rows)}/{len(rows)}]" in result.stdout  # progress per row


def test_a_broken_batch_norm_is_caught_by_the_agreement_check(tmp_path, monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import train_step
    finally:
        sys.path.remove(str(SCRIPT.parent))
    import bn_gpu
    real = bn_gpu.convert_model

    def nudge(module, inputs, output):
        module.running_mean.add_(1e-2)

    def off_by_a_little(model, backend="auto", **kwargs):  # running statistics nudged after each step
        model = real(model, backend=backend, **kwargs)
        for module in model.modules():
            if isinstance(module, bn_gpu.BatchNorm2d):
                module.register_forward_hook(nudge)
        return model

    monkeypatch.setattr(train_step.bn_gpu, "convert_model", off_by_a_little)
    args = train_step.parse_args(["--smoke", "--out", str(tmp_path), "--impls", "torch", "bn_gpu-triton",
                                  "--layouts", "contiguous", "--precisions", "fp32"])
    stem = train_step.run(args)
    rows = json.loads(pathlib.Path(stem + ".json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["torch", "bn_gpu-triton"]
    assert rows[0]["agrees"] is True and rows[1]["agrees"] is False and rows[1]["stat_error"] > 1e-3


@pytest.mark.parametrize("args, message", [(["--smoke", "--batch-sizes", "0"], "not a positive integer"),
                                           (["--smoke", "--modes", "fast"], "invalid choice"),
                                           (["--smoke", "--budget-s", "-1"], "not a positive number")])
def test_command_line_mistakes_are_one_line_and_exit_2(args, message):
    result = _run(*args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
