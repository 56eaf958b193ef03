"""Every kernel of every backend against the float64 reference, over layouts, dtypes and options.

On CPU tensors: the CPU backend, and the Triton kernels in the Triton interpreter. On a GPU
(marker `gpu`): the compiled Triton kernels and the CuPy kernels, with the same cases. Outputs
are poisoned with NaN before the kernels write them."""
import pytest
import torch

import bn_gpu  # registers the ops
from bn_gpu import reference as ref
from support import (DTYPES, LAYOUT_CASES, assert_close, assert_stats_close, backend_devices, case_id,
                     make_input, make_params)


def _scaled(grad, grad_y, C):
    """Parameter gradients are sums over N * S values: compare them relative to that scale."""
    return grad / (grad_y.double().abs().sum().cpu() / C)


def _assert_training_gradients_as_reference(x, grad_y, weight, bias, running_mean, running_var, backend, dtype, relu):
    """Two training calls through autograd (BatchNorm, then ReLU when relu) give the same bits, and
    their dx, dweight and dbias match the float64 reference -- through the ReLU's mask taken from the
    kernels' own output, as test_epilogue does."""
    C = x.shape[1]
    grads = []
    for _ in range(2):
        params = (weight.clone().requires_grad_(), bias.clone().requires_grad_())
        y = bn_gpu.batch_norm(x, running_mean.clone(), running_var.clone(), *params, True, backend=backend,
                              activation="relu" if relu else None)
        grads.append(torch.autograd.grad(y, (x, *params), grad_y))
    assert all(torch.equal(a, b) for a, b in zip(*grads)), "two calls differ"
    grad_bn = ref.epilogue_backward(grad_y, y.detach(), True) if relu else grad_y
    grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_train(grad_bn, x.detach(), weight)
    grad_x, grad_w, grad_b = grads[0]
    assert_close(grad_x, grad_x_ref, dtype, "grad_input")
    assert_close(_scaled(grad_w, grad_y, C), _scaled(grad_w_ref, grad_y, C), dtype, "grad_weight")
    assert_close(_scaled(grad_b, grad_y, C), _scaled(grad_b_ref, grad_y, C), dtype, "grad_bias")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=case_id)
# float64 takes the float32 kernels with a wider accumulator: in the full suite (make test) only.
@pytest.mark.parametrize("dtype", [*DTYPES[:3], pytest.param(DTYPES[3], marks=pytest.mark.slow)], ids=str)
def test_training_forward_and_backward(backend, device, case, dtype, kernel_path, poisoned):
    shape, layout = case
    C = shape[1]
    x = make_input(shape, dtype, layout, device)
    weight, bias, running_mean, running_var = make_params(C, dtype, device)
    rm0, rv0 = running_mean.clone(), running_var.clone()
    tracked = torch.tensor(5, device=device)
    y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, tracked,
                                                     0.1, 1e-5, backend)
    y_ref, mean_ref, var_ref, invstd_ref = ref.forward_train(x, weight, bias, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device
    if layout in ("contiguous", "channels_last"):
        assert y.stride() == x.stride()
    assert_close(y, y_ref, dtype, "output")
    assert_stats_close(mean, mean_ref, dtype, "mean")
    assert_stats_close(invstd, invstd_ref, dtype, "invstd")
    rm_ref, rv_ref = ref.update_running_stats(rm0, rv0, mean_ref, var_ref, x.numel() // C, 0.1)
    assert_close(running_mean, rm_ref, dtype, "running_mean")
    assert_close(running_var, rv_ref, dtype, "running_var")
    assert tracked.item() == 6

    grad_y = make_input(shape, dtype, layout, device, mean=0.0, std=1.0, seed=7)
    grad_x, grad_w, grad_b = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
    grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_train(grad_y, x, weight, 1e-5)
    assert grad_x.dtype == dtype and grad_w.dtype == weight.dtype
    assert_close(grad_x, grad_x_ref, dtype, "grad_input")
    assert_close(_scaled(grad_w, grad_y, C), _scaled(grad_w_ref, grad_y, C), dtype, "grad_weight")
    assert_close(_scaled(grad_b, grad_y, C), _scaled(grad_b_ref, grad_y, C), dtype, "grad_bias")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("channels", [10, 7], ids=lambda c: f"6-of-{c}")
def test_the_first_channels_of_a_wider_tensor(backend, device, channels, kernel_path, poisoned):
    """x and dy the first 6 channels of tensors of `channels`, read as they are: channels back to back
    (grouped in pairs, the plan's ALIGN 4) but batch rows of `channels` x 30 values -- whole 16-byte
    words for 10 (the kernels rebuild the stride with ALIGN), not for 7 (sites.row_alignment drops
    ALIGN: a kernel that assumed it would read the wrong values)."""
    from bn_gpu.backends import plan
    from bn_gpu.backends.triton import sites
    wide = (3, channels, 5, 6)
    x = make_input(wide, torch.float32, "contiguous", device)[:, :6]
    grad_y = make_input(wide, torch.float32, "contiguous", device, mean=0.0, std=1.0, seed=7)[:, :6]
    g = plan.geometry(x, grad_y, *plan.tuning_and_sms(x.device))
    assert g.read_strides is None and g.grad_read_strides is None and g.x.stride_n == channels * 30
    if backend == "triton":
        assert g.plan.align == 4 and sites.row_alignment(g) == (4 if channels == 10 else 1)
    weight, bias, running_mean, running_var = make_params(6, torch.float32, device)
    tracked = torch.tensor(0, device=device)
    y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, tracked, 0.1, 1e-5,
                                                     backend)
    y_ref, mean_ref, _, invstd_ref = ref.forward_train(x, weight, bias, 1e-5)
    assert_close(y, y_ref, torch.float32, "output")
    assert_stats_close(mean, mean_ref, torch.float32, "mean")
    assert_stats_close(invstd, invstd_ref, torch.float32, "invstd")
    grad_x, grad_w, grad_b = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
    grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_train(grad_y, x, weight, 1e-5)
    assert_close(grad_x, grad_x_ref, torch.float32, "grad_input")
    assert_close(_scaled(grad_w, grad_y, 6), _scaled(grad_w_ref, grad_y, 6), torch.float32, "grad_weight")
    assert_close(_scaled(grad_b, grad_y, 6), _scaled(grad_b_ref, grad_y, 6), torch.float32, "grad_bias")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_eval_forward_and_backward(backend, device, case, dtype, poisoned):
    shape, layout = case
    C = shape[1]
    x = make_input(shape, dtype, layout, device)
    weight, bias, running_mean, running_var = make_params(C, torch.float32, device)
    y, mean, invstd = torch.ops.bn_gpu.forward_eval(x, weight, bias, running_mean, running_var, 1e-5, backend)
    assert_close(y, ref.forward_eval(x, running_mean, running_var, weight, bias, 1e-5), dtype, "output")
    assert_stats_close(mean, running_mean.double(), dtype, "saved mean")
    assert_stats_close(invstd, 1 / torch.sqrt(running_var.double() + 1e-5), dtype, "saved invstd")

    grad_y = make_input(shape, dtype, layout, device, mean=0.0, std=1.0, seed=7)
    grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_eval(grad_y, x, running_mean, running_var, weight, 1e-5)
    grad_x, grad_w, grad_b = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, False, True, True, backend)
    assert_close(grad_x, grad_x_ref, dtype, "grad_input")
    assert_close(_scaled(grad_w, grad_y, C), _scaled(grad_w_ref, grad_y, C), dtype, "grad_weight")
    assert_close(_scaled(grad_b, grad_y, C), _scaled(grad_b_ref, grad_y, C), dtype, "grad_bias")
    # Only dx asked: one elementwise pass, and empty placeholders for the rest.
    grad_x_only, no_w, no_b = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, False, True, False, backend)
    assert_close(grad_x_only, grad_x_ref, dtype, "grad_input (dx only)")
    assert no_w.numel() == 0 and no_b.numel() == 0


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("with_weight,with_bias", [(False, False), (True, False), (False, True)])
def test_affine_options(backend, device, with_weight, with_bias, kernel_path, poisoned):
    x = make_input((5, 4, 6), device=device)
    weight, bias, _, _ = make_params(4, device=device)
    weight = weight if with_weight else None
    bias = bias if with_bias else None
    y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, None, None, None, 0.1, 1e-5, backend)
    assert_close(y, ref.forward_train(x, weight, bias)[0], torch.float32, "output")
    grad_y = make_input((5, 4, 6), device=device, seed=3)
    grad_x, grad_w, grad_b = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
    grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_train(grad_y, x, weight)
    assert_close(grad_x, grad_x_ref, torch.float32, "grad_input")
    assert grad_w.dtype == torch.float32
    # Sums over 30 values a channel: compared at the scale of |dy| summed over a channel.
    scale = grad_y.double().abs().sum().item() / 4
    assert_close(grad_w / scale, grad_w_ref / scale, torch.float32, "grad_weight")
    assert_close(grad_b / scale, grad_b_ref / scale, torch.float32, "grad_bias")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_eps_is_counted_once_in_every_dtype(backend, device, dtype, layout, kernel_path, poisoned):
    """eps = 0.5 against a variance of ~1e-2 (std 0.1): eps carries 98% of var + eps, so invstd off by
    eps counted twice (0.70x) or dropped (7x) is far outside every dtype's tolerance, in training
    (the statistics), in eval (the running statistics) and in the backward."""
    eps = 0.5
    x = make_input((4, 3, 5, 6), dtype, layout, device, mean=1.0, std=0.1)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    weight, bias, running_mean, running_var = make_params(3, param_dtype, device)
    running_var.fill_(0.01)
    y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, None, None, None, 0.1, eps, backend)
    y_ref, _, var_ref, invstd_ref = ref.forward_train(x, weight, bias, eps)
    assert_close(y, y_ref, dtype, "training output")
    assert_stats_close(invstd, invstd_ref, dtype, "invstd")
    grad_y = make_input((4, 3, 5, 6), dtype, layout, device, mean=0.0, std=1.0, seed=3)
    grad_x, _, _ = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
    assert_close(grad_x, ref.backward_train(grad_y, x, weight, eps)[0], dtype, "grad_input")
    y_eval, _, invstd_eval = torch.ops.bn_gpu.forward_eval(x, weight, bias, running_mean, running_var, eps, backend)
    assert_close(y_eval, ref.forward_eval(x, running_mean, running_var, weight, bias, eps), dtype, "eval output")
    assert_stats_close(invstd_eval, 1 / torch.sqrt(running_var.double() + eps), dtype, "eval invstd")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_float64_statistics_are_float64_to_the_last_bits(backend, device, layout, momentum, kernel_path):
    """float64 inputs: statistics computed and the running statistics updated in float64, momentum and
    eps included (not rounded to fp32 on the way)."""
    x = make_input((4, 3, 5), torch.float64, layout, device)
    weight, bias, running_mean, running_var = make_params(3, torch.float64, device)
    tracked = torch.tensor(4, device=device)
    rm0, rv0 = running_mean.clone(), running_var.clone()
    y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, tracked, momentum,
                                                     1e-5, backend)
    y_ref, mean_ref, var_ref, invstd_ref = ref.forward_train(x, weight, bias, 1e-5)
    rm_ref, rv_ref = ref.update_running_stats(rm0, rv0, mean_ref, var_ref, 20, ref.momentum_factor(momentum, 5))
    for what, actual, expected in (("mean", mean, mean_ref), ("invstd", invstd, invstd_ref), ("output", y, y_ref),
                                   ("running_mean", running_mean, rm_ref), ("running_var", running_var, rv_ref)):
        torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=1e-14, rtol=1e-13, msg=lambda m: f"{what}: {m}")
    y_eval, _, _ = torch.ops.bn_gpu.forward_eval(x, weight, bias, rm0, rv0, 1e-5, backend)
    torch.testing.assert_close(y_eval.cpu(), ref.forward_eval(x, rm0, rv0, weight, bias, 1e-5).cpu(), atol=1e-14,
                               rtol=1e-13)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_cumulative_average_counts_batches_on_device(backend, device, kernel_path):
    C = 3
    running_mean, running_var = torch.zeros(C, device=device), torch.ones(C, device=device)
    tracked = torch.tensor(0, device=device)
    rm_ref, rv_ref = running_mean.double(), running_var.double()
    for step in range(1, 4):
        x = make_input((6, C, 4), device=device, seed=step)
        torch.ops.bn_gpu.forward_train(x, None, None, running_mean, running_var, tracked, None, 1e-5, backend)
        _, mean, var, _ = ref.forward_train(x)
        rm_ref, rv_ref = ref.update_running_stats(rm_ref, rv_ref, mean, var, 24, ref.momentum_factor(None, step))
        assert tracked.item() == step
    assert_close(running_mean, rm_ref, torch.float32, "running_mean")
    assert_close(running_var, rv_ref, torch.float32, "running_var")


@pytest.mark.parametrize("backend,device", backend_devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mixed_precision_parameters(backend, device, dtype, kernel_path):
    """fp16 / bf16 input with fp32 weight, bias and running statistics (as under autocast)."""
    x = make_input((4, 3, 5, 5), dtype, "channels_last", device)
    weight, bias, running_mean, running_var = make_params(3, torch.float32, device)
    rm0, rv0 = running_mean.clone(), running_var.clone()
    y, _, _ = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, None, 0.1, 1e-5, backend)
    y_ref, mean_ref, var_ref, _ = ref.forward_train(x, weight, bias)
    assert y.dtype == dtype and running_mean.dtype == torch.float32
    assert_close(y, y_ref, dtype, "output")
    rm_ref, rv_ref = ref.update_running_stats(rm0, rv0, mean_ref, var_ref, 100, 0.1)
    assert_close(running_mean, rm_ref, torch.float32, "running_mean")
    assert_close(running_var, rv_ref, torch.float32, "running_var")


TRITON_DEVICES = [pair for pair in backend_devices() if pair.values[0] == "triton"]


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("programs_per_sm", [64, pytest.param(0, marks=pytest.mark.slow)], ids=["split", "single-pass"])
def test_pipelined_reductions(backend, device, layout, dtype, programs_per_sm, monkeypatch, poisoned):
    """Tuning.load_stages: the statistics and gradient sums of both layouts (split) and the
    channels-first single passes walk their tiles in a software-pipelined loop (tl.range(num_stages=...):
    channels-last tiles of half the plan's rows) or in the plain loop (load_stages=0). Both match the
    float64 reference forward and backward, and agree with each other within rounding."""
    import dataclasses

    import bn_gpu.backends.plan
    shape = (4, 6, 5, 7)
    x = make_input(shape, dtype, layout, device)
    grad_y = make_input(shape, dtype, layout, device, mean=0.0, std=1.0, seed=7)
    weight, bias, _, _ = make_params(shape[1], dtype, device)
    y_ref, mean_ref, _, invstd_ref = ref.forward_train(x, weight, bias, 1e-5)
    grad_x_ref, grad_w_ref, _ = ref.backward_train(grad_y, x, weight, 1e-5)
    results = {}
    for stages in (0, 3):
        for name in ("INTERPRETER_TUNING", "GPU_TUNING"):
            tuning = dataclasses.replace(getattr(bn_gpu.backends.plan, name), load_stages=stages,
                                         programs_per_sm=programs_per_sm, on_chip_bytes=0)
            monkeypatch.setattr(bn_gpu.backends.plan, name, tuning)
        y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, None, None, None, 0.1, 1e-5, backend)
        grad_x, grad_w, _ = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
        assert_close(y, y_ref, dtype, f"output, load_stages={stages}")
        assert_stats_close(mean, mean_ref, dtype, f"mean, load_stages={stages}")
        assert_stats_close(invstd, invstd_ref, dtype, f"invstd, load_stages={stages}")
        assert_close(grad_x, grad_x_ref, dtype, f"grad_input, load_stages={stages}")
        assert_close(_scaled(grad_w, grad_y, 6), _scaled(grad_w_ref, grad_y, 6), dtype,
                     f"grad_weight, load_stages={stages}")
        results[stages] = (mean, grad_w)
    assert_stats_close(results[3][0], results[0][0].double(), dtype, "mean against the plain loop")
    assert_close(_scaled(results[3][1], grad_y, 6), _scaled(results[0][1].double(), grad_y, 6), dtype,
                 "grad_weight against the plain loop")


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_folded_paired_gradient_sums_as_reference(backend, device, dtype, relu, monkeypatch, poisoned):
    """The Triton channels-first gradient sums with PAIRS over tiles of several rows, each row spanning
    the program's threads, folded into one row of lane sums (FOLD_ROWS: 56x56 planes on a GPU; in the
    interpreter, one warp, rows of 256 values in tiles of 1 KB), on the split plan: against the
    float64 reference, through the ReLU's mask too, and two calls bitwise equal."""
    import dataclasses

    import bn_gpu.backends.plan
    from bn_gpu.backends.triton import sites
    monkeypatch.setattr(bn_gpu.backends.plan, "GPU_TUNING",
                        dataclasses.replace(bn_gpu.backends.plan.GPU_TUNING, on_chip_bytes=0))
    monkeypatch.setattr(bn_gpu.backends.plan, "INTERPRETER_TUNING",
                        dataclasses.replace(bn_gpu.backends.plan.INTERPRETER_TUNING, on_chip_bytes=0, tile_bytes=1024,
                                            programs_per_sm=64))
    shape = (64, 8, 56, 56) if device == "cuda" else (4, 3, 16, 16)
    C = shape[1]
    x = make_input(shape, dtype, "contiguous", device, mean=0.5, std=1.0).requires_grad_()
    g = bn_gpu.backends.plan.geometry(x, x, *bn_gpu.backends.plan.tuning_and_sms(x.device))
    assert g.plan.splits > 1 and g.plan.rows > 1 and sites.config(g, "gradient_sums")[2]["FOLD_ROWS"]
    weight, bias, running_mean, running_var = make_params(C, torch.float32, device)
    # sum(dy) and sum(dy * (x - mean)) far from 0, so that the sums' errors show in both gradients
    grad_y = (make_input(shape, dtype, "contiguous", device, mean=0.5, std=1.0, seed=7).float() + x.detach().float()
              ).to(dtype)
    _assert_training_gradients_as_reference(x, grad_y, weight, bias, running_mean, running_var, backend, dtype, relu)


@pytest.mark.parametrize("backend,device", [p for p in backend_devices() if p.values[0] != "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_channels_last_16_bit_gradient_sums_through_the_relu_as_reference(backend, device, dtype, monkeypatch,
                                                                         poisoned):
    """16-bit channels-last rows of whole 16-byte groups (32 channels; 8 in the interpreter) through
    the ReLU's mask, on the split plan (on-chip off): the CUDA C gradient sums' ring of copies in
    dynamic shared memory (compilation.MASKED_RING_BUFFERS), turned more than once a thread
    (about 8 rows a thread, 7 in some: a last copy short of a batch), and the Triton ones' copies
    ahead over tiles of half the rows (sites.gradient_sums_site). Against the float64 reference (the
    ReLU's mask from the kernels' own output, as test_epilogue), and two calls bitwise equal."""
    import dataclasses

    import bn_gpu.backends.plan
    from bn_gpu.backends.triton import sites
    for name in ("INTERPRETER_TUNING", "GPU_TUNING"):
        monkeypatch.setattr(bn_gpu.backends.plan, name,
                            dataclasses.replace(getattr(bn_gpu.backends.plan, name), on_chip_bytes=0))
    shape = (128, 32, 33, 33) if device == "cuda" else (16, 8, 4, 4)
    C = shape[1]
    x = make_input(shape, dtype, "channels_last", device, mean=0.5, std=1.0).requires_grad_()
    if backend == "triton":  # the case walks the halved tiles
        g = bn_gpu.backends.plan.geometry(x, x, *bn_gpu.backends.plan.tuning_and_sms(x.device))
        meta = sites.gradient_sums_site(g, True, True, True, True).meta
        assert g.plan.splits > 1 and meta["BLOCK_M"] < sites.config(g, "gradient_sums")[2]["BLOCK_M"], meta
    weight, bias, running_mean, running_var = make_params(C, torch.float32, device)
    grad_y = make_input(shape, dtype, "channels_last", device, mean=0.0, std=1.0, seed=7)
    _assert_training_gradients_as_reference(x, grad_y, weight, bias, running_mean, running_var, backend, dtype, True)


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_channel_groups_single_pass_backward_over_half_tiles(backend, device, dtype, relu, monkeypatch, poisoned):
    """The Triton 16-bit channels-first single-pass backward of channel groups walks tiles of half the
    plan's rows (sites.single_pass_backward_site: 64x2048x7x7 on a GPU; in the interpreter rows of 9
    values in tiles of 1 KB, 2 groups of 8 channels, 5 batch rows: the last half tile short).
    Against the float64 reference, through the ReLU's mask too, and two calls bitwise equal."""
    import dataclasses

    import bn_gpu.backends.plan
    from bn_gpu.backends.triton import sites
    for name in ("INTERPRETER_TUNING", "GPU_TUNING"):
        tuning = dataclasses.replace(getattr(bn_gpu.backends.plan, name), on_chip_bytes=0, programs_per_sm=0)
        if name == "INTERPRETER_TUNING":
            tuning = dataclasses.replace(tuning, tile_bytes=1024)
        monkeypatch.setattr(bn_gpu.backends.plan, name, tuning)
    shape = (64, 2048, 7, 7) if device == "cuda" else (5, 8, 3, 3)
    C = shape[1]
    x = make_input(shape, dtype, "contiguous", device, mean=0.5, std=1.0).requires_grad_()
    g = bn_gpu.backends.plan.geometry(x, x, *bn_gpu.backends.plan.tuning_and_sms(x.device))
    site = sites.single_pass_backward_site(g, True, relu, True, True, relu)
    assert g.plan.splits == 1 and g.plan.group > 1 and site.meta["ROWS"] == g.plan.rows // 2 > 0, (g.plan, site.meta)
    weight, bias, running_mean, running_var = make_params(C, torch.float32, device)
    grad_y = make_input(shape, dtype, "contiguous", device, mean=0.0, std=1.0, seed=7)
    _assert_training_gradients_as_reference(x, grad_y, weight, bias, running_mean, running_var, backend, dtype, relu)
