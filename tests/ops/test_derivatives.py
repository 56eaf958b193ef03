"""Beyond first-order gradients: double backward, forward-mode AD, torch.func transforms and vmap,
against torch.nn.functional.batch_norm (PyTorch's OpInfo checks for nn.functional.batch_norm --
gradgrad, forward mode, forward-over-reverse -- are the yardstick)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import bn_gpu
from support import arrange, backend_devices, make_input, make_params

F64 = torch.float64


def _case(device, layout="contiguous", shape=(3, 2, 2, 3), seed=0):
    x = make_input(shape, F64, layout, device, mean=1.0, std=1.5, seed=seed).requires_grad_()
    weight, bias, running_mean, running_var = make_params(shape[1], F64, device)
    return x, weight.requires_grad_(), bias.requires_grad_(), running_mean, running_var


def _bn(backend, training, running_mean, running_var):
    """batch_norm(x, weight, bias) on fresh copies of the running statistics (gradcheck calls it many times)."""
    def f(x, weight=None, bias=None):
        stats = (running_mean.clone(), running_var.clone()) if running_mean is not None else (None, None)
        return bn_gpu.batch_norm(x, *stats, weight, bias, training=training, backend=backend)
    return f


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", backend_devices())
def test_gradgradcheck_of_the_issue(backend, device):
    interpreted = backend == "triton" and device == "cpu"  # the interpreter takes minutes over 300 values
    x = make_input((3, 2, 2, 3) if interpreted else (4, 3, 5, 5), F64, device=device).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a: bn_gpu.batch_norm(a, None, None, training=True, backend=backend),
                                        (x,))


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradgradcheck_and_forward_over_reverse(backend, device, layout, affine, training):
    interpreted = backend == "triton" and device == "cpu"  # 16 values: the interpreter's launches are slow
    x, weight, bias, running_mean, running_var = _case(device, layout, shape=(2, 2, 2, 2) if interpreted else (3, 2, 2, 3))
    inputs = (x, weight, bias) if affine else (x,)
    f = _bn(backend, training, running_mean, running_var)
    assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_stats", [True, False], ids=["running-stats", "no-stats"])
def test_forward_mode_gradcheck(backend, device, training, with_stats):
    if not training and not with_stats:
        pytest.skip("eval without running statistics uses batch statistics: the training case")
    x, weight, bias, running_mean, running_var = _case(device, shape=(3, 2, 4))
    stats = (running_mean, running_var) if with_stats else (None, None)
    assert torch.autograd.gradcheck(_bn(backend, training, *stats), (x, weight, bias), check_forward_ad=True,
                                    check_backward_ad=True, check_batched_grad=True)


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_jvp_without_requires_grad_as_torch(backend, device, training):
    """The issue's case: inputs that do not require grad still carry their tangent through."""
    x, weight, bias, running_mean, running_var = (t.detach() for t in _case(device, shape=(6, 4, 3)))
    x_tangent, weight_tangent = torch.randn_like(x), torch.randn_like(weight)

    def run(f):
        return torch.func.jvp(lambda a, w: f(a, running_mean.clone(), running_var.clone(), w, bias, training=training),
                              (x, weight), (x_tangent, weight_tangent))

    (out, tangent), (expected_out, expected_tangent) = run(
        lambda *a, **k: bn_gpu.batch_norm(*a, **k, backend=backend)), run(F.batch_norm)
    assert expected_tangent.norm() > 1
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(tangent, expected_tangent)


@pytest.mark.parametrize("backend, device", backend_devices())
def test_jacfwd_and_jacrev_as_torch(backend, device):
    x = make_input((4, 2, 3), F64, device=device)
    for transform in (torch.func.jacfwd, torch.func.jacrev):
        jacobian = transform(lambda a: bn_gpu.batch_norm(a, None, None, training=True, backend=backend))(x)
        expected = transform(lambda a: F.batch_norm(a, None, None, training=True))(x)
        torch.testing.assert_close(jacobian, expected)


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_statistics_with_a_tangent_are_refused(backend, device, training, which):
    x, weight, bias, running_mean, running_var = (t.detach() for t in _case(device))
    stats = {"running_mean": running_mean.clone(), "running_var": running_var.clone()}
    before = {name: t.clone() for name, t in stats.items()}
    with fwAD.dual_level():
        stats[which] = fwAD.make_dual(stats[which], torch.ones_like(stats[which]))
        dual_x = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
            bn_gpu.batch_norm(dual_x, stats["running_mean"], stats["running_var"], weight, bias, training=training,
                              backend=backend)
        if not training:  # torch refuses them in eval too
            with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
                F.batch_norm(dual_x, stats["running_mean"], stats["running_var"], weight, bias, training=False)
    for name in stats:
        torch.testing.assert_close(fwAD.unpack_dual(stats[name]).primal, before[name], rtol=0, atol=0)


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_running_statistics_alone_with_a_tangent_in_eval_as_torch(backend, device, which):
    """Accepted, as F.batch_norm accepts it: the output as without the tangent, and no tangent on it."""
    x, weight, bias, running_mean, running_var = (t.detach() for t in _case(device))
    outputs = []
    for fn in (lambda *a: bn_gpu.batch_norm(*a, training=False, backend=backend),
               lambda *a: F.batch_norm(*a, training=False)):
        stats = {"running_mean": running_mean.clone(), "running_var": running_var.clone()}
        with fwAD.dual_level():
            stats[which] = fwAD.make_dual(stats[which], torch.ones_like(stats[which]))
            y = fn(x, stats["running_mean"], stats["running_var"], weight, bias)
            primal, tangent = fwAD.unpack_dual(y)
            assert tangent is None
            outputs.append(primal)
    torch.testing.assert_close(*outputs)
    with fwAD.dual_level():  # in training the tangent would reach the updated statistics: refused
        dual = fwAD.make_dual(running_mean.clone(), torch.ones_like(running_mean))
        with pytest.raises(RuntimeError, match="not differentiable wrt running_mean and running_var"):
            bn_gpu.batch_norm(x, dual, running_var.clone(), weight, bias, training=True, backend=backend)


def _cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Tanh(),
        torch.nn.Conv2d(4, 4, 3, stride=2), torch.nn.BatchNorm2d(4), torch.nn.Softplus(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1)).double()


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradient_penalty_through_a_converted_cnn_as_torch(backend, device, layout):
    """WGAN-GP: the penalty on the input gradient's norm, back through the model's parameters."""
    reference = _cnn().to(device)
    model = bn_gpu.convert_model(copy.deepcopy(reference), backend=backend)
    x = arrange(make_input((5, 3, 6, 6), F64, device=device, mean=0.5, std=1.0), layout)

    def penalty_gradients(net):
        inputs = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(net(inputs).sum(), inputs, create_graph=True)
        penalty = ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()
        return torch.autograd.grad(penalty, list(net.parameters()), allow_unused=True, materialize_grads=True)

    for got, expected in zip(penalty_gradients(model), penalty_gradients(reference)):
        torch.testing.assert_close(got, expected)
    for got, expected in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend, device", backend_devices())
def test_grad_of_a_cube_then_its_norm_as_torch(backend, device):
    """The issue's gradient-penalty loss: grad of y^3, then backward through its squared norm."""
    grads = []
    for f in (lambda *a, **k: bn_gpu.batch_norm(*a, **k, backend=backend), F.batch_norm):
        x, weight, bias, _, _ = _case(device, shape=(4, 3, 5, 5))
        (grad,) = torch.autograd.grad(f(x, None, None, weight, bias, training=True).pow(3).sum(), x, create_graph=True)
        grad.pow(2).sum().backward()
        grads.append((x.grad, weight.grad, bias.grad))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected)


# ---- vmap ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, device", backend_devices())
def test_vmap_training_without_running_statistics_as_torch(backend, device):
    x = make_input((3, 4, 2, 5), torch.float32, device=device)
    weight, bias, _, _ = make_params(2, device=device)
    y = torch.vmap(lambda a: bn_gpu.batch_norm(a, None, None, weight, bias, training=True, backend=backend))(x)
    torch.testing.assert_close(y, torch.vmap(lambda a: F.batch_norm(a, None, None, weight, bias, training=True))(x))


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("stat_dim", [0, 1], ids=["stats-batched-dim0", "stats-batched-dim1"])
def test_vmap_training_updates_each_samples_running_statistics(backend, device, stat_dim):
    """Compared with a loop over the samples (torch's own vmap is wrong for statistics batched on dim 1)."""
    x = make_input((3, 4, 2, 5), torch.float32, device=device)
    _, _, running_mean, running_var = make_params(2 * 3, device=device)
    running_mean, running_var = (t.view(3, 2).movedim(0, stat_dim).contiguous() for t in (running_mean, running_var))
    expected_mean, expected_var = running_mean.clone(), running_var.clone()
    y = torch.vmap(lambda a, m, v: bn_gpu.batch_norm(a, m, v, training=True, momentum=0.3, backend=backend),
                   in_dims=(0, stat_dim, stat_dim))(x, running_mean, running_var)
    for i in range(3):
        expected = F.batch_norm(x[i], expected_mean.select(stat_dim, i), expected_var.select(stat_dim, i),
                                training=True, momentum=0.3)
        torch.testing.assert_close(y[i], expected)
    torch.testing.assert_close(running_mean, expected_mean)
    torch.testing.assert_close(running_var, expected_var)


@pytest.mark.parametrize("backend, device", backend_devices())
def test_vmap_training_with_shared_running_statistics_is_refused(backend, device):
    x = make_input((3, 4, 2, 5), torch.float32, device=device)
    _, _, running_mean, running_var = make_params(2, device=device)
    before = running_mean.clone()
    with pytest.raises(RuntimeError, match="running_mean and running_var batched like the input"):
        torch.vmap(lambda a: bn_gpu.batch_norm(a, running_mean, running_var, training=True, backend=backend))(x)
    assert torch.equal(running_mean, before)


@pytest.mark.parametrize("backend, device", backend_devices())
def test_vmap_eval_and_per_sample_gradients_as_torch(backend, device):
    x = make_input((3, 4, 2, 5), torch.float32, device=device)
    weight, bias, running_mean, running_var = make_params(2, device=device)
    model = bn_gpu.BatchNorm1d(2, backend=backend).to(device).eval()
    reference = torch.nn.BatchNorm1d(2).to(device).eval()
    for m in (model, reference):
        m.running_mean.copy_(running_mean)
        m.running_var.copy_(running_var)
    torch.testing.assert_close(torch.vmap(model)(x), torch.vmap(reference)(x))

    def per_sample_grad(f):
        return torch.vmap(torch.func.grad(lambda a: f(a, None, None, weight, bias, training=True).pow(2).sum()))(x)
    torch.testing.assert_close(per_sample_grad(lambda *a, **k: bn_gpu.batch_norm(*a, **k, backend=backend)),
                               per_sample_grad(F.batch_norm))
