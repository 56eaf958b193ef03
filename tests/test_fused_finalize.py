"""The split path's finalize, done by the last programs of each channel group to finish (Triton,
in two levels: kernels/finalize.py): the separate finalize kernel's results to the last bits of a
sum (another grouping of the partials, so another summation tree), the same bits call after call
(a fixed merge order, whichever program is last), and its counters left at zero -- after a call,
after two, and after a call that raised -- so the next call and a CUDA-graph replay start from
zero."""
import pytest
import torch

from bn_gpu import orchestration, reference, triton_backend
from support import make_input, make_params

pytestmark = pytest.mark.usefixtures("split_path")
SHAPES = [((5, 6, 9, 11), "contiguous"), ((5, 6, 9, 11), "channels_last"), ((300, 7), "contiguous")]


@pytest.fixture
def split_path(monkeypatch):
    """Many programs per channel group, so every group is finalized by one program of several."""
    import dataclasses

    import bn_gpu.plan
    for name in ("INTERPRETER_TUNING", "GPU_TUNING"):
        monkeypatch.setattr(bn_gpu.plan, name, dataclasses.replace(getattr(bn_gpu.plan, name), programs_per_sm=64))


class SeparateFinalize(triton_backend.TritonKernels):
    """The Triton kernels with the finalize in a launch of its own (the previous plan)."""

    def statistics_finalized(self, g, x, partials, counters, *finalize_args):
        self.statistics(g, x, partials)
        self.finalize_statistics(g, x, partials, *finalize_args)

    def gradient_sums_finalized(self, g, grad_y, x, mean, partials, counters, invstd, totals, grad_weight, grad_bias,
                                weight=None, bias=None, relu=False):
        self.gradient_sums(g, grad_y, x, mean, partials, invstd, weight, bias, relu)
        self.finalize_gradients(g, partials, invstd, totals, grad_weight, grad_bias)


def _step(kernels, x, dy, relu=False):
    """Forward (with running statistics, cumulative average) and backward; every output."""
    C = x.shape[1]
    weight, bias, running_mean, running_var = make_params(C)
    tracked = torch.tensor(3)
    y, mean, invstd = orchestration.forward_train(kernels, x, weight, bias, running_mean, running_var, tracked, None,
                                                  1e-5, relu=relu)
    grads = orchestration.backward(kernels, dy, x, weight, mean, invstd, True, True, True, bias=bias, relu=relu)
    return [y, mean, invstd, running_mean, running_var, tracked, *grads]


def _counters_are_zero(device=torch.device("cpu")):
    return all(not counters.any() for (d, _), counters in orchestration._COUNTERS.items() if d == device)


@pytest.mark.parametrize("shape, layout", SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_fused_finalize_matches_the_separate_one(poisoned, shape, layout, relu):
    x = make_input(shape, layout=layout)
    dy = make_input(shape, layout=layout, mean=0.0, std=1.0, seed=5)
    g = triton_backend.KERNELS.geometry(x, dy)
    assert g.plan.splits > 1 and not g.single_pass
    # Both levels of the merge have several members, and the last group fewer than the others.
    assert g.finalize.group_splits > 1 and g.finalize.split_groups > 1
    assert g.plan.splits % g.finalize.group_splits != 0
    fused = _step(triton_backend.KERNELS, x, dy, relu)
    separate = _step(SeparateFinalize(), x, dy, relu)
    for a, b in zip(fused, separate):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # And right: the float64 reference.
    weight, bias = make_params(shape[1])[:2]
    expected_y, expected_mean, _, expected_invstd = reference.forward_train(x, weight, bias)
    if relu:
        expected_y = expected_y.clamp_min(0)
    torch.testing.assert_close(fused[0].double(), expected_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1].double(), expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[2].double(), expected_invstd, atol=1e-5, rtol=1e-5)
    assert _counters_are_zero()


@pytest.mark.parametrize("shape, layout", SHAPES, ids=str)
def test_two_calls_give_the_same_bits_and_leave_the_counters_at_zero(shape, layout):
    x = make_input(shape, layout=layout)
    dy = make_input(shape, layout=layout, mean=0.0, std=1.0, seed=5)
    first = _step(triton_backend.KERNELS, x, dy)
    assert _counters_are_zero()
    second = _step(triton_backend.KERNELS, x, dy)
    assert _counters_are_zero()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_a_call_after_one_that_raised_is_right(monkeypatch):
    """The statistics kernel ran (and finalized) before the step raised: the next call starts from
    zeroed counters and gives the bits of a call before the failure."""
    shape, layout = SHAPES[0]
    x = make_input(shape, layout=layout)
    dy = make_input(shape, layout=layout, mean=0.0, std=1.0, seed=5)
    expected = _step(triton_backend.KERNELS, x, dy)

    class Failing(triton_backend.TritonKernels):
        def normalize(self, *args, **kwargs):
            raise RuntimeError("a failure after the statistics kernel")

    with pytest.raises(RuntimeError, match="after the statistics"):
        _step(Failing(), x, dy)
    assert _counters_are_zero()
    for a, b in zip(_step(triton_backend.KERNELS, x, dy), expected):
        assert torch.equal(a, b)


def test_counter_buffers_grow_and_are_kept_per_device_and_stream():
    small = orchestration.finalize_counters(torch.device("cpu"), 3)
    assert small.dtype == torch.int32 and small.numel() >= 3 and not small.any()
    assert orchestration.finalize_counters(torch.device("cpu"), 3) is small
    large = orchestration.finalize_counters(torch.device("cpu"), small.numel() + 1)
    assert large.numel() > small.numel() and not large.any()
    assert orchestration.finalize_counters(torch.device("cpu"), 3) is large
