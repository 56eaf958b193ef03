"""The entry points: the eager fast path, torch.func transforms, the dispatcher.

An eager call on plain tensors, with no mode, transform or tracer active, runs exactly the kernels
the dispatcher would choose; calling them directly saves two crossings of the dispatcher and the
Python Autograd kernel (about half of bn_gpu's own host time per call). Anything else -- tensor
subclasses, TorchDispatchMode / FakeTensorMode, vmap, autocast, torch.compile tracing,
TorchFunctionMode -- goes through torch.ops.bn_gpu as registered. Under torch.func
transforms (grad, jvp, vmap) the autograd.Function is applied here, before the dispatcher: from
inside the Autograd kernel it would miss the transforms' own handling of autograd.Function. The
dispatch-key sets compared here are private torch APIs, checked with torch 2.11 (on a GPU) and 2.13.
"""
from __future__ import annotations

import torch

from .autograd import PLAIN_TYPES, THROUGH_OPS, differentiating, function, without_running_stat_tangents
from .kernels import forward_eval as forward_eval_kernel, forward_train as forward_train_kernel

_PLAIN_INCLUDE = torch._C._dispatch_tls_local_include_set()
_PLAIN_EXCLUDE = torch._C._dispatch_tls_local_exclude_set()
_PLAIN_OR_NONE = frozenset((*PLAIN_TYPES, type(None)))


def plain_eager(*tensors) -> bool:
    """Whether the ops may be called below the dispatcher for these arguments."""
    return (not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._dispatch_tls_local_include_set() == _PLAIN_INCLUDE
            and torch._C._dispatch_tls_local_exclude_set() == _PLAIN_EXCLUDE
            and _PLAIN_OR_NONE.issuperset(map(type, tensors)))


def _eager_function(run, training: bool):
    """function(run, training) in the legacy form (forward takes ctx), for the eager fast path
    only: with a setup_context, Function.apply re-binds the arguments through inspect.signature on
    every call (host time); torch.func transforms, which need setup_context, never reach
    the fast path."""
    base = function(run, training)

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = run(*args)
            base.setup_context(ctx, args, output)
            ctx.eager = True
            return output

        backward = base.backward
        jvp = base.jvp

    return EagerFunction


_DIRECT = {True: _eager_function(forward_train_kernel, training=True),
           False: _eager_function(forward_eval_kernel, training=False)}

# autograd.Function.apply's Python layer, for the eager fast path: what it does there -- no
# setup_context to bind arguments for, no transform active -- is unwrapping tensors that a finished
# torch.func transform left wrapped, which _apply_eager does for the tensor arguments alone; the
# C apply beneath it (torch._C._FunctionBase.apply, private) then runs forward, without the Python
# layer's per-call cost. Checked with torch 2.11 and 2.13.
_C_APPLY = {training: torch._C._FunctionBase.__dict__["apply"].__get__(None, function)
            for training, function in _DIRECT.items()}
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _apply_eager(training: bool, args: tuple):
    return _C_APPLY[training](*[_unwrap_if_dead(a) if type(a) in PLAIN_TYPES else a for a in args])


def _in_torch_func_transform() -> bool:
    return torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling()


def forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend,
                  residual=None, relu=False):
    """torch.ops.bn_gpu.forward_train, through the eager fast path where it applies."""
    plain = plain_eager(input, weight, bias, running_mean, running_var, num_batches_tracked, residual)
    if plain and not differentiating(input, weight, bias, residual):
        return forward_train_kernel(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                                    backend, residual, relu)
    args = (input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend, residual,
            relu)
    if plain:
        return _apply_eager(True, without_running_stat_tangents(args, True))
    if _in_torch_func_transform():
        return THROUGH_OPS[True].apply(*without_running_stat_tangents(args, True))
    return torch.ops.bn_gpu.forward_train(*args)


def forward_eval(input, weight, bias, running_mean, running_var, eps, backend, residual=None, relu=False):
    """torch.ops.bn_gpu.forward_eval, through the eager fast path where it applies."""
    plain = plain_eager(input, weight, bias, running_mean, running_var, residual)
    if plain and not differentiating(input, weight, bias, residual):
        return forward_eval_kernel(input, weight, bias, running_mean, running_var, eps, backend, residual, relu)
    args = (input, weight, bias, running_mean, running_var, eps, backend, residual, relu)
    if plain:
        return _apply_eager(False, without_running_stat_tangents(args, False))
    if _in_torch_func_transform():
        return THROUGH_OPS[False].apply(*without_running_stat_tangents(args, False))
    return torch.ops.bn_gpu.forward_eval(*args)
