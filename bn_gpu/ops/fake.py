"""The ops' fake kernels: shapes and dtypes of the results, for torch.compile and meta tensors."""
from __future__ import annotations

import sys

import torch

from ..validation import check_batch_norm_args
from .library import backward_outputs, check_residual, forward_outputs


@torch.library.register_fake("bn_gpu::forward_train")
def _fake_forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend,
                        residual=None, relu=False):
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked)
    check_residual(input, residual)
    return forward_outputs(input, input.new_empty)


def _keep_eval_op_under_inductor() -> None:
    """Have torch.compile's inductor call the eval op's kernels (its fallback), as for every custom
    op, without the check it runs where the CI variable is set: there a fallback for an op with a
    decomposition -- bn_gpu/export.py's for ONNX, in torch._decomp's table -- is an error, which
    would fail torch.compile of an eval-mode model in a user's CI. Called from the op's fake kernel,
    which runs before inductor lowers a graph; does nothing until inductor is imported, or after the
    fallback exists. torch._inductor.lowering and torch._library.utils are private torch APIs (checked with
    torch 2.11 and 2.13): on any other shape of them this does nothing."""
    lowering = sys.modules.get("torch._inductor.lowering")
    op = torch.ops.bn_gpu.forward_eval.default
    if lowering is None or op in getattr(lowering, "lowerings", (op,)):
        return
    try:
        from torch._library.utils import get_layout_constraint_tag
        constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
        lowering.make_fallback(op, layout_constraint=constraint, warn=False)
    except Exception:  # noqa: BLE001 -- inductor's own path (and its check) then applies
        pass


@torch.library.register_fake("bn_gpu::forward_eval")
def _fake_forward_eval(input, weight, bias, running_mean, running_var, eps, backend, residual=None, relu=False):
    _keep_eval_op_under_inductor()
    check_batch_norm_args(input, running_mean, running_var, weight, bias, False, None, eps)
    check_residual(input, residual)
    return forward_outputs(input, input.new_empty)


@torch.library.register_fake("bn_gpu::backward")
def _fake_backward(grad_output, input, weight, mean, invstd, training, need_input_grad, need_weight_grad, backend,
                   bias=None, relu=False):
    return backward_outputs(input, weight, mean, need_input_grad, need_weight_grad, input.new_empty)
