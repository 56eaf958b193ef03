"""The multiprocessors the plans count on (bn_gpu/backends/device.py): the device's, or under MPS
the share that CUDA_MPS_ACTIVE_THREAD_PERCENTAGE gives the process -- an exchanging on-chip grid must
be resident at once, so it may not count SMs the process cannot have."""
import types

import pytest
import torch

from bn_gpu.backends import device, plan


@pytest.fixture
def h200(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(multi_processor_count=132))
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    device.multiprocessors.cache_clear()
    yield monkeypatch
    device.multiprocessors.cache_clear()


@pytest.mark.parametrize("percentage, sms", [(None, 132), ("100", 132), ("50", 66), ("33.3", 43), ("25", 33),
                                             ("0.5", 1), ("0", 1), ("150", 132), ("", 132), ("most", 132)])
def test_an_mps_share_of_the_threads_is_a_share_of_the_sms_rounded_down(h200, percentage, sms):
    if percentage is not None:
        h200.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", percentage)
    assert device.multiprocessors(0) == sms
    assert plan.tuning_and_sms(torch.device("cuda", 0)) == (plan.GPU_TUNING, sms)


def test_the_exchanging_grid_fits_the_share(h200):
    """16x64x28x28 fp32 exchanges on the Triton plan: 256 programs that wait for each other on the
    whole device, two an SM -- twice what half its SMs hold. Under a 50% share the grid is sized
    from the share's 66 SMs."""
    x = torch.empty((16, 64, 28, 28), device="meta")
    whole = plan.geometry(x, None, *plan.tuning_and_sms(torch.device("cuda", 0))).on_chip
    assert whole.splits > 1 and whole.programs == 256
    h200.setenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "50")
    device.multiprocessors.cache_clear()
    tuning, sms = plan.tuning_and_sms(torch.device("cuda", 0))
    shared = plan.geometry(x, None, tuning, sms).on_chip
    assert shared.splits > 1 and shared.programs <= tuning.on_chip_programs_per_sm * 66
