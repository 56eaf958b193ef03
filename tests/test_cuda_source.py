"""The CuPy backend without a GPU: its CUDA C source compiles with nvcc for sm_80 and sm_90 in every
type instantiation the backend asks NVRTC for, and missing pieces give errors that say what to do."""
import os
import shutil
import subprocess

import pytest
import torch

import bn_gpu
from bn_gpu import cupy_backend

NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def _instantiation_unit(tmp_path):
    """A translation unit that includes the source and takes the address of every kernel the
    backend compiles, which instantiates each template as NVRTC's name expressions would."""
    (tmp_path / "batch_norm.cu").write_text(cupy_backend.source())
    names = sorted({name for combo in cupy_backend.type_combinations()
                    for name in cupy_backend.kernel_names(*combo).values()})
    lines = ['#include "batch_norm.cu"', "void instantiate_all() {"]
    lines += [f"    (void)&{name};" for name in names]
    lines.append("}")
    unit = tmp_path / "instantiate.cu"
    unit.write_text("\n".join(lines) + "\n")
    return unit, names


@pytest.mark.skipif(NVCC is None, reason="no CUDA compiler (nvcc) found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_cuda_source_compiles_for_every_instantiation(tmp_path, arch):
    unit, names = _instantiation_unit(tmp_path)
    for T in cupy_backend.C_TYPES.values():  # every kernel template for every input dtype
        for template in ("stats_channels_first", "stats_channels_last", "finalize_forward",
                         "normalize_channels_first", "normalize_channels_last", "backward_reduce_channels_first",
                         "backward_reduce_channels_last", "dx_channels_first", "dx_channels_last"):
            assert any(n.startswith(f"{template}<{T},") for n in names), (template, T)
    result = subprocess.run([NVCC, "-std=c++17", f"-arch={arch}", "-c", str(unit), "-o", str(tmp_path / "out.o")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "warning" not in result.stderr.lower(), result.stderr[-4000:]


def test_every_kernel_of_the_source_is_used():
    source = cupy_backend.source()
    roles = cupy_backend.kernel_names("float", "float", "float", "float")
    for name in {n.split("<")[0] for n in roles.values()}:
        assert f"void {name}(" in source
    assert source.count("__global__") == len({n.split("<")[0] for n in roles.values()})


def _has_cupy():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_has_cupy(), reason="checks the error shown when CuPy is not installed")
def test_missing_cupy_names_the_install_command():
    with pytest.raises(RuntimeError, match=r"needs CuPy, which is not installed: pip install -e \.\[cupy\]"):
        bn_gpu.batch_norm(torch.randn(4, 3), None, None, training=True, backend="cupy")


def test_cpu_tensors_are_refused_with_the_way_out(monkeypatch):
    monkeypatch.setattr(cupy_backend, "_import_cupy", lambda: object())  # as if CuPy were installed
    monkeypatch.setattr(bn_gpu.backends, "_checked_modules", {})
    with pytest.raises(RuntimeError, match=r"backend='cupy' needs CUDA tensors and a GPU; got tensors on cpu"):
        bn_gpu.batch_norm(torch.randn(4, 3), None, None, training=True, backend="cupy")


def test_set_backend_and_environment_default(monkeypatch):
    previous = bn_gpu.get_backend()
    try:
        bn_gpu.set_backend("cupy")
        assert bn_gpu.get_backend() == "cupy"
        assert bn_gpu.backends.resolve("auto", torch.device("cuda")) == "cupy"
        assert bn_gpu.backends.resolve("auto", torch.device("cpu")) == "cpu"
    finally:
        bn_gpu.set_backend(previous)
