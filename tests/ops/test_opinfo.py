"""PyTorch's own OpInfo samples for nn.functional.batch_norm, run through bn_gpu.batch_norm and
compared with F.batch_norm on the same sample: output, running statistics, first- and second-order
gradients, and forward-mode tangents. The samples hold the edges PyTorch tests its own op on: the
empty 1-D input (0,), one channel, no affine parameters, momenta outside [0, 1], large eps."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.testing._internal.common_methods_invocations import op_db

import bn_gpu
from support import backend_devices

F64 = torch.float64
_OPINFO = next(op for op in op_db if op.name == "nn.functional.batch_norm" and not op.variant_test_name)
SAMPLES = list(_OPINFO.sample_inputs("cpu", F64, requires_grad=True))


def _sample_id(index: int) -> str:
    sample = SAMPLES[index]
    training = "train" if sample.kwargs.get("training", False) else "eval"
    return "x".join(map(str, sample.input.shape)) + f"-{training}-{index}"


def _call(fn, sample, inputs, stats, **extra):
    """fn(input, running_mean, running_var, weight, bias, **kwargs) with the differentiable inputs
    (input, weight, bias) given and fresh copies of the running statistics."""
    x, weight, bias = inputs
    return fn(x, *stats, weight, bias, **sample.kwargs, **extra)


def _copies(sample):
    running_mean, running_var, weight, bias = sample.args
    stats = [t.detach().clone() if t is not None else None for t in (running_mean, running_var)]
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
              for t in (sample.input, weight, bias)]
    return inputs, stats


@pytest.mark.parametrize("backend, device", [p for p in backend_devices() if p.values[1] == "cpu"])
@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=_sample_id)
def test_opinfo_sample_as_torch(backend, device, index):
    sample = SAMPLES[index]
    inputs, stats = _copies(sample)
    expected_inputs, expected_stats = _copies(sample)
    y = _call(bn_gpu.batch_norm, sample, inputs, stats, backend=backend)
    expected = _call(F.batch_norm, sample, expected_inputs, expected_stats)
    torch.testing.assert_close(y, expected)
    for actual_stat, expected_stat in zip(stats, expected_stats):
        torch.testing.assert_close(actual_stat, expected_stat)

    # First and second order: the gradients of sum(y * g), then of the gradients' weighted sum.
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    expected_wanted = [t for t in expected_inputs if t is not None and t.requires_grad]
    g = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(index))
    grads = torch.autograd.grad((y * g).sum(), wanted, create_graph=True, allow_unused=True)
    expected_grads = torch.autograd.grad((expected * g).sum(), expected_wanted, create_graph=True, allow_unused=True)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
    # A gradient that does not require grad is constant here (bn_gpu's grad_bias = sum(g); torch's
    # carries a graph that differentiates to zero): left out of the sums, it changes no derivative.
    actual_sum = sum((a * a).sum() for a in grads if a is not None and a.requires_grad)
    expected_sum = sum((b * b).sum() for b in expected_grads if b is not None and b.requires_grad)
    if torch.is_tensor(expected_sum):
        second = torch.autograd.grad(actual_sum, wanted, allow_unused=True)
        expected_second = torch.autograd.grad(expected_sum, expected_wanted, allow_unused=True)
        for grad, expected_grad in zip(second, expected_second):
            if expected_grad is None:
                assert grad is None or not grad.any()
            else:
                torch.testing.assert_close(grad, expected_grad)

    # Forward mode: a tangent on every differentiable input.
    tangents = [torch.randn(t.shape, dtype=F64, generator=torch.Generator().manual_seed(index + 1))
                if t is not None else None for t in (sample.input, sample.args[2], sample.args[3])]

    def jvp(fn, **extra):
        inputs, stats = _copies(sample)
        with fwAD.dual_level():
            duals = [fwAD.make_dual(t.detach(), tangent) if t is not None else None
                     for t, tangent in zip(inputs, tangents)]
            out = _call(fn, sample, duals, stats, **extra)
            return fwAD.unpack_dual(out).tangent

    tangent, expected_tangent = jvp(bn_gpu.batch_norm, backend=backend), jvp(F.batch_norm)
    assert tangent.shape == expected_tangent.shape
    torch.testing.assert_close(tangent, expected_tangent)
