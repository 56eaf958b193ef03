"""The on-chip kernels (x, and dy, read once): the planner's choice at its limit, both of their modes
-- the exchange (a channel group's programs meet at a barrier) and the walk (a program holds whole
groups) -- against the float64 reference with every buffer poisoned, bitwise determinism, counters
left at zero, and the launcher's residency rule. The kernel_path fixture's "on-chip" path also runs
the op, epilogue, numerics and replay tests through them."""
import dataclasses
import types

import pytest
import torch
import triton.language as tl  # noqa: F401 (the interpreter wants it in a kernel's globals: see Failing)
from support import (assert_close, assert_parameter_grads_close, assert_stats_close, backend_devices, make_input,
                     make_params)

import bn_gpu.backends.plan as plans
from bn_gpu import reference as ref
from bn_gpu.backends import orchestration
from bn_gpu.backends.plan import OnChipPlan, Tuning, on_chip_plan

TRITON_DEVICES = [pair for pair in backend_devices() if pair.values[0] == "triton"]
SMS = plans.INTERPRETER_SMS


def _tuning(tile_bytes, on_chip_bytes, **fields) -> Tuning:
    return dataclasses.replace(plans.INTERPRETER_TUNING, tile_bytes=tile_bytes, on_chip_bytes=on_chip_bytes,
                               programs_per_sm=64, on_chip_programs_per_sm=2, **fields)


@pytest.fixture
def tuned(monkeypatch):
    """Set the tuning of both devices (the GPU's with the interpreter's multiprocessors, so that a GPU
    takes the same plans: fewer resident programs than it holds)."""
    def tune(tuning: Tuning):
        monkeypatch.setattr(plans, "INTERPRETER_TUNING", tuning)
        monkeypatch.setattr(plans, "GPU_TUNING", dataclasses.replace(tuning, num_warps=plans.GPU_TUNING.num_warps))
        monkeypatch.setattr(plans, "multiprocessors", lambda index: SMS)
    return tune


# ---- the planner ----------------------------------------------------------------------------------

def test_the_plan_holds_what_fits_and_no_more():
    """At the limit: an SM holds on_chip_bytes of accumulation-dtype values (x; x and dy in the
    backward), 16-bit values counted widened -- a walking program all of it, each of the two
    exchanging programs of an SM half; one value more and the two-pass plans remain."""
    tuning = _tuning(256, 1024)  # 256 fp32 values an SM, 128 an exchanging program
    # 4 channel groups of 8 tiles of 32 values: fill 4 x 2 resident programs -> 2 programs a group.
    plan = on_chip_plan(8, 32, 4, 1, 4, tuning, SMS, streams=1)
    assert plan == OnChipPlan(held=4, splits=2, programs=8, block_splits=2, load_stages=tuning.load_stages, resident=2)
    assert plan.exchange
    assert on_chip_plan(8, 32 + 1, 4, 1, 4, tuning, SMS, streams=1) is None  # a share of 132 values
    # At the limit: 8 tiles of 32 values a group, held whole (8 groups fill the resident programs) by
    # one program an SM that walks them.
    walk = on_chip_plan(8, 32, 8, 1, 4, tuning, SMS, streams=1)
    assert walk.held * 32 == 256 and walk.splits == 1 and not walk.exchange and walk.programs == SMS
    assert walk.resident == 0
    assert on_chip_plan(8, 32 + 1, 8, 1, 4, tuning, SMS, streams=1) is None  # a value more than fits
    assert on_chip_plan(8, 32, 8, 1, 4, tuning, SMS, streams=2) is None      # the backward holds x and dy
    assert on_chip_plan(4, 32, 8, 1, 4, tuning, SMS, streams=2).held == 4
    assert on_chip_plan(8, 32, 8, 1, 2, tuning, SMS, streams=1).held == 8    # 16-bit: counted widened
    assert on_chip_plan(8, 32, 8, 1, 8, tuning, SMS, streams=1) is None      # float64: 8 bytes a value
    assert on_chip_plan(8, 32, 8, 1, 4, dataclasses.replace(tuning, on_chip_bytes=0), SMS, 1) is None
    assert on_chip_plan(0, 32, 8, 1, 4, tuning, SMS, streams=1) is None      # an empty batch


def test_a_split_group_is_spread_over_the_resident_programs_and_no_further():
    tuning = _tuning(256, 4096)  # 512 fp32 values an exchanging program, tiles of 64 values
    resident = SMS * tuning.on_chip_programs_per_sm
    plan = on_chip_plan(16, 64, 1, 1, 4, tuning, SMS, streams=1)  # one group of 16 tiles: 8 programs of 2
    assert (plan.splits, plan.held, plan.programs) == (8, 2, 8) and plan.programs <= resident
    # A small group is not spread over more programs than it has tiles of values.
    small = on_chip_plan(2, 64, 1, 1, 4, tuning, SMS, streams=1)
    assert (small.splits, small.held) == (2, 1)
    # Partials merge BLOCK_SPLITS rows at a time, FUSED_FINALIZE_TILE values of them in all.
    wide = on_chip_plan(64, 64, 1, 256, 4, dataclasses.replace(tuning, on_chip_programs_per_sm=8), SMS, 1)
    assert (wide.splits, wide.held) == (32, 2) and wide.block_splits == plans.FUSED_FINALIZE_TILE // 256
    # A program holds no more than its share, however few programs the values would fill.
    fewer = on_chip_plan(16, 64, 1, 1, 4, dataclasses.replace(tuning, tile_bytes=65536), SMS, 1)
    assert (fewer.held, fewer.splits) == (8, 2)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_geometry_takes_the_on_chip_plan_up_to_the_limit(tuned, layout):
    """The Triton geometry of an input that fits has the on-chip plans; one whose programs would
    need more than on_chip_bytes keeps the two-pass plans alone (the CUDA C backend's plans:
    tests/backends/test_cuda_on_chip.py)."""
    from bn_gpu.backends.triton.table import KERNELS

    tuned(_tuning(256, 2048))
    fits = make_input((4, 3, 5, 7), torch.float32, layout)
    g = KERNELS.geometry(fits)
    assert g.on_chip is not None and g.on_chip_backward is not None
    assert g.on_chip.exchange  # 3 channels (blocks) on 8 resident programs
    assert KERNELS.geometry(make_input((64, 3, 5, 7), torch.float32, layout)).on_chip is None


# ---- the kernels against float64 ------------------------------------------------------------------

# (shape, layout, tile_bytes, on_chip_bytes, dtype) -> (forward's mode, backward's mode) in the
# interpreter's plans (4 SMs of 2 resident programs).
CASES = {
    ((4, 3, 5, 7), "contiguous", 256, 2048, torch.float32): ("exchange", "exchange"),
    ((2, 6, 5, 7), "contiguous", 256, 2048, torch.float32): ("walk", "walk"),
    ((4, 8, 7, 7), "contiguous", 1024, 16384, torch.float32): ("exchange", "exchange"),   # groups of 4 channels
    ((4, 32, 7, 7), "contiguous", 1024, 16384, torch.float32): ("walk", "walk"),
    ((4, 8, 7, 7), "contiguous", 1024, 16384, torch.bfloat16): ("exchange", "exchange"),  # groups of 8
    ((4, 3, 5, 7), "channels_last", 256, 2048, torch.float32): ("exchange", "exchange"),
    ((4, 3, 5, 7), "channels_last", 256, 2048, torch.bfloat16): ("exchange", "exchange"),
    ((16, 5), "contiguous", 256, 2048, torch.float32): ("walk", "walk"),
}


def _mode(plan) -> str:
    return "two-pass" if plan is None else "exchange" if plan.exchange else "walk"


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{'x'.join(map(str, c[0]))}-{c[1]}-{c[4]}".replace(
    "torch.", ""))
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_on_chip_kernels_match_float64(backend, device, case, momentum, tuned, poisoned):
    """Training forward (running statistics, batch counted) and backward (dx, dweight, dbias) in one
    launch each, against the float64 reference; every output and workspace poisoned first."""
    from bn_gpu.backends.triton.table import KERNELS

    shape, layout, tile_bytes, on_chip_bytes, dtype = case
    tuned(_tuning(tile_bytes, on_chip_bytes))
    x = make_input(shape, dtype, layout, device)
    grad_y = make_input(shape, dtype, layout, device, mean=0.0, std=1.0, seed=7)
    C = shape[1]
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    weight, bias, running_mean, running_var = make_params(C, param_dtype, device)
    g = KERNELS.geometry(x, grad_y)
    assert (_mode(KERNELS.geometry(x).on_chip), _mode(g.on_chip_backward)) == CASES[case]
    rm0, rv0 = running_mean.clone(), running_var.clone()
    counter = torch.tensor(3, device=device)
    y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, counter, momentum,
                                                     1e-5, backend)
    y_ref, mean_ref, var_ref, invstd_ref = ref.forward_train(x, weight, bias, 1e-5)
    assert_close(y, y_ref, dtype, "output")
    assert_stats_close(mean, mean_ref, dtype, "mean")
    assert_stats_close(invstd, invstd_ref, dtype, "invstd")
    count = x.numel() // C
    factor = ref.momentum_factor(momentum, 4)  # the counter after this batch
    rm_ref, rv_ref = ref.update_running_stats(rm0, rv0, mean_ref, var_ref, count, factor)
    assert_close(running_mean, rm_ref, param_dtype, "running_mean")
    assert_close(running_var, rv_ref, param_dtype, "running_var")
    assert counter.item() == 4
    grad_x, grad_w, grad_b = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
    grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_train(grad_y, x, weight, 1e-5)
    assert_close(grad_x, grad_x_ref, dtype, "grad_input")
    assert_parameter_grads_close(grad_w, grad_b, grad_w_ref, grad_b_ref, grad_y, dtype)


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_exchange_is_deterministic_and_leaves_its_counters_at_zero(backend, device, layout, tuned):
    """Two calls give the same bits (the partials merge in split order, whichever program arrives
    last), and the barriers' counters are zero again after each (the next launch, a graph replay)."""
    from bn_gpu.backends.triton.table import KERNELS

    tuned(_tuning(256, 2048))
    x = make_input((4, 3, 5, 7), torch.float32, layout, device)
    grad_y = make_input((4, 3, 5, 7), torch.float32, layout, device, mean=0.0, std=1.0, seed=7)
    weight, bias, _, _ = make_params(3, torch.float32, device)
    g = KERNELS.geometry(x, grad_y)
    assert g.on_chip.exchange and g.on_chip_backward.exchange
    results = []
    for _ in range(2):
        y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, None, None, None, 0.1, 1e-5, backend)
        grads = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
        results.append((y, mean, invstd, *grads))
        counters = orchestration.finalize_counters(x.device, orchestration.on_chip_counters(g, g.on_chip, True))
        assert not counters.any()
    for first, second in zip(*results):
        assert torch.equal(first, second)


# ---- the launcher ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_exchange_launches_cooperatively_and_the_walk_does_not(layout):
    """The exchange's sites ask Triton for a cooperative launch (the driver starts every program at
    once or refuses the grid) and the cap that holds 2 programs an SM; the walk, whose programs
    never wait for each other, neither (GPU plans of an H200: 16x64x28x28 exchanges, 64x2048x7x7 walks)."""
    from bn_gpu.backends.triton import sites

    for shape, exchange in (((16, 64, 28, 28), True), ((64, 2048, 7, 7), False)):
        x = make_input(shape, torch.float32, layout, device="meta")
        g = plans.geometry(x, x, plans.GPU_TUNING, 132)
        if g.on_chip is None:  # channels-last 7x7 planes: no channel groups to walk
            assert not exchange and layout == "channels_last"
            continue
        at_sites = [sites.on_chip_forward_site(g, True, True, True, False, True, False, False)]
        if exchange:  # (the Triton backward walks no groups)
            at_sites.append(sites.on_chip_backward_site(g, True, True, True, False))
        assert g.on_chip.exchange == exchange and (g.on_chip_backward is None) == (not exchange)
        for at in at_sites:
            assert at.meta.get("launch_cooperative_grid", False) == exchange, (shape, at.meta)
            assert (at.meta.get("maxnreg") == sites.MAX_REGISTERS) == exchange
            assert bool(at.resident) == exchange


def test_a_refused_cooperative_launch_names_the_way_out(monkeypatch):
    """A cooperative launch the driver refuses (kernels of other streams, or an MPS share the process
    cannot see, hold SMs the grid needs) is reported with BN_GPU_TUNING=on_chip_bytes=0; any other
    error of the launch passes through unchanged."""
    from bn_gpu.backends.triton import launcher

    monkeypatch.setattr(launcher, "interpreting", lambda: False)
    monkeypatch.setattr(launcher, "check_residency", lambda site, args: None)
    errors = [RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch"),
              RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")]

    class Refusing:
        __name__ = "on_chip_forward_channels_last"
        params = []

        def __getitem__(self, grid):
            def launch(*args, **meta):
                raise errors[0]
            return launch

    site = launcher.Site(Refusing(), (264,), {"num_warps": 8, "launch_cooperative_grid": True}, (), resident=2)
    launch = launcher.Launcher(direct=False)
    with pytest.raises(RuntimeError, match="every program of on_chip_forward_channels_last's grid \\(264\\).*"
                                           "too many blocks.*on_chip_bytes=0"):
        launch(site, ())
    errors.pop(0)
    with pytest.raises(RuntimeError, match="^Triton Error \\[CUDA\\]: an illegal memory access"):
        launch(site, ())


def test_residency_counts_registers_shared_memory_and_threads(monkeypatch):
    """An SM of 64K registers and 228 KB holds 2 programs of 8 warps at 128 registers, 1 at 129 (registers
    are allocated 8 a thread), and as many as its shared memory holds."""
    from bn_gpu.backends.triton import launcher

    props = types.SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                                  shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert launcher.resident_programs(128, 0, 8, 0) == 2
    assert launcher.resident_programs(129, 0, 8, 0) == 1
    assert launcher.resident_programs(32, 0, 8, 0) == 8  # threads: 2048 a SM
    assert launcher.resident_programs(32, 100 * 1024, 8, 0) == 2
    assert launcher.resident_programs(32, 140 * 1024, 8, 0) == 1


def test_a_grid_that_would_not_be_resident_is_refused_before_it_launches(monkeypatch):
    """check_residency compiles the kernel (warmup) and refuses it, naming the way out, when an SM
    holds fewer of its programs than the grid needs at once: programs waiting at a barrier for
    programs that cannot start would never return."""
    from bn_gpu.backends.triton import launcher

    props = types.SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                                  shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    compiled = types.SimpleNamespace(n_regs=160, metadata=types.SimpleNamespace(shared=1024))
    kernel = types.SimpleNamespace(warmup=lambda *args, grid, **meta: compiled,
                                   __name__="on_chip_forward_channels_last")
    site = launcher.Site(kernel, (8,), {"num_warps": 8}, (), resident=2)
    with pytest.raises(RuntimeError, match="an SM holds 1 of its programs, its grid needs 2.*on_chip_bytes=0"):
        launcher.check_residency(site, [])
    compiled.n_regs = 128
    launcher.check_residency(site, [])  # two programs an SM: it may launch


def test_concurrent_programs_in_the_interpreter_leave_it_as_it_was(monkeypatch):
    """launch_concurrently restores the interpreter's program index and atomics after the grid, and
    reports a failing program's error instead of leaving the others waiting."""
    pytest.importorskip("triton")
    from triton.runtime import interpreter as triton_interpreter

    from bn_gpu.backends.triton import interpreter

    builder = triton_interpreter.interpreter_builder
    before = builder.__dict__.get("grid_idx")
    monkeypatch.setattr(type(builder), "create_atomic_rmw", lambda self, *args: None)  # a harmless atomic

    class Failing:
        """A kernel whose program 1 fails while program 0 would wait for it."""
        arg_names = ["x"]
        pre_run_hooks = []

        @staticmethod
        def rewrite():
            def fn(x):
                if builder.grid_idx[0] == 1:
                    raise ValueError("program 1 failed")
                while True:  # waits, as at a barrier, until the launch stops it
                    builder.create_atomic_rmw(None, None, None, None, None, None)
            return fn

    with pytest.raises(Exception, match="program 1 failed"):
        interpreter.launch_concurrently(Failing, (2,), [0], {})
    assert "grid_idx" not in type(builder).__dict__ and "create_atomic_rmw" not in builder.__dict__
    assert builder.__dict__.get("grid_idx") == before
