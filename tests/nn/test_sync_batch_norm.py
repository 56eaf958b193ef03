"""SyncBatchNorm across processes: 2 and 3 ranks spawned with gloo on this machine, each comparing
its share against bn_gpu's single-process BatchNorm on the concatenated global batch (outputs,
running statistics, num_batches_tracked, input/weight/bias gradients), on the "cpu" backend and on
the Triton kernels in the interpreter. GPU variants are marked `gpu`."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bn_gpu
from support import INTERPRETER_BROKEN, INTERPRETING, arrange

C = 3


def _backends():
    params = [pytest.param("cpu", id="cpu")]
    if INTERPRETING:
        marks = [pytest.mark.skip(reason=INTERPRETER_BROKEN)] if INTERPRETER_BROKEN else []
        params.append(pytest.param("triton", id="triton-interpreter", marks=marks))
    return params


def _spawn(worker, world_size: int, tmp_path, *args) -> None:
    """Run worker(rank, world_size, *args) in world_size processes joined by gloo over a FileStore."""
    mp.start_processes(_entry, args=(worker, world_size, str(tmp_path / "store"), args), nprocs=world_size,
                       join=True, start_method="spawn")


def _entry(rank, worker, world_size, store_path, args):
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        worker(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _global_batch(sizes, dtype, layout, seed, spatial=(4, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), C, *spatial, generator=g, dtype=torch.float64) * 2 + 3
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return arrange(x.to(dtype), layout), arrange(grad.to(dtype), layout)


def _share(t, sizes, rank):
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _close(actual, expected, what, dtype=torch.float32):
    tol = {torch.float32: 2e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


def _parity_worker(rank, world_size, backend, sizes, dtype, layout, momentum, group_ranks):
    """Two training steps and one eval step of SyncBatchNorm against BatchNorm on the global batch."""
    group = dist.new_group(group_ranks) if group_ranks else None
    members = group_ranks or list(range(world_size))
    if rank not in members:
        return
    member = members.index(rank)
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    torch.manual_seed(0)
    reference = bn_gpu.BatchNorm2d(C, momentum=momentum, backend=backend).to(param_dtype)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    sync = bn_gpu.convert_sync_batchnorm(copy.deepcopy(reference), process_group=group, backend=backend)
    assert isinstance(sync, bn_gpu.SyncBatchNorm)
    for step in range(2):
        x, grad = _global_batch(sizes, dtype, layout, seed=step)
        x_ref, x_local = x.clone().requires_grad_(), _share(x, sizes, member).clone().requires_grad_()
        y_ref, y_local = reference(x_ref), sync(x_local)
        y_ref.backward(grad)
        y_local.backward(_share(grad, sizes, member))
        _close(y_local, _share(y_ref, sizes, member), f"step {step} output", dtype)
        _close(x_local.grad, _share(x_ref.grad, sizes, member), f"step {step} grad_input", dtype)
        for name in ("weight", "bias"):  # local gradients: their sum over the ranks is the global one
            local = getattr(sync, name).grad.clone()
            dist.all_reduce(local, group=group)
            _close(local, getattr(reference, name).grad, f"step {step} grad_{name} summed", dtype)
            assert not torch.isnan(getattr(sync, name).grad).any()
        for name in ("running_mean", "running_var"):
            _close(getattr(sync, name), getattr(reference, name), f"step {step} {name}", param_dtype)
        assert int(sync.num_batches_tracked) == int(reference.num_batches_tracked) == step + 1
        for module in (reference, sync):
            module.zero_grad()
    sync.eval()
    reference.eval()
    x, _ = _global_batch(sizes, dtype, layout, seed=9)
    _close(sync(_share(x, sizes, member)), _share(reference(x), sizes, member), "eval output", dtype)


PARITY_CASES = {
    "2-equal": (2, [3, 3], torch.float32, "contiguous", 0.1, None),
    "2-uneven-channels-last": (2, [1, 4], torch.float32, "channels_last", 0.1, None),
    "3-one-empty-momentum-none": (3, [2, 0, 3], torch.float32, "contiguous", None, None),
    "3-subgroup-0-2": (3, [2, 3], torch.float32, "contiguous", 0.3, [0, 2]),
    "2-bfloat16": (2, [2, 3], torch.bfloat16, "channels_last", 0.1, None),
    "2-float16": (2, [3, 2], torch.float16, "contiguous", 0.1, None),
    "2-float64": (2, [2, 2], torch.float64, "contiguous", 0.1, None),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_sync_batch_norm_matches_batch_norm_on_the_global_batch(backend, case, tmp_path):
    world_size, sizes, dtype, layout, momentum, group_ranks = PARITY_CASES[case]
    _spawn(_parity_worker, world_size, tmp_path, backend, sizes, dtype, layout, momentum, group_ranks)


def _ddp_worker(rank, world_size, backend, steps):
    """A small CNN under DDP with SGD: every rank's parameters and running statistics equal the
    single-process model's trained on the global batch."""
    torch.manual_seed(0)
    reference = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2))
    model = torch.nn.parallel.DistributedDataParallel(
        bn_gpu.convert_sync_batchnorm(copy.deepcopy(reference), backend=backend))
    reference = bn_gpu.convert_model(reference, backend=backend)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, reference)]
    per_rank = 3
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(per_rank * world_size, 3, 6, 6, generator=g)
        target = torch.randint(0, 2, (per_rank * world_size,), generator=g)
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        losses = [torch.nn.functional.cross_entropy(model(x[local]), target[local]),
                  torch.nn.functional.cross_entropy(reference(x), target)]
        for loss, optimizer in zip(losses, optimizers):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for (name, got), (_, expected) in zip(model.module.state_dict().items(), reference.state_dict().items()):
        torch.testing.assert_close(got.double(), expected.double(), atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends())
def test_ddp_training_steps_match_single_process_training(backend, tmp_path):
    _spawn(_ddp_worker, 2, tmp_path, backend, 3)


def _graph_free_worker(rank, world_size, backend):
    """An empty rank gives zero gradients and no NaN anywhere; no step reads a device value on the host."""
    sizes = [0, 4]
    sync = bn_gpu.SyncBatchNorm(C, backend=backend)
    x, grad = _global_batch(sizes, torch.float32, "contiguous", seed=1)
    local = _share(x, sizes, rank).clone().requires_grad_()
    y = sync(local)
    y.backward(_share(grad, sizes, rank))
    for t in (y, local.grad, sync.weight.grad, sync.bias.grad, sync.running_mean, sync.running_var):
        assert not torch.isnan(t).any()
    if rank == 0:
        assert y.shape == (0, C, 4, 5) and torch.equal(sync.weight.grad, torch.zeros(C))


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends())
def test_an_empty_rank_takes_part_and_gets_zero_gradients(backend, tmp_path):
    _spawn(_graph_free_worker, 2, tmp_path, backend)


def _one_value_worker(rank, world_size, backend, sizes):
    """A global batch of one value per channel is refused on every rank, every buffer untouched."""
    sync = bn_gpu.SyncBatchNorm(C, momentum=None, backend=backend)
    before = copy.deepcopy(sync.state_dict())
    x, _ = _global_batch(sizes, torch.float32, "contiguous", seed=1, spatial=())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sync(_share(x, sizes, rank))
    for name, value in sync.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends())
def test_a_global_batch_of_one_value_per_channel_is_refused(backend, tmp_path):
    _spawn(_one_value_worker, 2, tmp_path, backend, [0, 1])


def _two_values_worker(rank, world_size, backend):
    """One value per channel on each rank is two on the global batch: normalized, no error."""
    sync = bn_gpu.SyncBatchNorm(C, eps=1e-12, backend=backend)
    x, _ = _global_batch([1, 1], torch.float32, "contiguous", seed=1, spatial=())
    y = sync(_share(x, [1, 1], rank))
    _close(y.abs(), torch.ones_like(y), "output of a two-value batch")  # (x - mean) / std is +-1
    assert torch.isfinite(sync.running_var).all()


@pytest.mark.slow
@pytest.mark.parametrize("backend", _backends())
def test_one_value_per_channel_on_each_of_two_ranks_is_a_batch(backend, tmp_path):
    _spawn(_two_values_worker, 2, tmp_path, backend)


# ---- one process -----------------------------------------------------------------------------

def test_without_a_process_group_sync_batch_norm_is_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(4, C, 5)
    sync, plain = bn_gpu.SyncBatchNorm(C), bn_gpu.BatchNorm1d(C)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    assert set(sync.state_dict()) == set(torch.nn.SyncBatchNorm(C).state_dict())


def test_convert_sync_batchnorm_shares_tensors_and_keeps_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, C, 1), torch.nn.BatchNorm2d(C), torch.nn.SyncBatchNorm(C),
                                bn_gpu.BatchNorm1d(C), torch.nn.Sequential(bn_gpu.BatchNorm3d(C)))
    model[1].eval()
    tensors = dict(model.state_dict(keep_vars=True))
    converted = bn_gpu.convert_sync_batchnorm(model, backend="cpu")
    assert converted is model
    assert all(type(m) is bn_gpu.SyncBatchNorm for m in (model[1], model[2], model[3], model[4][0]))
    assert not model[1].training and model[2].training and model[1].backend == "cpu"
    for name, t in model.state_dict(keep_vars=True).items():
        assert t is tensors[name], name
    assert type(bn_gpu.convert_sync_batchnorm(torch.nn.BatchNorm2d(C))) is bn_gpu.SyncBatchNorm
    bn_gpu.revert_model(model)
    assert type(model[1]) is torch.nn.SyncBatchNorm


# ---- GPU -------------------------------------------------------------------------------------

def _gloo_cuda_worker(rank, world_size, backend):
    torch.cuda.set_device(0)
    _parity_cuda(rank, world_size, backend)


def _parity_cuda(rank, world_size, backend):
    sizes = [3, 2]
    reference = bn_gpu.BatchNorm2d(C, backend=backend).cuda()
    sync = bn_gpu.convert_sync_batchnorm(copy.deepcopy(reference), backend=backend)
    x, grad = (t.cuda() for t in _global_batch(sizes, torch.float32, "channels_last", seed=0))
    x_ref, x_local = x.clone().requires_grad_(), _share(x, sizes, rank).clone().requires_grad_()
    y_ref, y = reference(x_ref), sync(x_local)
    y_ref.backward(grad)
    y.backward(_share(grad, sizes, rank))
    _close(y, _share(y_ref, sizes, rank), "output")
    _close(x_local.grad, _share(x_ref.grad, sizes, rank), "grad_input")
    _close(sync.running_mean, reference.running_mean, "running_mean")
    _close(sync.running_var, reference.running_var, "running_var")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_gloo_over_cuda_tensors_on_one_gpu(backend, tmp_path):
    if backend == "cupy":
        pytest.importorskip("cupy")
    _spawn(_gloo_cuda_worker, 2, tmp_path, backend)


def _nccl_worker(rank, world_size, store_path, backend):
    torch.cuda.set_device(rank)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size)
    try:
        _parity_cuda(rank, world_size, backend)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across GPUs needs two of them")
def test_nccl_across_two_gpus(tmp_path):
    mp.start_processes(_nccl_worker, args=(2, str(tmp_path / "store"), "triton"), nprocs=2, join=True,
                       start_method="spawn")


os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on the loopback interface only
