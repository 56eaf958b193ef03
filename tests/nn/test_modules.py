"""bn_gpu.BatchNorm1d/2d/3d and convert_model against torch.nn.BatchNorm*, over several steps."""
import copy
import inspect

import pytest
import torch

import bn_gpu
from support import backends_for_cpu_tensors, make_input

TORCH_HAS_BIAS_ARG = "bias" in inspect.signature(torch.nn.BatchNorm2d.__init__).parameters

MODULE_CASES = [
    (torch.nn.BatchNorm1d, bn_gpu.BatchNorm1d, (8, 4), "contiguous"),
    (torch.nn.BatchNorm1d, bn_gpu.BatchNorm1d, (4, 4, 6), "contiguous"),
    (torch.nn.BatchNorm2d, bn_gpu.BatchNorm2d, (3, 4, 5, 6), "contiguous"),
    (torch.nn.BatchNorm2d, bn_gpu.BatchNorm2d, (3, 4, 5, 6), "channels_last"),
    # The 5-D cases take the 4-D kernels' paths: in the full suite (make test) only.
    pytest.param((torch.nn.BatchNorm3d, bn_gpu.BatchNorm3d, (2, 4, 3, 4, 5), "contiguous"), marks=pytest.mark.slow),
    pytest.param((torch.nn.BatchNorm3d, bn_gpu.BatchNorm3d, (2, 4, 3, 4, 5), "channels_last"), marks=pytest.mark.slow),
]
OPTIONS = [
    dict(),
    dict(momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
    dict(momentum=0.3, eps=1e-3),
]
if TORCH_HAS_BIAS_ARG:
    OPTIONS.append(dict(bias=False))


def _pair(torch_cls, ours_cls, options, backend):
    torch.manual_seed(0)
    theirs = torch_cls(4, **options)
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            if theirs.bias is not None:
                theirs.bias.normal_()
    ours = ours_cls(4, backend=backend, **options)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _run_steps(theirs, ours, shape, layout, steps=3):
    for step in range(steps):
        x = make_input(shape, layout=layout, seed=step).requires_grad_()
        x_ours = x.detach().clone().requires_grad_()
        y, y_ours = theirs(x), ours(x_ours)
        torch.testing.assert_close(y_ours, y, atol=1e-5, rtol=1e-5)
        assert y_ours.stride() == y.stride()
        grad = make_input(shape, layout=layout, mean=0, std=1, seed=100 + step)
        y.backward(grad)
        y_ours.backward(grad)
        torch.testing.assert_close(x_ours.grad, x.grad, atol=1e-5, rtol=1e-5)
        for name, p in theirs.named_parameters():
            torch.testing.assert_close(dict(ours.named_parameters())[name].grad, p.grad, atol=1e-4, rtol=1e-5)
        for name, b in theirs.named_buffers():
            torch.testing.assert_close(dict(ours.named_buffers())[name], b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", backends_for_cpu_tensors())
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("case", MODULE_CASES, ids=lambda c: f"{c[0].__name__}-{'x'.join(map(str, c[2]))}-{c[3]}")
def test_module_matches_torch_train_then_eval(backend, options, case):
    torch_cls, ours_cls, shape, layout = case
    theirs, ours = _pair(torch_cls, ours_cls, options, backend)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _run_steps(theirs, ours, shape, layout)
    theirs.eval()
    ours.eval()
    _run_steps(theirs, ours, shape, layout, steps=1)


@pytest.mark.parametrize("backend", backends_for_cpu_tensors())
def test_empty_batch_counts_but_keeps_statistics(backend):
    theirs, ours = _pair(torch.nn.BatchNorm2d, bn_gpu.BatchNorm2d, {}, backend)
    x = torch.randn(0, 4, 3, 3)
    y, y_ours = theirs(x), ours(x)
    assert y_ours.shape == y.shape
    for name, b in theirs.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], b)
    assert ours.num_batches_tracked.item() == 1


def test_convert_model_keeps_parameters_buffers_and_mode():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5), torch.nn.BatchNorm1d(5)))
    model(torch.randn(4, 3, 8, 8))  # move the running statistics away from their initial values
    model[2][2].eval()
    reference = copy.deepcopy(model)
    bn2d, bn1d = model[1], model[2][2]
    tensors = {name: t for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    converted = bn_gpu.convert_model(model, backend="cpu")
    assert converted is model
    assert type(model[1]) is bn_gpu.BatchNorm2d and type(model[2][2]) is bn_gpu.BatchNorm1d
    assert model[1].training and not model[2][2].training
    assert model[1].weight is bn2d.weight and model[2][2].running_mean is bn1d.running_mean
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t is tensors[name]
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)


def test_convert_model_on_a_batchnorm_itself_and_backend_default():
    bn = torch.nn.BatchNorm3d(2)
    converted = bn_gpu.convert_model(bn)
    assert type(converted) is bn_gpu.BatchNorm3d and converted.backend == "auto"
    assert converted.weight is bn.weight
    assert "backend='auto'" in repr(converted)


def test_wrong_dimensionality_is_refused_like_torch():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bn_gpu.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        bn_gpu.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))
