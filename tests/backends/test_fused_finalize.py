"""The split path's finalize, done by the last programs of each channel group to finish, in two
levels (Triton: kernels/finalize.py; CUDA C: the FINALIZE instantiations of kernels/cuda/batch_norm.cu):
the separate finalize kernel's results to the last bits of a sum (another grouping of the partials,
so another summation tree; for the cancelling gradient sums, bits of their terms' magnitudes), the
same bits call after call (a fixed merge order, whichever program is last), and its counters left at
zero -- after a call, after two, and after a call that raised -- so the next call and a CUDA-graph
replay start from zero. On the CPU the Triton kernels run in the interpreter; on a GPU (marker
`gpu`) both backends run, on shapes whose GPU plans split."""
import dataclasses

import pytest
import torch

from bn_gpu import reference
from bn_gpu.backends import orchestration
from bn_gpu.backends.cupy import CudaKernels
from bn_gpu.backends.triton import TritonKernels
from support import make_input, make_params, requires_cupy

# Every case: several splits per channel group, both levels of the merge with several members, and
# a last group shorter than the others (checked in each test). The interpreter's plans split small
# inputs (with more programs per SM); a GPU's (132 SMs) need larger ones.
INTERPRETER_SHAPES = [((5, 6, 9, 11), "contiguous"), ((5, 6, 9, 11), "channels_last"), ((300, 7), "contiguous")]
GPU_SHAPES = [((29, 8, 64, 64), "contiguous"), ((29, 8, 64, 64), "channels_last"), ((2500, 7), "contiguous"),
              ((5, 40, 60, 60), "channels_last")]  # 40 channels: two channel blocks of CUDA C


def _separate(table_class):
    """A backend's kernel table with the finalize in a launch of its own (the previous plan)."""

    class SeparateFinalize(table_class):
        def statistics_finalized(self, g, x, partials, counters, *finalize_args):
            self.statistics(g, x, partials)
            self.finalize_statistics(g, x, partials, *finalize_args)

        def gradient_sums_finalized(self, g, grad_y, x, mean, partials, counters, invstd, totals, grad_weight,
                                    grad_bias, weight=None, bias=None, relu=False):
            self.gradient_sums(g, grad_y, x, mean, partials, invstd, weight, bias, relu)
            self.finalize_gradients(g, partials, invstd, totals, grad_weight, grad_bias)

    return SeparateFinalize()


@dataclasses.dataclass
class Target:
    table_class: type
    device: str

    @property
    def kernels(self):
        return self.table_class()


TARGETS = [
    pytest.param(Target(TritonKernels, "cpu"), id="triton-interpreter"),
    pytest.param(Target(TritonKernels, "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param(Target(CudaKernels, "cuda"), id="cupy-cuda", marks=[pytest.mark.gpu, requires_cupy]),
]


def _target_cases():
    for param in TARGETS:
        target = param.values[0]
        for shape, layout in INTERPRETER_SHAPES if target.device == "cpu" else GPU_SHAPES:
            yield pytest.param(target, shape, layout, id=f"{param.id}-{'x'.join(map(str, shape))}-{layout}",
                               marks=param.marks)


CASES = list(_target_cases())
pytestmark = pytest.mark.usefixtures("interpreter_splits")


@pytest.fixture
def interpreter_splits(monkeypatch):
    """Many programs per channel group in the interpreter's plans (see INTERPRETER_SHAPES), and the
    two-pass plans on a GPU too, whose small inputs would otherwise take the on-chip kernels (their
    exchange has tests of its own: tests/kernels/test_on_chip.py)."""
    import bn_gpu.backends.plan
    tuning = dataclasses.replace(bn_gpu.backends.plan.INTERPRETER_TUNING, programs_per_sm=64)
    monkeypatch.setattr(bn_gpu.backends.plan, "INTERPRETER_TUNING", tuning)
    monkeypatch.setattr(bn_gpu.backends.plan, "GPU_TUNING",
                        dataclasses.replace(bn_gpu.backends.plan.GPU_TUNING, on_chip_bytes=0))


def _inputs(target, shape, layout):
    x = make_input(shape, layout=layout, device=target.device)
    dy = make_input(shape, layout=layout, device=target.device, mean=0.0, std=1.0, seed=5)
    g = target.kernels.geometry(x, dy)
    assert g.plan.splits > 1 and not g.single_pass
    # Both levels of the merge have several members, and the last group fewer than the others.
    assert g.finalize.group_splits > 1 and g.finalize.split_groups > 1
    assert g.plan.splits % g.finalize.group_splits != 0
    return x, dy


OUTPUTS = ("y", "mean", "invstd", "running_mean", "running_var", "num_batches_tracked", "grad_x", "grad_weight",
           "grad_bias")


def _step(kernels, x, dy, relu=False):
    """Forward (with running statistics, cumulative average) and backward; every output (OUTPUTS)."""
    C = x.shape[1]
    weight, bias, running_mean, running_var = make_params(C, device=x.device)
    tracked = torch.tensor(3, device=x.device)
    y, mean, invstd = orchestration.forward_train(kernels, x, weight, bias, running_mean, running_var, tracked, None,
                                                  1e-5, relu=relu)
    grads = orchestration.backward(kernels, dy, x, weight, mean, invstd, True, True, True, bias=bias, relu=relu)
    return [y, mean, invstd, running_mean, running_var, tracked, *grads]


def _gradient_sum_scales(x, dy):
    """Per channel, the sum of the terms' magnitudes of grad_weight (dy * x_hat) and grad_bias (dy),
    ReLU mask or not: the scale of a float32 sum's rounding, whatever its order. dy has mean 0, so
    these sums cancel: a channel's result can be far smaller than its rounding (seen on an H200:
    grad_bias of 2.0 differing by 4.6e-5 between the two summation trees, 3e-9 of this scale)."""
    dims = [d for d in range(x.dim()) if d != 1]
    x64, dy64 = x.double(), dy.double()
    x_hat = (x64 - x64.mean(dims, keepdim=True)) / x64.std(dims, correction=0, keepdim=True)
    return {"grad_weight": (dy64 * x_hat).abs().sum(dims), "grad_bias": dy64.abs().sum(dims)}


def _assert_same_up_to_the_summation_tree(fused, separate, x, dy):
    scales = _gradient_sum_scales(x, dy)
    for name, a, b in zip(OUTPUTS, fused, separate):
        if name in scales:
            excess = (a.double() - b.double()).abs() - 1e-6 * scales[name]
            assert (excess <= 0).all(), f"{name}: {a.tolist()} against {b.tolist()}"
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda message, name=name: f"{name}: {message}")


def _counters_are_zero(device):
    return all(not counters.any() for (d, _), counters in orchestration._COUNTERS.items() if d == device)


@pytest.mark.slow
@pytest.mark.parametrize("target, shape, layout", CASES)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_fused_finalize_matches_the_separate_one(poisoned, target, shape, layout, relu):
    x, dy = _inputs(target, shape, layout)
    fused = _step(target.kernels, x, dy, relu)
    separate = _step(_separate(target.table_class), x, dy, relu)
    _assert_same_up_to_the_summation_tree(fused, separate, x, dy)
    # And right: the float64 reference.
    weight, bias = make_params(shape[1], device=x.device)[:2]
    expected_y, expected_mean, _, expected_invstd = reference.forward_train(x, weight, bias)
    if relu:
        expected_y = expected_y.clamp_min(0)
    torch.testing.assert_close(fused[0].double(), expected_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1].double(), expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[2].double(), expected_invstd, atol=1e-5, rtol=1e-5)
    assert _counters_are_zero(x.device)


@pytest.mark.slow
@pytest.mark.parametrize("target, shape, layout", CASES)
def test_two_calls_give_the_same_bits_and_leave_the_counters_at_zero(target, shape, layout):
    x, dy = _inputs(target, shape, layout)
    first = _step(target.kernels, x, dy)
    assert _counters_are_zero(x.device)
    second = _step(target.kernels, x, dy)
    assert _counters_are_zero(x.device)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("target", TARGETS)
def test_a_call_after_one_that_raised_is_right(target):
    """The statistics kernel ran (and finalized) before the step raised: the next call starts from
    zeroed counters and gives the bits of a call before the failure."""
    shape, layout = (INTERPRETER_SHAPES if target.device == "cpu" else GPU_SHAPES)[0]
    x, dy = _inputs(target, shape, layout)
    expected = _step(target.kernels, x, dy)

    class Failing(target.table_class):
        def normalize(self, *args, **kwargs):
            raise RuntimeError("a failure after the statistics kernel")

    with pytest.raises(RuntimeError, match="after the statistics"):
        _step(Failing(), x, dy)
    assert _counters_are_zero(x.device)
    for a, b in zip(_step(target.kernels, x, dy), expected):
        assert torch.equal(a, b)


def test_counter_buffers_grow_and_are_kept_per_device_and_stream():
    small = orchestration.finalize_counters(torch.device("cpu"), 3)
    assert small.dtype == torch.int32 and small.numel() >= 3 and not small.any()
    assert orchestration.finalize_counters(torch.device("cpu"), 3) is small
    large = orchestration.finalize_counters(torch.device("cpu"), small.numel() + 1)
    assert large.numel() > small.numel() and not large.any()
    assert orchestration.finalize_counters(torch.device("cpu"), 3) is large


def test_workspaces_grow_and_are_kept_per_device_stream_dtype_and_slot():
    """orchestration.workspace: contiguous tensors of the shape asked for, over one buffer per
    (device, stream, dtype, slot) that grows when a call needs more and is taken again after."""
    cpu = torch.device("cpu")
    a = orchestration.workspace((3, 5, 7), torch.float32, cpu)
    assert a.shape == (3, 5, 7) and a.is_contiguous() and a.dtype == torch.float32
    b = orchestration.workspace((2, 4), torch.float32, cpu)
    assert b.data_ptr() == a.data_ptr()  # the same buffer, taken again
    other_slot = orchestration.workspace((2, 4), torch.float32, cpu, 1)
    other_dtype = orchestration.workspace((2, 4), torch.float64, cpu)
    assert len({b.data_ptr(), other_slot.data_ptr(), other_dtype.data_ptr()}) == 3
    large = orchestration.workspace((a._base.numel() + 1,), torch.float32, cpu)
    assert large.numel() == a._base.numel() + 1 and large.data_ptr() != a.data_ptr()
    assert orchestration.workspace((2, 4), torch.float32, cpu).data_ptr() == large.data_ptr()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("target", TARGETS)
def test_a_cumulative_single_pass_counts_each_batch_once(monkeypatch, target, layout):
    """The single-pass forward with momentum=None: every program reads num_batches_tracked for its
    factor 1 / (count + 1), and the last program to finish counts the batch (the same ticket), in
    the one launch. Three steps against torch.nn.BatchNorm2d(momentum=None)."""
    import bn_gpu.backends.plan
    for name in ("INTERPRETER_TUNING", "GPU_TUNING"):  # one program per channel (block): single pass
        monkeypatch.setattr(bn_gpu.backends.plan, name, dataclasses.replace(getattr(bn_gpu.backends.plan, name), programs_per_sm=0))
    C = 160  # several programs in every plan: channels-last, 2 Triton and 5 CUDA C channel blocks on a GPU
    theirs = torch.nn.BatchNorm2d(C, momentum=None)
    weight, bias, running_mean, running_var = make_params(C, device=target.device)
    tracked = torch.tensor(2, device=target.device)
    theirs.running_mean.copy_(running_mean.cpu())
    theirs.running_var.copy_(running_var.cpu())
    theirs.num_batches_tracked.fill_(2)
    for step in range(3):
        x = make_input((3, C, 5, 4), layout=layout, device=target.device, seed=step)
        g = target.kernels.geometry(x)
        assert g.single_pass and g.finalize_groups > 1
        orchestration.forward_train(target.kernels, x, weight, bias, running_mean, running_var, tracked, None, 1e-5)
        theirs(x.cpu())
        assert tracked.item() == theirs.num_batches_tracked.item() == 3 + step
        torch.testing.assert_close(running_mean.cpu(), theirs.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(running_var.cpu(), theirs.running_var, atol=1e-6, rtol=1e-5)
    assert _counters_are_zero(x.device)
