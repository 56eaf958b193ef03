"""GPU-only checks (marker `gpu`): large shapes against float64 on the GPU, the modules against
torch.nn (cuDNN) on CUDA, CUDA-graph capture, a tensor above 2**31 elements, and the Triton and
CuPy backends against each other on random inputs.

Parity of every kernel in every layout and dtype on the GPU is in test_kernels.py (its
triton-cuda / cupy-cuda cases)."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bn_gpu
from bn_gpu import reference as ref
from bn_gpu.backends import replay
from support import assert_close, assert_stats_close, gpu_backends, make_input, make_params, requires_cupy

pytestmark = pytest.mark.gpu

LARGE_CASES = [
    ((64, 64, 112, 112), "contiguous"),
    ((64, 64, 112, 112), "channels_last"),
    ((64, 2048, 7, 7), "contiguous"),
    ((64, 2048, 7, 7), "channels_last"),
    ((16384, 2048), "contiguous"),
    ((8, 64, 16, 56, 56), "channels_last"),
]


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: "x".join(map(str, c[0])) + "-" + c[1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_shapes_against_float64_on_gpu(backend, case, dtype):
    shape, layout = case
    C = shape[1]
    x = make_input(shape, dtype, layout, "cuda")
    weight, bias, running_mean, running_var = make_params(C, torch.float32, "cuda")
    rm0, rv0 = running_mean.clone(), running_var.clone()
    y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, None, 0.1, 1e-5, backend)
    y_ref, mean_ref, var_ref, invstd_ref = ref.forward_train(x, weight, bias)
    assert_close(y, y_ref, dtype, "output")
    assert_stats_close(mean, mean_ref, dtype, "mean")
    assert_stats_close(invstd, invstd_ref, dtype, "invstd")
    rm_ref, rv_ref = ref.update_running_stats(rm0, rv0, mean_ref, var_ref, x.numel() // C, 0.1)
    assert_close(running_var, rv_ref, torch.float32, "running_var")
    del y_ref
    grad_y = make_input(shape, dtype, layout, "cuda", mean=0, std=1, seed=3)
    grad_x, grad_w, grad_b = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
    grad_x_ref, grad_w_ref, grad_b_ref = ref.backward_train(grad_y, x, weight)
    assert_close(grad_x, grad_x_ref, dtype, "grad_input")
    scale = grad_y.double().abs().sum() / C
    assert_close(grad_w / scale, grad_w_ref / scale, dtype, "grad_weight")


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_modules_match_torch_cudnn_on_gpu(backend, layout):
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(16).cuda()
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.normal_()
    ours = bn_gpu.convert_model(copy.deepcopy(theirs), backend=backend)
    for step in range(3):
        x = make_input((8, 16, 14, 14), layout=layout, device="cuda", seed=step).requires_grad_()
        x_ours = x.detach().clone().requires_grad_()
        y, y_ours = theirs(x), ours(x_ours)
        torch.testing.assert_close(y_ours, y, atol=1e-5, rtol=1e-5)
        assert y_ours.stride() == y.stride()
        grad = torch.randn_like(y)
        y.backward(grad)
        y_ours.backward(grad)
        torch.testing.assert_close(x_ours.grad, x.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 3


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("shape, layout", [((4, 8, 6, 6), "contiguous"), ((32, 8, 64, 64), "contiguous"),
                                           ((32, 8, 64, 64), "channels_last")], ids=str)
def test_training_step_captures_into_a_cuda_graph(backend, shape, layout):
    """No host synchronization on the training path: the forward + backward capture and replay --
    on the split path too, where the Triton reductions' counters must be zero at every replay."""
    bn = bn_gpu.BatchNorm2d(8, momentum=None, backend=backend).cuda()
    static_x = make_input(shape, layout=layout, device="cuda").requires_grad_()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        bn(static_x).sum().backward()  # warm-up: compile kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    reference = copy.deepcopy(bn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = bn(static_x)
        static_y.sum().backward()
    for step in range(3):
        x = make_input(shape, layout=layout, device="cuda", seed=10 + step)
        static_x.data.copy_(x)
        graph.replay()
        torch.testing.assert_close(static_y, reference(x), atol=1e-5, rtol=1e-5)
    torch.cuda.synchronize()
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    assert bn.num_batches_tracked.item() == reference.num_batches_tracked.item()


@pytest.mark.parametrize("backend", gpu_backends())
def test_above_two_to_the_31_elements(backend):
    """64-bit offsets: 2**31 + 2**20 fp16 values in 2 channels (channels-first and channels-last)."""
    free, _ = torch.cuda.mem_get_info()
    numel = 2**31 + 2**20
    if free < numel * 12:  # x, y and float64 copies of one channel
        pytest.skip(f"needs about {numel * 12 / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    for shape in [(2, 2, numel // 4), (numel // 2, 2)]:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(shape, generator=g, device="cuda", dtype=torch.float16)
        y, mean, invstd = torch.ops.bn_gpu.forward_train(x, None, None, None, None, None, 0.1, 1e-5, backend)
        mean_ref = torch.stack([x.select(1, c).double().mean() for c in range(2)])
        var_ref = torch.stack([(x.select(1, c).double() - mean_ref[c]).square().mean() for c in range(2)])
        torch.testing.assert_close(mean.double(), mean_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(invstd.double(), 1 / torch.sqrt(var_ref + 1e-5), atol=1e-5, rtol=1e-5)
        # The last elements sit past 2**31: normalized there too.
        tail = x.flatten()[-4096:].double()
        channel = (torch.arange(numel - 4096, numel, device="cuda") // (numel // 4)) % 2 if x.dim() == 3 else \
            torch.arange(numel - 4096, numel, device="cuda") % 2
        expected = (tail - mean_ref[channel]) / torch.sqrt(var_ref[channel] + 1e-5)
        torch.testing.assert_close(y.flatten()[-4096:].double(), expected, atol=1e-2, rtol=1e-2)
        del x, y
        torch.cuda.empty_cache()


@st.composite
def _random_cases(draw):
    spatial = [draw(st.integers(1, 24)) for _ in range(draw(st.integers(0, 3)))]
    shape = (draw(st.integers(2, 16)), draw(st.integers(1, 96)), *spatial)
    layout = draw(st.sampled_from(["contiguous", "channels_last", "channel_slice"]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return shape, layout, dtype, draw(st.integers(0, 2**16))


@requires_cupy
@settings(max_examples=40, deadline=None)
@given(case=_random_cases())
def test_triton_and_cupy_agree(case):
    """The two GPU backends on the same random inputs: outputs, statistics, running statistics and
    gradients agree within the dtype's tolerance."""
    shape, layout, dtype, seed = case
    C = shape[1]
    x = make_input(shape, dtype, layout, "cuda", seed=seed)
    grad_y = make_input(shape, dtype, layout, "cuda", mean=0, std=1, seed=seed + 1)
    results = {}
    for backend in ("triton", "cupy"):
        weight, bias, running_mean, running_var = make_params(C, torch.float32, "cuda", seed=seed + 2)
        y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, None, 0.1,
                                                         1e-5, backend)
        grads = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
        y_eval, _, _ = torch.ops.bn_gpu.forward_eval(x, weight, bias, running_mean, running_var, 1e-5, backend)
        # dx relative to each channel's gain weight * invstd: the bracket it multiplies cancels
        # among O(1) terms where a channel has few values (see test_numerics).
        gain = (weight * invstd).reshape(1, C, *[1] * (x.dim() - 2))
        results[backend] = dict(y=y, mean=mean, invstd=invstd, running_mean=running_mean,
                                running_var=running_var, grad_x=grads[0].float() / gain, y_eval=y_eval)
    for name, value in results["triton"].items():
        other = results["cupy"][name]
        if name in ("y", "y_eval", "grad_x"):  # values in the input's dtype
            assert_close(other, value, dtype, name)
        else:  # fp32 statistics
            assert_stats_close(other, value, dtype, name)


@pytest.mark.parametrize("backend", gpu_backends())
def test_compile_fullgraph_on_gpu(backend):
    """torch.compile (Inductor) of a small CNN built with the modules, train then eval, on CUDA."""
    def cnn():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), bn_gpu.BatchNorm2d(8, backend=backend), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 10), bn_gpu.BatchNorm1d(10, backend=backend)).cuda()

    eager, compiled_model = cnn(), cnn()
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = make_input((4, 3, 6, 6), device="cuda")
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled_model[1].running_var, eager[1].running_var)
    eager.eval()
    compiled_model.eval()
    torch.testing.assert_close(compiled(x), eager(x), atol=1e-4, rtol=1e-4)


REPLAY_CASES = [((8, 4, 64, 64), "contiguous"), ((4, 64, 7, 7), "contiguous"), ((8, 4, 64, 64), "channels_last"),
                ((4096, 8), "contiguous")]


def _every_op(backend: str, calls: int) -> list:
    """Each op called `calls` times on bf16 inputs of REPLAY_CASES (both kernel paths and layouts):
    the last call's results of each."""
    results = []
    for shape, layout in REPLAY_CASES:
        C = shape[1]
        x = make_input(shape, torch.bfloat16, layout, "cuda")
        grad_y = make_input(shape, torch.bfloat16, layout, "cuda", mean=0, std=1, seed=4)
        weight, bias, running_mean, running_var = make_params(C, torch.float32, "cuda")
        for _ in range(calls):
            y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, None,
                                                             0.1, 1e-5, backend)
            y_eval = torch.ops.bn_gpu.forward_eval(x, weight, bias, running_mean, running_var, 1e-5, backend)[0]
            grads = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, backend)
        results += [y, mean, invstd, y_eval, running_mean, running_var, *grads]
    torch.cuda.synchronize()
    return results


def test_direct_launches_match_the_jit(monkeypatch):
    """BN_GPU_DIRECT_LAUNCH=1: launches through the compiled kernels' launchers give bitwise the
    results of the JIT path, for every op and both paths, and are actually taken."""
    from bn_gpu.backends.triton import launcher
    monkeypatch.setattr(launcher, "launch", launcher.Launcher(direct=False))
    expected = _every_op("triton", 3)  # the first launch of a specialization compiles; the later ones reuse it
    direct = launcher.Launcher(direct=True)
    monkeypatch.setattr(launcher, "launch", direct)
    actual = _every_op("triton", 3)
    assert direct.direct and direct.compiled, "no launch went through the compiled launcher"
    # The third call of each op (two forwards, the backward) replays the second's recording (bn_gpu.backends.replay).
    assert sum(type(found) is replay.Replay for found in direct.replays.values()) == 3 * len(REPLAY_CASES)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


@requires_cupy
def test_cupy_replays_match_the_full_path(monkeypatch):
    """The CuPy backend replays a seen signature (bn_gpu.backends.replay): bitwise the results of
    the full host path, on both kernel paths and both layouts, and actually taken."""
    from bn_gpu.backends.cupy import launcher
    # The full path on every call: no replay applies while replay_launcher says none does.
    monkeypatch.setattr(launcher, "replay_launcher", lambda: None)
    expected = _every_op("cupy", 2)
    monkeypatch.undo()
    fresh = launcher.Launcher()
    monkeypatch.setattr(launcher, "launch", fresh)
    actual = _every_op("cupy", 2)  # the first call of each op recorded, the second replayed
    assert sum(type(found) is replay.Replay for found in fresh.replays.values()) == 3 * len(REPLAY_CASES)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)
