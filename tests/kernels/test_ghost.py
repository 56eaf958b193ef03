"""Ghost BatchNorm on the GPU backends' kernels (the two-level channel index: kernels/ghost.py for
Triton, kernels/cuda/ghost.cuh for CUDA C) against the float64 reference, with every buffer
poisoned; the path taken; the plan's constraints."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import bn_gpu
import bn_gpu.backends.ghost as ghost_backend
import bn_gpu.backends.cupy
import bn_gpu.backends.triton
from bn_gpu import reference
from bn_gpu.backends import plan
from bn_gpu.nn import ghost as ghost_nn
from support import INTERPRETING, TOLERANCES, arrange, make_input, requires_cupy

# (backend, device): Triton in the interpreter and on a GPU, CUDA C on a GPU.
BACKEND_DEVICES = [
    pytest.param("triton", "cpu", id="triton-interpreter",
                 marks=pytest.mark.skipif(not INTERPRETING, reason="no interpreter")),
    pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param("cupy", "cuda", id="cupy-cuda", marks=[pytest.mark.gpu, requires_cupy])]
CASES = [((8, 6, 5, 4), 2, "contiguous"), ((8, 6, 5, 4), 4, "channels_last"), ((12, 16), 3, "contiguous"),
         ((8, 8, 7, 7), 4, "contiguous")]  # the last: fp32 channel groups of 4 (C a multiple of 4)


def _float64_ghost(x, weight, bias, grad, virtual_batch_size, eps=1e-5):
    """y and (dx, dweight, dbias) of Ghost BatchNorm in float64 autograd, chunk by chunk."""
    x, weight, bias = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y = torch.cat([reference.forward_train(chunk, weight, bias, eps)[0] for chunk in x.split(virtual_batch_size)])
    y.backward(grad.double())
    return y.detach(), (x.grad, weight.grad, bias.grad)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape, virtual_batch_size, layout", CASES,
                         ids=["8x6x5x4-by2", "8x6x5x4-by4-cl", "12x16-by3", "8x8x7x7-by4"])
def test_ghost_kernels_match_float64(poisoned, backend, device, dtype, shape, virtual_batch_size, layout):
    module = getattr(bn_gpu.backends, backend)
    if device == "cuda" and shape == (8, 8, 7, 7):
        shape = (64, 64, 7, 7)
    C, chunks = shape[1], shape[0] // virtual_batch_size
    x = make_input(shape, dtype, layout, device=device).mul(3).add(2)
    weight = make_input((C,), torch.float32, device=device, seed=1)
    bias = make_input((C,), torch.float32, device=device, seed=2)
    running_mean = make_input((C,), torch.float32, device=device, seed=3)
    running_var = make_input((C,), torch.float32, device=device, seed=4).abs().add(0.5)
    counter = torch.tensor(5, device=device)
    expected_mean, expected_var = running_mean.double(), running_var.double()
    y, mean, invstd = module.ghost_forward_train(x, weight, bias, running_mean, running_var, counter, 0.1, 1e-5,
                                                 chunks)
    grad = make_input(shape, dtype, layout, device=device, seed=5)
    y64, grads64 = _float64_ghost(x, weight, bias, grad, virtual_batch_size)
    for chunk in x.double().split(virtual_batch_size):
        _, chunk_mean, chunk_var, _ = reference.forward_train(chunk, None, None, 1e-5)
        count = chunk.numel() // C
        expected_mean, expected_var = reference.update_running_stats(expected_mean, expected_var, chunk_mean,
                                                                      chunk_var, count, 0.1)
    atol, rtol = TOLERANCES[dtype]
    assert y.stride() == x.stride() and y.dtype == dtype
    torch.testing.assert_close(y.double(), y64, atol=atol * 4, rtol=rtol)
    torch.testing.assert_close(running_mean.double(), expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(running_var.double(), expected_var, atol=1e-5, rtol=1e-5)
    assert counter.item() == 5 + chunks
    grad_x, grad_weight, grad_bias = module.ghost_backward(grad, x, weight, mean, invstd, chunks, torch.float32)
    torch.testing.assert_close(grad_x.double(), grads64[0], atol=atol * 4, rtol=rtol)
    scale = grads64[1].abs().max().item() + grads64[2].abs().max().item()
    torch.testing.assert_close(grad_weight.double(), grads64[1], atol=1e-4 * scale, rtol=1e-4)
    torch.testing.assert_close(grad_bias.double(), grads64[2], atol=1e-4 * scale, rtol=1e-4)
    again = module.ghost_backward(grad, x, weight, mean, invstd, chunks, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(again, (grad_x, grad_weight, grad_bias)))  # deterministic


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape, layout", [((12, 3, 4), "contiguous"), ((10, 3, 4), "contiguous"),
                                           ((10, 3, 2, 2), "channels_last")],
                         ids=["whole-virtual-batches", "shorter-last", "shorter-last-channels-last"])
def test_ghost_batch_norm_on_the_kernels_as_the_torch_operations(monkeypatch, backend, device, shape, layout):
    """The kernels take the whole virtual batches; a shorter last one is a BatchNorm call after them.
    The same module on the CPU backend (the torch operations) is the reference."""
    calls = []
    module = getattr(bn_gpu.backends, backend)
    real = module.ghost_forward_train
    monkeypatch.setattr(module, "ghost_forward_train", lambda *a: calls.append(a[-1]) or real(*a))
    modules = [(bn_gpu.GhostBatchNorm1d(3, 4, momentum=None, backend=b) if len(shape) == 3 else
                bn_gpu.GhostBatchNorm2d(3, 4, momentum=None, backend=b)).to(d) for b, d in ((backend, device),
                                                                                           ("cpu", "cpu"))]
    with torch.no_grad():
        for m in modules:
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.num_batches_tracked.fill_(3)
    x = make_input(shape, torch.float32, layout)
    outputs = []
    for m, d in zip(modules, (device, "cpu")):
        x_m = x.to(d).clone().requires_grad_()
        y = m(x_m)
        y.backward(torch.ones_like(y) + x.to(d))
        outputs.append([t.cpu() for t in (y, x_m.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var,
                                          m.num_batches_tracked)])
    assert calls == [shape[0] // 4]
    assert outputs[0][0].stride() == outputs[1][0].stride()
    for kernels, torch_ops in zip(*outputs):  # fp32 sums in another order: a few ulp of the values' size
        torch.testing.assert_close(kernels, torch_ops, atol=1e-5, rtol=1e-5)
    # A strided running mean: the torch operations.
    strided = torch.zeros(6, device=device)[::2]
    ghost_nn.ghost_batch_norm(x.to(device), strided, torch.ones(3, device=device), training=True,
                              virtual_batch_size=4, backend=backend)
    assert calls == [shape[0] // 4] and strided.abs().sum() > 0


@pytest.mark.skipif(not INTERPRETING, reason="the interpreter runs the Triton backend on CPU tensors")
def test_fake_tensors_take_the_torch_operations():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.randn(8, 3, 4)
        y = ghost_nn.ghost_batch_norm(x, torch.zeros(3), torch.ones(3), training=True, virtual_batch_size=4,
                                      backend="triton", num_batches_tracked=torch.tensor(0))
    assert y.shape == x.shape and type(y).__name__ == "FakeTensor"


@pytest.mark.skipif(not INTERPRETING, reason="the interpreter runs the Triton backend on CPU tensors")
def test_ghost_kernels_gradients_of_gradients():
    x = make_input((4, 2, 2, 1), torch.float64).requires_grad_()
    weight = make_input((2,), torch.float64, seed=1).requires_grad_()
    bias = make_input((2,), torch.float64, seed=2).requires_grad_()

    def ghost(x, weight, bias):
        return ghost_nn.ghost_batch_norm(x, None, None, weight, bias, True, virtual_batch_size=2, backend="triton")
    assert torch.autograd.gradgradcheck(ghost, (x, weight, bias))


def _meta(shape, layout="contiguous"):
    return arrange(torch.empty(shape, device="meta"), layout)


def test_the_ghost_plan_keeps_a_program_in_one_virtual_batch():
    tuning, sms = plan.GPU_TUNING, 132
    # channels-last: the channel block divides C (96 -> 32), so a block never straddles two virtual batches
    g = ghost_backend.geometry(_meta((256, 96, 8, 8), "channels_last"), 8, tuning, sms)
    assert (g.N, g.C, g.chunk_channels, g.plan.block_c) == (32, 768, 96, 32)
    assert g.chunk_extra == 32 * 64 * 96 - 96
    # channels-first 7x7 planes: fp32 channel groups of 4 where C is a multiple of 4, else none
    g = ghost_backend.geometry(_meta((64, 64, 7, 7)), 4, tuning, sms)
    assert g.plan.group == 4 and g.chunk_extra == 16 * 64 * 49 - 64 * 49
    g = ghost_backend.geometry(_meta((64, 6, 7, 7)), 4, tuning, sms)
    assert g.plan.group == 1


SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "profiling" / "ghost_traffic.py"


def _traffic(*args):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)


def test_ghost_traffic_counts_fewer_launches_and_bytes_on_the_kernels():
    result = _traffic("--shape", "16,8", "--virtual-batch-size", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = dict(re.findall(r"^  (torch operations|Triton kernels)\s+(\d+) launches", result.stdout, re.M))
    moved = dict(re.findall(r"^  (torch operations|Triton kernels).* \(([\d.]+) \|x\|\)$", result.stdout, re.M))
    assert int(counts["Triton kernels"]) < int(counts["torch operations"]), result.stdout
    assert float(moved["Triton kernels"]) < float(moved["torch operations"]), result.stdout
    mistake = _traffic("--shape", "10,8", "--virtual-batch-size", "4")
    assert mistake.returncode == 2 and len(mistake.stderr.strip().splitlines()) == 1, mistake.stderr


@pytest.mark.skipif(not INTERPRETING, reason="the interpreter runs the Triton backend on CPU tensors")
def test_kernel_times_ghost_ops_run_the_backend_kernels(monkeypatch):
    """profiling/kernel_times.py's ghost_fwd and ghost_bwd: the backend's Ghost kernels in four virtual
    batches (its forward's outputs per virtual channel), and a clear error where N is no multiple."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import kernel_times
    finally:
        sys.path.remove(str(SCRIPT.parent))
    calls = []
    real = bn_gpu.backends.triton.ghost_forward_train
    monkeypatch.setattr(bn_gpu.backends.triton, "ghost_forward_train", lambda *a: calls.append(a[-1]) or real(*a))
    x, dy = make_input((8, 6, 4, 4)), make_input((8, 6, 4, 4), seed=1)
    y, mean, invstd = kernel_times._op_call("ghost_fwd", "triton", x, dy)()
    assert y.shape == x.shape and mean.shape == invstd.shape == (4 * 6,) and calls == [4, 4]
    grad_x, grad_weight, grad_bias = kernel_times._op_call("ghost_bwd", "triton", x, dy)()
    assert grad_x.shape == x.shape and grad_weight.shape == grad_bias.shape == (6,)
    with pytest.raises(ValueError, match="N a multiple of 4"):
        kernel_times._op_call("ghost_fwd", "triton", make_input((6, 6, 4, 4)), dy)
