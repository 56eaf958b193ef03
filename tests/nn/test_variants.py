"""FrozenBatchNorm, Batch Renormalization and Ghost BatchNorm against their float64 references
(bn_gpu/reference.py) and the public implementations they replace."""
from __future__ import annotations

import copy

import pytest
import torch

import bn_gpu
from bn_gpu import reference
from support import (TOLERANCES, TorchvisionFrozenBatchNorm2d, assert_close, backend_devices, make_input,
                     make_params)

LAYOUTS = ["contiguous", "channels_last"]


def _params(C, dtype, device):
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return make_params(C, param_dtype, device)


# ---- FrozenBatchNorm ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_frozen_batch_norm_as_reference_and_torchvision(backend, device, dtype, layout):
    x = make_input((3, 4, 5, 6), dtype, layout, device).requires_grad_()
    weight, bias, running_mean, running_var = _params(4, dtype, device)
    module = bn_gpu.FrozenBatchNorm2d(4, eps=1e-3, backend=backend).to(device, weight.dtype)
    torchvision_like = TorchvisionFrozenBatchNorm2d(4, eps=1e-3).to(device, weight.dtype)
    for m in (module, torchvision_like):
        for name, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                            ("running_var", running_var)):
            getattr(m, name).copy_(value)
    y = module(x)
    assert_close(y, reference.frozen_batch_norm(x.detach(), weight, bias, running_mean, running_var, 1e-3), dtype,
                 "output")
    assert y.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    grad = make_input(x.shape, dtype, layout, device, seed=3)
    (dx,) = torch.autograd.grad(y, x, grad)
    scale = weight.double() / torch.sqrt(running_var.double() + 1e-3)
    assert_close(dx, grad.double() * scale.reshape(1, -1, 1, 1), dtype, "grad_input")
    if dtype == torch.float32:
        torch.testing.assert_close(y, torchvision_like(x), atol=1e-5, rtol=1e-5)
    assert list(module.state_dict()) == list(torchvision_like.state_dict())


def test_frozen_batch_norm_keeps_no_activation_for_the_backward():
    x = torch.randn(8, 4, 16, 16, requires_grad=True)
    frozen = bn_gpu.FrozenBatchNorm2d(4)
    weight, bias, running_mean, running_var = make_params(4)
    for name, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        getattr(frozen, name).copy_(value)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = frozen(x)
    assert all(shape.numel() <= 4 for shape in saved), saved  # per-channel vectors only
    grad = torch.randn(x.shape)
    y.backward(grad)
    scale = weight.double() / torch.sqrt(running_var.double() + 1e-5)
    assert_close(x.grad, grad.double() * scale.reshape(1, -1, 1, 1), torch.float32, "grad_input")


def test_frozen_batch_norm_loads_a_batch_norm_checkpoint_and_torchvisions():
    bn = torch.nn.BatchNorm2d(4)
    bn.running_mean.normal_()
    frozen = bn_gpu.FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked dropped, as torchvision drops it
    assert torch.equal(frozen.running_mean, bn.running_mean)
    frozen.load_state_dict(TorchvisionFrozenBatchNorm2d(4).state_dict())
    with pytest.raises(ValueError, match="expected 4D input"):
        frozen(torch.randn(2, 4, 3))


def test_convert_model_frozen_shares_storage_and_computes_eval_batch_norm():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.BatchNorm1d(4 * 4 * 4, affine=False))
    with torch.no_grad():
        for m in (model[1], model[4]):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 6, 6)
    expected = model.eval()(x)
    weight_storage = model[1].weight.data_ptr()
    bn_gpu.convert_model(model, frozen=True)
    assert type(model[1]) is bn_gpu.FrozenBatchNorm2d and type(model[4]) is bn_gpu.FrozenBatchNorm1d
    assert model[1].weight.data_ptr() == weight_storage and not model[1].weight.requires_grad
    torch.testing.assert_close(model(x), expected)
    folded, report = bn_gpu.fold_batch_norms(model)
    assert ("1", "0") in report.folded


# ---- Batch Renormalization -------------------------------------------------------------------------

def _renorm_case(dtype, layout, device, seed=0):
    x = make_input((6, 3, 4, 5), dtype, layout, device, mean=1.0, std=2.0, seed=seed)
    weight, bias, running_mean, running_var = _params(3, dtype, device)
    running_var = running_var * 3  # sigma_B / sigma away from 1: r is clipped for some channels
    return x, weight, bias, running_mean, running_var


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("warmup", [False, True], ids=["renorm", "warm-up"])
def test_batch_renorm_as_reference(backend, device, dtype, layout, warmup):
    x, weight, bias, running_mean, running_var = _renorm_case(dtype, layout, device)
    x.requires_grad_()
    weight.requires_grad_()
    bias.requires_grad_()
    counter = torch.tensor(2, device=device)
    mean_before, var_before = running_mean.clone(), running_var.clone()
    y = bn_gpu.batch_renorm(x, running_mean, running_var, weight, bias, True, 0.2, 1e-5, r_max=1.25, d_max=0.3,
                            warmup_steps=5 if warmup else 2, num_batches_tracked=counter, backend=backend)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    y_ref, r, d, mean_ref, var_ref = reference.batch_renorm_train(x64, w64, b64, mean_before, var_before, 0.2, 1e-5,
                                                                  1.25, 0.3, warmup)
    if not warmup:
        assert bool(((r - 1.25).abs() < 1e-12).any()) and bool(((r - 1.25).abs() > 1e-3).any()), r  # clipped and not
    assert_close(y, y_ref, dtype, "output")
    atol, rtol = TOLERANCES[dtype] if dtype != torch.float64 else (1e-7, 1e-7)
    torch.testing.assert_close(running_mean.double().cpu(), mean_ref.cpu(), atol=max(atol, 1e-5), rtol=rtol)
    torch.testing.assert_close(running_var.double().cpu(), var_ref.cpu(), atol=max(atol, 1e-5), rtol=rtol)
    assert int(counter) == 3
    grad = make_input(x.shape, dtype, layout, device, seed=7)
    got = torch.autograd.grad(y, (x, weight, bias), grad)
    expected = torch.autograd.grad(y_ref, (x64, w64, b64), grad.double())
    for what, a, b in zip(("grad_input", "grad_weight", "grad_bias"), got, expected):
        atol, rtol = TOLERANCES[dtype]
        scale = 1.0 if what == "grad_input" else float(b.abs().max())  # sums over 120 values per channel
        torch.testing.assert_close(a.double().cpu(), b.cpu(), atol=atol * max(scale, 1.0), rtol=rtol,
                                   msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend, device", backend_devices())
def test_batch_renorm_module_warms_up_as_batch_norm_then_eval_is_batch_norm(backend, device):
    torch.manual_seed(0)
    renorm = bn_gpu.BatchRenorm2d(3, momentum=0.1, warmup_steps=2, r_max=1.2, d_max=0.1, backend=backend).to(device)
    plain = bn_gpu.BatchNorm2d(3, backend=backend).to(device)
    for step in range(3):
        x = make_input((4, 3, 5, 5), device=device, seed=step, mean=step * 3.0)
        y, y_plain = renorm(x), plain(x)
        if step < 2:
            torch.testing.assert_close(y, y_plain)
        else:  # the batch mean moved away from the running mean: d corrects it
            assert not torch.allclose(y, y_plain, atol=1e-3)
    assert int(renorm.num_batches_tracked) == 3
    renorm.eval()
    plain.load_state_dict(renorm.state_dict())
    plain.eval()
    x = make_input((4, 3, 5, 5), device=device, seed=9)
    torch.testing.assert_close(renorm(x), plain(x))


def test_batch_renorm_refuses_bad_settings():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        bn_gpu.batch_renorm(x, torch.zeros(3), torch.ones(3), training=True, r_max=0.5)
    with pytest.raises(ValueError, match="needs running_mean"):
        bn_gpu.batch_renorm(x, None, None, training=True)
    with pytest.raises(ValueError, match="warmup_steps needs num_batches_tracked"):
        bn_gpu.batch_renorm(x, torch.zeros(3), torch.ones(3), training=True, warmup_steps=3)


# ---- Ghost BatchNorm ------------------------------------------------------------------------------

def _chunked_torch(module: torch.nn.Module, x, virtual_batch_size):
    """The common implementation Ghost BatchNorm replaces: BatchNorm called on each chunk."""
    return torch.cat([module(chunk) for chunk in x.split(virtual_batch_size, dim=0)])


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("shape, virtual_batch_size", [((10, 3), 4), ((12, 3, 5), 4), ((7, 3, 2, 3), 3)],
                         ids=["10x3-by4", "12x3x5-by4", "7x3x2x3-by3"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_ghost_batch_norm_as_the_chunked_batch_norm(backend, device, shape, virtual_batch_size, momentum):
    torch.manual_seed(0)
    x = make_input(shape, torch.float64, device=device).requires_grad_()
    module_type = bn_gpu.GhostBatchNorm1d if len(shape) < 4 else bn_gpu.GhostBatchNorm2d
    torch_type = torch.nn.BatchNorm1d if len(shape) < 4 else torch.nn.BatchNorm2d
    ghost = module_type(3, virtual_batch_size, momentum=momentum, backend=backend).to(device).double()
    chunked = torch_type(3, momentum=momentum).to(device).double()
    with torch.no_grad():
        for m in (ghost, chunked):
            m.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
            m.running_mean.fill_(0.5)
            m.num_batches_tracked.fill_(2)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ghost(x), _chunked_torch(chunked, x_ref, virtual_batch_size)
    torch.testing.assert_close(y, y_ref)
    grad = make_input(shape, torch.float64, device=device, seed=4)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(ghost.weight.grad, chunked.weight.grad)
    torch.testing.assert_close(ghost.bias.grad, chunked.bias.grad)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ghost, name), getattr(chunked, name))
    y64, _, _ = reference.ghost_batch_norm_train(x.detach(), chunked.weight, chunked.bias, chunked.running_mean,
                                                 chunked.running_var, 0.1, 1e-5, virtual_batch_size)
    torch.testing.assert_close(y.detach().cpu(), y64.cpu().to(y.dtype))  # outputs do not depend on momentum


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("rows", [10, 12], ids=["shorter-last-chunk", "whole-chunks"])  # 12: Triton's kernels
def test_ghost_batch_norm_running_statistics_of_a_chunk_holding_an_inf_as_the_chunked_batch_norm(backend, device,
                                                                                                 rows):
    """A chunk holding +inf has an infinite mean and a NaN variance, as BatchNorm on that chunk gives:
    the running mean goes to inf (not NaN), the running variance to NaN, the other channels unharmed."""
    x = make_input((rows, 3), torch.float64, device=device)
    x[5, 1] = float("inf")  # the second chunk of four rows, channel 1
    ghost = bn_gpu.GhostBatchNorm1d(3, 4, backend=backend).to(device).double()
    chunked = torch.nn.BatchNorm1d(3).to(device).double()
    ghost(x), _chunked_torch(chunked, x, 4)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ghost, name), getattr(chunked, name), equal_nan=True)
    assert ghost.running_mean[1] == float("inf") and ghost.running_var[1].isnan()
    assert ghost.running_mean[[0, 2]].isfinite().all() and ghost.running_var[[0, 2]].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ghost_batch_norm_keeps_dtype_and_layout(dtype):
    x = make_input((8, 3, 4, 5), dtype, "channels_last")
    y = bn_gpu.GhostBatchNorm2d(3, 3)(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(3)
    assert_close(y, _chunked_torch(bn, x.float(), 3), dtype, "output")
    ghost = bn_gpu.GhostBatchNorm1d(3, 4)
    with pytest.raises(ValueError, match="one value per channel"):
        ghost(torch.randn(9, 3))
    assert set(ghost.state_dict()) == set(torch.nn.BatchNorm1d(3).state_dict())
    copy.deepcopy(ghost).eval()(torch.randn(9, 3))


# ---- one value per channel, or none ---------------------------------------------------------------

_ONE_VALUE_CASES = {
    # name: (module, input) where a training statistic would have one value per channel
    "ghost-every-chunk": (lambda: bn_gpu.GhostBatchNorm1d(8, virtual_batch_size=1), (4, 8)),
    "ghost-last-chunk": (lambda: bn_gpu.GhostBatchNorm1d(8, virtual_batch_size=4), (9, 8)),
    "ghost-whole-batch": (lambda: bn_gpu.GhostBatchNorm1d(8, virtual_batch_size=4), (1, 8)),
    "ghost-1x1-planes": (lambda: bn_gpu.GhostBatchNorm2d(8, virtual_batch_size=1), (3, 8, 1, 1)),
    "renorm": (lambda: bn_gpu.BatchRenorm1d(8), (1, 8)),
    "renorm-warmup": (lambda: bn_gpu.BatchRenorm2d(8, warmup_steps=2), (1, 8, 1, 1)),
    "batch-norm-relu": (lambda: bn_gpu.BatchNormReLU1d(8), (1, 8)),
    "batch-norm-relu-residual": (lambda: bn_gpu.BatchNormReLU2d(8), (1, 8, 1, 1)),
}


@pytest.mark.parametrize("case", list(_ONE_VALUE_CASES))
def test_one_value_per_channel_in_training_is_refused_and_changes_nothing(case):
    make, shape = _ONE_VALUE_CASES[case]
    module = make()
    with torch.no_grad():
        module.running_mean.uniform_()
        module.running_var.uniform_(1, 2)
    before = copy.deepcopy(module.state_dict())
    x = torch.randn(shape)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(x, x.clone()) if case.endswith("residual") else module(x)
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("make", [lambda: bn_gpu.GhostBatchNorm1d(3, virtual_batch_size=1),
                                  lambda: bn_gpu.BatchRenorm1d(3), lambda: bn_gpu.BatchNormReLU1d(3),
                                  lambda: bn_gpu.FrozenBatchNorm1d(3)], ids=["ghost", "renorm", "relu", "frozen"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batches_and_single_values_where_they_are_fine(make, training):
    """An empty batch gives an empty output (and counts as a batch in training, as BatchNorm's);
    one value per channel is fine in eval, where no statistic is taken; FrozenBatchNorm never
    takes one. Nothing here is NaN."""
    module = make().train(training)
    counted = getattr(module, "num_batches_tracked", None)
    start = int(counted) if counted is not None else 0
    y = module(torch.randn(0, 3))
    assert y.shape == (0, 3)
    if counted is not None:
        assert int(module.num_batches_tracked) == start + (1 if training else 0)
    for name, value in module.state_dict().items():
        assert not value.is_floating_point() or torch.isfinite(value).all(), name
    if not training or isinstance(module, bn_gpu.FrozenBatchNorm1d):
        x = torch.randn(1, 3)
        y = module(x)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("settings, message", [({"r_max": 0.5}, "r_max must be >= 1"),
                                               ({"d_max": -1.0}, "d_max >= 0"),
                                               ({"r_max": float("nan")}, "r_max must be >= 1"),
                                               ({"warmup_steps": -1}, "warmup_steps must be a non-negative"),
                                               ({"warmup_steps": 1.5}, "warmup_steps must be a non-negative")])
def test_batch_renorm_refuses_bad_limits_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        bn_gpu.BatchRenorm2d(3, **settings)


@pytest.mark.parametrize("make", [lambda: bn_gpu.FrozenBatchNorm2d(3), lambda: bn_gpu.BatchRenorm2d(3),
                                  lambda: bn_gpu.GhostBatchNorm2d(3, 2)], ids=["frozen", "renorm", "ghost"])
def test_variants_under_torch_compile_as_eager(make):
    torch.manual_seed(0)
    module = make()
    eager = copy.deepcopy(module)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    y = torch.compile(module, backend="aot_eager")(x)
    y_eager = eager(x_eager)
    torch.testing.assert_close(y, y_eager)
    y.sum().backward()
    y_eager.sum().backward()
    torch.testing.assert_close(x.grad, x_eager.grad)
    for (name, a), (_, b) in zip(module.state_dict().items(), eager.state_dict().items()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")


def test_frozen_batch_norm_as_torchvisions_own_where_installed():
    misc = pytest.importorskip("torchvision.ops.misc", reason="torchvision is not installed (the replica in "
                               "support.py is tested instead)")
    theirs = misc.FrozenBatchNorm2d(4, eps=1e-3)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(theirs, name).normal_()
        theirs.running_var.uniform_(0.5, 2)
    ours = bn_gpu.FrozenBatchNorm2d(4, eps=1e-3)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
