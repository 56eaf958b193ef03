"""The Triton backend's launcher without a GPU: the JIT compiles and launches a specialization
once, later launches with the same specialization call the compiled kernel directly with every
argument in parameter order, and anything that changes the specialization goes back to the JIT."""
import types

import pytest
import torch

from bn_gpu.backends.plan import interpreting
from bn_gpu.backends.triton import launcher as triton_launcher
from bn_gpu.tools import launches


class FakeCompiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self):
        self.runs = []

    def run(self, *args):
        self.runs.append(args)


class FakeKernel:
    """A JITFunction's surface: params, and kernel[grid](*args, **meta) returning the compiled kernel."""

    def __init__(self, names, constexprs):
        self.params = [types.SimpleNamespace(name=n, is_constexpr=n in constexprs) for n in names]
        self.jit_launches = []
        self.compiled = FakeCompiled()

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.jit_launches.append((grid, args, meta))
            return self.compiled
        return launch


@pytest.fixture
def launcher(monkeypatch):
    monkeypatch.setattr(triton_launcher, "current_stream", lambda: 7)
    result = triton_launcher.Launcher(direct=True)
    result.direct = True  # also under the interpreter: the fakes need no GPU
    return result


def site(kernel, grid, meta, head=(), tail=()):
    return triton_launcher.Site(kernel, grid, meta, head, tail)


def test_second_launch_of_a_specialization_skips_the_jit(launcher):
    kernel = FakeKernel(["x_ptr", "n", "eps", "BLOCK", "FLAG"], {"BLOCK", "FLAG"})
    x = torch.zeros(64)
    at = site(kernel, (3, 2), dict(BLOCK=128, FLAG=True, num_warps=4), head=(64,))
    launcher(at, (x,), (0.5,))
    assert kernel.jit_launches == [((3, 2), (x, 64, 0.5), dict(BLOCK=128, FLAG=True, num_warps=4))]
    assert not kernel.compiled.runs
    launcher(at, (x,), (0.25,))  # another float: same specialization
    assert len(kernel.jit_launches) == 1
    assert kernel.compiled.runs == [(3, 2, 1, 7, "function", "metadata", None, None, None, x, 64, 0.25, 128, True)]


@pytest.mark.parametrize("change", ["misaligned", "dtype", "none", "site"])
def test_a_new_specialization_goes_through_the_jit(launcher, change):
    """A pointer's alignment, dtype or presence, or another site (other integers, constexprs or
    grid: each site is one geometry's and flags' launch), is another specialization."""
    kernel = FakeKernel(["x_ptr", "w_ptr", "n", "BLOCK"], {"BLOCK"})
    buffer, weight = torch.zeros(64), torch.zeros(8)
    at = site(kernel, (3,), dict(BLOCK=128, num_warps=4), head=(64,))
    launcher(at, (buffer, weight))
    pointers = (buffer, weight)
    if change == "misaligned":
        pointers = (buffer[1:], weight)  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        pointers = (buffer.double(), weight)
    elif change == "none":
        pointers = (buffer, None)
    else:
        at = site(kernel, (3,), dict(BLOCK=128, num_warps=4), head=(64,))
    launcher(at, pointers)
    assert len(kernel.jit_launches) == 2 and not kernel.compiled.runs


def test_triton_default_hooks_count_as_none():
    """Triton's own defaults (empty hook chains, or None) leave the direct path on: with the check
    comparing them to None, no launch ever took it (seen on an H200 with Triton 3.6)."""
    assert triton_launcher.no_launch_hooks()


def test_launch_hooks_keep_every_launch_on_the_jit(launcher):
    import triton
    hook = triton.knobs.runtime.launch_enter_hook
    kernel = FakeKernel(["x_ptr", "BLOCK"], {"BLOCK"})
    if hasattr(hook, "add"):
        hook.add(print)
        cleanup = lambda: hook.remove(print)  # noqa: E731
    else:
        triton.knobs.runtime.launch_enter_hook = print
        cleanup = lambda: setattr(triton.knobs.runtime, "launch_enter_hook", hook)  # noqa: E731
    try:
        assert not triton_launcher.no_launch_hooks()
        at = site(kernel, (1,), dict(BLOCK=4))
        for _ in range(3):
            launcher(at, (torch.zeros(4),))
    finally:
        cleanup()
    assert len(kernel.jit_launches) == 3 and not kernel.compiled.runs


def test_a_compiled_kernel_without_the_launcher_api_turns_direct_launches_off(launcher):
    kernel = FakeKernel(["x_ptr", "BLOCK"], {"BLOCK"})
    kernel.compiled = object()
    at = site(kernel, (1,), dict(BLOCK=4))
    for _ in range(2):
        launcher(at, (torch.zeros(4),))
    assert len(kernel.jit_launches) == 2 and launcher.direct is False


def test_direct_launches_are_the_default_but_never_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("BN_GPU_DIRECT_LAUNCH", raising=False)
    assert triton_launcher.Launcher().direct is (not interpreting())
    monkeypatch.setenv("BN_GPU_DIRECT_LAUNCH", "0")
    assert triton_launcher.Launcher().direct is False
    monkeypatch.setenv("BN_GPU_DIRECT_LAUNCH", "1")
    assert triton_launcher.Launcher().direct is (not interpreting())
    assert triton_launcher.Launcher(direct=True).direct is (not interpreting())


def test_a_launcher_that_refuses_the_arguments_falls_back_to_the_jit(launcher):
    kernel = FakeKernel(["x_ptr", "BLOCK"], {"BLOCK"})

    def refuse(*args):
        raise TypeError("launcher takes other arguments")

    kernel.compiled.run = refuse
    x, at = torch.zeros(4), site(kernel, (1,), dict(BLOCK=4))
    for _ in range(3):
        launcher(at, (x,))
    assert len(kernel.jit_launches) == 3 and launcher.direct is False


@pytest.mark.parametrize("op", launches.OPS + launches.SYNC_OPS)
@pytest.mark.parametrize("shape,layout", [((64, 64, 56, 56), "contiguous"), ((64, 64, 56, 56), "channels_last"),
                                          ((64, 2048, 7, 7), "contiguous"), ((5, 3), "contiguous")])
def test_every_launch_passes_tensors_ints_and_floats_where_the_key_expects_them(op, shape, layout, monkeypatch):
    """What the key relies on: in every Triton launch the backend makes (recorded on meta tensors,
    both paths, with and without the epilogue), the pointers are tensors or None, the site's
    arguments integers (their values are in the site) and the per-call scalars Python floats (the
    JIT specializes none)."""
    checked = []
    args = triton_launcher.Site.args

    def checked_args(site, pointers, floats):
        assert all(p is None or isinstance(p, torch.Tensor) for p in pointers), site.kernel.__name__
        assert all(type(v) is int for v in (*site.head, *site.tail)), site.kernel.__name__
        assert all(type(v) is float for v in floats), site.kernel.__name__
        checked.append(site)
        return args(site, pointers, floats)

    monkeypatch.setattr(triton_launcher.Site, "args", checked_args)
    for epilogue in (False, True):
        if epilogue and op in launches.SYNC_OPS:
            continue
        recorded = launches.record("triton", op, shape, torch.bfloat16, layout, epilogue=epilogue)
        assert recorded and len(checked) >= len(recorded)
