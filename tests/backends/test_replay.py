"""Replayed calls (bn_gpu.backends.replay) without a GPU: a launcher whose "compiled kernels" run
the Triton kernels in the interpreter with exactly the arguments a direct launch passes them, so a
replay's buffers, pointers, scalars and constexprs are checked by the kernels' results -- against
the full host path bit for bit, and against the float64 reference."""
import inspect

import pytest
import torch
from support import Allocations, assert_close, assert_stats_close, make_input, make_params

import bn_gpu
from bn_gpu import reference
from bn_gpu.backends import replay
from bn_gpu.backends.plan import interpreting
from bn_gpu.backends.triton import interpreter
from bn_gpu.backends.triton import launcher as triton_launcher

pytestmark = pytest.mark.skipif(not interpreting(), reason="runs the kernels in the Triton interpreter")


class InterpretedKernel:
    """A compiled kernel's launcher surface (run, function, packed_metadata) over the interpreter:
    run() launches the JIT kernel on the grid and the runtime arguments and constexprs it is given."""
    function = packed_metadata = None

    def __init__(self, kernel, counts, concurrent=False):
        self.kernel, self.counts, self.concurrent = kernel, counts, concurrent

    def run(self, grid_x, grid_y, grid_z, stream, function, metadata, hook, enter, leave, *arguments):
        self.counts["direct"] += 1
        if self.concurrent:  # programs that wait for each other (Site.resident), as the launcher runs them
            interpreter.launch_concurrently(self.kernel, (grid_x, grid_y, grid_z), list(arguments), {})
        else:
            self.kernel[(grid_x, grid_y, grid_z)](*arguments)


class InterpreterLauncher(triton_launcher.Launcher):
    """A Launcher taking the direct path under the interpreter."""

    def __init__(self):
        super().__init__(direct=True)
        self.direct = True
        self.counts = {"direct": 0}

    def _remember(self, key, site, compiled, runtime_args):
        """As Launcher._remember: the constexprs are the kernel's parameters after its runtime arguments."""
        constexprs = list(inspect.signature(site.kernel.fn).parameters)[runtime_args:]
        dims = (site.grid[0], site.grid[1] if len(site.grid) > 1 else 1, 1)
        self.compiled[key] = (InterpretedKernel(site.kernel, self.counts, bool(site.resident)), dims,
                              [site.meta[c] for c in constexprs])


@pytest.fixture
def launcher(monkeypatch):
    result = InterpreterLauncher()
    monkeypatch.setattr(triton_launcher, "launch", result)
    run = replay.Replay.run

    def counted_run(self, inputs, *args, **kwargs):
        result.counts["replayed"] = result.counts.get("replayed", 0) + 1
        return run(self, inputs, *args, **kwargs)

    monkeypatch.setattr(replay.Replay, "run", counted_run)
    monkeypatch.setattr(triton_launcher, "current_stream", lambda: 0)
    return result


def replays(launcher) -> list:
    return [found for found in launcher.replays.values() if type(found) is replay.Replay]


def train(x, params, counter=None, momentum=0.1, relu=False):
    weight, bias, running_mean, running_var = params
    return torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, counter, momentum, 1e-5,
                                          "triton", None, relu)


def evaluate(x, params, relu=False):
    weight, bias, running_mean, running_var = params
    return torch.ops.bn_gpu.forward_eval(x, weight, bias, running_mean, running_var, 1e-5, "triton", None, relu)


def copies(params):
    return [t.clone() for t in params]


def expected_train(x, params, momentum=0.1, batches=1):
    """float64 (y, mean, invstd, running_mean, running_var); batches: num_batches_tracked after the call."""
    weight, bias, running_mean, running_var = params
    y, mean, var, invstd = reference.forward_train(x, weight, bias, 1e-5)
    running = reference.update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1],
                                             reference.momentum_factor(momentum, batches))
    return (y, mean, invstd, *running)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
@pytest.mark.parametrize("shape,layout", [((6, 5, 7, 9), "contiguous"), ((6, 5, 7, 9), "channels_last"),
                                          ((40, 6), "contiguous")])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_a_replayed_training_forward_is_the_full_path_bit_for_bit(launcher, poisoned, kernel_path, shape, layout,
                                                                  dtype, momentum):
    """Three calls of one signature: the first goes through the JIT, the second is recorded, the
    third replayed -- with outputs poisoned before the kernels write them, on both kernel paths
    (the split one takes the finalize counters and rows of its partials buffer)."""
    C = shape[1]
    params = make_params(C, torch.float32 if dtype != torch.float32 else dtype)
    x = make_input(shape, dtype, layout)
    results = []
    for call in range(3):
        state = copies(params)
        counter = torch.tensor(2)
        results.append((*train(x, state, counter, momentum), *state[2:], counter))
        assert len(replays(launcher)) == (1 if call >= 1 else 0)
        assert launcher.counts.get("replayed", 0) == (1 if call == 2 else 0)
    direct_before_replay = launcher.counts["direct"]
    assert direct_before_replay > 0
    for recorded, replayed in zip(results[1], results[2]):
        assert torch.equal(recorded, replayed)
    assert results[2][0].stride() == x.stride()
    y, mean, invstd, running_mean, running_var, counter = results[2]
    expected = expected_train(x, params, momentum, batches=3)
    for actual, wanted, what in zip((y, mean, invstd, running_mean, running_var), expected,
                                    ("y", "mean", "invstd", "running_mean", "running_var")):
        (assert_close if what == "y" else assert_stats_close)(actual, wanted, dtype, what)
    assert counter.item() == 3


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("poison", [True, False])
def test_a_replayed_eval_forward_is_the_full_path_bit_for_bit(launcher, request, relu, poison):
    """Also without the poisoning fixture: the replay then allocates through torch directly."""
    if poison:
        request.getfixturevalue("poisoned")
    x = make_input((4, 6, 5, 5), layout="channels_last")
    params = make_params(6)
    results = [evaluate(x, params, relu) for _ in range(3)]
    assert len(replays(launcher)) == 1 and launcher.counts["replayed"] == 1
    for recorded, replayed in zip(results[1], results[2]):
        assert torch.equal(recorded, replayed)
    assert results[2][0].stride() == x.stride()
    weight, bias, running_mean, running_var = params
    expected = reference.forward_eval(x, running_mean, running_var, weight, bias, 1e-5)
    assert_close(results[2][0], expected.clamp_min(0) if relu else expected, torch.float32, "y")


def test_another_signature_is_not_replayed(launcher):
    """A misaligned input, another weight dtype, another eps: each its own signature, and right."""
    storage = make_input((1 + 8 * 5 * 6,), torch.bfloat16)
    params = make_params(5)
    for _ in range(2):
        train(storage[:-1].view(8, 5, 6), copies(params))
    misaligned = storage[1:].view(8, 5, 6)  # 2 bytes past a 16-byte boundary
    y = train(misaligned, copies(params))[0]
    assert_close(y, expected_train(misaligned, params)[0], torch.bfloat16, "misaligned")
    bf16_params = [t.to(torch.bfloat16) for t in params]
    y = train(storage[:-1].view(8, 5, 6), bf16_params)[0]
    assert_close(y, expected_train(storage[:-1].view(8, 5, 6), bf16_params)[0], torch.bfloat16, "bf16 weight")
    assert len(launcher.replays) == 3 and len(replays(launcher)) == 1


def test_bad_arguments_after_a_replay_are_refused_and_change_nothing(launcher):
    x = make_input((8, 5, 6))
    params = make_params(5)
    for _ in range(3):
        train(x, copies(params))
    assert launcher.counts["replayed"] == 1
    weight, bias, running_mean, running_var = copies(params)
    before = running_mean.clone(), running_var.clone()
    with pytest.raises(RuntimeError, match="weight should contain 5 elements not 4"):
        train(x, (weight[:4], bias, running_mean, running_var))
    with pytest.raises(ValueError, match="eps must be positive"):
        torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, None, 0.1, -1e-5, "triton")
    assert torch.equal(running_mean, before[0]) and torch.equal(running_var, before[1])


@pytest.mark.parametrize("case", ["strided running_mean", "weight passed as bias", "residual"])
def test_host_paths_with_more_than_launches_are_never_replayed(launcher, case):
    """A copy outside the orchestration's (a strided running statistic written back), an argument
    passed twice, a residual: the full path on every call, right."""
    x = make_input((6, 4, 5, 7))
    weight, bias, running_mean, running_var = make_params(4)
    residual = make_input((6, 4, 5, 7), seed=3) if case == "residual" else None
    for _ in range(4):
        stats = torch.stack([running_mean, running_var], dim=1).clone()  # columns: strided views
        mean_view, var_view = (stats[:, 0], stats[:, 1]) if case == "strided running_mean" else (
            running_mean.clone(), running_var.clone())
        b = weight if case == "weight passed as bias" else bias
        y = bn_gpu.batch_norm(x, mean_view, var_view, weight, b, True, 0.1, 1e-5, backend="triton",
                              residual=residual)
        expected = expected_train(x, (weight, b, running_mean, running_var))
        assert_close(y, expected[0] if residual is None else expected[0] + residual, torch.float32, case)
        assert_stats_close(mean_view, expected[3], torch.float32, "running_mean")
    assert not replays(launcher) and "replayed" not in launcher.counts


def test_launch_hooks_turn_replays_off(launcher):
    import triton
    x, params = make_input((8, 5, 6)), make_params(5)
    for _ in range(2):
        train(x, copies(params))
    assert replays(launcher) and replay.launcher("triton") is launcher
    hook = triton.knobs.runtime.launch_enter_hook
    hook.add(print)
    try:
        assert replay.launcher("triton") is None
    finally:
        hook.remove(print)
    assert replay.launcher("triton") is launcher and replay.launcher("cpu") is None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_a_replayed_backward_is_the_full_path_bit_for_bit(launcher, poisoned, kernel_path, layout, dtype):
    """The backward's host path replayed as the forward's: the split path takes rows of its partials
    and totals buffers and the finalize counters."""
    shape = (6, 5, 7, 9)
    x = make_input(shape, dtype, layout)
    grad_y = make_input(shape, dtype, layout, mean=0.0, std=1.0, seed=5)
    weight, bias, _, _ = make_params(5)
    results = []
    for call in range(3):
        _, mean, invstd = train(x, (weight, bias, None, None))
        results.append(torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, "triton"))
        assert launcher.counts.get("replayed", 0) == (2 if call == 2 else 0)  # forward and backward
    for recorded, replayed in zip(results[1], results[2]):
        assert torch.equal(recorded, replayed)
    grad_x, grad_weight, grad_bias = reference.backward_train(grad_y, x, weight, 1e-5)
    assert_close(results[2][0], grad_x, dtype, "grad_x")
    assert_stats_close(results[2][1], grad_weight, dtype, "grad_weight")
    assert_stats_close(results[2][2], grad_bias, dtype, "grad_bias")


def test_a_backward_that_leaves_a_gradient_out_is_never_replayed(launcher):
    """Without grad_weight the op returns empty tensors made outside the recorded buffers."""
    x, grad_y = make_input((8, 5, 6)), make_input((8, 5, 6), mean=0.0, std=1.0, seed=5)
    weight = make_params(5)[0]
    for _ in range(3):
        _, mean, invstd = train(x, (weight, None, None, None))
        grad_x = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, False, "triton")[0]
        assert_close(grad_x, reference.backward_train(grad_y, x, weight, 1e-5)[0], torch.float32, "grad_x")
    assert launcher.counts.get("replayed", 0) == 1  # the forward


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_an_input_the_kernels_do_not_read_is_replayed_with_its_copy(launcher, poisoned, layout):
    """x in a layout the kernels do not read is copied into one they do: the copy is part of the
    replay, which is the full path bit for bit -- and, with the copy's buffer poisoned, the copy
    itself is checked. channels_last: read natively, no copy, replayed as before."""
    x = make_input((6, 4, 5, 7), layout=layout)
    params = make_params(4)
    results = []
    for _ in range(3):
        state = copies(params)
        results.append((*train(x, state), *state[2:]))
    assert launcher.counts.get("replayed", 0) == 1
    for recorded, replayed in zip(results[1], results[2]):
        assert torch.equal(recorded, replayed)
    expected = expected_train(x, params)
    assert_close(results[2][0], expected[0], torch.float32, "y")
    assert_stats_close(results[2][3], expected[3], torch.float32, "running_mean")


@pytest.mark.parametrize("grad_layout", ["expanded", "sum", "channels_last", "transposed"])
def test_a_backward_with_dy_in_another_layout_is_replayed_with_its_copy(launcher, poisoned, grad_layout):
    """dy laid out unlike x -- expanded (stride 0: along the width here, so that its sums do not
    cancel; everywhere for y.sum()'s gradient), or in another memory format -- is copied into x's
    family inside the replay instead of turning the replay off."""
    shape = (6, 5, 7, 9)
    x = make_input(shape)
    if grad_layout == "expanded":
        grad_y = make_input((*shape[:3], 1), mean=0.0, std=1.0, seed=5).expand(shape)
    elif grad_layout == "sum":
        grad_y = torch.ones(()).expand(shape)
    else:
        grad_y = make_input(shape, layout=grad_layout, mean=0.0, std=1.0, seed=5)
    weight, bias, _, _ = make_params(5)
    results = []
    for _ in range(3):
        _, mean, invstd = train(x, (weight, bias, None, None))
        results.append(torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, "triton"))
    assert launcher.counts.get("replayed", 0) == 2  # the third forward and backward
    for recorded, replayed in zip(results[1], results[2]):
        assert torch.equal(recorded, replayed)
    grad_x, grad_weight, grad_bias = reference.backward_train(grad_y.contiguous(), x, weight, 1e-5)
    assert_close(results[2][0], grad_x, torch.float32, "grad_x")
    assert_stats_close(results[2][2], grad_bias, torch.float32, "grad_bias")
    if grad_layout == "sum":  # dy constant: grad_weight = dy * sum(x_hat) = 0 up to float32 sums of 378 values
        torch.testing.assert_close(results[2][1].double(), grad_weight, atol=1e-4, rtol=0)
    else:
        assert_stats_close(results[2][1], grad_weight, torch.float32, "grad_weight")


def test_replayed_split_steps_take_the_workspaces(launcher, monkeypatch):
    """Without poisoning, a replayed split forward and backward take the per-stream workspaces for
    their partials and totals, as the full path does: they allocate their outputs alone, and give
    the full path's results bit for bit."""
    import dataclasses

    from torch.utils._python_dispatch import _disable_current_modes

    import bn_gpu.backends.plan
    from bn_gpu.ops import kernels
    run = InterpretedKernel.run

    def unseen_run(*args):  # what the interpreter allocates to run a kernel is no part of the host path
        with _disable_current_modes():
            return run(*args)

    monkeypatch.setattr(InterpretedKernel, "run", unseen_run)
    for name in ("INTERPRETER_TUNING", "GPU_TUNING"):  # several programs per channel: the split kernels
        monkeypatch.setattr(bn_gpu.backends.plan, name,
                            dataclasses.replace(getattr(bn_gpu.backends.plan, name), programs_per_sm=64,
                                                on_chip_bytes=0))

    x = make_input((6, 5, 7, 9))
    dy = make_input((6, 5, 7, 9), mean=0.0, std=1.0, seed=3)
    params = make_params(5)

    states = [copies(params) for _ in range(3)]

    def step():
        # The ops' kernels, below the dispatcher: a dispatch mode sees what they allocate.
        weight, bias, running_mean, running_var = states.pop()
        y, mean, invstd = kernels.forward_train(x, weight, bias, running_mean, running_var, None, 0.1, 1e-5, "triton")
        return y, mean, invstd, *kernels.backward(dy, x, weight, mean, invstd, True, True, True, "triton")

    results = [step(), step()]
    assert launcher.counts.get("replayed", 0) == 0
    with Allocations() as seen:
        results.append(step())
    assert launcher.counts["replayed"] == 2  # the third forward and the third backward
    assert sorted(seen.shapes) == sorted([x.shape, (5,), (5,), x.shape, (5,), (5,)]), seen.shapes
    for recorded, replayed in zip(results[1], results[2]):
        assert torch.equal(recorded, replayed)
    grad_x, _, _ = reference.backward_train(dy, x, params[0], 1e-5)
    assert_close(results[2][3], grad_x, torch.float32, "grad_input")
