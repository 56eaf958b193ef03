"""The CuPy backend's replays without CuPy or a GPU: compiled kernels replaced by recorders, CPU
tensors let through, so that a replayed call's launches -- kernels, grids, blocks, scalars, and
which argument or buffer each address points into -- can be compared with the full host path's."""
import pytest
import torch
from support import make_input, make_params

import bn_gpu.backends
import bn_gpu.backends.cupy as cupy_backend
from bn_gpu.backends import replay
from bn_gpu.backends.cupy import launcher, table


class RecordingKernel:
    def __init__(self, role, launches):
        self.role, self.launches = role, launches

    def __call__(self, grid, block, args, stream=None):
        self.launches.append((self.role, tuple(grid), tuple(block), tuple(args)))


@pytest.fixture
def recorded(monkeypatch):
    """Launches recorded, not run; a fresh launcher; CPU tensors accepted by the backend."""
    launches = []
    kernels = {}

    def compiled_kernels(device_index, *types):
        return kernels.setdefault(types, _Roles(launches))

    monkeypatch.setattr(table, "compiled_kernels", compiled_kernels)
    monkeypatch.setattr(launcher, "launch", launcher.Launcher())
    monkeypatch.setattr(launcher, "current_stream", lambda: None)
    monkeypatch.setattr(cupy_backend, "check_available", lambda device: None)
    monkeypatch.setattr(bn_gpu.backends, "_checked_modules", {})
    monkeypatch.setattr(bn_gpu.backends.plan, "multiprocessors", lambda index: 132)
    monkeypatch.setattr(table, "shared_memory_per_sm", lambda index: 233472)  # an H200's
    monkeypatch.setattr(launcher, "cooperative", lambda kernel, *shape: kernel)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    counts = {"replayed": 0}
    run = replay.Replay.run

    def counted_run(self, inputs, *args, **kwargs):
        counts["replayed"] += 1
        return run(self, inputs, *args, **kwargs)

    monkeypatch.setattr(replay.Replay, "run", counted_run)
    return launches, counts


class _Roles(dict):
    def __init__(self, launches):
        super().__init__()
        self.launches = launches

    def __missing__(self, role):
        self[role] = RecordingKernel(role, self.launches)
        return self[role]


def _labelled(launches, known: dict) -> list:
    """The launches with each address named: an argument or output by `known` ({address: name}),
    anything else by the order its address first appears -- the same for two calls that use the
    same arguments and buffers in the same way."""
    import numpy as np
    others = {}
    result = []
    for role, grid, block, args in launches:
        named = []
        for a in args:
            if type(a) is np.uint64 and int(a) != 0:
                address = int(a)
                named.append(known.get(address) or others.setdefault(address, f"buffer{len(others)}"))
            else:
                named.append(a)
        result.append((role, grid, block, tuple(named)))
    return result


def _known(**tensors) -> dict:
    return {t.data_ptr(): name for name, t in tensors.items() if t is not None and t.numel()}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(6, 5, 7, 9), (64, 3, 16, 16)], ids=["single-pass", "split"])
def test_a_replayed_cupy_training_step_launches_what_the_full_path_does(recorded, shape, layout):
    launches, counts = recorded
    x = make_input(shape, layout=layout)
    grad_y = make_input(shape, layout=layout, mean=0.0, std=1.0, seed=5)
    weight, bias, running_mean, running_var = make_params(shape[1])
    counter = torch.tensor(4)
    calls = []
    for _ in range(3):
        start = len(launches)
        y, mean, invstd = torch.ops.bn_gpu.forward_train(x, weight, bias, running_mean, running_var, counter, 0.1,
                                                         1e-5, "cupy")
        middle = len(launches)
        grads = torch.ops.bn_gpu.backward(grad_y, x, weight, mean, invstd, True, True, True, "cupy")
        known = _known(x=x, grad_y=grad_y, weight=weight, bias=bias, running_mean=running_mean,
                       running_var=running_var, counter=counter, y=y, mean=mean, invstd=invstd, grad_x=grads[0],
                       grad_weight=grads[1], grad_bias=grads[2])
        # Each op's launches named apart: a buffer freed after the forward may be reallocated at
        # the same address in the backward, in one call and not in another.
        calls.append((_labelled(launches[start:middle], known), _labelled(launches[middle:], known)))
    # The first call is recorded (CuPy has no JIT launch to wait for), the next two replayed.
    assert counts["replayed"] == 4
    assert calls[2] == calls[1] == calls[0]
    assert calls[2][0] and calls[2][1]
    assert sum(type(found) is replay.Replay for found in launcher.launch.replays.values()) == 2


def test_a_cupy_call_with_a_copy_outside_the_orchestration_is_never_replayed(recorded):
    """A bias whose dtype differs from the weight's is read through a per-channel copy the replay
    would not see: the full path on every call."""
    launches, counts = recorded
    x = make_input((6, 5, 7, 9), torch.bfloat16)
    weight, bias, running_mean, running_var = make_params(5)
    for _ in range(4):
        torch.ops.bn_gpu.forward_train(x, weight, bias.to(torch.bfloat16), running_mean, running_var, None, 0.1,
                                       1e-5, "cupy")
    assert counts["replayed"] == 0 and launches
    assert not any(type(found) is replay.Replay for found in launcher.launch.replays.values())
