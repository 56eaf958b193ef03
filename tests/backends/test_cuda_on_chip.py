"""The CUDA C on-chip kernels (kernels/cuda/on_chip.cuh): their plan -- the input held in shared memory
in its own dtype, channels-first as whole rows of S, every plan an exchange -- the tuning taken from the
SMs' shared memory, the cooperative launch's residency check, and, on a GPU, their results against the
float64 reference with every buffer poisoned, bitwise determinism and their counters left at zero.
Their source compiles for sm_90 with nvcc and for sm_80 with NVRTC in test_cuda_source.py, and their
launches match their signatures there too."""
import dataclasses
import math
import types

import pytest
import torch
from support import (assert_close, assert_parameter_grads_close, assert_stats_close, backend_devices, make_input,
                     make_params)

import bn_gpu.backends.plan as plans
from bn_gpu import reference as ref
from bn_gpu.backends import orchestration
from bn_gpu.backends.cupy import compilation, launcher, table
from bn_gpu.backends.plan import OnChipPlan, on_chip_plan

SHARED_PER_SM = 233472  # an H100's or H200's shared memory an SM
SMS = 132
CUPY_DEVICES = [pair for pair in backend_devices() if pair.values[0] == "cupy"]  # marked gpu, CuPy required


def _shared_tuning(on_chip_bytes: int) -> plans.Tuning:
    return dataclasses.replace(plans.GPU_TUNING, on_chip_bytes=on_chip_bytes, on_chip_shared=True,
                               on_chip_programs_per_sm=2)


# ---- the plan ---------------------------------------------------------------------------------------

def test_the_plan_holds_values_of_the_input_dtype_and_exchanges_below_the_resident_blocks():
    """In shared memory the input keeps its dtype: 16-bit values take 2 bytes (in registers they are
    counted widened). Below the resident blocks every plan is an exchange, a group held by one block
    included (its barrier one party); groups that fill them are walked (the next test)."""
    tuning = _shared_tuning(2 * 4096)  # 4096 bytes a block
    assert on_chip_plan(4, 256, 8, 1, 4, tuning, SMS, streams=1) == OnChipPlan(
        held=4, splits=1, programs=8, block_splits=1, load_stages=tuning.load_stages, resident=2)
    assert on_chip_plan(1, 1024, 8, 1, 4, tuning, SMS, streams=1).held == 1     # a block's share of fp32
    assert on_chip_plan(1, 1024 + 1, 8, 1, 4, tuning, SMS, streams=1) is None   # a value more
    assert on_chip_plan(1, 2048, 8, 1, 2, tuning, SMS, streams=1).held == 1     # bf16: twice the values
    assert on_chip_plan(1, 2048 + 1, 8, 1, 2, tuning, SMS, streams=1) is None
    assert on_chip_plan(4, 256, 8, 1, 2, tuning, SMS, streams=2).held == 4      # x and dy of bf16
    assert on_chip_plan(4, 256, 8, 1, 4, tuning, SMS, streams=2).held == 2      # x and dy of fp32: split in two
    split = on_chip_plan(64, 256, 8, 1, 4, tuning, SMS, streams=1)
    assert split.exchange and (split.held, split.splits, split.programs) == (4, 16, 128)
    assert on_chip_plan(4, 256, 2 * SMS, 1, 4, tuning, SMS, streams=1) is None  # no two buffers of a group
    assert on_chip_plan(4, 256, 8, 4, 4, tuning, SMS, streams=1, exchange=False) is None  # channel groups
    # Without on_chip_shared the same groups are walked, and held widened.
    registers = dataclasses.replace(tuning, on_chip_shared=False)
    assert not on_chip_plan(4, 256, 8, 1, 4, registers, SMS, streams=1).exchange
    assert on_chip_plan(1, 2048, 8, 1, 2, registers, SMS, streams=1) is None


def test_groups_that_fill_the_resident_blocks_are_walked_with_buffers_of_whole_groups():
    """Where the groups fill the resident blocks (two an SM), the forward walks them: every resident
    block, with as many buffers of a whole group (units x unit_values values) as its share holds, up
    to load_stages, and at least two (the next group copied while the current one is used); at one
    block an SM where two slices do not fit a block's share, or where fewer groups fill the SMs and
    cannot be exchanged. Only groups of a tile's bytes or more, whose copies outweigh two block
    reductions each. The backward's buffers hold a group's dy and x, at one block an SM (its registers
    fit one). Never where `walk` is off (runs that are not whole 16-byte slots a thread)."""
    share = 64 * 1024  # bytes a block
    tuning = _shared_tuning(2 * share)
    groups = 2 * SMS
    fp32 = on_chip_plan(4, 1024, groups, 4, 4, tuning, SMS, streams=1)  # 16 KB a group: 4 fit, 3 stages
    assert fp32 == OnChipPlan(held=4, splits=1, programs=2 * SMS, block_splits=1, load_stages=3, resident=0)
    assert not fp32.exchange
    assert on_chip_plan(4, 2048, groups, 4, 4, tuning, SMS, streams=1).load_stages == 2      # 32 KB: two
    assert on_chip_plan(4, 2048 + 1, groups, 4, 4, tuning, SMS, streams=1).programs == SMS   # a value more
    assert on_chip_plan(4, 4096 + 1, groups, 4, 4, tuning, SMS, streams=1) is None           # over half an SM's
    assert on_chip_plan(4, 2048, groups, 8, 2, tuning, SMS, streams=1).load_stages == 3      # bf16: 16 KB
    assert on_chip_plan(4, 1024 - 1, groups, 4, 4, tuning, SMS, streams=1) is None           # under a tile
    # The backward: an SM's share of each of dy and x (64 KB), at one block an SM: as many buffers of a
    # group's two slices as it holds, three at most; under two, none.
    assert on_chip_plan(4, 1024, groups, 4, 4, tuning, SMS, streams=2) == OnChipPlan(
        held=4, splits=1, programs=SMS, block_splits=1, load_stages=3, resident=0)
    assert on_chip_plan(4, 2048, groups, 4, 4, tuning, SMS, streams=2).load_stages == 2
    assert on_chip_plan(4, 2048 + 1, groups, 4, 4, tuning, SMS, streams=2) is None
    assert on_chip_plan(4, 1024, groups, 4, 4, tuning, SMS, streams=1, walk=False) is None
    assert on_chip_plan(4, 1024, groups - 1, 1, 4, tuning, SMS, streams=1).exchange          # below: exchanged
    # Fewer groups than resident blocks but as many as SMs, which cannot be exchanged (channel groups),
    # and groups whose two slices do not fit a block's share: walked at one block an SM, its whole share.
    one = on_chip_plan(4, 2048, SMS, 4, 4, tuning, SMS, streams=1, exchange=False)
    assert (one.programs, one.load_stages, one.exchange) == (SMS, 3, False)
    assert on_chip_plan(4, 2048, SMS - 1, 4, 4, tuning, SMS, streams=1, exchange=False) is None
    assert on_chip_plan(4, 4096, groups, 4, 4, tuning, SMS, streams=1).programs == SMS        # 64 KB slices


def test_the_tuning_takes_the_shared_memory_of_an_sm():
    """An SM's shared memory less what each of its two blocks keeps beside the slice; none where the
    GPU tuning has no on-chip kernels (BN_GPU_TUNING=on_chip_bytes=0)."""
    tuning = table.tuning_for(plans.GPU_TUNING, 4, SHARED_PER_SM)
    per_block = SHARED_PER_SM // 2 - compilation.ON_CHIP_RESERVED_SHARED
    assert tuning.on_chip_shared and tuning.on_chip_bytes == 2 * per_block
    off = dataclasses.replace(plans.GPU_TUNING, on_chip_bytes=0)
    assert table.tuning_for(off, 4, SHARED_PER_SM).on_chip_bytes == 0
    assert table.tuning_for(plans.GPU_TUNING, 4, 0).on_chip_bytes == 0


@pytest.fixture
def h200(monkeypatch):
    monkeypatch.setattr(plans, "multiprocessors", lambda index: SMS)
    monkeypatch.setattr(table, "shared_memory_per_sm", lambda index: SHARED_PER_SM)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_the_geometry_walks_groups_that_fill_the_resident_blocks(h200, dtype):
    """64x2048x7x7: 4 fp32 channels a group (2048 / 4 = 512 groups, a 50 KB slice each: 2 buffers in a
    block's share), 2 fp64 (1024 groups of 50 KB); bf16's 256 groups of 8 fill 256 of the 264 resident
    blocks, so one block an SM walks them, with 3 buffers of 50 KB in its share of 196 KB. Rows of
    S = 64 values are walked whole (1024 channels of 128 rows: 32 or 16 KB a channel, 3 buffers;
    fp64's 64 KB at one block an SM). Runs of S = 62 (no whole 16-byte slots in fp32 and bf16; fp64's
    127 KB slices fit one buffer an SM) and S = 48 x 48 (4.5 KB or more: more slots than threads) keep
    the single pass. The backward walks at one block an SM, with two buffers of a 7x7 group's dy and x
    (4 x 50 KB in an SM's 196 KB), three of 8x8 rows (but fp64's two 64 KB slices fit one)."""
    size = dtype.itemsize
    x = make_input((64, 2048, 7, 7), dtype, device="meta")
    g = table.KERNELS.geometry(x, x)
    assert g.plan.group == 16 // size and not g.on_chip.exchange and not g.on_chip_backward.exchange
    if dtype == torch.bfloat16:
        assert (g.on_chip.programs, g.on_chip.load_stages) == (SMS, 3)
    else:
        assert (g.on_chip.programs, g.on_chip.load_stages) == (2 * SMS, 2)
    assert (g.on_chip_backward.programs, g.on_chip_backward.load_stages) == (SMS, 2)
    x = make_input((128, 1024, 8, 8), dtype, device="meta")
    rows = table.KERNELS.geometry(x, x)
    assert rows.plan.group == 1 and not rows.on_chip.exchange and rows.on_chip.load_stages == 3
    # fp64's 64 KB slices: one buffer in the share of one of two blocks, three in an SM's.
    assert rows.on_chip.programs == (SMS if dtype == torch.float64 else 2 * SMS)
    if dtype == torch.float64:
        assert rows.on_chip_backward is None
    else:
        assert (rows.on_chip_backward.programs, rows.on_chip_backward.load_stages) == (SMS, 3)
    assert table.KERNELS.geometry(make_input((256, 1024, 62), dtype, device="meta")).on_chip is None
    assert table.KERNELS.geometry(make_input((4, 1024, 48, 48), dtype, device="meta")).on_chip is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_geometry_holds_whole_rows_of_s_and_no_channel_groups(h200, dtype):
    """Channels-first blocks hold whole rows of S in blocks of the tile's rows (a (rows, S) matrix in
    shared memory) within a block's share; 7x7 planes, whose channels are grouped, keep the two-pass
    plans; so does an input above the limit."""
    size = dtype.itemsize
    share = table.tuning_for(plans.GPU_TUNING, size, SHARED_PER_SM).on_chip_bytes // 2
    g = table.KERNELS.geometry(make_input((32, 128, 16, 16), dtype, device="meta"))
    assert g.on_chip is not None and g.on_chip.exchange and g.on_chip.programs <= 2 * SMS
    held_rows = g.on_chip.held * g.plan.rows
    assert held_rows * g.S * size <= share and g.on_chip.splits == -(-g.N // held_rows)
    grouped = table.KERNELS.geometry(make_input((64, 16, 7, 7), dtype, device="meta"))
    assert grouped.plan.group > 1 and grouped.on_chip is None
    assert table.KERNELS.geometry(make_input((64, 64, 112, 112), dtype, device="meta")).on_chip is None


# ---- the cooperative launch -------------------------------------------------------------------------

class _Function:
    """A compiled cupy.cuda.Function: its handle, and the launches it was asked for."""
    ptr = 1234

    def __init__(self):
        self.launches = []

    def __call__(self, grid, block, args, **options):
        self.launches.append((grid, block, args, options))


class _RawKernel:
    """What cooperative() reads of a cupy.RawKernel."""

    def __init__(self, limit=49152):
        self.max_dynamic_shared_size_bytes = limit
        self.kernel = _Function()


def test_a_grid_that_would_not_be_resident_is_refused_before_it_launches(monkeypatch):
    """The dynamic shared memory limit is raised to the slice's, and a grid larger than the occupancy
    holds at once is refused, naming the way back to the two-pass kernels (blocks waiting at a barrier
    for blocks that cannot start would never return; the driver would refuse the cooperative launch
    with less to go on)."""
    per_sm = {"value": 2}
    occupancy = []

    def blocks_per_sm(function, threads, shared):
        occupancy.append((function, threads, shared))
        return per_sm["value"]

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(driver=types.SimpleNamespace(
        occupancyMaxActiveBlocksPerMultiprocessor=blocks_per_sm)))
    monkeypatch.setattr(launcher, "import_cupy", lambda: fake)
    launcher.cooperative.cache_clear()
    kernel = _RawKernel()
    launch = launcher.cooperative(kernel, "on_chip_forward_channels_first_4", 65536, 256, 2 * SMS, SMS)
    assert isinstance(launch, launcher.Cooperative) and launch.shared_mem == 65536
    assert kernel.max_dynamic_shared_size_bytes == 65536 and occupancy == [(1234, 256, 65536)]
    launch([SMS, 2], [256], ("args",), stream="stream")  # as the launcher and its replays call a kernel
    assert kernel.kernel.launches == [((SMS, 2), (256,), ("args",), dict(
        shared_mem=65536, stream="stream", enable_cooperative_groups=True))]
    launcher.cooperative(kernel, "on_chip_forward_channels_first_4", 4096, 256, SMS, SMS)
    assert kernel.max_dynamic_shared_size_bytes == 65536  # never lowered under a larger launch's slice
    per_sm["value"] = 1
    with pytest.raises(RuntimeError, match="needs its 264 blocks resident at once.*holds 1 a multiprocessor"
                                           ".*on_chip_bytes=0"):
        launcher.cooperative(kernel, "on_chip_backward_channels_last_4", 32768, 256, 2 * SMS, SMS)
    launcher.cooperative.cache_clear()


# ---- on a GPU: the kernels against float64 ------------------------------------------------------------

# Shapes whose plans exchange on any GPU of at least 48 KB of shared memory an SM (16 or more
# splits), and one a block holds whole (one split: its barrier has one party).
SHAPES = [((64, 4, 32, 32), "contiguous"), ((64, 4, 32, 32), "channels_last"), ((8, 16, 10, 12), "contiguous"),
          ((16, 24, 6, 6), "channels_last")]


@pytest.mark.parametrize("backend,device", CUPY_DEVICES)
@pytest.mark.parametrize("shape, layout", SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
def test_on_chip_kernels_match_float64(backend, device, shape, layout, dtype, momentum, epilogue, poisoned):
    """Training forward (running statistics, batch counted; with the epilogue + residual and ReLU)
    and backward (dx, dweight, dbias; through the ReLU with the epilogue), one cooperative launch
    each, against the float64 reference with every output and workspace poisoned."""
    x = make_input(shape, dtype, layout, device)
    grad_y = make_input(shape, dtype, layout, device, mean=0.0, std=1.0, seed=7)
    residual = make_input(shape, dtype, layout, device, mean=0.0, std=1.0, seed=9) if epilogue else None
    C = shape[1]
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    weight, bias, running_mean, running_var = make_params(C, param_dtype, device)
    g = table.KERNELS.geometry(x, grad_y)
    assert table.KERNELS.geometry(x).on_chip is not None and g.on_chip_backward is not None
    rm0, rv0 = running_mean.clone(), running_var.clone()
    counter = torch.tensor(3, device=device)
    fused = dict(residual=residual, relu=True) if epilogue else {}
    y, mean, invstd = orchestration.forward_train(table.KERNELS, x, weight, bias, running_mean, running_var, counter,
                                                  momentum, 1e-5, **fused)
    y_ref, mean_ref, var_ref, invstd_ref = ref.forward_train(x, weight, bias, 1e-5)
    if epilogue:
        y_ref = torch.relu(y_ref + residual.double())
    assert_close(y, y_ref, dtype, "output")
    assert_stats_close(mean, mean_ref, dtype, "mean")
    assert_stats_close(invstd, invstd_ref, dtype, "invstd")
    factor = ref.momentum_factor(momentum, 4)  # the counter after this batch
    rm_ref, rv_ref = ref.update_running_stats(rm0, rv0, mean_ref, var_ref, x.numel() // C, factor)
    assert_close(running_mean, rm_ref, param_dtype, "running_mean")
    assert_close(running_var, rv_ref, param_dtype, "running_var")
    assert counter.item() == 4
    grad_x, grad_w, grad_b = orchestration.backward(table.KERNELS, grad_y, x, weight, mean, invstd, True, True, True,
                                                    **(dict(bias=bias, relu=True) if epilogue else {}))
    masked = grad_y
    if epilogue:  # the ReLU's mask, from the forward's output without the residual
        masked = torch.where(ref.forward_train(x, weight, bias, 1e-5)[0] > 0, grad_y.double(), 0.0)
    grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_train(masked, x, weight, 1e-5)
    assert_close(grad_x, grad_x_ref, dtype, "grad_input")
    assert_parameter_grads_close(grad_w, grad_b, grad_w_ref, grad_b_ref, grad_y, dtype)


@pytest.mark.parametrize("backend,device", CUPY_DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_the_exchange_is_deterministic_and_leaves_its_counters_at_zero(backend, device, layout):
    """Two calls give the same bits (partials merged in split order whichever block arrives last), and
    the barriers' counters are zero after each: ready for the next launch and for graph replay."""
    x = make_input((64, 4, 32, 32), torch.float32, layout, device)
    grad_y = make_input((64, 4, 32, 32), torch.float32, layout, device, mean=0.0, std=1.0, seed=7)
    weight, bias, _, _ = make_params(4, torch.float32, device)
    g = table.KERNELS.geometry(x, grad_y)
    assert g.on_chip.splits > 1 and g.on_chip_backward.splits > 1
    results = []
    for _ in range(2):
        y, mean, invstd = orchestration.forward_train(table.KERNELS, x, weight, bias, None, None, None, 0.1, 1e-5)
        grads = orchestration.backward(table.KERNELS, grad_y, x, weight, mean, invstd, True, True, True)
        results.append((y, mean, invstd, *grads))
        counters = orchestration.finalize_counters(x.device, orchestration.on_chip_counters(g, g.on_chip, True))
        assert not counters.any()
    for first, second in zip(*results):
        assert torch.equal(first, second)


# The smallest shapes whose channel groups fill the resident blocks (two an SM) of GPUs of up to 160
# SMs, so the forward walks them: 7x7 planes in groups of 4 fp32 or 8 bf16 channels (640 or 320
# groups of 18.4 KB), and rows of S = 64 (320 channels of 32 or 16 KB); the first also with x one value
# off 16 bytes (read value by value, VEC = 1); and 160 groups of 7x7 planes, walked at one block an SM
# in bf16 (channel groups are not exchanged), two in fp32 (320 groups).
WALKED = [((24, 2560, 7, 7), 0), ((128, 320, 8, 8), 0), ((24, 2560, 7, 7), 1), ((24, 1280, 7, 7), 0)]


@pytest.mark.parametrize("backend,device", CUPY_DEVICES)
@pytest.mark.parametrize("shape, offset", WALKED, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else f"offset{v}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
def test_the_walk_matches_float64_and_is_deterministic(backend, device, shape, offset, dtype, momentum, epilogue,
                                                       poisoned):
    """The walked training forward (running statistics, batch counted; with the epilogue + residual
    and ReLU) against the float64 reference with every output poisoned; a second call gives the same
    bits, and the batch's ticket is back at zero after each."""
    base = make_input((math.prod(shape) + offset,), dtype, device=device)
    x = base[offset:].view(shape)
    residual = make_input(shape, dtype, device=device, mean=0.0, std=1.0, seed=9) if epilogue else None
    C = shape[1]
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    if compilation.shared_memory_per_sm(x.device.index or 0) < 160 * 1024:
        pytest.skip("these slices are walked on GPUs of 160 KB of shared memory an SM or more (A100, H100, H200)")
    g = table.KERNELS.geometry(x)
    assert g.on_chip is not None and not g.on_chip.exchange
    fused = dict(residual=residual, relu=True) if epilogue else {}
    y_ref, mean_ref, var_ref, invstd_ref = ref.forward_train(x, *make_params(C, param_dtype, device)[:2], 1e-5)
    if epilogue:
        y_ref = torch.relu(y_ref + residual.double())
    results = []
    for _ in range(2):
        weight, bias, running_mean, running_var = make_params(C, param_dtype, device)
        rm0, rv0 = running_mean.clone(), running_var.clone()
        counter = torch.tensor(3, device=device)
        y, mean, invstd = orchestration.forward_train(table.KERNELS, x, weight, bias, running_mean, running_var,
                                                      counter, momentum, 1e-5, **fused)
        assert_close(y, y_ref, dtype, "output")
        assert_stats_close(mean, mean_ref, dtype, "mean")
        assert_stats_close(invstd, invstd_ref, dtype, "invstd")
        rm_ref, rv_ref = ref.update_running_stats(rm0, rv0, mean_ref, var_ref, x.numel() // C,
                                                  ref.momentum_factor(momentum, 4))
        assert_close(running_mean, rm_ref, param_dtype, "running_mean")
        assert_close(running_var, rv_ref, param_dtype, "running_var")
        assert counter.item() == 4
        assert not orchestration.finalize_counters(x.device, orchestration.on_chip_counters(g, g.on_chip, True)).any()
        results.append((y, mean, invstd, running_mean, running_var))
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend,device", CUPY_DEVICES)
@pytest.mark.parametrize("shape, offset", WALKED, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple)
                         else f"offset{v}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_the_backward_walk_matches_float64_and_is_deterministic(backend, device, shape, offset, dtype, relu,
                                                                poisoned):
    """The walked training backward (dx, dweight, dbias; through the ReLU's mask) from the forward's
    statistics against the float64 reference with every output poisoned (the ReLU's mask from the
    forward's own output, as test_epilogue); a second call gives the same bits. dy is one value off
    16 bytes where x is (read value by value, VEC = 1)."""
    base = make_input((math.prod(shape) + offset,), dtype, device=device)
    x = base[offset:].view(shape)
    grad_base = make_input((math.prod(shape) + offset,), dtype, device=device, mean=0.0, std=1.0, seed=7)
    grad_y = grad_base[offset:].view(shape)
    C = shape[1]
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    if compilation.shared_memory_per_sm(x.device.index or 0) < 160 * 1024:
        pytest.skip("these slices are walked on GPUs of 160 KB of shared memory an SM or more (A100, H100, H200)")
    g = table.KERNELS.geometry(x, grad_y)
    assert g.on_chip_backward is not None and not g.on_chip_backward.exchange
    weight, bias, _, _ = make_params(C, param_dtype, device)
    y, mean, invstd = orchestration.forward_train(table.KERNELS, x, weight, bias, None, None, None, 0.1, 1e-5,
                                                  relu=relu)
    grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_train(ref.epilogue_backward(grad_y, y, relu), x, weight, 1e-5)
    results = []
    for _ in range(2):
        grads = orchestration.backward(table.KERNELS, grad_y, x, weight, mean, invstd, True, True, True,
                                       **(dict(bias=bias, relu=True) if relu else {}))
        assert_close(grads[0], grad_x_ref, dtype, "grad_input")
        assert_parameter_grads_close(grads[1], grads[2], grad_w_ref, grad_b_ref, grad_y, dtype)
        results.append(grads)
    for first, second in zip(*results):
        assert torch.equal(first, second)
