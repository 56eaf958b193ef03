"""Hard inputs: large offsets with small spread, NaN/Inf in one channel, constant channels, edge
sizes, and bitwise determinism -- on the CPU path, in the Triton interpreter and (marker `gpu`)
on the GPU backends.

Documented bound for |mean| >> std: batch mean and variance stay within ~1e-6 relative of the
float64 reference (moments are accumulated relative to one value of each channel, and partials
are merged with Chan's formula). Outputs differ by at most about |weight| * ulp_fp32(|mean|) / std
on top of the dtype's rounding, because the saved mean is an fp32 number (as in PyTorch): ~5e-3
for mean 1e4 with std 0.1."""
import math

import pytest
import torch

import bn_gpu
from bn_gpu import reference as ref
from support import (TOLERANCES, assert_close, assert_close_with_slack, backend_devices, make_input,
                     fp32_spacing, make_params, rounding_at_mean)


OFFSET_CASES = [
    (torch.float32, 1e3, 1.0), (torch.float32, 1e3, 0.1), (torch.float32, 1e4, 1.0), (torch.float32, 1e4, 0.1),
    (torch.bfloat16, 100.0, 0.5), (torch.float16, 100.0, 0.5),
]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype,offset,std", OFFSET_CASES, ids=lambda v: str(v))
def test_large_offset_small_spread(backend, device, layout, dtype, offset, std):
    x = make_input((8, 3, 9, 11), dtype, layout, device, mean=offset, std=std, seed=4)
    weight, bias, running_mean, running_var = make_params(3, torch.float32, device)
    rm0, rv0 = running_mean.clone(), running_var.clone()
    y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, None, 0.1, 1e-5, backend)
    y_ref, mean_ref, var_ref, _ = ref.forward_train(x, weight, bias)
    var = invstd.double() ** -2 - 1e-5
    assert torch.isfinite(y).all() and (var > 0).all()
    torch.testing.assert_close(mean.double().cpu(), mean_ref.cpu(), atol=0, rtol=1e-6)
    torch.testing.assert_close(var.cpu(), var_ref.cpu(), atol=0, rtol=1e-5)
    atol, rtol = TOLERANCES[dtype]
    bound = float(weight.max()) * float(fp32_spacing(torch.tensor(offset))) / std + atol
    torch.testing.assert_close(y.double().cpu(), y_ref.cpu(), atol=bound, rtol=rtol)
    _, rv_ref = ref.update_running_stats(rm0, rv0, mean_ref, var_ref, x.numel() // 3, 0.1)
    assert_close(running_var, rv_ref, torch.float32, "running_var")


@pytest.mark.slow
@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype,offset,std", OFFSET_CASES, ids=lambda v: str(v))
def test_large_offset_small_spread_backward(backend, device, layout, dtype, offset, std, kernel_path, poisoned):
    """The backward at |mean| >> std (16-bit dx in the uncentered form, fp32 centered): within the
    dtype's tolerance plus what the saved fp32 mean's rounding carries, ulp_fp32(|mean|) through
    xhat's projection for dx (|weight| * invstd^2 * max|dy| of it) and through xhat for grad_weight
    (sum |dy| * invstd of it). Both kernel paths (the split dx kernels and the single pass), outputs
    poisoned with NaN before the kernels write them."""
    x = make_input((8, 3, 9, 11), dtype, layout, device, mean=offset, std=std, seed=4)
    grad_y = make_input((8, 3, 9, 11), dtype, layout, device, mean=0.5, std=1.0, seed=5)
    weight, bias, running_mean, running_var = make_params(3, torch.float32, device)
    _, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, None, 0.1, 1e-5,
                                                     backend)
    grad_x, grad_weight, grad_bias = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True,
                                                               backend)
    dx_ref, dw_ref, db_ref = ref.backward_train(grad_y, x, weight)
    invstd_ref = ref.batch_stats(x.double().cpu())[1].add(1e-5).rsqrt().max().item()
    mean_rounding = float(fp32_spacing(torch.tensor(offset)))
    dy = grad_y.double().cpu()
    atol, rtol = TOLERANCES[dtype]
    dx_bound = float(weight.abs().max()) * invstd_ref ** 2 * dy.abs().max().item() * mean_rounding + atol
    torch.testing.assert_close(grad_x.double().cpu(), dx_ref.cpu(), atol=dx_bound, rtol=rtol)
    dw_bound = dy.abs().sum(dim=[0, 2, 3]).max().item() * invstd_ref * mean_rounding + atol
    torch.testing.assert_close(grad_weight.double().cpu(), dw_ref.cpu(), atol=dw_bound, rtol=rtol)
    assert_close(grad_bias, db_ref, torch.float32, "grad_bias")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_nan_or_inf_stays_in_its_channel(backend, device, bad, layout):
    x = make_input((4, 3, 5, 5), layout=layout, device=device)
    x[2, 1, 3, 4] = bad
    weight, bias, running_mean, running_var = make_params(3, device=device)
    rm0, rv0 = running_mean.clone(), running_var.clone()
    y, _, _ = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, None, 0.1, 1e-5, backend)
    good = [0, 2]
    y_ref, mean_ref, var_ref, _ = ref.forward_train(x[:, good], weight[good], bias[good])
    assert_close(y[:, good], y_ref, torch.float32, "clean channels")
    rm_ref, rv_ref = ref.update_running_stats(rm0[good], rv0[good], mean_ref, var_ref, 100, 0.1)
    assert_close(running_mean[good], rm_ref, torch.float32, "clean running_mean")
    assert_close(running_var[good], rv_ref, torch.float32, "clean running_var")
    # The poisoned channel is not finite, as in PyTorch.
    torch_y = torch.nn.functional.batch_norm(x.cpu(), rm0.clone().cpu(), rv0.clone().cpu(), weight.cpu(), bias.cpu(),
                                             training=True)
    assert not torch.isfinite(torch_y[:, 1]).all()
    assert not torch.isfinite(y[:, 1]).all()
    assert not torch.isfinite(running_var[1])


_NON_FINITE = {  # channel 1's values at (n, 1, h, w), set after the random fill
    "inf": {(2, 3, 4): math.inf},
    "-inf": {(2, 3, 4): -math.inf},
    "inf-first-value": {(0, 0, 0): math.inf},  # the channel's shift
    "two-inf": {(0, 0, 0): math.inf, (3, 4, 4): math.inf},
    "inf-and-minus-inf": {(1, 1, 1): math.inf, (3, 2, 2): -math.inf},
    "nan": {(2, 3, 4): math.nan},
}


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("case", list(_NON_FINITE))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_non_finite_channel_as_torch(backend, device, case, layout, kernel_path, poisoned):
    """A channel holding an inf has that inf as its batch mean and running_mean, NaN as its variance
    (+inf with -inf: NaN), as torch's batch_norm; the other channels are untouched by it."""
    x = make_input((4, 3, 5, 5), layout=layout, device=device)
    for (n, h, w), value in _NON_FINITE[case].items():
        x[n, 1, h, w] = value
    weight, bias, running_mean, running_var = make_params(3, device=device)
    expected_mean, expected_var = running_mean.cpu().clone(), running_var.cpu().clone()
    expected_y = torch.nn.functional.batch_norm(x.cpu(), expected_mean, expected_var, weight.cpu(), bias.cpu(),
                                                training=True)
    y, mean, _ = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, None, 0.1, 1e-5, backend)
    torch.testing.assert_close(running_mean.cpu(), expected_mean, equal_nan=True)
    torch.testing.assert_close(running_var.cpu(), expected_var, equal_nan=True)
    torch.testing.assert_close(mean[1].cpu(), x[:, 1].cpu().double().mean().float(), equal_nan=True)  # inf, -inf or NaN
    torch.testing.assert_close(y.cpu(), expected_y, equal_nan=True)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_constant_channel_gives_bias(backend, device, layout):
    x = make_input((4, 3, 5, 5), layout=layout, device=device)
    x[:, 1] = 7.25
    weight, bias, _, _ = make_params(3, device=device)
    y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, None, None, None, 0.1, 1e-5, backend)
    assert torch.isfinite(y).all() and torch.isfinite(invstd).all()
    torch.testing.assert_close(y[:, 1].cpu(), bias[1].cpu().expand(4, 5, 5), atol=1e-4, rtol=0)
    torch.testing.assert_close(mean[1].item(), 7.25)


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_constant_channel_gradient_with_a_tiny_eps_as_torch(backend, device, dtype, layout, kernel_path):
    """A constant channel (x - mean = 0) under a constant gradient: dx = scale * (dy - mean(dy)) is
    exactly 0 however large scale = 1 / sqrt(eps) is, as torch gives it. Folding mean(dy) into a
    per-channel constant left an fp32 rounding of scale * mean(dy) there: +-inf in fp16 at eps 1e-30."""
    x = make_input((4, 3, 5, 5), dtype, layout, device)
    x[:, 1] = 3.0
    grad_y = torch.full(x.shape, 0.3, dtype=dtype, device=device)
    for eps in (1e-10, 1e-30):
        _, mean, invstd = torch.ops.bn_gpu.forward_train(x, None, None, None, None, None, 0.1, eps, backend)
        grad_x, _, _ = torch.ops.bn_gpu.backward(grad_y, x, None, mean, invstd, True, True, False, backend)
        assert torch.isfinite(grad_x).all(), eps
        torch.testing.assert_close(grad_x[:, 1].cpu(), torch.zeros_like(grad_x[:, 1].cpu()), atol=0, rtol=0)


SIZE_CASES = [
    (2, 3),              # m = 2
    (7, 1),              # C = 1
    (3, 10000),          # C = 10 000
    (5, 4, 1, 1),        # 1 x 1 spatial
    (1, 3, 4, 5),        # N = 1, spatial > 1
    (3, 3, 17, 19),      # not a multiple of any block size
    (2, 3, 3, 5, 7),     # 5-D
    (129, 5),            # rows not a multiple of any block size
]


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", SIZE_CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_edge_sizes(backend, device, shape, layout, monkeypatch):
    C = shape[1]
    if C > 1000 and device == "cpu":
        # The interpreter runs programs one by one: wider channel blocks keep 10 000 channels quick.
        import dataclasses
        import bn_gpu.backends.plan
        monkeypatch.setattr(bn_gpu.backends.plan, "INTERPRETER_TUNING",
                            dataclasses.replace(bn_gpu.backends.plan.INTERPRETER_TUNING, max_block_c=512, tile_bytes=8192))
    x = make_input(shape, layout=layout, device=device)
    weight, bias, running_mean, running_var = make_params(C, device=device)
    y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, None, 0.1, 1e-5, backend)
    y_ref, _, _, _ = ref.forward_train(x, weight, bias)
    assert_close(y, y_ref, torch.float32, "output")
    grad_y = make_input(shape, layout=layout, device=device, mean=0, std=1, seed=2)
    grad_x, _, _ = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
    # dx = weight * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat)): the bracket cancels among
    # O(1) terms, and weight * invstd is large where a channel of few values has a tiny variance,
    # so compare the bracket.
    mean_ref, var_ref = ref.batch_stats(x)
    invstd_ref = 1 / torch.sqrt(var_ref + 1e-5)
    gain = (weight.double() * invstd_ref).reshape(1, C, *[1] * (x.dim() - 2)).cpu()
    slack = 4 * rounding_at_mean(mean_ref, invstd_ref, None, x) * float(grad_y.abs().max())
    assert_close_with_slack(grad_x.double().cpu() / gain, ref.backward_train(grad_y, x, weight)[0].cpu() / gain,
                            torch.float32, slack, "grad_input")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (4, 3, 0)], ids=str)
def test_empty_batch(backend, device, shape):
    x = torch.randn(shape, device=device).requires_grad_()
    _, _, running_mean, running_var = make_params(3, device=device)
    before = running_mean.clone(), running_var.clone()
    tracked = torch.tensor(3, device=device)
    y = bn_gpu.batch_norm(x, running_mean, running_var, training=True, backend=backend, num_batches_tracked=tracked)
    assert y.shape == x.shape and tracked.item() == 4
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])
    y.sum().backward()
    assert x.grad.shape == x.shape


def _one_step(backend, device, seed=0):
    bn = bn_gpu.BatchNorm2d(6, backend=backend).to(device)
    x = make_input((8, 6, 13, 11), layout="channels_last", device=device, seed=seed).requires_grad_()
    y = bn(x)
    y.backward(make_input((8, 6, 13, 11), device=device, mean=0, std=1, seed=seed + 1))
    return [y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var]


@pytest.mark.parametrize("backend,device", backend_devices())
def test_bitwise_deterministic(backend, device, monkeypatch):
    """Every run gives the same bits, with or without torch.use_deterministic_algorithms, whatever
    the fresh buffers held before (a kernel that read memory it had not written would differ here:
    the first run's buffers are filled with NaN, the later ones' with random values)."""
    import bn_gpu.backends.orchestration

    real = bn_gpu.backends.orchestration.empty
    fill = {"value": float("nan")}

    def filled(*args):
        t = real(*args)
        return t.fill_(fill["value"]) if t.is_floating_point() else t

    monkeypatch.setattr(bn_gpu.backends.orchestration, "empty", filled)
    monkeypatch.setattr(bn_gpu.backends.orchestration, "workspace",
                        lambda shape, dtype, device, slot=0: filled(shape, dtype, device))
    first = _one_step(backend, device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for value in (1e30, -3.0):
            fill["value"] = value
            again = _one_step(backend, device)
            for a, b in zip(first, again):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_no_kernel_accumulates_through_atomics():
    """The reductions have a fixed order: no kernel accumulates values through atomics, whose order
    depends on scheduling. The atomics of each backend are on integer counters: the ticket that
    picks the program that merges the partials -- in a fixed order (Triton: finalize.last_of_group;
    CUDA C: last_block_of) -- and the on-chip kernels' barriers (Triton: group_barrier.py; CUDA C:
    on_chip.cuh, wait_for_group and leave_group)."""
    import importlib.resources
    import re
    kernels = importlib.resources.files("bn_gpu.kernels")
    sources = {name: kernels.joinpath(name).read_text()
               for name in ("channels_first.py", "channels_last.py", "finalize.py", "moments.py", "batch_counter.py",
                            "group_barrier.py")}
    sources.update({f"cuda/{f.name}": f.read_text() for f in kernels.joinpath("cuda").iterdir()
                    if f.name.endswith((".cu", ".cuh"))})
    calls = []
    for name, text in sources.items():
        code = "\n".join(line.split("#")[0].split("//")[0] for line in text.splitlines())  # comments aside
        calls += [(name, call) for call in re.findall(r"[\w.]*atomic\w*\([^,]*,[^,)]*", code, flags=re.IGNORECASE)]
    barrier = [("group_barrier.py", "tl.atomic_add(counter_ptr + group, 1"),
               ("group_barrier.py", "tl.atomic_add(counter_ptr + group, 0"),
               ("group_barrier.py", "tl.atomic_add(counter_ptr + group, 0"),
               ("group_barrier.py", "tl.atomic_add(counter_ptr + group, 1"),
               ("group_barrier.py", "tl.atomic_xchg(counter_ptr + group, 0")]
    cuda_barrier = [("cuda/on_chip.cuh", "atomicAdd(counters + group, 1"),
                    ("cuda/on_chip.cuh", "atomicAdd(counters + group, 1"),
                    ("cuda/on_chip.cuh", "atomicExch(counters + group, 0")]
    assert sorted(calls) == sorted([("finalize.py", "tl.atomic_add(counter_ptr + group, 1"),
                                    ("cuda/finalize.cuh", "atomicAdd(counters + index, 1")] + barrier + cuda_barrier), calls
