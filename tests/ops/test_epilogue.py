"""The fused epilogue relu(bn(x) + residual): ops, modules and fx fusion, against the float64
reference and the unfused torch sequence F.relu(F.batch_norm(x) + residual)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import bn_gpu
from bn_gpu import reference as ref
from support import (CHANNEL_GROUP_CASE, LAYOUT_CASES, arrange, assert_close, backend_devices, case_id, make_input,
                     make_params)

EPILOGUES = [("relu", False), ("relu", True), (None, True)]
EPILOGUE_IDS = ["relu", "add-relu", "add"]


def _scaled(grad, grad_y, C):
    return grad / (grad_y.double().abs().sum().cpu() / C)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("case", LAYOUT_CASES[::2] + [CHANNEL_GROUP_CASE], ids=case_id)
# bfloat16 in the full suite (make test) only: the epilogue's arithmetic is in the accumulation dtype.
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)], ids=str)
@pytest.mark.parametrize("activation,with_residual", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_epilogue_as_reference(backend, device, case, dtype, activation, with_residual, training, kernel_path,
                               poisoned):
    shape, layout = case
    C = shape[1]
    x = make_input(shape, dtype, layout, device, mean=0.5, std=1.0).requires_grad_()
    weight, bias, running_mean, running_var = make_params(C, torch.float32, device)
    weight.requires_grad_()
    bias.requires_grad_()
    # The residual in its own layout: contiguous whatever x's is.
    residual = make_input(shape, dtype, "contiguous", device, mean=0.0, std=1.0, seed=5).requires_grad_() \
        if with_residual else None
    y = bn_gpu.batch_norm(x, running_mean.clone(), running_var.clone(), weight, bias, training, backend=backend,
                          activation=activation, residual=residual)
    relu = activation == "relu"
    if training:
        y_bn = ref.forward_train(x.detach(), weight.detach(), bias.detach())[0]
    else:
        y_bn = ref.forward_eval(x.detach(), running_mean, running_var, weight.detach(), bias.detach())
    y_ref = ref.epilogue(y_bn, residual.detach() if with_residual else None, relu)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y, y_ref, dtype, "output")

    grad_y = make_input(shape, dtype, layout, device, mean=0.0, std=1.0, seed=7)
    inputs = (x, weight, bias) + ((residual,) if with_residual else ())
    grads = torch.autograd.grad(y, inputs, grad_y)
    # bf16 outputs near 0 may round across the ReLU's kink: the reference takes the ReLU's mask from
    # the kernels' own output (a positive fp32 value stays positive in bf16), so every gradient is
    # compared everywhere; elsewhere the float64 output's.
    grad_bn = ref.epilogue_backward(grad_y, y.detach() if dtype == torch.bfloat16 and relu else y_ref, relu)
    if training:
        grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_train(grad_bn, x.detach(), weight.detach())
    else:
        grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_eval(grad_bn, x.detach(), running_mean, running_var,
                                                               weight.detach())
    assert_close(grads[0], grad_x_ref, dtype, "grad_input")
    assert_close(_scaled(grads[1], grad_y, C), _scaled(grad_w_ref, grad_y, C), dtype, "grad_weight")
    assert_close(_scaled(grads[2], grad_y, C), _scaled(grad_b_ref, grad_y, C), dtype, "grad_bias")
    if with_residual:
        assert_close(grads[3], grad_bn, dtype, "grad_residual")


def _torch_sequence(x, running_mean, running_var, weight, bias, training, residual):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training)
    return F.relu(y if residual is None else y + residual)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "add-relu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_relu_epilogue_at_an_exact_zero_as_torch(backend, device, with_residual, layout, kernel_path):
    """Pre-activations exactly 0 get a zero gradient, as torch's ReLU gives them. Channel values
    -1, 0, 1 repeated have mean 0 exactly; with bias 0 and residual 0 every 0 of x is an exact 0 of
    the ReLU's input, in training and in eval (running_mean 0)."""
    pattern = torch.tensor([-1.0, 0.0, 1.0, 0.0, 1.0, -1.0], dtype=torch.float64)
    x64 = pattern.repeat(2 * 3 * 4).reshape(2, 3, 4, 6)[:, :, :4]  # each channel: 2 x 4 rows of the pattern
    for training in (True, False):
        x = arrange(x64.float().to(device), layout).requires_grad_()
        weight = torch.tensor([0.5, 1.0, 2.0], device=device, requires_grad=True)
        bias = torch.zeros(3, device=device, requires_grad=True)
        residual = torch.zeros_like(x) if with_residual else None
        stats = (torch.zeros(3, device=device), torch.ones(3, device=device))
        y = bn_gpu.batch_norm(x, *(t.clone() for t in stats), weight, bias, training, backend=backend,
                              activation="relu", residual=residual)
        inputs = (x, weight, bias)
        grad_y = make_input(tuple(x.shape), torch.float32, layout, device, mean=0.5, std=1.0, seed=3)
        grads = torch.autograd.grad(y, inputs, grad_y)
        expected_inputs = [t.detach().cpu().requires_grad_() for t in inputs]
        expected = _torch_sequence(*expected_inputs[:1], *(t.cpu().clone() for t in stats), *expected_inputs[1:],
                                   training, residual.cpu() if with_residual else None)
        expected_grads = torch.autograd.grad(expected, expected_inputs, grad_y.cpu())
        if not training:  # the exact zeros of x are the ReLU's: torch's gradient there is 0
            assert (expected_grads[0][x64 == 0] == 0).all()
        torch.testing.assert_close(y.cpu(), expected)
        for name, grad, expected_grad in zip(("input", "weight", "bias"), grads, expected_grads):
            torch.testing.assert_close(grad.cpu(), expected_grad, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{'train' if training else 'eval'} grad_{name}: {m}")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("with_residual", [False, True], ids=["relu", "add-relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_relu_epilogue_keeps_nan_and_passes_its_gradient_as_torch(backend, device, with_residual, training):
    """torch.relu(NaN) is NaN, and its backward zeroes the gradient only where the output is <= 0: a
    NaN passes it on. A diverging model's NaN must not vanish under BatchNormReLU."""
    x = torch.tensor([[math.nan, 1.0, -2.0], [2.0, 3.0, 0.5], [0.25, -1.0, 4.0]], device=device)
    weight, bias = torch.tensor([1.0, 0.5, 2.0], device=device), torch.tensor([0.1, -0.2, 0.3], device=device)
    running_mean, running_var = torch.tensor([0.0, 1.0, 0.5], device=device), torch.ones(3, device=device)
    residual = torch.tensor([[0.5, math.nan, 0.0], [1.0, -1.0, 0.0], [0.0, 0.0, -9.0]], device=device) \
        if with_residual else None
    grad_y = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]], device=device)
    results = []
    for fn in (lambda *a: bn_gpu.batch_norm(*a[:6], backend=backend, activation="relu", residual=a[6]),
               _torch_sequence):
        inputs = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = fn(inputs[0], running_mean.clone(), running_var.clone(), *inputs[1:], training, residual)
        results.append((y, *torch.autograd.grad(y, inputs, grad_y)))
    for what, actual, expected in zip(("output", "grad_input", "grad_weight", "grad_bias"), *results):
        torch.testing.assert_close(actual.cpu(), expected.cpu(), equal_nan=True, msg=lambda m: f"{what}: {m}")
    assert torch.isnan(results[0][0]).any()


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_epilogue_double_backward_and_forward_mode(backend, device, training):
    x = make_input((3, 2, 2, 3), torch.float64, device=device, mean=0.3, std=1.0).requires_grad_()
    residual = make_input((3, 2, 2, 3), torch.float64, device=device, mean=0.0, std=1.0, seed=3).requires_grad_()
    weight, bias, running_mean, running_var = make_params(2, torch.float64, device)

    def f(a, r):
        return bn_gpu.batch_norm(a, running_mean.clone(), running_var.clone(), weight, bias, training,
                                 backend=backend, activation="relu", residual=r)

    def g(a, r):
        return F.relu(F.batch_norm(a, running_mean.clone(), running_var.clone(), weight, bias, training) + r)

    assert torch.autograd.gradgradcheck(f, (x, residual))
    tangents = (torch.randn_like(x), torch.randn_like(residual))
    primals = (x.detach(), residual.detach())
    torch.testing.assert_close(torch.func.jvp(f, primals, tangents), torch.func.jvp(g, primals, tangents))


@pytest.mark.parametrize("backend,device", backend_devices())
def test_epilogue_under_vmap_as_torch(backend, device):
    x = make_input((3, 4, 2, 5), device=device)
    residual = make_input((3, 4, 2, 5), device=device, seed=2)
    y = torch.vmap(lambda a, r: bn_gpu.batch_norm(a, None, None, training=True, activation="relu", residual=r,
                                                  backend=backend))(x, residual)
    expected = torch.vmap(lambda a, r: F.relu(F.batch_norm(a, None, None, training=True) + r))(x, residual)
    torch.testing.assert_close(y, expected)


def test_epilogue_refuses_bad_arguments():
    x = torch.randn(4, 3, 5)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        bn_gpu.batch_norm(x, None, None, training=True, activation="gelu")
    with pytest.raises(RuntimeError, match="residual must match the input"):
        bn_gpu.batch_norm(x, None, None, training=True, residual=torch.randn(4, 3, 6))
    running_mean = torch.zeros(3)
    with pytest.raises(RuntimeError, match="residual must match the input"):
        bn_gpu.batch_norm(x, running_mean, torch.ones(3), training=True, residual=x.double())
    assert torch.equal(running_mean, torch.zeros(3))


def test_epilogue_ops_pass_opcheck():
    x = torch.randn(4, 3, 5, requires_grad=True)
    residual = torch.randn(4, 3, 5, requires_grad=True)
    weight, bias = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    for op, args in ((torch.ops.bn_gpu.forward_train.default,
                      (x, weight, bias, torch.zeros(3), torch.ones(3), torch.tensor(0), 0.1, 1e-5, "cpu", residual,
                       True)),
                     (torch.ops.bn_gpu.forward_eval.default,
                      (x, weight, bias, torch.zeros(3), torch.ones(3), 1e-5, "cpu", residual, True))):
        torch.library.opcheck(op, args)


# ---- modules and fusion --------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", backend_devices())
def test_batch_norm_relu_module_as_the_torch_sequence(backend, device):
    torch.manual_seed(0)
    fused = bn_gpu.BatchNormReLU2d(4, backend=backend).to(device)
    plain = torch.nn.BatchNorm2d(4).to(device)
    assert list(fused.state_dict()) == list(plain.state_dict())
    for step in range(2):
        x = arrange(make_input((3, 4, 5, 5), device=device, seed=step), "channels_last")
        residual = make_input((3, 4, 5, 5), device=device, seed=10 + step)
        torch.testing.assert_close(fused(x, residual), F.relu(plain(x) + residual))
        torch.testing.assert_close(fused(x), F.relu(plain(x)))
    torch.testing.assert_close(fused.running_var, plain.running_var)
    fused.eval()
    plain.eval()
    torch.testing.assert_close(fused(x, residual), F.relu(plain(x) + residual))


class _Block(torch.nn.Module):
    """A ResNet basic block, the patterns fusion looks for, and one it must leave."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2, self.bn2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.bn3 = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        y += x
        return self.bn3(torch.relu(y)) * 2


@pytest.mark.parametrize("backend", ["cpu", None])
def test_fuse_batch_norm_relu_reports_and_computes_the_same(backend):
    torch.manual_seed(0)
    model = _Block()
    fused, report = bn_gpu.fuse_batch_norm_relu(model, backend=backend)
    assert report.fused == [("bn1", "BatchNorm -> ReLU"), ("bn2", "BatchNorm + add -> ReLU")]
    assert [name for name, _ in report.left] == ["bn3"] and "mul" in report.left[0][1]
    assert "fused 2 BatchNorm(s), left 1" in str(report)
    assert type(fused.bn1) is bn_gpu.BatchNormReLU2d and type(fused.bn3) is torch.nn.BatchNorm2d
    assert type(model.bn1) is torch.nn.BatchNorm2d  # the original is untouched
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4, 5, 5)
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    y, y_ref = fused(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(fused.bn2.weight.grad, reference.bn2.weight.grad)
    torch.testing.assert_close(fused.bn1.running_mean, reference.bn1.running_mean)


class _DataDependent(torch.nn.Module):
    """A model torch.fx cannot trace (control flow on a value), with a BatchNorm -> ReLU in a
    Sequential, one BatchNorm that no ReLU follows there, and one outside any Sequential."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                        torch.nn.BatchNorm2d(4))
        self.head = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.body(x)
        return torch.relu(self.head(y)) if bool(x.abs().sum() > 0) else y  # always true, but data-dependent


def test_fuse_batch_norm_relu_on_an_untraceable_model_fuses_within_sequentials():
    torch.manual_seed(0)
    model = _DataDependent()
    fused, report = bn_gpu.fuse_batch_norm_relu(model)
    assert not report.traced and "TraceError" in report.trace_error
    assert report.fused == [("body.1", "BatchNorm -> ReLU")]
    assert dict(report.left).keys() == {"body.3", "head"}
    assert str(report).startswith("fused 1 BatchNorm(s), left 2 (torch.fx could not trace the model")
    assert type(fused.body[1]) is bn_gpu.BatchNormReLU2d and type(fused.body[2]) is torch.nn.Identity
    assert type(model.body[1]) is torch.nn.BatchNorm2d  # the original is untouched
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), model(x))
    torch.testing.assert_close(fused.body[1].running_var, model.body[1].running_var)


def test_fusion_report_names_what_follows_a_batch_norm():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Sigmoid(),
                                torch.nn.BatchNorm2d(4))
    _, report = bn_gpu.fuse_batch_norm_relu(model)
    left = dict(report.left)
    assert left["1"] == "followed by module 2 (Sigmoid), not a ReLU or an add"
    assert left["3"] == "followed by the model's output, not a ReLU or an add"
    assert "output output" not in str(report)


def test_batch_norm_relu_under_torch_compile():
    torch.manual_seed(0)
    module = bn_gpu.BatchNormReLU2d(3)
    eager = copy.deepcopy(module)
    x, residual = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(torch.compile(module, backend="aot_eager", fullgraph=True)(x, residual),
                               eager(x, residual))
