"""What PyTorch's BatchNorm accepts, bn_gpu accepts with the same results: per-channel tensors that
are strided views (read and written through their strides: the neighbouring storage is never
touched), momentum outside [0, 1], the empty 1-D input, an empty float64 batch through a float32 module."""
import pytest
import torch

import bn_gpu
from support import backend_devices, make_input, make_params

C = 5
SENTINEL = 1234.5
PER_CHANNEL = ["weight", "bias", "running_mean", "running_var"]


def _strided_view(values: torch.Tensor) -> torch.Tensor:
    """values as every other element of a buffer whose other elements hold SENTINEL."""
    buffer = torch.full((2 * values.numel(),), SENTINEL, dtype=values.dtype, device=values.device)
    view = buffer[::2]
    view.copy_(values)
    assert not view.is_contiguous()
    return view


def _assert_neighbours_untouched(view: torch.Tensor, name: str) -> None:
    storage = torch.as_strided(view, (2 * view.numel(),), (1,), view.storage_offset())
    assert bool((storage[1::2] == SENTINEL).all()), f"{name}: a kernel wrote between the strided elements"


def _params(device):
    weight, bias, running_mean, running_var = make_params(C, device=device)
    return dict(weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("strided", PER_CHANNEL)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_per_channel_tensor_in_the_forward(backend, device, strided, training):
    x = make_input((4, C, 3, 3), device=device)
    dense = _params(device)
    given = {k: v.clone() for k, v in dense.items()}
    given[strided] = _strided_view(given[strided])
    ops = torch.ops.bn_gpu
    if training:
        expected = ops.forward_train(x, dense["weight"], dense["bias"], dense["running_mean"], dense["running_var"],
                                     None, 0.1, 1e-5, backend)
        actual = ops.forward_train(x, given["weight"], given["bias"], given["running_mean"], given["running_var"],
                                   None, 0.1, 1e-5, backend)
    else:
        expected = ops.forward_eval(x, dense["weight"], dense["bias"], dense["running_mean"], dense["running_var"],
                                    1e-5, backend)
        actual = ops.forward_eval(x, given["weight"], given["bias"], given["running_mean"], given["running_var"],
                                  1e-5, backend)
    for name, a, e in zip(("output", "mean", "invstd"), actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    for name in PER_CHANNEL:  # the running statistics updated in place, through the view
        torch.testing.assert_close(given[name], dense[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    _assert_neighbours_untouched(given[strided], strided)


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("strided", ["weight", "mean", "invstd"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_per_channel_tensor_in_the_backward(backend, device, strided, training):
    x = make_input((4, C, 3, 3), device=device)
    grad_y = make_input((4, C, 3, 3), device=device, mean=0, std=1, seed=5)
    weight = make_params(C, device=device)[0]
    _, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, None, None, None, None, 0.1, 1e-5, backend)
    dense = dict(weight=weight, mean=mean, invstd=invstd)
    given = dict(dense)
    given[strided] = _strided_view(dense[strided].clone())
    expected = torch.ops.bn_gpu.backward(grad_y, x, dense["weight"], dense["mean"], dense["invstd"], training,
                                         True, True, backend)
    actual = torch.ops.bn_gpu.backward(grad_y, x, given["weight"], given["mean"], given["invstd"], training,
                                       True, True, backend)
    for name, a, e in zip(("grad_input", "grad_weight", "grad_bias"), actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    _assert_neighbours_untouched(given[strided], strided)


@pytest.mark.parametrize("backend, device", backend_devices())
def test_strided_running_statistics_of_a_module(backend, device):
    """A module whose buffers are views into one packed tensor, as some checkpoint loaders make them:
    the views are updated in place, as the float64 reference says. (torch.nn.BatchNorm2d on CUDA
    leaves such views unchanged -- seen with torch 2.11 and cuDNN 9.19 on an H200 -- so the
    reference, not torch, is the yardstick here.)"""
    from bn_gpu import reference as ref
    ours = bn_gpu.BatchNorm2d(C, backend=backend).to(device)
    packed = torch.stack([torch.zeros(C), torch.ones(C)], dim=1).to(device)  # (C, 2): columns strided
    ours.running_mean, ours.running_var = packed[:, 0], packed[:, 1]
    expected_mean, expected_var = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    for step in range(2):
        x = make_input((4, C, 3, 3), device=device, seed=step)
        torch.testing.assert_close(ours(x), torch.nn.functional.batch_norm(x, None, None, training=True),
                                   atol=1e-5, rtol=1e-5)
        _, mean, var, _ = ref.forward_train(x.cpu())
        expected_mean, expected_var = ref.update_running_stats(expected_mean, expected_var, mean, var,
                                                               x.numel() // C, 0.1)
    assert ours.running_mean.data_ptr() == packed.data_ptr()  # still the views, updated in place
    torch.testing.assert_close(packed[:, 0].double().cpu(), expected_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(packed[:, 1].double().cpu(), expected_var, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("momentum", [1.5, -0.5, 2.0])
def test_momentum_outside_the_unit_interval_as_torch(backend, device, momentum):
    x = make_input((6, C), device=device)
    params = _params(device)
    theirs = {k: v.clone() for k, v in params.items()}
    y = bn_gpu.batch_norm(x, params["running_mean"], params["running_var"], params["weight"], params["bias"],
                          training=True, momentum=momentum, backend=backend)
    y_torch = torch.nn.functional.batch_norm(x, theirs["running_mean"], theirs["running_var"], theirs["weight"],
                                             theirs["bias"], training=True, momentum=momentum)
    torch.testing.assert_close(y, y_torch, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(params["running_mean"], theirs["running_mean"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(params["running_var"], theirs["running_var"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_1d_input_as_torch(backend, device, training):
    """PyTorch returns an empty output for a (0,) input, whatever the per-channel tensors hold."""
    x = torch.empty(0, device=device)
    counter = torch.zeros((), dtype=torch.int64, device=device)
    running_mean, running_var = torch.zeros(3, device=device), torch.ones(3, device=device)
    y = bn_gpu.batch_norm(x, running_mean, running_var, training=training, backend=backend,
                          num_batches_tracked=counter if training else None)
    expected = torch.nn.functional.batch_norm(x, running_mean.clone(), running_var.clone(), training=training)
    assert y.shape == expected.shape == (0,) and y.dtype == expected.dtype
    assert torch.equal(running_mean, torch.zeros(3, device=device))
    assert int(counter) == int(training)  # an empty batch still counts, as in the modules


@pytest.mark.parametrize("backend, device", backend_devices())
def test_empty_float64_batch_through_a_float32_module(backend, device):
    theirs = torch.nn.BatchNorm1d(C).to(device)
    ours = bn_gpu.BatchNorm1d(C, backend=backend).to(device)
    x = torch.empty(0, C, dtype=torch.float64, device=device)
    y, y_torch = ours(x), theirs(x)
    assert y.shape == y_torch.shape and y.dtype == y_torch.dtype == torch.float64
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 1
    ours.eval()
    theirs.eval()
    assert ours(x).dtype == theirs(x).dtype
