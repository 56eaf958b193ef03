"""fold_batch_norms (inference folding) and revert_model (back to torch.nn)."""
from __future__ import annotations

import copy

import pytest
import torch

import bn_gpu
from support import TorchvisionFrozenBatchNorm2d as FrozenBatchNorm2d
from support import arrange


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Running statistics and affine parameters away from their defaults, so folding them matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                for t, low, high in ((m.running_mean, -1, 1), (m.running_var, 0.5, 2), (m.weight, 0.5, 1.5),
                                     (m.bias, -1, 1)):
                    if t is not None:
                        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) * (high - low) + low)
    return model


LAYER_CASES = {
    "conv1d": (lambda: torch.nn.Conv1d(4, 6, 3), torch.nn.BatchNorm1d(6), (3, 4, 9)),
    "conv2d-groups-no-bias": (lambda: torch.nn.Conv2d(4, 6, 3, groups=2, bias=False), torch.nn.BatchNorm2d(6),
                              (3, 4, 7, 6)),
    "conv3d": (lambda: torch.nn.Conv3d(2, 4, 2), torch.nn.BatchNorm3d(4), (2, 2, 4, 3, 5)),
    "conv-transpose1d-groups": (lambda: torch.nn.ConvTranspose1d(4, 6, 3, groups=2), torch.nn.BatchNorm1d(6),
                                (3, 4, 5)),
    "conv-transpose2d-groups": (lambda: torch.nn.ConvTranspose2d(6, 9, 3, stride=2, groups=3),
                                torch.nn.BatchNorm2d(9), (2, 6, 4, 5)),
    "conv-transpose3d": (lambda: torch.nn.ConvTranspose3d(2, 3, 2), torch.nn.BatchNorm3d(3), (2, 2, 3, 3, 3)),
    "linear": (lambda: torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), (6, 5)),
    "no-affine": (lambda: torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, affine=False), (2, 3, 5, 5)),
    "frozen": (lambda: torch.nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4, eps=1e-3), (2, 3, 6, 6)),
}
TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (5e-2, 2e-2)}


@pytest.mark.parametrize("case", list(LAYER_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["torch", "bn_gpu"])
def test_folded_model_computes_what_the_model_computes(case, dtype, kind):
    make_layer, bn, shape = LAYER_CASES[case]
    torch.manual_seed(0)
    model = _randomize(torch.nn.Sequential(make_layer(), copy.deepcopy(bn), torch.nn.ReLU())).to(dtype).eval()
    if kind == "bn_gpu":
        model = bn_gpu.convert_model(model)
    x = torch.randn(shape, dtype=dtype)
    if x.dim() in (4, 5):
        x = arrange(x, "channels_last")
    folded, report = bn_gpu.fold_batch_norms(model)
    assert report.folded == [("1", "0")] and report.left == [] and report.traced
    assert not any(bn_gpu.transforms.tracing.is_batch_norm(m) for m in folded.modules())
    with torch.no_grad():
        expected = model(x)
        if dtype == torch.bfloat16:  # rounding of the unfolded model's two bf16 steps
            expected = model.double()(x.double())
        atol, rtol = TOLERANCE[dtype]
        torch.testing.assert_close(folded(x).double(), expected.double(), atol=atol, rtol=rtol)


def test_fold_works_on_a_copy_and_reports_what_it_left():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
            self.shared, self.bn_shared = torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)
            self.bn_after_add = torch.nn.BatchNorm2d(4)
            self.batch_stats = torch.nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):
            y = self.bn(self.conv(x))
            z = self.shared(y)
            y = self.bn_shared(z) + z               # the conv's output feeds the add too
            return self.batch_stats(self.bn_after_add(y + 1))

    model = _randomize(Net()).eval()
    before = copy.deepcopy(model.state_dict())
    folded, report = bn_gpu.fold_batch_norms(model)
    assert report.folded == [("bn", "conv")]
    left = dict(report.left)
    assert set(left) == {"bn_shared", "bn_after_add", "batch_stats"}
    assert "feeds more than this BatchNorm" in left["bn_shared"]
    assert "not the output of a module" in left["bn_after_add"]
    assert "track_running_stats=False" in left["batch_stats"]
    assert "folded 1 BatchNorm(s), left 3" in str(report)
    for name, value in model.state_dict().items():  # the original is untouched
        assert torch.equal(value, before[name]), name
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_untraceable_model_folds_within_sequentials():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
            self.head = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.body(x)
            return self.head(y) if bool(y.sum() > 0) else y

    model = _randomize(DataDependent()).eval()
    folded, report = bn_gpu.fold_batch_norms(model)
    assert not report.traced and "TraceError" in report.trace_error
    assert report.folded == [("body.1", "body.0")]
    assert {name for name, _ in report.left} == {"head"}  # the failed trace is no BatchNorm
    assert str(report).startswith("folded 1 BatchNorm(s), left 1 (torch.fx could not trace the model")
    assert isinstance(folded.body[1], torch.nn.Identity)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_fold_refuses_a_model_in_training_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(RuntimeError, match=r"training mode.*call model.eval\(\)"):
        bn_gpu.fold_batch_norms(model)
    model.eval()
    model[1].train()
    with pytest.raises(RuntimeError, match=r"training mode \(1\)"):
        bn_gpu.fold_batch_norms(model)


# ---- revert_model --------------------------------------------------------------------------------

def test_revert_model_gives_torch_modules_sharing_the_tensors():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(4 * 4 * 4)),
                                torch.nn.Unflatten(1, (4, 4, 4, 1)), torch.nn.BatchNorm3d(4, momentum=None))
    bn_gpu.convert_model(model, backend="cpu")
    model[1].eval()
    tensors = {name: t for name, t in model.state_dict(keep_vars=True).items()}
    reverted = bn_gpu.revert_model(model)
    assert reverted is model
    assert [type(m) for m in (model[1], model[2][1], model[4])] == [
        torch.nn.BatchNorm2d, torch.nn.BatchNorm1d, torch.nn.BatchNorm3d]
    assert not model[1].training and model[4].momentum is None
    for name, t in model.state_dict(keep_vars=True).items():
        assert t is tensors[name], name
    assert not hasattr(model[1], "backend")
    single = bn_gpu.revert_model(bn_gpu.BatchNorm2d(4))
    assert type(single) is torch.nn.BatchNorm2d


def test_revert_then_convert_round_trip_computes_the_same():
    torch.manual_seed(0)
    model = _randomize(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 6, 6)
    converted = bn_gpu.convert_model(copy.deepcopy(model))
    round_trip = bn_gpu.convert_model(bn_gpu.revert_model(copy.deepcopy(converted)))
    torch.testing.assert_close(round_trip(x), model(x))
    torch.testing.assert_close(round_trip[1].running_mean, model[1].running_mean)
