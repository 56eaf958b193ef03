"""Backend choice: per call, per module (checked at construction), process-wide by set_backend or
the BN_GPU_BACKEND environment variable."""
import os
import subprocess
import sys

import pytest
import torch

import bn_gpu


def _in_fresh_process(code: str, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "BN_GPU_BACKEND"}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                          timeout=300)


def test_environment_sets_the_process_default():
    code = "import torch, bn_gpu; print(bn_gpu.get_backend(), bn_gpu.backends.resolve('auto', torch.device('cuda')))"
    assert _in_fresh_process(code).stdout.split() == ["triton", "triton"]
    assert _in_fresh_process(code, BN_GPU_BACKEND="cupy").stdout.split() == ["cupy", "cupy"]


def test_environment_names_are_case_insensitive():
    code = "import bn_gpu; print(bn_gpu.get_backend())"
    assert _in_fresh_process(code, BN_GPU_BACKEND="CuPy").stdout.split() == ["cupy"]
    assert _in_fresh_process(code, BN_GPU_BACKEND="TRITON").stdout.split() == ["triton"]


@pytest.mark.parametrize("value", ["cuda", "cpu", ""])
def test_environment_with_an_unknown_backend_names_the_variable_and_the_choices(value):
    result = _in_fresh_process("import bn_gpu", BN_GPU_BACKEND=value)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "BN_GPU_BACKEND" in last_line and f"{value!r}" in last_line, last_line
    assert "'triton', 'cupy'" in last_line, last_line


def test_names_are_case_insensitive_everywhere():
    previous = bn_gpu.get_backend()
    try:
        bn_gpu.set_backend("CuPy")
        assert bn_gpu.get_backend() == "cupy"
    finally:
        bn_gpu.set_backend(previous)
    assert bn_gpu.BatchNorm1d(3, backend="CPU").backend == "cpu"
    x = torch.randn(4, 3)
    torch.testing.assert_close(bn_gpu.batch_norm(x, None, None, training=True, backend="Cpu"),
                               torch.nn.functional.batch_norm(x, None, None, training=True))


def test_set_backend_cpu_says_why_it_is_not_a_process_default():
    with pytest.raises(ValueError, match="'cpu' is not a backend for CUDA tensors.*'auto' already runs CPU tensors"):
        bn_gpu.set_backend("cpu")


def test_unknown_backend_message_names_every_choice():
    with pytest.raises(ValueError, match="choose one of 'auto', 'triton', 'cupy', 'cpu'"):
        bn_gpu.batch_norm(torch.randn(4, 3), None, None, training=True, backend="cuda")
    with pytest.raises(ValueError, match="choose one of 'auto', 'triton', 'cupy', 'cpu'"):
        bn_gpu.BatchNorm2d(3, backend="gpu")


def test_set_backend():
    previous = bn_gpu.get_backend()
    try:
        bn_gpu.set_backend("cupy")
        assert bn_gpu.get_backend() == "cupy"
        assert bn_gpu.backends.resolve("auto", torch.device("cuda")) == "cupy"
        assert bn_gpu.backends.resolve("auto", torch.device("cpu")) == "cpu"
    finally:
        bn_gpu.set_backend(previous)
    assert bn_gpu.get_backend() == previous


def test_modules_and_convert_model_check_the_backend_at_construction():
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        bn_gpu.BatchNorm2d(8, backend="nonsense")
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        bn_gpu.convert_model(model, backend="nonsense")
    assert type(model[0]) is torch.nn.BatchNorm1d  # nothing converted
    assert bn_gpu.BatchNorm1d(4, backend="auto").backend == "auto"


def test_the_cpu_backend_needs_no_triton():
    """Triton ships Linux wheels only: elsewhere bn_gpu imports and the "cpu" backend runs without it."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, bn_gpu\n"
            "bn = bn_gpu.BatchNorm1d(3)\n"
            "print(tuple(bn(torch.randn(4, 3)).shape), bn_gpu.__version__)\n")
    result = _in_fresh_process(code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[:2] == ["(4,", "3)"]
