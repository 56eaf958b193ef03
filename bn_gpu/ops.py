"""The torch ops of namespace ``bn_gpu``: schemas, CPU/CUDA kernels, fake kernels and autograd.

Registered through a ``torch.library.Library`` define/impl pair rather than the ``custom_op`` /
``triton_op`` decorators: on an H200 host the decorators cost ~26-32 us more per call
(docs/baselines.md, "Host time per call"), which small layers cannot afford.

    bn_gpu::forward_train  batch statistics, normalize; updates running stats and counts the batch
    bn_gpu::forward_eval   normalize with the running statistics
    bn_gpu::backward       gradients of both (training: through the batch statistics)

Every op takes the concrete backend name ("triton", "cupy", "cpu") as its last argument.
"""
from __future__ import annotations

import torch

from . import backends
from .dtypes import stat_dtype
from .layout import empty_output
from .validation import check_batch_norm_args, check_input

_lib = torch.library.Library("bn_gpu", "DEF")
_lib.define(
    "forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps, str backend) "
    "-> (Tensor output, Tensor mean, Tensor invstd)")
_lib.define(
    "forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
    "float eps, str backend) -> (Tensor output, Tensor mean, Tensor invstd)")
_lib.define(
    "backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, bool training, "
    "bool need_input_grad, bool need_weight_grad, str backend) "
    "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)")


def _channels(input) -> int:
    return input.shape[1] if input.dim() > 1 else 0  # a 1-D input can only be the empty (0,)


def _forward_outputs(input, new):
    """(output, mean, invstd) for input; mean and invstd allocated with `new`."""
    C = _channels(input)
    return empty_output(input), new(C, dtype=stat_dtype(input.dtype)), new(C, dtype=stat_dtype(input.dtype))


def _backward_outputs(input, weight, mean, need_input_grad, need_weight_grad, new):
    """(grad_input, grad_weight, grad_bias) allocated with `new`; unneeded ones have 0 elements."""
    param_dtype = weight.dtype if weight is not None else mean.dtype
    C = _channels(input)
    grad_input = empty_output(input) if need_input_grad else new(0)
    if need_weight_grad:
        return grad_input, new(C, dtype=param_dtype), new(C, dtype=param_dtype)
    return grad_input, new(0), new(0)


# ---- CPU and CUDA kernels -------------------------------------------------------------------

def _dense(t):
    """t, or a contiguous copy of a strided view: the kernels index per-channel tensors densely."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _write_back(target, updated) -> None:
    """Running statistics updated in a dense copy go back into the caller's strided view, in place."""
    if updated is not target:
        target.copy_(updated)


def _forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend):
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked)
    impl = backends.implementation(backend, input.device)
    if input.numel() == 0:
        # As PyTorch: an empty batch counts as a batch but leaves the running statistics alone.
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return _forward_outputs(input, input.new_zeros)
    dense_mean, dense_var = _dense(running_mean), _dense(running_var)
    outputs = impl.forward_train(input, _dense(weight), _dense(bias), dense_mean, dense_var, num_batches_tracked,
                                 momentum, eps)
    _write_back(running_mean, dense_mean)
    _write_back(running_var, dense_var)
    return outputs


def _forward_eval(input, weight, bias, running_mean, running_var, eps, backend):
    check_batch_norm_args(input, running_mean, running_var, weight, bias, False, None, eps)
    impl = backends.implementation(backend, input.device)
    if input.numel() == 0:
        return _forward_outputs(input, input.new_zeros)
    return impl.forward_eval(input, _dense(weight), _dense(bias), _dense(running_mean), _dense(running_var), eps)


def _backward(grad_output, input, weight, mean, invstd, training, need_input_grad, need_weight_grad, backend):
    check_input(input)
    if grad_output.shape != input.shape:
        raise RuntimeError(f"bn_gpu.backward: grad_output has shape {tuple(grad_output.shape)}, "
                           f"expected the input's {tuple(input.shape)}")
    impl = backends.implementation(backend, input.device)
    if input.numel() == 0:
        return _backward_outputs(input, weight, mean, need_input_grad, need_weight_grad, input.new_zeros)
    return impl.backward(grad_output, input, _dense(weight), _dense(mean), _dense(invstd), training,
                         need_input_grad, need_weight_grad)


for _key in ("CPU", "CUDA"):
    _lib.impl("forward_train", _forward_train, _key)
    _lib.impl("forward_eval", _forward_eval, _key)
    _lib.impl("backward", _backward, _key)


# ---- fake kernels (torch.compile, meta tensors) ----------------------------------------------

@torch.library.register_fake("bn_gpu::forward_train")
def _fake_forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend):
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked)
    return _forward_outputs(input, input.new_empty)


@torch.library.register_fake("bn_gpu::forward_eval")
def _fake_forward_eval(input, weight, bias, running_mean, running_var, eps, backend):
    check_batch_norm_args(input, running_mean, running_var, weight, bias, False, None, eps)
    return _forward_outputs(input, input.new_empty)


@torch.library.register_fake("bn_gpu::backward")
def _fake_backward(grad_output, input, weight, mean, invstd, training, need_input_grad, need_weight_grad, backend):
    return _backward_outputs(input, weight, mean, need_input_grad, need_weight_grad, input.new_empty)


# ---- autograd ---------------------------------------------------------------------------------

def _setup_context(ctx, args, output, training: bool) -> None:
    x, weight, bias = args[:3]
    _, mean, invstd = output
    ctx.mark_non_differentiable(mean, invstd)
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.training = training
    ctx.backend = args[-1]
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _gradients(ctx, needs, grad_output) -> tuple:
    """Gradients of (input, weight, bias, the other arguments...) given which ones are needed."""
    none = (None,) * (len(needs) - 3)
    if grad_output is None or not any(needs[:3]):
        return (None, None, None) + none
    x, weight, mean, invstd = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = torch.ops.bn_gpu.backward(
        grad_output, x, weight, mean, invstd, ctx.training, needs[0], needs[1] or needs[2], ctx.backend)
    if needs[2] and grad_bias.dtype != ctx.bias_dtype:
        grad_bias = grad_bias.to(ctx.bias_dtype)
    return (grad_input if needs[0] else None, grad_weight if needs[1] else None,
            grad_bias if needs[2] else None) + none


def _needs_grad(x, weight, bias) -> bool:
    """Only input, weight and bias carry gradients (the running statistics and the counter never do)."""
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad))


def _below_autograd(op, keyset, args):
    """The op's kernels below the Autograd key (torch._C._AutoDispatchBelowAutograd and
    _after_autograd_keyset are private torch APIs: checked with torch 2.11 and 2.13)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _autograd_kernel(op, training: bool):
    """The Autograd-key kernel of a forward op: an autograd.Function around the op's own kernels.

    Registered directly rather than with torch.library.register_autograd, which refuses ops that
    mutate inputs (forward_train updates the running statistics and the batch counter, which carry
    no gradient) and re-fills default arguments on every call (~20 us of host time).
    """
    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keyset, *args):
            output = _below_autograd(op, keyset, args)
            _setup_context(ctx, args, output, training)
            return output

        @staticmethod
        def backward(ctx, grad_output, _grad_mean, _grad_invstd):
            return (None,) + _gradients(ctx, ctx.needs_input_grad[1:], grad_output)

    def kernel(keyset, *args):
        if _needs_grad(*args[:3]):
            return Function.apply(keyset, *args)
        return _below_autograd(op, keyset, args)

    return kernel


_lib.impl("forward_train", _autograd_kernel(torch.ops.bn_gpu.forward_train.default, training=True),
          "Autograd", with_keyset=True)
_lib.impl("forward_eval", _autograd_kernel(torch.ops.bn_gpu.forward_eval.default, training=False),
          "Autograd", with_keyset=True)


# ---- the eager fast path ----------------------------------------------------------------------
# An eager call on plain tensors, with no mode, transform or tracer active, runs exactly the kernels
# the dispatcher would choose; calling them directly saves two crossings of the dispatcher and the
# Python Autograd kernel (about half of bn_gpu's own host time per call). Anything else -- tensor
# subclasses, TorchDispatchMode / FakeTensorMode, vmap, autocast, torch.compile tracing,
# TorchFunctionMode -- goes through torch.ops.bn_gpu as registered above. The dispatch-key sets
# compared here are private torch APIs, checked with torch 2.11 (on a GPU) and 2.13.

_PLAIN_INCLUDE = torch._C._dispatch_tls_local_include_set()
_PLAIN_EXCLUDE = torch._C._dispatch_tls_local_exclude_set()
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # a Parameter overrides nothing of torch's dispatch


def plain_eager(*tensors) -> bool:
    """Whether the ops may be called below the dispatcher for these arguments."""
    return (not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._dispatch_tls_local_include_set() == _PLAIN_INCLUDE
            and torch._C._dispatch_tls_local_exclude_set() == _PLAIN_EXCLUDE
            and all(t is None or type(t) in _PLAIN_TYPES for t in tensors))


def _direct_function(implementation, training: bool):
    """An autograd.Function running the op's implementation directly (the fast path's Autograd)."""
    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = implementation(*args)
            _setup_context(ctx, args, output, training)
            return output

        @staticmethod
        def backward(ctx, grad_output, _grad_mean, _grad_invstd):
            return _gradients(ctx, ctx.needs_input_grad, grad_output)

    return Function


_DIRECT = {True: _direct_function(_forward_train, training=True),
           False: _direct_function(_forward_eval, training=False)}


def forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend):
    """torch.ops.bn_gpu.forward_train, through the eager fast path where it applies."""
    if plain_eager(input, weight, bias, running_mean, running_var, num_batches_tracked):
        if _needs_grad(input, weight, bias):
            return _DIRECT[True].apply(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                       momentum, eps, backend)
        return _forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                              backend)
    return torch.ops.bn_gpu.forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked,
                                          momentum, eps, backend)


def forward_eval(input, weight, bias, running_mean, running_var, eps, backend):
    """torch.ops.bn_gpu.forward_eval, through the eager fast path where it applies."""
    if plain_eager(input, weight, bias, running_mean, running_var):
        if _needs_grad(input, weight, bias):
            return _DIRECT[False].apply(input, weight, bias, running_mean, running_var, eps, backend)
        return _forward_eval(input, weight, bias, running_mean, running_var, eps, backend)
    return torch.ops.bn_gpu.forward_eval(input, weight, bias, running_mean, running_var, eps, backend)
