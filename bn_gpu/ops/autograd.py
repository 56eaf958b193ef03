"""The ops' derivatives: the autograd.Function around the forward ops and their Autograd kernels.

First-order gradients come from the backward op (the kernels). A backward run with
create_graph=True and forward-mode AD take the torch-op formulas of bn_gpu.ops.derivatives instead,
so gradients of gradients and tangents are right; the fast kernels stay on the first-order path.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad

from . import derivatives
from .kernels import backward as backward_kernel
from .library import LIBRARY

PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # a Parameter overrides nothing of torch's dispatch


def _has_tangent(t) -> bool:
    return t is not None and _forward_ad.unpack_dual(t).tangent is not None


def without_running_stat_tangents(args: tuple, training: bool) -> tuple:
    """The op's arguments, checked for tangents on the running statistics (args[3] and args[4]).
    As PyTorch: they are refused in eval when input, weight, bias or residual has a tangent too; an
    eval call where only the running statistics have one runs on their primal values, and its output
    has no tangent. In training they are refused (PyTorch would carry them into the updated running
    statistics, which bn_gpu's kernels write in place)."""
    if _forward_ad._current_level < 0 and not torch._C._are_functorch_transforms_active():
        return args  # no dual level open, no transform: no tangent anywhere (and no unpack_dual to pay)
    running_mean, running_var = args[3], args[4]
    if not (_has_tangent(running_mean) or _has_tangent(running_var)):
        return args
    residual_index = (7 if training else 5) + 2
    others = (*args[:3], args[residual_index] if len(args) > residual_index else None)
    if training or any(_has_tangent(t) for t in others):
        raise RuntimeError("batch_norm is not differentiable wrt running_mean and running_var, "
                           "they cannot have forward grad defined")
    return (*args[:3], _forward_ad.unpack_dual(running_mean).primal, _forward_ad.unpack_dual(running_var).primal,
            *args[5:])


def differentiating(x, weight, bias, residual=None) -> bool:
    """Whether a derivative is wanted: only input, weight, bias and residual carry gradients (the
    running statistics and the counter never do); or a dual level is open (torch.autograd.forward_ad
    or torch.func.jvp) with forward grad enabled (autograd.Function.forward disables it, so the op
    called inside is not wrapped twice). forward_ad._current_level is private torch API: checked
    with torch 2.11 and 2.13."""
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)
                                    or (residual is not None and residual.requires_grad)):
        return True
    return _forward_ad._current_level >= 0 and torch._C._is_fwd_grad_enabled()


def _gradients(ctx, needs, grad_output) -> tuple:
    """Gradients of the op's arguments (input, weight, bias, ..., residual, relu) given which are needed."""
    grads = [None] * len(needs)
    residual_needed = len(needs) > ctx.residual_index and needs[ctx.residual_index]
    if grad_output is None or not (any(needs[:3]) or residual_needed):
        return tuple(grads)
    x, weight, bias, mean, invstd, output = ctx.saved_tensors
    # The ReLU's mask: with a residual, from the saved output (which the next layer usually keeps
    # anyway) in a pass of its own, whose result is the residual's gradient too -- the bytes a
    # fused read of the output would move; without one, recomputed from x inside the backward
    # kernels (relu_in_kernels), or here for a differentiable backward.
    relu_in_kernels = ctx.relu and not ctx.has_residual
    if ctx.relu and ctx.has_residual:
        grad_output = torch.where(output <= 0, torch.zeros((), dtype=grad_output.dtype, device=grad_output.device),
                                  grad_output)
    if residual_needed:
        grads[ctx.residual_index] = grad_output
    if not any(needs[:3]):
        return tuple(grads)
    if x is None:  # not kept (eval, dx alone): grad_output stands in for its shape and layout
        x = grad_output
    if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
        if relu_in_kernels:
            grad_output = derivatives.through_relu(grad_output, x, weight, bias, mean, invstd)
        grad_input, grad_weight, grad_bias = derivatives.differentiable_gradients(
            grad_output, x, weight, mean, invstd, ctx.training, ctx.eps)
        if weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
    else:
        args = (grad_output, x, weight, mean, invstd, ctx.training, needs[0], needs[1] or needs[2], ctx.backend,
                bias if relu_in_kernels else None, relu_in_kernels)
        direct = getattr(ctx, "eager", False) and plain_backward(grad_output, mean, x, weight, invstd, bias)
        grad_input, grad_weight, grad_bias = backward_kernel(*args) if direct else torch.ops.bn_gpu.backward(*args)
    if needs[2] and grad_bias.dtype != ctx.bias_dtype:
        grad_bias = grad_bias.to(ctx.bias_dtype)
    grads[:3] = (grad_input if needs[0] else None, grad_weight if needs[1] else None,
                 grad_bias if needs[2] else None)
    return tuple(grads)


def function(run, training: bool):
    """An autograd.Function computing run(*args) -- a forward op's arguments -- with batch_norm's
    derivatives: backward (first and higher order), jvp (forward mode), and vmap through the ops'
    batching rules. In the setup_context form that torch.func transforms require."""
    eps_index = 7 if training else 5  # then backend, residual, relu (the last two may be left out)

    class Function(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(*args):
            return run(*args)

        @staticmethod
        def setup_context(ctx, inputs, output):
            x, weight, bias = inputs[:3]
            y, mean, invstd = output
            ctx.mark_non_differentiable(mean, invstd)
            # mean and invstd never get a gradient: no zero tensors (fill kernels on a GPU) for them.
            ctx.set_materialize_grads(False)
            ctx.residual_index = eps_index + 2
            ctx.has_residual = len(inputs) > ctx.residual_index and inputs[ctx.residual_index] is not None
            ctx.relu = len(inputs) > eps_index + 3 and bool(inputs[eps_index + 3])
            # Eval with a weight that needs no gradient (FrozenBatchNorm): dx = dy * weight * invstd
            # needs no activation, so none is kept alive -- unless a ReLU's mask is recomputed from it.
            keep_x = training or (weight is not None and weight.requires_grad) or (ctx.relu and not ctx.has_residual)
            kept_output = y if ctx.relu and ctx.has_residual else None
            ctx.save_for_backward(x if keep_x else None, weight, bias, mean, invstd, kept_output)
            if _forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
                ctx.save_for_forward(x, weight, bias, mean, invstd, y if ctx.relu else None)
            ctx.training, ctx.eps, ctx.backend = training, inputs[eps_index], inputs[eps_index + 1]
            ctx.bias_dtype = bias.dtype if bias is not None else None

        @staticmethod
        def backward(ctx, grad_output, _grad_mean, _grad_invstd):
            return _gradients(ctx, ctx.needs_input_grad, grad_output)

        @staticmethod
        def jvp(ctx, x_tangent, weight_tangent, bias_tangent, *other_tangents):
            x, weight, _bias, mean, invstd, output = ctx.saved_tensors
            tangent = derivatives.output_tangent(x, weight, mean, invstd, ctx.training, x_tangent, weight_tangent,
                                                 bias_tangent)
            residual_tangent = other_tangents[ctx.residual_index - 3] if len(other_tangents) > ctx.residual_index - 3 \
                else None
            if residual_tangent is not None:
                tangent = tangent + residual_tangent
            if ctx.relu:
                tangent = torch.where(output <= 0, torch.zeros((), dtype=tangent.dtype, device=tangent.device), tangent)
            return tangent, None, None

    return Function


def _below_autograd(op, keyset, args):
    """The op's kernels below the Autograd key (torch._C._AutoDispatchBelowAutograd and
    _after_autograd_keyset are private torch APIs: checked with torch 2.11 and 2.13)."""
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


THROUGH_OPS = {True: function(torch.ops.bn_gpu.forward_train.default, training=True),
               False: function(torch.ops.bn_gpu.forward_eval.default, training=False)}


def _autograd_kernel(op, training: bool):
    """The Autograd-key kernel of a forward op: the op's own kernels, in an autograd.Function when
    a derivative is wanted (its forward calls the op again, with grad disabled, to reach them).

    Registered directly rather than with torch.library.register_autograd, which refuses ops that
    mutate inputs (forward_train updates the running statistics and the batch counter, which carry
    no gradient) and re-fills default arguments on every call (host time a small layer cannot afford).
    """
    function = THROUGH_OPS[training]

    def kernel(keyset, *args):
        residual_index = (7 if training else 5) + 2
        if differentiating(*args[:3], args[residual_index] if len(args) > residual_index else None):
            return function.apply(*without_running_stat_tangents(args, training))
        return _below_autograd(op, keyset, args)

    return kernel


LIBRARY.impl("forward_train", _autograd_kernel(torch.ops.bn_gpu.forward_train.default, training=True),
             "Autograd", with_keyset=True)
LIBRARY.impl("forward_eval", _autograd_kernel(torch.ops.bn_gpu.forward_eval.default, training=False),
             "Autograd", with_keyset=True)


def plain_backward(grad_output, saved_mean, *others) -> bool:
    """Whether the backward of a forward that took the eager fast path may call the op's kernel
    directly. plain_eager's dispatch-TLS comparison does not hold there: on CUDA the autograd
    engine runs backward on its device thread, whose TLS differs from the caller's; what can have
    changed since the forward -- a mode, a transform, compiled autograd, a tensor subclass, a
    gradient batched by the legacy vmap that gradcheck uses (its dispatch keys differ from those of
    the saved mean) -- is checked instead."""
    return (not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) in PLAIN_TYPES for t in (grad_output, saved_mean, *others))
            and torch._C._dispatch_keys(grad_output) == torch._C._dispatch_keys(saved_mean))
