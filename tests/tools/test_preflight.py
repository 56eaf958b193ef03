"""python -m bn_gpu preflight: a verdict per op, backend, layout and path, able to fail."""
import torch

from bn_gpu.backends import cpu as cpu_backend
from bn_gpu.tools import preflight


def test_preflight_passes_every_case_on_this_machine(capsys):
    assert preflight.run(torch.device("cpu")) == 0
    lines = capsys.readouterr().out.splitlines()
    verdicts = [line for line in lines if line.startswith(("ok", "FAIL"))]
    # every (backend, case, dtype): the cpu backend, and the Triton kernels in the interpreter
    assert len(verdicts) == len(preflight._backends(torch.device("cpu"))) * len(preflight.CPU_CASES) * 2
    assert all(line.startswith("ok") for line in verdicts), verdicts
    triton_paths = {path for line in verdicts if line.split()[1] == "triton"
                    for path in ("split", "single-pass") if f" {path} " in line}
    assert triton_paths == {"split", "single-pass"}  # both kernel paths ran
    assert lines[-1] == "preflight: 0 failed"
    # a header naming the columns, and every row distinct: its shape written out
    assert lines[0].startswith("preflight on cpu") and lines[1].split()[:6] == ["backend", "case", "path", "dtype",
                                                                                "shape", "errors"]
    assert len(set(verdicts)) == len(verdicts) or len({line.rsplit("(", 1)[0] for line in verdicts}) == len(verdicts)
    for (name, shape, layout) in preflight.CPU_CASES:
        assert any("x".join(map(str, shape)) in line for line in verdicts), shape


def test_preflight_reports_a_wrong_kernel(capsys, monkeypatch):
    real = cpu_backend.forward_eval

    def off_by_one_percent(*args):
        y, mean, invstd = real(*args)
        return y * 1.01, mean, invstd

    monkeypatch.setattr(cpu_backend, "forward_eval", off_by_one_percent)
    monkeypatch.setattr(preflight, "_backends", lambda device: ["cpu"])
    failed = preflight.run(torch.device("cpu"), dtypes=(torch.float32,))
    out = capsys.readouterr().out
    assert failed == len(preflight.CPU_CASES)
    assert out.count("FAIL") == len(preflight.CPU_CASES)
    assert all(" eval 1.0e-02 " in line for line in out.splitlines() if line.startswith("FAIL"))
