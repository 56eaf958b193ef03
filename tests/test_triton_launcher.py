"""The Triton backend's launcher without a GPU: the JIT compiles and launches a specialization
once, later launches with the same specialization call the compiled kernel directly with every
argument in parameter order, and anything that changes the specialization goes back to the JIT."""
import types

import pytest
import torch

from bn_gpu import launches, triton_backend


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
    monkeypatch.setattr(triton_backend, "_current_stream", lambda: 7)
    result = triton_backend.Launcher(direct=True)
    result.direct = True  # also under the interpreter: the fakes need no GPU
    return result


def test_second_launch_of_a_specialization_skips_the_jit(launcher):
    kernel = FakeKernel(["x_ptr", "n", "eps", "BLOCK", "FLAG"], {"BLOCK", "FLAG"})
    x = torch.zeros(64)
    meta = dict(BLOCK=128, FLAG=True, num_warps=4)
    launcher(kernel, (3, 2), [x, 64, 0.5], meta)
    assert len(kernel.jit_launches) == 1 and not kernel.compiled.runs
    launcher(kernel, (3, 2), [x, 64, 0.25], meta)  # another float: same specialization
    assert len(kernel.jit_launches) == 1
    assert kernel.compiled.runs == [(3, 2, 1, 7, "function", "metadata", None, None, None, x, 64, 0.25, 128, True)]


@pytest.mark.parametrize("change", ["misaligned", "int", "dtype", "meta", "grid"])
def test_a_new_specialization_goes_through_the_jit(launcher, change):
    kernel = FakeKernel(["x_ptr", "n", "BLOCK"], {"BLOCK"})
    buffer = torch.zeros(64)
    args, meta, grid = [buffer, 64], dict(BLOCK=128, num_warps=4), (3,)
    launcher(kernel, grid, args, meta)
    if change == "misaligned":
        args = [buffer[1:], 64]  # 4 bytes past a 16-byte boundary
    elif change == "int":
        args = [buffer, 1]  # Triton specializes integers equal to 1
    elif change == "dtype":
        args = [buffer.double(), 64]
    elif change == "meta":
        meta = dict(BLOCK=256, num_warps=4)
    else:
        grid = (4,)
    launcher(kernel, grid, args, meta)
    assert len(kernel.jit_launches) == 2 and not kernel.compiled.runs


def test_triton_default_hooks_count_as_none():
    """Triton's own defaults (empty hook chains, or None) leave the direct path on: with the check
    comparing them to None, no launch ever took it (seen on an H200 with Triton 3.6)."""
    assert triton_backend._no_launch_hooks()


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
        assert not triton_backend._no_launch_hooks()
        for _ in range(3):
            launcher(kernel, (1,), [torch.zeros(4)], dict(BLOCK=4))
    finally:
        cleanup()
    assert len(kernel.jit_launches) == 3 and not kernel.compiled.runs


def test_a_compiled_kernel_without_the_launcher_api_turns_direct_launches_off(launcher):
    kernel = FakeKernel(["x_ptr", "BLOCK"], {"BLOCK"})
    kernel.compiled = object()
    for _ in range(2):
        launcher(kernel, (1,), [torch.zeros(4)], dict(BLOCK=4))
    assert len(kernel.jit_launches) == 2 and launcher.direct is False


def test_direct_launches_are_the_default_but_never_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("BN_GPU_DIRECT_LAUNCH", raising=False)
    assert triton_backend.Launcher().direct is (not triton_backend.interpreting())
    monkeypatch.setenv("BN_GPU_DIRECT_LAUNCH", "0")
    assert triton_backend.Launcher().direct is False
    monkeypatch.setenv("BN_GPU_DIRECT_LAUNCH", "1")
    assert triton_backend.Launcher().direct is (not triton_backend.interpreting())
    assert triton_backend.Launcher(direct=True).direct is (not triton_backend.interpreting())


def test_a_launcher_that_refuses_the_arguments_falls_back_to_the_jit(launcher):
    kernel = FakeKernel(["x_ptr", "BLOCK"], {"BLOCK"})

    def refuse(*args):
        raise TypeError("launcher takes other arguments")

    kernel.compiled.run = refuse
    x = torch.zeros(4)
    for _ in range(3):
        launcher(kernel, (1,), [x], dict(BLOCK=4))
    assert len(kernel.jit_launches) == 3 and launcher.direct is False


def test_pointers_floats_and_integers_in_the_key(launcher):
    """The key looks at the leading pointers (a tensor's dtype and alignment, or None) and takes the
    rest as they are, floats by type: a launch with other floats reuses the compiled kernel, one
    with a pointer given where it was None (or the reverse) or another integer does not."""
    kernel = FakeKernel(["x_ptr", "w_ptr", "n", "eps", "stride", "momentum", "BLOCK"], {"BLOCK"})
    x, w = torch.zeros(64), torch.zeros(8)
    meta = dict(BLOCK=64)
    launcher(kernel, (2,), [x, None, 64, 1e-5, 8, 0.1], meta)
    launcher(kernel, (2,), [x, None, 64, 1e-3, 8, 0.5], meta)
    assert len(kernel.jit_launches) == 1 and len(kernel.compiled.runs) == 1
    launcher(kernel, (2,), [x, w, 64, 1e-5, 8, 0.1], meta)
    launcher(kernel, (2,), [x, None, 64, 1e-5, 16, 0.1], meta)
    assert len(kernel.jit_launches) == 3
    launcher(kernel, (2,), [x, w, 64, 0.25, 8, 0.0], meta)
    assert len(kernel.jit_launches) == 3 and len(kernel.compiled.runs) == 2
    assert kernel.compiled.runs[-1][9:] == (x, w, 64, 0.25, 8, 0.0, 64)


def test_a_tensor_past_the_pointers_is_never_kept_in_a_key(launcher):
    """The kinds of a kernel's arguments come from its first launch; a launch that breaks them (a
    tensor where that one had an integer) goes through the JIT and leaves no key holding the tensor."""
    kernel = FakeKernel(["x_ptr", "n", "BLOCK"], {"BLOCK"})
    launcher(kernel, (1,), [torch.zeros(4), 4], dict(BLOCK=4))
    for _ in range(2):
        launcher(kernel, (1,), [torch.zeros(4), torch.zeros(4)], dict(BLOCK=4))
    assert len(kernel.jit_launches) == 3 and len(launcher.compiled) == 1


@pytest.mark.parametrize("op", launches.OPS + launches.SYNC_OPS)
@pytest.mark.parametrize("shape,layout", [((64, 64, 56, 56), "contiguous"), ((64, 64, 56, 56), "channels_last"),
                                          ((64, 2048, 7, 7), "contiguous"), ((5, 3), "contiguous")])
def test_every_launch_passes_its_pointers_first(op, shape, layout):
    """What the key relies on: in every Triton launch the backend makes (recorded on meta tensors,
    both paths, with and without the epilogue), no tensor comes after the first scalar."""
    for epilogue in (False, True):
        if epilogue and op in launches.SYNC_OPS:
            continue
        recorded = launches.record("triton", op, shape, torch.bfloat16, layout, epilogue=epilogue)
        assert recorded
        for launch in recorded:
            pointers, _ = triton_backend._argument_kinds(launch.args)
            assert not any(isinstance(a, torch.Tensor) for a in launch.args[pointers:]), launch.name
