"""The CuPy backend without a GPU: its CUDA C source compiles in every type instantiation the backend
asks NVRTC for -- with nvcc for sm_90 (host code included; the resource and SASS checks read that
object) and with NVRTC for sm_80, as CuPy compiles it at run time -- and missing pieces give errors
that say what to do."""
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import bn_gpu
import bn_gpu.backends.cupy as cupy_backend
from bn_gpu.backends import plan
from bn_gpu.backends.cupy import compilation
from bn_gpu.backends.cupy import launcher as cupy_launcher
from bn_gpu.backends.cupy import table as cupy_table
from bn_gpu.tools import model
from bn_gpu.dtypes import stat_dtype
from nvrtc_compile import instantiated_names
from support import has_cupy

# One xdist worker runs this module (`make test`: --dist loadgroup), so its compile fixture starts once.
pytestmark = [pytest.mark.xdist_group("nvcc"), pytest.mark.slow]

NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


def _instantiation_unit(tmp_path):
    """A translation unit that includes the source and takes the address of every kernel the
    backend compiles, which instantiates each template as NVRTC's name expressions would."""
    (tmp_path / "batch_norm.cu").write_text(compilation.source())
    names = instantiated_names()
    lines = ['#include "batch_norm.cu"', "void instantiate_all() {"]
    lines += [f"    (void)&{name};" for name in names]
    lines.append("}")
    unit = tmp_path / "instantiate.cu"
    unit.write_text("\n".join(lines) + "\n")
    return unit, names


def _find_nvrtc():
    import ctypes.util
    import glob
    candidates = [ctypes.util.find_library("nvrtc")] + sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    try:
        import nvidia.cuda_nvrtc  # the wheel CuPy can use: nvidia-cuda-nvrtc-cu12
        candidates += sorted(glob.glob(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    return next((c for c in candidates if c and "builtins" not in c and "alt" not in c), None)


NVRTC = _find_nvrtc()


@pytest.fixture(scope="module")
def nvrtc_run():
    """NVRTC's compile for sm_80 (nvrtc_compile.py) in a process of its own, started with nvcc's (the
    first test that needs either starts both); None without NVRTC or the CUDA headers it compiles against."""
    toolkits = [os.environ.get("CUDA_PATH", ""), "/usr/local/cuda",
                os.path.dirname(os.path.dirname(os.path.realpath(NVCC))) if NVCC else ""]
    include = next((os.path.join(t, "include") for t in toolkits
                    if t and os.path.exists(os.path.join(t, "include", "cuda_fp16.h"))), None)
    if NVRTC is None or include is None:
        yield None
        return
    process = subprocess.Popen([sys.executable, str(pathlib.Path(__file__).with_name("nvrtc_compile.py")), NVRTC,
                                include, "sm_80"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield process
    if process.poll() is None:
        process.kill()


# nvcc's targets; sm_80's machine code comes from NVRTC (test_nvrtc_compiles_every_name_expression):
# each compile of every instantiation takes minutes of one core.
ARCHS = ["sm_90"]


@pytest.fixture(scope="module")
def nvcc_runs(tmp_path_factory, nvrtc_run):
    """One nvcc process per architecture over the same unit, started with NVRTC's (the compiles are
    single-threaded and among the longest CPU tests of the suite: side by side on a 2-core CI machine,
    with the module's other tests beside them). {arch: (process, names instantiated)}."""
    tmp_path = tmp_path_factory.mktemp("nvcc")
    unit, names = _instantiation_unit(tmp_path)
    runs = {arch: (subprocess.Popen([NVCC, *compilation.COMPILE_OPTIONS, f"-arch={arch}", "-c", str(unit),
                                     "-o", str(tmp_path / f"{arch}.o")],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), names)
            for arch in ARCHS}
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()


def _finished(process) -> str:
    """The nvcc run's stderr, waited for once: two tests read the same run, and a second
    communicate() would return nothing, which a test for warnings would pass."""
    if not hasattr(process, "stderr_text"):
        _, process.stderr_text = process.communicate(timeout=900)
    return process.stderr_text


def _cuobjdump_sm_90(nvcc_runs, option: str) -> str:
    """`cuobjdump option` of the sm_90 object of every instantiation, once nvcc has written it."""
    process, _ = nvcc_runs["sm_90"]
    stderr = _finished(process)
    assert process.returncode == 0, stderr[-4000:]
    obj = process.args[process.args.index("-o") + 1]
    return subprocess.run([model.tool("cuobjdump"), option, obj], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def sm_90_resources(nvcc_runs):
    """{function: {registers, stack, shared, local}} of every instantiation compiled for sm_90."""
    return model.parse_resources(_cuobjdump_sm_90(nvcc_runs, "--dump-resource-usage"))


@pytest.fixture(scope="module")
def sm_90_sass(nvcc_runs):
    """{function: instructions} of every instantiation compiled for sm_90, disassembled once (the
    whole object's disassembly and parse are the slowest step of the SASS checks)."""
    return model.parse_sass(_cuobjdump_sm_90(nvcc_runs, "-sass"))


@pytest.mark.skipif(NVCC is None, reason="no CUDA compiler (nvcc) found")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_source_compiles_for_every_instantiation(nvcc_runs, arch):
    process, names = nvcc_runs[arch]
    for T in compilation.C_TYPES.values():  # every kernel template for every input dtype
        for template in ("statistics_channels_first", "statistics_channels_last", "finalize_statistics",
                         "normalize_channels_first", "normalize_channels_last", "gradient_sums_channels_first",
                         "gradient_sums_channels_last", "input_gradient_channels_first", "input_gradient_channels_last",
                         "on_chip_forward_channels_first", "on_chip_forward_channels_last",
                         "on_chip_backward_channels_first", "on_chip_backward_channels_last"):
            assert any(n.startswith(f"{template}<{T},") for n in names), (template, T)
    stderr = _finished(process)
    assert process.returncode == 0, stderr[-4000:]
    assert "warning" not in stderr.lower(), stderr[-4000:]


def _blocks_an_sm(name: str, resources: dict, dynamic_shared: int = 0) -> int:
    """Blocks of 256 threads an H200 SM holds of a kernel compiled for sm_90 (its registers, static
    shared memory and the launch's dynamic shared memory), as the static model counts them."""
    compiled = model.Compiled("cupy", name, registers=resources["registers"], spill_bytes=resources["stack"],
                              shared_bytes=resources["shared"], loops=[])
    return model.occupancy(compiled, compilation.THREADS, model.TARGETS["h200"], dynamic_shared)


@pytest.mark.skipif(NVCC is None or model.tool("cuobjdump") is None, reason="no nvcc or cuobjdump found")
def test_the_on_chip_kernels_static_shared_memory_fits_what_the_plan_reserves(sm_90_resources):
    """The on-chip plan gives each of an SM's two blocks its share of the SM's shared memory less
    ON_CHIP_RESERVED_SHARED, which must hold the kernel's static shared memory (its column trees and
    per-channel arrays) and the 1 KB the driver reserves a block: every instantiation, sm_90. (The
    launcher's occupancy check would refuse a launch that does not fit, on a GPU.)"""
    on_chip = {name: r["shared"] for name, r in sm_90_resources.items() if "on_chip_" in name}
    assert len(on_chip) >= 4 * len(compilation.C_TYPES), sorted(on_chip)
    assert max(on_chip.values()) + 1024 <= compilation.ON_CHIP_RESERVED_SHARED, on_chip


# A kernel's declaration: `__global__ void name(`, with launch bounds before the name where it has them.
_KERNEL = r"__global__ void (?:__launch_bounds__\([^()]*\) )?(\w+)\("


@pytest.mark.skipif(NVCC is None or model.tool("cuobjdump") is None, reason="no nvcc or cuobjdump found")
def test_the_split_gradient_sums_fit_the_blocks_an_sm_the_grids_are_planned_for(sm_90_resources):
    """The channels-first gradient sums' split walks (not GROUPED) fit Tuning.programs_per_sm blocks of
    256 threads an SM on sm_90 (their launch bounds, GradientSumsBlocks), with and without the ReLU's
    mask and the fused finalize, in fp32, fp16 and bf16: at 3 a grid planned for 4 runs in two waves."""
    # <T, W, A, VEC, FUSED, FINALIZE, GROUPED = false, GHOST = false>, T not double
    walks = {name: r for name, r in sm_90_resources.items()
             if re.match(r"_Z28gradient_sums_channels_firstI(?!d).*ELb[01]ELb[01]ELb0ELb0EEv", name)}
    assert len(walks) >= 12, sorted(walks)  # 3 dtypes x FUSED x FINALIZE, and the 16-bit ones' weight dtypes
    for name, r in walks.items():
        assert _blocks_an_sm(name, r) >= plan.GPU_TUNING.programs_per_sm, (name, r)


@pytest.mark.skipif(NVCC is None or model.tool("cuobjdump") is None, reason="no nvcc or cuobjdump found")
def test_the_channels_last_statistics_fit_the_blocks_an_sm_the_grids_are_planned_for(sm_90_resources, sm_90_sass):
    """The channels-last statistics (fp32, fp16, bf16; ChannelsLastStatisticsBlocks) fit
    Tuning.programs_per_sm blocks of 256 threads an SM on sm_90, so a whole-wave grid runs in one
    wave; what their bound moves to the stack is never read or written in the loops that load the
    rows (nested loops apart: the close of a run of sums, once every 64 rows, may)."""
    # <T, A, R, VEC, FINALIZE, GHOST = false>, T not double
    kernels = {name: r for name, r in sm_90_resources.items()
               if re.match(r"_Z24statistics_channels_lastI(?!d)\w+Li(1|4|8)ELb[01]ELb0EEv", name)}
    assert len(kernels) == 2 * (2 + 4 * 2), sorted(kernels)  # 2 widths x FINALIZE x (fp32, 2 x 2 16-bit)
    for name, r in kernels.items():
        assert _blocks_an_sm(name, r) >= plan.GPU_TUNING.programs_per_sm, (name, r)
        loops = model.loop_ranges(sm_90_sass[name])
        for start, end in loops:
            inner = [(a, b) for a, b in loops if start < a and b < end]
            body = [i for i in sm_90_sass[name]
                    if start <= i.address <= end and not any(a <= i.address <= b for a, b in inner)]
            if any(i.opcode.startswith("LDG") for i in body):
                assert not any(i.opcode.startswith(("LDL", "STL")) for i in body), (name, start, end)


@pytest.mark.skipif(NVCC is None or model.tool("cuobjdump") is None, reason="no nvcc or cuobjdump found")
def test_the_channels_first_normalize_with_the_epilogue_fits_the_blocks_an_sm_the_grids_are_planned_for(
        sm_90_resources):
    """The split channels-first normalize with the epilogue (NormalizeBlocks): fp32 and fp16 fit
    Tuning.programs_per_sm blocks an SM on sm_90, bf16 (which would spill in its loop at 4) 2; none
    of them uses the stack."""
    # <T, W, R, A, VEC = 4 or 8, FUSED = true, GROUPED = false, GHOST = false>, T not double
    kernels = {name: r for name, r in sm_90_resources.items()
               if re.match(r"_Z24normalize_channels_firstI(?!d)\w+Li(4|8)ELb1ELb0ELb0EEv", name)}
    assert len(kernels) == 1 + 2 * 4, sorted(kernels)  # fp32; fp16 and bf16 with their W and R
    for name, r in kernels.items():
        blocks = 2 if "13__nv_bfloat16" in name else plan.GPU_TUNING.programs_per_sm
        assert _blocks_an_sm(name, r) >= blocks and r["stack"] == 0, (name, r)


def test_every_kernel_of_the_source_is_used():
    source = compilation.source()
    roles = compilation.kernel_names("float", "float", "float", "float")
    declared = re.findall(_KERNEL, source)
    assert sorted(declared) == sorted({n.split("<")[0] for n in roles.values()})
    assert source.count("__global__") == len(declared)


@pytest.mark.skipif(has_cupy(), reason="checks the error shown when CuPy is not installed")
def test_missing_cupy_names_the_install_command():
    with pytest.raises(RuntimeError, match=r"needs CuPy, which is not installed: pip install -e \.\[cupy-cuda13\]"):
        bn_gpu.batch_norm(torch.randn(4, 3), None, None, training=True, backend="cupy")


def test_cpu_tensors_are_refused_with_the_way_out(monkeypatch):
    monkeypatch.setattr(compilation, "import_cupy", lambda: object())  # as if CuPy were installed
    monkeypatch.setattr(bn_gpu.backends, "_checked_modules", {})
    with pytest.raises(RuntimeError, match=r"backend='cupy' needs CUDA tensors and a GPU; got tensors on cpu"):
        bn_gpu.batch_norm(torch.randn(4, 3), None, None, training=True, backend="cupy")


# ---- the launcher against the kernel signatures, without CuPy or a GPU ---------------------------

def _kernel_parameters():
    """{kernel template name: [parameter C types]} parsed from the CUDA source."""
    source = re.sub(r"//[^\n]*", "", compilation.source())
    params = {}
    for match in re.finditer(_KERNEL + r"(.*?)\)\s*\{", source, re.S):
        params[match.group(1)] = [" ".join(p.split()[:-1]) for p in match.group(2).split(",")]
    return params


def _parameter_names(kernel: str) -> list:
    """The names of a kernel's parameters, in order, parsed from the CUDA source."""
    source = re.sub(r"//[^\n]*", "", compilation.source())
    match = next(m for m in re.finditer(_KERNEL + r"(.*?)\)\s*\{", source, re.S) if m.group(1) == kernel)
    return [p.split()[-1].lstrip("*") for p in match.group(2).split(",")]


class _FakeCupy:
    """Records launches instead of compiling and running them."""

    def __init__(self):
        self.launches = []
        self.shared_mem = []  # each launch's dynamic shared memory, in launch order
        fake = self

        class Function:
            """A compiled kernel: records its launches; its dynamic shared memory limit as CuPy's."""

            def __init__(self, name):
                self.name, self.max_dynamic_shared_size_bytes = name, 49152

            def __call__(self, grid, block, args, stream, shared_mem=0):
                assert shared_mem <= self.max_dynamic_shared_size_bytes, (self.name, shared_mem)
                fake.launches.append((self.name, grid, block, args))
                fake.shared_mem.append(shared_mem)

        class RawModule:
            def __init__(self, code, options, name_expressions):
                assert "__global__" in code and options == compilation.COMPILE_OPTIONS
                self.names = set(name_expressions)

            def get_function(self, name):
                assert name in self.names
                return Function(name)

        class _Context:
            def __init__(self, *args):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        self.RawModule = RawModule
        self.cuda = type("cuda", (), {"Device": _Context, "ExternalStream": _Context})


def _expected_numpy_type(c_type: str, accumulate):
    import numpy as np
    if "*" in c_type:
        return np.uint64
    return {"i64": np.int64, "int": np.int32, "float": np.float32, "double": np.float64, "A": accumulate}[c_type]


H200_SHARED_PER_SM = 233472  # bytes of shared memory an SM of an H100 or H200 has


def _fake_cooperative(kernel, role, shared_mem, threads, blocks, sms):
    """The cooperative launch's checks, on the H200's figures: the grid resident at two blocks an
    SM at most (the on-chip plans'), each with its slice and the static shared memory beside it."""
    assert role.startswith("on_chip_") and threads == compilation.THREADS and blocks <= 2 * sms, (role, blocks)
    per_sm = -(-blocks // sms)
    assert per_sm * (shared_mem + compilation.ON_CHIP_RESERVED_SHARED) <= H200_SHARED_PER_SM, (role, shared_mem)
    return kernel


@pytest.fixture
def fake_cupy(monkeypatch):
    """The CuPy backend on a fake CuPy that records launches instead of running them."""
    import bn_gpu.backends.plan

    fake = _FakeCupy()
    compilation.compiled_kernels.cache_clear()
    monkeypatch.setattr(compilation, "import_cupy", lambda: fake)
    monkeypatch.setattr(bn_gpu.backends.plan, "multiprocessors", lambda index: 132)
    monkeypatch.setattr(cupy_table, "shared_memory_per_sm", lambda index: H200_SHARED_PER_SM)
    monkeypatch.setattr(cupy_launcher, "cooperative", _fake_cooperative)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 0})())
    compilation.stream.cache_clear()
    yield fake
    compilation.compiled_kernels.cache_clear()


@pytest.fixture
def cooperative(fake_cupy, monkeypatch):
    """The cooperative launches the fake CuPy is asked for: (role, dynamic shared memory, blocks)."""
    launches = []

    def recording(kernel, role, shared_mem, threads, blocks, sms):
        launches.append((role, shared_mem, blocks))
        return _fake_cooperative(kernel, role, shared_mem, threads, blocks, sms)

    monkeypatch.setattr(cupy_launcher, "cooperative", recording)
    return launches


def _finalizing(name: str) -> bool:
    """Whether a launched statistics or gradient-sums instantiation has FINALIZE set (the boolean
    template argument before GHOST, and before GROUPED on the channels-first kernels)."""
    arguments = name[name.index("<") + 1:-1].split(", ")
    return arguments[-3 if "_channels_first" in name else -2] == "true"


def _check_arguments(launches, dtype) -> None:
    import numpy as np
    signatures = _kernel_parameters()
    accumulate = np.float64 if dtype == torch.float64 else np.float32
    for name, grid, block, args in launches:
        params = signatures[name.split("<")[0]]
        assert len(args) == len(params), (name, len(args), len(params))
        for arg, c_type in zip(args, params):
            assert type(arg) is _expected_numpy_type(c_type.replace("const ", "").replace("__restrict__", "").strip()
                                                     if "*" not in c_type else "*", accumulate), (name, c_type, arg)
        assert all(g > 0 for g in grid) and math.prod(block) == compilation.THREADS and block[0] <= 256


@pytest.fixture
def cuda_kernel_path(kernel_path):
    """The kernel path as the CUDA C backend takes it for 7x7 planes: its on-chip kernels do not hold
    channel groups, so the two-pass plans (split, with 64 programs an SM)."""
    return "split" if kernel_path == "on-chip" else kernel_path


def _train_kernels(g, op: str, on_chip, two_pass: str) -> list:
    """The training kernels of `op` ("forward" or "backward") on geometry g, by the path it takes."""
    family = "first" if g.channels_first else "last"
    if on_chip is not None:
        return [f"on_chip_{op}_channels_{family}"]
    if g.single_pass:
        return [f"single_pass_{op}_channels_{family}"]
    return [f"{name}_channels_{family}" for name in two_pass.split()]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_launch_arguments_match_the_kernel_signatures(fake_cupy, layout, dtype, kernel_path):
    """Every path's launches against the kernels' parameters: the on-chip kernels where the input
    fits the shared memory of an H200's SMs (here every forward but the channels-first fp64 one, whose
    tiles are too large for a block's share)."""
    from support import make_input, make_params

    x = make_input((4, 6, 64, 64), dtype, layout)
    weight, bias, running_mean, running_var = make_params(6, torch.float32 if dtype == torch.bfloat16 else dtype)
    cupy_backend.forward_train(x, weight, bias, running_mean, running_var, torch.tensor(3), None, 1e-5)
    cupy_backend.forward_eval(x, weight, bias, running_mean, running_var, 1e-5)
    mean, invstd = torch.zeros(6, dtype=stat_dtype(dtype)), torch.ones(6, dtype=stat_dtype(dtype))
    cupy_backend.backward(x, x, weight, mean, invstd, True, True, True)
    cupy_backend.backward(x, x, None, mean, invstd, False, True, False)

    g_forward, g_backward = cupy_backend.KERNELS.geometry(x), cupy_backend.KERNELS.geometry(x, x)
    if kernel_path == "on-chip":
        assert g_forward.on_chip is not None or dtype == torch.float64 and layout == "contiguous"
    else:
        assert g_forward.on_chip is None and g_backward.on_chip_backward is None
    launched = [name.split("<")[0] for name, *_ in fake_cupy.launches]
    family = "first" if layout == "contiguous" else "last"
    train_forward = _train_kernels(g_forward, "forward", g_forward.on_chip, "statistics normalize")
    train_backward = _train_kernels(g_backward, "backward", g_backward.on_chip_backward, "gradient_sums input_gradient")
    assert launched == (train_forward + [f"normalize_channels_{family}"] + train_backward
                        + [f"input_gradient_channels_{family}"])
    # The split reductions are their finalizing instantiations, with the counters buffer.
    for name, _, _, args in fake_cupy.launches:
        if name.startswith(("statistics", "gradient_sums")):
            assert _finalizing(name), name
            assert (args[4] if name.startswith("statistics") else args[8]) != 0
    # The on-chip kernels get their barriers' counters and the partials of their exchange.
    for name, grid, _, args in fake_cupy.launches:
        if name.startswith("on_chip"):
            counters = args[11]
            assert counters != 0 and all(args[k] != 0 for k in ((3, 4, 5) if "forward" in name else (9, 10)))
    _check_arguments(fake_cupy.launches, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_sync_batch_norm_launch_arguments_match_the_kernel_signatures(fake_cupy, layout, dtype):
    """SyncBatchNorm's steps on the CuPy backend (the collectives run between them)."""
    from support import make_input, make_params

    x = make_input((4, 6, 64, 64), dtype, layout)
    weight, bias, running_mean, running_var = make_params(6, torch.float32 if dtype == torch.bfloat16 else dtype)
    moments = cupy_backend.local_moments(x)
    assert moments.shape == (13,) and moments.dtype == stat_dtype(dtype)
    mean, invstd = cupy_backend.merge_ranks(x, torch.zeros(3, 13, dtype=stat_dtype(dtype)), running_mean,
                                            running_var, torch.tensor(2), None, 1e-5)
    cupy_backend.normalize(x, mean, invstd, weight, bias, torch.tensor(2), 1e-5)
    totals, _, _ = cupy_backend.gradient_totals(x, x, mean, invstd, weight.dtype)
    cupy_backend.input_gradient(x, x, mean, invstd, weight, totals)
    family = "first" if layout == "contiguous" else "last"
    assert [name.split("<")[0] for name, *_ in fake_cupy.launches] == [
        f"statistics_channels_{family}", "finalize_moments", "merge_ranks", f"normalize_channels_{family}",
        f"gradient_sums_channels_{family}", f"input_gradient_channels_{family}"]
    # The local moments come from the plain statistics kernel, the local gradient sums finalize themselves.
    assert not _finalizing(fake_cupy.launches[0][0]) and _finalizing(fake_cupy.launches[4][0])
    _check_arguments(fake_cupy.launches, dtype)


@pytest.mark.parametrize("dtype, shape, layout, vec, group", [
    (torch.float32, (8, 6, 16, 16), "contiguous", 4, 1), (torch.bfloat16, (16, 16, 8, 8), "channels_last", 8, 1),
    (torch.float32, (64, 16, 7, 7), "contiguous", 4, 4), (torch.float32, (8, 6, 8, 8), "channels_last", 1, 1)],
    ids=["fp32-rows", "bf16-channels-last", "fp32-channel-groups", "fp32-6-channels-last"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_ghost_launch_arguments_match_the_kernel_signatures(fake_cupy, dtype, shape, layout, vec, group, momentum):
    """Ghost BatchNorm on the CUDA C kernels, 4 virtual batches: statistics (not finalizing), the
    finalize per virtual batch, normalize; gradient sums, the finalize, dx -- each split kernel with
    the geometry's two-level channel index after its sizes, G x C virtual channels, and 16-byte
    accesses only where each virtual batch starts on 16 bytes and (channels-last) a thread's channels
    lie in one (6 channels: value by value)."""
    from support import make_input, make_params

    chunks, C = 4, shape[1]
    x = make_input(shape, dtype, layout)
    weight, bias, running_mean, running_var = make_params(C, torch.float32 if dtype == torch.bfloat16 else dtype)
    y, mean, invstd = cupy_backend.ghost_forward_train(x, weight, bias, running_mean, running_var, torch.tensor(3),
                                                       momentum, 1e-5, chunks)
    assert y.shape == x.shape and mean.shape == invstd.shape == (chunks * C,)
    grads = cupy_backend.ghost_backward(x, x, weight, mean, invstd, chunks, weight.dtype)
    assert [t.shape for t in grads] == [x.shape, (C,), (C,)]
    family = "first" if layout == "contiguous" else "last"
    assert [name.split("<")[0] for name, *_ in fake_cupy.launches] == [
        f"statistics_channels_{family}", "finalize_ghost_statistics", f"normalize_channels_{family}",
        f"gradient_sums_channels_{family}", "finalize_ghost_gradients", f"input_gradient_channels_{family}"]
    g = cupy_backend.KERNELS.ghost_geometry(x, chunks)
    assert (g.C, g.chunk_channels, g.plan.group if g.channels_first else 1) == (chunks * C, C, group)
    for name, grid, block, args in fake_cupy.launches:
        kernel = name.split("<")[0]
        if "finalize_ghost" in kernel:
            assert grid == (C,), name
            named = dict(zip(_parameter_names(kernel), args))
            assert (named["splits"], named["C"], named["chunks"]) == (g.plan.splits, C, chunks), name
            continue
        assert name.endswith(", true>"), name  # GHOST
        assert not name.startswith(("statistics", "gradient_sums")) or not _finalizing(name), name
        assert f", {vec}, " in name, name
        named = dict(zip(_parameter_names(kernel), args))
        assert [named[k] for k in ("C", "chunk_channels", "chunk_extra")] == [chunks * C, C, g.chunk_extra], name
    _check_arguments(fake_cupy.launches, dtype)


@pytest.mark.parametrize("dtype, shape", [(torch.float32, (32, 2048, 7, 7)), (torch.bfloat16, (32, 4096, 7, 7)),
                                          (torch.float32, (128, 1024, 8, 8)), (torch.bfloat16, (32, 2048, 7, 7))],
                         ids=str)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_the_walk_launch_arguments_match_its_plan(fake_cupy, cooperative, dtype, shape, momentum):
    """The walked forward (channel groups, or rows of S, that fill an H200's 264 resident blocks; bf16
    32x2048x7x7's 256 groups of 8 channels, one block an SM): the WALK instantiation on a grid of the
    plan's blocks, with load_stages buffers of a group's N rows of group x S values as its dynamic
    shared memory, no partials, the batch's ticket only for a cumulative average, and the tiling
    arguments the kernel reads as buffers, the group's channels and its run's places x 16 bytes."""
    from support import make_input, make_params

    x = make_input(shape, dtype)
    weight, bias, running_mean, running_var = make_params(shape[1], torch.float32)
    cupy_backend.forward_train(x, weight, bias, running_mean, running_var, torch.tensor(3), momentum, 1e-5)
    g = cupy_backend.KERNELS.geometry(x)
    run = g.plan.group * g.S
    (name, grid, block, args), = fake_cupy.launches
    assert name.startswith("on_chip_forward_channels_first<") and name.endswith(", true>")  # WALK
    blocks = 132 if g.C // g.plan.group < 2 * 132 else 2 * 132
    assert grid == (blocks, 1) and block == (compilation.THREADS,)
    assert cooperative == [(f"on_chip_forward_channels_first_{16 // x.element_size()}_walk", 3 * g.N * run *
                            x.element_size(), blocks)]
    assert args[3] == args[4] == args[5] == 0                      # no partials
    assert (args[11] != 0) == (momentum is None)                    # the ticket of a cumulative average
    assert [int(a) for a in args[24:27]] == [3, g.plan.group, plan.next_power_of_2(run)]
    assert g.plan.group == (16 // x.element_size() if g.S == 49 else 1)
    _check_arguments(fake_cupy.launches, dtype)


@pytest.mark.parametrize("dtype, shape", [(torch.float32, (64, 2048, 7, 7)), (torch.bfloat16, (32, 4096, 7, 7)),
                                          (torch.float32, (128, 1024, 8, 8))], ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_the_backward_walk_launch_arguments_match_its_plan(fake_cupy, cooperative, dtype, shape, relu):
    """The walked backward (channel groups, or rows of S, that fill an H200's resident blocks): the
    WALK instantiation of on_chip_backward, with the ReLU's mask where asked (FUSED, the bias passed),
    on one block an SM, with load_stages buffers of a group's dy and x (2 x N rows of group x S
    values) as its dynamic shared memory -- 64x2048x7x7 fp32's two of 2 x 50 KB -- no partials nor
    counters, and the forward walk's tiling arguments."""
    from support import make_input, make_params

    x = make_input(shape, dtype)
    weight, bias, _, _ = make_params(shape[1], torch.float32)
    mean, invstd = torch.zeros(shape[1]), torch.ones(shape[1])
    cupy_backend.backward(x, x, weight, mean, invstd, True, True, True, **(dict(bias=bias, relu=True) if relu else {}))
    g = cupy_backend.KERNELS.geometry(x, x)
    run, stages = g.plan.group * g.S, g.on_chip_backward.load_stages
    (name, grid, block, args), = fake_cupy.launches
    assert name.startswith("on_chip_backward_channels_first<")
    assert name.endswith((", true, true>" if relu else ", false, true>"))  # FUSED, WALK
    assert grid == (132, 1) and block == (compilation.THREADS,)
    role = f"on_chip_backward_channels_first_{16 // x.element_size()}" + ("_fused" if relu else "") + "_walk"
    assert cooperative == [(role, stages * 2 * g.N * run * x.element_size(), 132)]
    assert stages == (2 if shape == (64, 2048, 7, 7) else 3) and cooperative[0][1] <= 200 * 1024
    assert (args[6] != 0) == relu                                   # the bias, for the mask
    assert args[9] == args[10] == args[11] == 0                     # no partials, no counters
    assert [int(a) for a in args[22:26]] == [0, stages, g.plan.group, plan.next_power_of_2(run)]
    _check_arguments(fake_cupy.launches, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_the_masked_16_bit_channels_last_gradient_sums_launch_with_their_copy_ring(fake_cupy, monkeypatch, dtype,
                                                                                     relu):
    """The split channels-last gradient sums of 16-bit inputs through the ReLU's mask launch with
    their ring of MASKED_RING_BUFFERS copies (2 rows of dy and x a thread each) as dynamic shared
    memory, the kernel's limit raised to it (above 48 KB a block, static and dynamic, it must be);
    every other launch of the backward, and the same sums without the mask or in fp32, with none.
    They are compiled in the module of the kernels with dynamic shared memory."""
    import dataclasses

    from support import make_input, make_params

    monkeypatch.setattr(plan, "GPU_TUNING", dataclasses.replace(plan.GPU_TUNING, on_chip_bytes=0))
    cupy_launcher.with_shared_memory.cache_clear()
    x = make_input((64, 256, 8, 8), dtype, "channels_last")
    weight, bias, _, _ = make_params(256, torch.float32)
    mean, invstd = torch.zeros(256), torch.ones(256)
    cupy_backend.backward(x, x, weight, mean, invstd, True, True, True, **(dict(bias=bias, relu=True) if relu else {}))
    g = cupy_backend.KERNELS.geometry(x, x)
    assert not g.channels_first and not g.single_pass and g.on_chip_backward is None
    ring = compilation.MASKED_RING_BUFFERS * 2 * 2 * compilation.THREADS * compilation.VECTOR_BYTES
    masked = relu and dtype != torch.float32
    expected = [ring if masked and name.startswith("gradient_sums_channels_last") else 0
                for name, *_ in fake_cupy.launches]
    assert [name.split("<")[0] for name, *_ in fake_cupy.launches] == ["gradient_sums_channels_last",
                                                                         "input_gradient_channels_last"]
    assert fake_cupy.shared_mem == expected and ring == 80 * 1024
    _check_arguments(fake_cupy.launches, dtype)
    cupy_launcher.with_shared_memory.cache_clear()
    # Compiled apart from the kernels without dynamic shared memory, as the on-chip kernels are.
    _, dynamic, _ = compilation.kernel_modules(*cupy_table.c_types(dtype, torch.float32, torch.float32))
    assert {role for role in dynamic if not role.startswith("on_chip_")} == (
        {"gradient_sums_channels_last_8_fused", "gradient_sums_channels_last_8_fused_finalized"}
        if dtype != torch.float32 else set())


@pytest.mark.skipif(NVCC is None or model.tool("cuobjdump") is None, reason="no nvcc or cuobjdump found")
def test_the_masked_16_bit_channels_last_gradient_sums_keep_four_copies_in_flight(sm_90_resources, sm_90_sass):
    """Their ring, on sm_90: each waits on its copies with 4 groups left (MASKED_RING_BUFFERS - 1
    in flight while it adds the fifth), static and dynamic shared memory hold exactly 2 blocks an SM
    (their registers would fit 3, and the grid, sized for 4, would end on a partial wave), and the
    copies a thread keeps at once are 5 x 2 x 2 x 16 bytes; the unmasked 16-bit sums keep their two
    static buffers (one wait with a group left)."""
    # <T, W, A, VEC = 8, FUSED, FINALIZE, GHOST = false>, T __half or __nv_bfloat16
    kernels = {name: r for name, r in sm_90_resources.items()
               if re.match(r"_Z27gradient_sums_channels_lastI(6__half|13__nv_bfloat16)\w+Li8ELb[01]ELb[01]ELb0EEv", name)}
    assert len(kernels) == 2 * 2 * 2 * 2, sorted(kernels)  # 2 dtypes x 2 weight dtypes x FUSED x FINALIZE
    ring = compilation.MASKED_RING_BUFFERS * compilation.RING_COPY_BYTES
    for name, r in kernels.items():
        fused = "Li8ELb1E" in name
        waits = {int(m.group(1), 16) for ins in sm_90_sass[name]
                 for m in [re.search(r"SB0, (0x[0-9a-f]+)", ins.operands)] if ins.opcode.startswith("DEPBAR") and m}
        assert (compilation.MASKED_RING_BUFFERS - 1 if fused else 1) in waits, (name, waits)
        assert _blocks_an_sm(name, r, ring if fused else 0) >= 2, (name, r)
        if fused:
            assert _blocks_an_sm(name, r, ring) == 2, (name, r)
        streaming = model.main_loops(sm_90_sass[name])[0]
        at_once = (compilation.MASKED_RING_BUFFERS if fused else 2) * compilation.RING_COPY_BYTES // compilation.THREADS
        assert streaming.loads_at_once_bits == 8 * at_once, (name, streaming)


@pytest.mark.skipif(NVRTC is None, reason="no NVRTC library (CUDA toolkit or nvidia-cuda-nvrtc wheel) found")
def test_nvrtc_compiles_every_name_expression(nvrtc_run):
    """What CuPy does at run time: NVRTC (no host headers) with the backend's name expressions, to
    machine code for sm_80 (Ampere: the sm_90 object is nvcc's), without a warning."""
    if nvrtc_run is None:
        pytest.skip("NVRTC found, but no CUDA headers (cuda_fp16.h) to compile against")
    stdout, stderr = nvrtc_run.communicate(timeout=900)
    assert nvrtc_run.returncode == 0, stderr[-4000:]
    result = json.loads(stdout.splitlines()[-1])
    assert result["status"] == 0, result["log"][-4000:]
    assert "warning" not in result["log"].lower(), result["log"][-4000:]
    assert result["cubin_bytes"] > 0 and result["names"] > 0 and result["unlowered"] == []


@pytest.mark.parametrize("dtype, channels, vec", [(torch.bfloat16, 16, 8), (torch.float32, 16, 4),
                                                  (torch.float64, 6, 2), (torch.bfloat16, 12, 1),
                                                  (torch.float32, 6, 1)], ids=str)
def test_channels_last_kernels_read_16_bytes_of_channels_where_c_allows(fake_cupy, dtype, channels, vec):
    """A channels-last thread owns 16 bytes of consecutive channels when C is a multiple of that many
    values (else one channel, VEC = 1); a block has block_c / VEC threads across channels and the
    rest of its 256 along rows."""
    from support import make_input, make_params

    x = make_input((4, channels, 8, 8), dtype, "channels_last")
    weight, bias, running_mean, running_var = make_params(channels, torch.float32 if dtype == torch.bfloat16 else dtype)
    cupy_backend.forward_train(x, weight, bias, running_mean, running_var, torch.tensor(3), 0.1, 1e-5)
    g = cupy_backend.KERNELS.geometry(x)
    assert g.plan.block_c == min(plan.next_power_of_2(channels), 32 * 16 // x.element_size())
    for name, grid, block, _ in fake_cupy.launches:
        assert f", {vec}, " in name or name.endswith(f", {vec}>"), name
        assert block == (g.plan.block_c // vec, 256 // (g.plan.block_c // vec)) and grid[1] == g.plan.c_blocks
    # A view whose rows start one value in (not 16 bytes) takes the scalar kernels.
    fake_cupy.launches.clear()
    offset = make_input((4, channels + 1, 8, 8), dtype, "channels_last")[:, 1:]
    assert offset.stride()[1] == 1 and (vec == 1 or offset.data_ptr() % 16)
    cupy_backend.forward_train(offset, weight, bias, running_mean, running_var, torch.tensor(3), 0.1, 1e-5)
    assert all(", 1, " in name or name.endswith(", 1>") for name, *_ in fake_cupy.launches)
    _check_arguments(fake_cupy.launches, dtype)


@pytest.mark.parametrize("dtype, group, vec", [(torch.bfloat16, 8, 8), (torch.float32, 4, 4), (torch.float64, 2, 2)],
                         ids=str)
def test_channels_first_blocks_own_channel_groups_where_rows_cannot_start_on_16_bytes(fake_cupy, dtype, group, vec,
                                                                                      cuda_kernel_path):
    """7x7 planes: a block owns `group` adjacent channels, whose rows together start on 16 bytes, and
    reads them 16 bytes at a time; a misaligned view still takes the grouped kernels, value by value."""
    from support import make_input, make_params

    C = 16
    x = make_input((64, C, 7, 7), dtype, "contiguous")
    weight, bias, running_mean, running_var = make_params(C, torch.float32 if dtype == torch.bfloat16 else dtype)
    mean, invstd = torch.zeros(C, dtype=stat_dtype(dtype)), torch.ones(C, dtype=stat_dtype(dtype))

    def launch_all(x):
        cupy_backend.forward_train(x, weight, bias, running_mean, running_var, torch.tensor(3), 0.1, 1e-5)
        cupy_backend.forward_eval(x, weight, bias, running_mean, running_var, 1e-5, residual=x, relu=True)
        cupy_backend.backward(x, x, weight, mean, invstd, True, True, True)

    launch_all(x)
    g = cupy_backend.KERNELS.geometry(x)
    assert g.plan.group == group and g.plan.block_s >= group * 49
    assert len(fake_cupy.launches) == (5 if cuda_kernel_path == "split" else 3)
    for name, grid, block, _ in fake_cupy.launches:
        assert "_channels_first<" in name and name.endswith((", true>", ", true, false>")), name  # GROUPED(, GHOST)
        assert f", {vec}, " in name, name
        assert grid == (C // group, g.plan.splits) and block == (256,)
    _check_arguments(fake_cupy.launches, dtype)
    fake_cupy.launches.clear()
    offset = make_input((64 * C * 49 + 1,), dtype, "contiguous")[1:].view(64, C, 7, 7)  # 2-8 bytes off 16
    assert offset.data_ptr() % 16
    launch_all(offset)
    assert all(name.endswith((", true>", ", true, false>")) and ", 1, " in name for name, *_ in fake_cupy.launches)
    _check_arguments(fake_cupy.launches, dtype)


@pytest.mark.parametrize("dtype, vec", [(torch.bfloat16, 8), (torch.float32, 4)], ids=str)
def test_channels_first_kernels_read_16_bytes_only_where_rows_hold_whole_groups(fake_cupy, dtype, vec, kernel_path):
    """The channels-first kernels have no value-by-value tail: they take 16-byte groups where S is a
    multiple of the width (as well as the strides and pointers), and a sliced view whose rows end
    mid-group, its pointer and strides aligned, is read value by value -- the statistics kernel too,
    the one launch whose only tensor is x."""
    from support import make_input, make_params

    C = 3
    weight, bias, running_mean, running_var = make_params(C, torch.float32 if dtype == torch.bfloat16 else dtype)
    whole = make_input((256, C, 64), dtype, "contiguous")
    cupy_backend.forward_train(whole, weight, bias, running_mean, running_var, torch.tensor(3), 0.1, 1e-5)
    names = [name for name, *_ in fake_cupy.launches]
    first = {"split": "statistics_", "single-pass": "single_pass_", "on-chip": "on_chip_"}[kernel_path]
    assert names[0].startswith(first), names
    assert all(f", {vec}, " in name for name in names if "finalize" not in name), names
    assert not cupy_backend.KERNELS.geometry(whole).channel_groups
    fake_cupy.launches.clear()
    sliced = whole[..., :62]  # rows of 62 values, 64 apart: row and channel strides of 16-byte multiples
    assert all(stride % vec == 0 for stride in sliced.stride()[:2]) and sliced.data_ptr() % 16 == 0
    cupy_backend.forward_train(sliced, weight, bias, running_mean, running_var, torch.tensor(3), 0.1, 1e-5)
    g = cupy_backend.KERNELS.geometry(sliced)
    assert not g.channel_groups and not g.copy_input and g.S == 62
    names = [name for name, *_ in fake_cupy.launches]
    assert names and all(", 1, " in name for name in names if "finalize" not in name), names
    _check_arguments(fake_cupy.launches, dtype)


@pytest.mark.skipif(NVCC is None or model.tool("cuobjdump") is None, reason="needs nvcc and cuobjdump")
@pytest.mark.parametrize("mangled_prefix,groups", [
    ("_Z24normalize_channels_firstIffffLi4ELb0ELb0ELb0EE", 4),
    ("_Z24normalize_channels_firstI13__nv_bfloat16fffLi8ELb0ELb0ELb0EE", 4),
    # Channel groups (7x7 planes): a thread's place, 4 rows loaded before the first is used.
    ("_Z34single_pass_forward_channels_firstIffffLi4ELb0ELb1EE", 4),
    ("_Z24normalize_channels_firstIffffLi4ELb0ELb1ELb0EE", 2),
])
def test_channels_first_normalize_loads_four_groups_before_it_stores(sm_90_sass, mangled_prefix, groups):
    """Normalize loads 4 groups of 16 bytes (through the read-only path) before it stores the first:
    through plain loads nvcc kept each load behind the store before it (y might have been x), so a
    thread had one load in flight (run 7 on an H200: the fp32 pass at 66% of its floor on 64x256x56x56).
    The channel-group walks batch their rows the same way; nvcc keeps 2 of the grouped fp32
    normalize's 4 at once (the previous source: 1)."""
    (name,) = [name for name in sm_90_sass if name.startswith(mangled_prefix)]
    streaming = model.main_loops(sm_90_sass[name])[0]
    assert streaming.loads_at_once_bits >= groups * 128, streaming
