"""Property-based: hypothesis draws shapes, layouts, dtypes and options; every backend available
here (CPU, the Triton interpreter, and on a GPU the Triton and CuPy kernels) must match the
float64 reference in training forward, running statistics, eval forward and backward."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bn_gpu  # noqa: F401
from bn_gpu import reference as ref
from support import (TOLERANCES, assert_close, assert_close_with_slack, assert_stats_close, backend_devices,
                     make_input, make_params, rounding_at_mean)


@st.composite
def cases(draw):
    spatial_dims = draw(st.integers(0, 3))
    N = draw(st.integers(1, 5))
    C = draw(st.integers(1, 9))
    spatial = [draw(st.integers(1, 7)) for _ in range(spatial_dims)]
    if N * (1 if not spatial else __import__("math").prod(spatial)) < 2:
        N = 2
    layout = draw(st.sampled_from(["contiguous", "channels_last", "channel_slice", "transposed"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    return dict(shape=(N, C, *spatial), layout=layout, dtype=dtype,
                affine=draw(st.booleans()), track=draw(st.booleans()),
                momentum=draw(st.sampled_from([0.1, 0.5, 1.0, 0.0, None])),
                eps=draw(st.sampled_from([1e-5, 1e-3])),
                offset=draw(st.sampled_from([0.0, 3.0, -50.0])), seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("backend,device", backend_devices())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_matches_reference(backend, device, case):
    shape, dtype = case["shape"], case["dtype"]
    C = shape[1]
    x = make_input(shape, dtype, case["layout"], device, mean=case["offset"], std=2.0, seed=case["seed"])
    weight, bias, running_mean, running_var = make_params(C, dtype, device, seed=case["seed"] + 1)
    if not case["affine"]:
        weight = bias = None
    tracked = torch.tensor(2, device=device)
    rm0, rv0 = running_mean.clone(), running_var.clone()
    stats = (running_mean, running_var) if case["track"] else (None, None)
    y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, *stats, tracked, case["momentum"],
                                                     case["eps"], backend)
    y_ref, mean_ref, var_ref, invstd_ref = ref.forward_train(x, weight, bias, case["eps"])
    # The saved mean is fp32: its rounding scales with |mean| / std (see test_numerics).
    at_mean = rounding_at_mean(mean_ref, invstd_ref, weight, x)
    assert_close_with_slack(y, y_ref, dtype, at_mean, "output")
    assert_stats_close(mean, mean_ref, dtype, "mean")
    if case["track"]:
        factor = ref.momentum_factor(case["momentum"], 3)
        rm_ref, rv_ref = ref.update_running_stats(rm0, rv0, mean_ref, var_ref, x.numel() // C, factor)
        assert_close(running_mean, rm_ref, dtype, "running_mean")
        assert_close(running_var, rv_ref, dtype, "running_var")
        y_eval, _, _ = torch.ops.bn_gpu.forward_eval(x, weight, bias, running_mean, running_var, case["eps"], backend)
        y_eval_ref = ref.forward_eval(x, running_mean, running_var, weight, bias, case["eps"])
        assert_close(y_eval, y_eval_ref, dtype, "eval")
    grad_y = make_input(shape, dtype, case["layout"], device, mean=0.0, std=1.0, seed=case["seed"] + 2)
    grad_x, grad_w, grad_b = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
    grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_train(grad_y, x, weight, case["eps"])
    # Compare the gradient relative to each channel's gain weight * invstd (see test_numerics): the
    # bracket it multiplies cancels among O(1) terms, with x_hat off by the mean's rounding.
    gain = invstd_ref if weight is None else weight.double() * invstd_ref
    gain = gain.reshape(1, C, *[1] * (x.dim() - 2)).cpu()
    x_hat_rounding = rounding_at_mean(mean_ref, invstd_ref, None, x)
    assert_close_with_slack(grad_x.double().cpu() / gain, grad_x_ref.cpu() / gain, dtype,
                            4 * x_hat_rounding * float(grad_y.double().abs().max()), "grad_input")
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(grad_b.double().cpu(), grad_b_ref.cpu(), atol=atol * x.numel() / C, rtol=rtol)
    # sum(dy * x_hat): each term off by the dtype's rounding and x_hat's, over m values a channel.
    x_hat_slack = float(torch.as_tensor(x_hat_rounding).max()) * float(grad_y.double().abs().max())
    torch.testing.assert_close(grad_w.double().cpu(), grad_w_ref.cpu(), atol=(atol + 4 * x_hat_slack) * x.numel() / C,
                               rtol=rtol)
