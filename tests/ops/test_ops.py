"""torch.library checks of the bn_gpu ops, and torch.compile of a small CNN built with the modules."""
import pytest
import torch

import bn_gpu
from support import backends_for_cpu_tensors, make_input, make_params


def _forward_train_args(layout, backend, requires_grad):
    x = make_input((4, 3, 5, 6), layout=layout).requires_grad_(requires_grad)
    weight, bias, running_mean, running_var = make_params(3)
    return (x, weight.requires_grad_(requires_grad), bias.requires_grad_(requires_grad),
            running_mean, running_var, torch.tensor(2), 0.1, 1e-5, backend)


@pytest.mark.parametrize("backend", backends_for_cpu_tensors())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("requires_grad", [True, False])
def test_opcheck_forward_train(backend, layout, requires_grad):
    torch.library.opcheck(torch.ops.bn_gpu.forward_train.default,
                          _forward_train_args(layout, backend, requires_grad))


@pytest.mark.parametrize("backend", backends_for_cpu_tensors())
def test_opcheck_forward_train_cumulative_without_affine(backend):
    x = make_input((6, 4))
    torch.library.opcheck(torch.ops.bn_gpu.forward_train.default,
                          (x, None, None, torch.zeros(4), torch.ones(4), torch.tensor(0), None, 1e-5, backend))


@pytest.mark.parametrize("backend", backends_for_cpu_tensors())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_forward_eval(backend, layout):
    x = make_input((4, 3, 5, 6), layout=layout).requires_grad_()
    weight, bias, running_mean, running_var = make_params(3)
    torch.library.opcheck(torch.ops.bn_gpu.forward_eval.default,
                          (x, weight.requires_grad_(), bias.requires_grad_(), running_mean, running_var, 1e-5, backend))


@pytest.mark.parametrize("backend", backends_for_cpu_tensors())
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("need_input_grad,need_weight_grad", [(True, True), (True, False), (False, True)])
def test_opcheck_backward(backend, training, need_input_grad, need_weight_grad):
    x = make_input((4, 3, 5))
    weight, _, _, _ = make_params(3)
    _, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, None, None, None, None, 0.1, 1e-5, "cpu")
    grad_y = make_input((4, 3, 5), mean=0, std=1, seed=5)
    torch.library.opcheck(torch.ops.bn_gpu.backward.default,
                          (grad_y, x, weight, mean, invstd, training, need_input_grad, need_weight_grad, backend))


def test_gradcheck_through_the_ops_in_float64():
    x = make_input((5, 3, 4), torch.float64).requires_grad_()
    weight, bias, _, _ = make_params(3, torch.float64)
    weight.requires_grad_()
    bias.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: bn_gpu.batch_norm(x, None, None, w, b, training=True, backend="cpu"),
                                    (x, weight, bias))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: bn_gpu.batch_norm(x, rm, rv, w, b, training=False, backend="cpu"),
                                    (x, weight, bias))


def _small_cnn(backend):
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), bn_gpu.BatchNorm2d(8, backend=backend), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), bn_gpu.BatchNorm2d(8, momentum=None, backend=backend), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10), bn_gpu.BatchNorm1d(10, backend=backend))


@pytest.mark.slow
@pytest.mark.parametrize("backend", backends_for_cpu_tensors())
def test_compile_fullgraph_train_and_eval(backend):
    torch.manual_seed(0)
    eager = _small_cnn(backend)
    compiled_model = _small_cnn(backend)
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for step in range(2):
        x = make_input((4, 3, 6, 6), seed=step)
        y_eager, y_compiled = eager(x), compiled(x)
        torch.testing.assert_close(y_compiled, y_eager, atol=1e-5, rtol=1e-5)
        y_eager.square().sum().backward()
        y_compiled.square().sum().backward()
    for (name, p), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled.grad, p.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, b), b_compiled in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_compiled, b, msg=name)
    eager.eval()
    compiled_model.eval()
    x = make_input((4, 3, 6, 6), seed=9)
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-5, rtol=1e-5)


def test_compile_with_inductor_train_and_eval():
    torch.manual_seed(0)
    model = _small_cnn("cpu")
    reference = _small_cnn("cpu")
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True)
    x = make_input((4, 3, 6, 6))
    torch.testing.assert_close(compiled(x), reference(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    model.eval()
    reference.eval()
    torch.testing.assert_close(compiled(x), reference(x), atol=1e-4, rtol=1e-4)


def test_an_eager_backward_calls_the_kernels_below_the_dispatcher(monkeypatch):
    """The eager fast path holds for the backward too: plain tensors call bn_gpu.ops.kernels.backward
    directly; a gradient batched by the legacy vmap (gradcheck's) goes through torch.ops.bn_gpu."""
    from bn_gpu.ops import autograd
    calls = []
    direct = autograd.backward_kernel
    monkeypatch.setattr(autograd, "backward_kernel", lambda *args: calls.append(1) or direct(*args))
    x = torch.randn(6, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, requires_grad=True)
    y = bn_gpu.batch_norm(x, None, None, weight, None, True, backend="cpu")
    torch.autograd.grad(y, (x, weight), torch.randn_like(y))
    assert len(calls) == 1


@pytest.mark.slow
def test_inductor_compiles_an_eval_model_where_the_ci_variable_is_set():
    """Inductor refuses, where CI is set, a fallback for an op with a decomposition (the eval op has
    one, for ONNX): a user's CI compiling an eval-mode model must still work. A fresh process, so
    that no earlier compile has made the fallback."""
    import subprocess
    import sys
    code = ("import torch, bn_gpu\n"
            "m = bn_gpu.convert_model(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))).eval()\n"
            "x = torch.randn(2, 3, 6, 6)\n"
            "torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), m(x))\n"
            "print('compiled')\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    env["CI"] = "true"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-2000:]
