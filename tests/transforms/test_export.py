"""A converted model leaving eager PyTorch: torch.export, ONNX (run in onnxruntime), torch.jit.script."""
from __future__ import annotations

import pytest
import torch

import bn_gpu
from support import arrange


def _model(backend: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, groups=2), torch.nn.BatchNorm2d(8, affine=False),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5), torch.nn.BatchNorm1d(5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return bn_gpu.convert_model(model, backend=backend)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_export_keeps_the_ops(training):
    model = _model().train(training)
    x = torch.randn(4, 3, 8, 8)
    program = torch.export.export(model, (x,))
    op = "bn_gpu.forward_train" if training else "bn_gpu.forward_eval"
    assert op in str(program.graph)
    expected = model(x)
    torch.testing.assert_close(program.module()(x), expected)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_onnx_export_runs_in_onnxruntime(layout, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export test needs the test extra (onnxruntime)")
    pytest.importorskip("onnxscript", reason="torch.onnx.export needs onnxscript (the test extra)")
    model = _model().eval()
    x = arrange(torch.randn(2, 3, 8, 8), layout)
    path = tmp_path / "model.onnx"
    program = torch.onnx.export(model, (x,), dynamo=True, optimize=False)
    assert "BatchNormalization" in {node.op_type for node in program.model_proto.graph.node}
    program.save(str(path))
    runtime = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = runtime.run(None, {runtime.get_inputs()[0].name: x.contiguous().numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(output), model(x), atol=1e-5, rtol=1e-5)


def test_jit_script_names_the_routes_that_work():
    model = _model()
    with pytest.raises(RuntimeError, match=r"torch\.export.*revert_model"):
        torch.jit.script(model)
    scripted = torch.jit.script(bn_gpu.revert_model(model).eval())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(scripted(x), model(x))
