"""The op schemas of namespace ``bn_gpu``, and the shapes of their results.

    bn_gpu::forward_train  batch statistics, normalize; updates running stats and counts the batch
    bn_gpu::forward_eval   normalize with the running statistics
                           both with an epilogue: output = relu?(normalized + residual?)
    bn_gpu::backward       gradients of both (training: through the batch statistics); relu: through the
                           forward's ReLU (without residual), its mask recomputed from the input and bias

Every op takes the concrete backend name ("triton", "cupy", "cpu") as its last argument. Registered
through a ``torch.library.Library`` define/impl pair rather than the ``custom_op`` / ``triton_op``
decorators, whose per-call host cost small layers cannot afford (docs/baselines.md, "Host time per
call").
"""
from __future__ import annotations

import torch

from ..backends.layout import empty_output
from ..dtypes import stat_dtype

LIBRARY = torch.library.Library("bn_gpu", "DEF")
LIBRARY.define(
    "forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps, str backend, "
    "Tensor? residual=None, bool relu=False) -> (Tensor output, Tensor mean, Tensor invstd)")
LIBRARY.define(
    "forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
    "float eps, str backend, Tensor? residual=None, bool relu=False) -> (Tensor output, Tensor mean, Tensor invstd)")
LIBRARY.define(
    "backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, bool training, "
    "bool need_input_grad, bool need_weight_grad, str backend, Tensor? bias=None, bool relu=False) "
    "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)")


def channels(input) -> int:
    return input.shape[1] if input.dim() > 1 else 0  # a 1-D input can only be the empty (0,)


def forward_outputs(input, new):
    """(output, mean, invstd) for input; mean and invstd allocated with `new`."""
    C = channels(input)
    return empty_output(input), new(C, dtype=stat_dtype(input.dtype)), new(C, dtype=stat_dtype(input.dtype))


def backward_outputs(input, weight, mean, need_input_grad, need_weight_grad, new):
    """(grad_input, grad_weight, grad_bias) allocated with `new`; unneeded ones have 0 elements."""
    param_dtype = weight.dtype if weight is not None else mean.dtype
    C = channels(input)
    grad_input = empty_output(input) if need_input_grad else new(0)
    if need_weight_grad:
        return grad_input, new(C, dtype=param_dtype), new(C, dtype=param_dtype)
    return grad_input, new(0), new(0)


def check_residual(input, residual) -> None:
    if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype
                                 or residual.device != input.device):
        raise RuntimeError(f"batch_norm: residual must match the input: shape {tuple(input.shape)}, {input.dtype} on "
                           f"{input.device}; got shape {tuple(residual.shape)}, {residual.dtype} on {residual.device}")
