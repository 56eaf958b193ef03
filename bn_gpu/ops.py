"""The torch ops of namespace ``bn_gpu``: schemas, CPU/CUDA kernels, fake kernels and autograd.

Registered through a ``torch.library.Library`` define/impl pair rather than the ``custom_op`` /
``triton_op`` decorators: on an H200 host the decorators cost ~26-32 us more per call
(docs/baselines.md, "Host time per call"), which small layers cannot afford.

    bn_gpu::forward_train  batch statistics, normalize; updates running stats and counts the batch
    bn_gpu::forward_eval   normalize with the running statistics
                           both with an epilogue: output = relu?(normalized + residual?)
    bn_gpu::backward       gradients of both (training: through the batch statistics); relu: through the
                           forward's ReLU (without residual), its mask recomputed from the input and bias

Every op takes the concrete backend name ("triton", "cupy", "cpu") as its last argument.
"""
from __future__ import annotations

import sys

import torch
import torch.autograd.forward_ad as _forward_ad

from . import backends, derivatives, replay
from .dtypes import stat_dtype
from .layout import empty_output
from .validation import check_batch_norm_args, check_input

_lib = torch.library.Library("bn_gpu", "DEF")
_lib.define(
    "forward_train(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
    "Tensor(b!)? running_var, Tensor(c!)? num_batches_tracked, float? momentum, float eps, str backend, "
    "Tensor? residual=None, bool relu=False) -> (Tensor output, Tensor mean, Tensor invstd)")
_lib.define(
    "forward_eval(Tensor input, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, "
    "float eps, str backend, Tensor? residual=None, bool relu=False) -> (Tensor output, Tensor mean, Tensor invstd)")
_lib.define(
    "backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, bool training, "
    "bool need_input_grad, bool need_weight_grad, str backend, Tensor? bias=None, bool relu=False) "
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


def _check_residual(input, residual) -> None:
    if residual is not None and (residual.shape != input.shape or residual.dtype != input.dtype
                                 or residual.device != input.device):
        raise RuntimeError(f"batch_norm: residual must match the input: shape {tuple(input.shape)}, {input.dtype} on "
                           f"{input.device}; got shape {tuple(residual.shape)}, {residual.dtype} on {residual.device}")


# Each op's kernel first looks for a replay of its signature (bn_gpu/replay.py), written out in each:
# a shared helper would cost the replayed call one more Python frame.

def _forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend,
                   residual=None, relu=False):
    launch = replay.launcher(backend)
    if launch is not None and residual is None and type(eps) is float and (momentum is None or type(momentum) is float):
        key = replay.train_key(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, relu)
        inputs = (input, weight, bias, running_mean, running_var, num_batches_tracked)
        found = launch.replays.get(key)
        if type(found) is replay.Replay:
            return found.run(inputs)
        return replay.recorded(launch, key, found, inputs, _full_forward_train, input, weight, bias, running_mean,
                               running_var, num_batches_tracked, momentum, eps, backend, None, relu)
    return _full_forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                               backend, residual, relu)


def _full_forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend,
                        residual=None, relu=False):
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked)
    if residual is not None:
        _check_residual(input, residual)
    impl = backends.implementation(backend, input.device)
    if input.numel() == 0:
        # As PyTorch: an empty batch counts as a batch but leaves the running statistics alone.
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        return _forward_outputs(input, input.new_zeros)
    dense_mean, dense_var = _dense(running_mean), _dense(running_var)
    outputs = impl.forward_train(input, _dense(weight), _dense(bias), dense_mean, dense_var, num_batches_tracked,
                                 momentum, eps, residual, relu)
    _write_back(running_mean, dense_mean)
    _write_back(running_var, dense_var)
    return outputs


def _forward_eval(input, weight, bias, running_mean, running_var, eps, backend, residual=None, relu=False):
    launch = replay.launcher(backend)
    if launch is not None and residual is None and type(eps) is float:
        key = replay.eval_key(input, weight, bias, running_mean, running_var, eps, relu)
        inputs = (input, weight, bias, running_mean, running_var)
        found = launch.replays.get(key)
        if type(found) is replay.Replay:
            return found.run(inputs)
        return replay.recorded(launch, key, found, inputs, _full_forward_eval, input, weight, bias, running_mean,
                               running_var, eps, backend, None, relu)
    return _full_forward_eval(input, weight, bias, running_mean, running_var, eps, backend, residual, relu)


def _full_forward_eval(input, weight, bias, running_mean, running_var, eps, backend, residual=None, relu=False):
    check_batch_norm_args(input, running_mean, running_var, weight, bias, False, None, eps)
    if residual is not None:
        _check_residual(input, residual)
    impl = backends.implementation(backend, input.device)
    if input.numel() == 0:
        return _forward_outputs(input, input.new_zeros)
    return impl.forward_eval(input, _dense(weight), _dense(bias), _dense(running_mean), _dense(running_var), eps,
                             residual, relu)


def _backward(grad_output, input, weight, mean, invstd, training, need_input_grad, need_weight_grad, backend,
              bias=None, relu=False):
    launch = replay.launcher(backend)
    if launch is not None:
        key = replay.backward_key(grad_output, input, weight, mean, invstd, bias, training, need_input_grad,
                                  need_weight_grad, relu)
        inputs = (input, grad_output, weight, mean, invstd, bias)
        found = launch.replays.get(key)
        if type(found) is replay.Replay:
            return found.run(inputs)
        return replay.recorded(launch, key, found, inputs, _full_backward, grad_output, input, weight, mean, invstd,
                               training, need_input_grad, need_weight_grad, backend, bias, relu)
    return _full_backward(grad_output, input, weight, mean, invstd, training, need_input_grad, need_weight_grad,
                          backend, bias, relu)


def _full_backward(grad_output, input, weight, mean, invstd, training, need_input_grad, need_weight_grad, backend,
                   bias=None, relu=False):
    check_input(input)
    if grad_output.shape != input.shape:
        raise RuntimeError(f"bn_gpu.backward: grad_output has shape {tuple(grad_output.shape)}, "
                           f"expected the input's {tuple(input.shape)}")
    impl = backends.implementation(backend, input.device)
    if input.numel() == 0:
        return _backward_outputs(input, weight, mean, need_input_grad, need_weight_grad, input.new_zeros)
    return impl.backward(grad_output, input, _dense(weight), _dense(mean), _dense(invstd), training,
                         need_input_grad, need_weight_grad, _dense(bias), relu)


for _key in ("CPU", "CUDA"):
    _lib.impl("forward_train", _forward_train, _key)
    _lib.impl("forward_eval", _forward_eval, _key)
    _lib.impl("backward", _backward, _key)


# ---- fake kernels (torch.compile, meta tensors) ----------------------------------------------

@torch.library.register_fake("bn_gpu::forward_train")
def _fake_forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend,
                        residual=None, relu=False):
    check_batch_norm_args(input, running_mean, running_var, weight, bias, True, momentum, eps, num_batches_tracked)
    _check_residual(input, residual)
    return _forward_outputs(input, input.new_empty)


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
    _check_residual(input, residual)
    return _forward_outputs(input, input.new_empty)


@torch.library.register_fake("bn_gpu::backward")
def _fake_backward(grad_output, input, weight, mean, invstd, training, need_input_grad, need_weight_grad, backend,
                   bias=None, relu=False):
    return _backward_outputs(input, weight, mean, need_input_grad, need_weight_grad, input.new_empty)


# ---- vmap ------------------------------------------------------------------------------------
# Each vmapped sample is an independent batch_norm: the vmapped dim is folded into the channels,
# (B, N, C, *S) -> (N, B*C, *S), so one call normalizes every sample's channels separately, and
# per-channel tensors become B*C long (repeated when not vmapped).

def _fold_input(x, bdim, batch_size):
    x = x.movedim(bdim, 1) if bdim is not None else x.unsqueeze(1).expand(x.shape[0], batch_size, *x.shape[1:])
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _fold_per_channel(t, bdim, batch_size):
    if t is None:
        return None
    return t.movedim(bdim, 0).reshape(-1) if bdim is not None else t.repeat(batch_size)


def _fold_residual(residual, in_dims, index, batch_size):
    if residual is None:
        return None
    return _fold_input(residual, in_dims[index] if len(in_dims) > index else None, batch_size)


def _unfold_input(x, batch_size):
    return x.view(x.shape[0], batch_size, -1, *x.shape[2:])


def _unfold_per_channel(t, batch_size):
    return (t.view(batch_size, -1), 0) if t.numel() else (t, None)


@torch.library.register_vmap("bn_gpu::forward_train", lib=_lib)
def _forward_train_vmap(info, in_dims, input, weight, bias, running_mean, running_var, num_batches_tracked,
                        momentum, eps, backend, residual=None, relu=False):
    x_dim, weight_dim, bias_dim, mean_dim, var_dim, count_dim = in_dims[:6]
    if running_mean is not None and (mean_dim is None or var_dim is None):
        raise RuntimeError("bn_gpu: vmap of training batch_norm needs running_mean and running_var batched like "
                           "the input (each sample updates its own); pass running_mean=running_var=None, or "
                           "track_running_stats=False in a module, to use batch statistics alone")
    if count_dim is not None:
        raise RuntimeError("bn_gpu: vmap of training batch_norm with a batched num_batches_tracked is not supported")
    B = info.batch_size
    stats = [_fold_per_channel(t, d, B) for t, d in ((running_mean, mean_dim), (running_var, var_dim))]
    output, mean, invstd = torch.ops.bn_gpu.forward_train(
        _fold_input(input, x_dim, B), _fold_per_channel(weight, weight_dim, B), _fold_per_channel(bias, bias_dim, B),
        *stats, num_batches_tracked, momentum, eps, backend, _fold_residual(residual, in_dims, 9, B), relu)
    for target, dim, folded in ((running_mean, mean_dim, stats[0]), (running_var, var_dim, stats[1])):
        if folded is not None and folded.data_ptr() != target.data_ptr():  # folding copied: write back
            target.movedim(dim, 0).copy_(folded.view(B, -1))
    return (_unfold_input(output, B), mean.view(B, -1), invstd.view(B, -1)), (1, 0, 0)


@torch.library.register_vmap("bn_gpu::forward_eval", lib=_lib)
def _forward_eval_vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps, backend, residual=None,
                       relu=False):
    B = info.batch_size
    per_channel = [_fold_per_channel(t, d, B) for t, d in zip((weight, bias, running_mean, running_var), in_dims[1:5])]
    output, mean, invstd = torch.ops.bn_gpu.forward_eval(_fold_input(input, in_dims[0], B), *per_channel, eps,
                                                         backend, _fold_residual(residual, in_dims, 7, B), relu)
    return (_unfold_input(output, B), mean.view(B, -1), invstd.view(B, -1)), (1, 0, 0)


@torch.library.register_vmap("bn_gpu::backward", lib=_lib)
def _backward_vmap(info, in_dims, grad_output, input, weight, mean, invstd, training, need_input_grad,
                   need_weight_grad, backend, bias=None, relu=False):
    B = info.batch_size
    bias_dim = in_dims[9] if len(in_dims) > 9 else None
    grad_input, grad_weight, grad_bias = torch.ops.bn_gpu.backward(
        _fold_input(grad_output, in_dims[0], B), _fold_input(input, in_dims[1], B),
        *(_fold_per_channel(t, d, B) for t, d in zip((weight, mean, invstd), in_dims[2:5])),
        training, need_input_grad, need_weight_grad, backend, _fold_per_channel(bias, bias_dim, B), relu)
    grad_weight, weight_dim = _unfold_per_channel(grad_weight, B)
    grad_bias, bias_dim = _unfold_per_channel(grad_bias, B)
    input_dim = 1 if grad_input.numel() else None
    return ((_unfold_input(grad_input, B) if input_dim else grad_input, grad_weight, grad_bias),
            (input_dim, weight_dim, bias_dim))


# ---- autograd ---------------------------------------------------------------------------------
# First-order gradients come from the backward op (the kernels). A backward run with
# create_graph=True and forward-mode AD take the torch-op formulas of bn_gpu.derivatives instead,
# so gradients of gradients and tangents are right; the fast kernels stay on the first-order path.

def _has_tangent(t) -> bool:
    return t is not None and _forward_ad.unpack_dual(t).tangent is not None


def _without_running_stat_tangents(args: tuple, training: bool) -> tuple:
    """The op's arguments, checked for tangents on the running statistics (args[3] and args[4]).
    As PyTorch: they are refused in eval when input, weight, bias or residual has a tangent too; an
    eval call where only the running statistics have one runs on their primal values, and its output
    has no tangent. In training they are refused (PyTorch would carry them into the updated running
    statistics, which bn_gpu's kernels write in place)."""
    if _forward_ad._current_level < 0 and not torch._C._are_functorch_transforms_active():
        return args  # no dual level open, no transform: no tangent anywhere (two unpack_dual calls: ~0.6 us)
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


def _differentiating(x, weight, bias, residual=None) -> bool:
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
        direct = getattr(ctx, "eager", False) and _plain_backward(grad_output, mean, x, weight, invstd, bias)
        grad_input, grad_weight, grad_bias = _backward(*args) if direct else torch.ops.bn_gpu.backward(*args)
    if needs[2] and grad_bias.dtype != ctx.bias_dtype:
        grad_bias = grad_bias.to(ctx.bias_dtype)
    grads[:3] = (grad_input if needs[0] else None, grad_weight if needs[1] else None,
                 grad_bias if needs[2] else None)
    return tuple(grads)


def _function(run, training: bool):
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


_THROUGH_OPS = {True: _function(torch.ops.bn_gpu.forward_train.default, training=True),
                False: _function(torch.ops.bn_gpu.forward_eval.default, training=False)}


def _autograd_kernel(op, training: bool):
    """The Autograd-key kernel of a forward op: the op's own kernels, in an autograd.Function when
    a derivative is wanted (its forward calls the op again, with grad disabled, to reach them).

    Registered directly rather than with torch.library.register_autograd, which refuses ops that
    mutate inputs (forward_train updates the running statistics and the batch counter, which carry
    no gradient) and re-fills default arguments on every call (~20 us of host time).
    """
    function = _THROUGH_OPS[training]

    def kernel(keyset, *args):
        residual_index = (7 if training else 5) + 2
        if _differentiating(*args[:3], args[residual_index] if len(args) > residual_index else None):
            return function.apply(*_without_running_stat_tangents(args, training))
        return _below_autograd(op, keyset, args)

    return kernel


_lib.impl("forward_train", _autograd_kernel(torch.ops.bn_gpu.forward_train.default, training=True),
          "Autograd", with_keyset=True)
_lib.impl("forward_eval", _autograd_kernel(torch.ops.bn_gpu.forward_eval.default, training=False),
          "Autograd", with_keyset=True)


# ---- the entry points: the eager fast path, torch.func transforms, the dispatcher ------------
# An eager call on plain tensors, with no mode, transform or tracer active, runs exactly the kernels
# the dispatcher would choose; calling them directly saves two crossings of the dispatcher and the
# Python Autograd kernel (about half of bn_gpu's own host time per call). Anything else -- tensor
# subclasses, TorchDispatchMode / FakeTensorMode, vmap, autocast, torch.compile tracing,
# TorchFunctionMode -- goes through torch.ops.bn_gpu as registered above. Under torch.func
# transforms (grad, jvp, vmap) the autograd.Function is applied here, before the dispatcher: from
# inside the Autograd kernel it would miss the transforms' own handling of autograd.Function. The
# dispatch-key sets compared here are private torch APIs, checked with torch 2.11 (on a GPU) and 2.13.

_PLAIN_INCLUDE = torch._C._dispatch_tls_local_include_set()
_PLAIN_EXCLUDE = torch._C._dispatch_tls_local_exclude_set()
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)  # a Parameter overrides nothing of torch's dispatch
_PLAIN_OR_NONE = frozenset((*_PLAIN_TYPES, type(None)))


def plain_eager(*tensors) -> bool:
    """Whether the ops may be called below the dispatcher for these arguments."""
    return (not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._dispatch_tls_local_include_set() == _PLAIN_INCLUDE
            and torch._C._dispatch_tls_local_exclude_set() == _PLAIN_EXCLUDE
            and _PLAIN_OR_NONE.issuperset(map(type, tensors)))


def _eager_function(run, training: bool):
    """_function(run, training) in the legacy form (forward takes ctx), for the eager fast path
    only: with a setup_context, Function.apply re-binds the arguments through inspect.signature on
    every call (~10 us of host time); torch.func transforms, which need setup_context, never reach
    the fast path."""
    base = _function(run, training)

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


def _plain_backward(grad_output, saved_mean, *others) -> bool:
    """Whether the backward of a forward that took the eager fast path may call the op's kernel
    directly. plain_eager's dispatch-TLS comparison does not hold there: on CUDA the autograd
    engine runs backward on its device thread, whose TLS differs from the caller's; what can have
    changed since the forward -- a mode, a transform, compiled autograd, a tensor subclass, a
    gradient batched by the legacy vmap that gradcheck uses (its dispatch keys differ from those of
    the saved mean) -- is checked instead."""
    return (not torch.compiler.is_compiling() and not torch._C._is_torch_function_mode_enabled()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) in _PLAIN_TYPES for t in (grad_output, saved_mean, *others))
            and torch._C._dispatch_keys(grad_output) == torch._C._dispatch_keys(saved_mean))


_DIRECT = {True: _eager_function(_forward_train, training=True),
           False: _eager_function(_forward_eval, training=False)}

# autograd.Function.apply's Python layer, for the eager fast path: what it does there -- no
# setup_context to bind arguments for, no transform active -- is unwrapping tensors that a finished
# torch.func transform left wrapped, which _apply_eager does for the tensor arguments alone; the
# C apply beneath it (torch._C._FunctionBase.apply, private) then runs forward: 2-5 us a call less
# on a CPU host, of the ~20 an autograd.Function adds. Checked with torch 2.11 and 2.13.
_C_APPLY = {training: torch._C._FunctionBase.__dict__["apply"].__get__(None, function)
            for training, function in _DIRECT.items()}
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _apply_eager(training: bool, args: tuple):
    return _C_APPLY[training](*[_unwrap_if_dead(a) if type(a) in _PLAIN_TYPES else a for a in args])


def _in_torch_func_transform() -> bool:
    return torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling()


def forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend,
                  residual=None, relu=False):
    """torch.ops.bn_gpu.forward_train, through the eager fast path where it applies."""
    plain = plain_eager(input, weight, bias, running_mean, running_var, num_batches_tracked, residual)
    if plain and not _differentiating(input, weight, bias, residual):
        return _forward_train(input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps,
                              backend, residual, relu)
    args = (input, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps, backend, residual,
            relu)
    if plain:
        return _apply_eager(True, _without_running_stat_tangents(args, True))
    if _in_torch_func_transform():
        return _THROUGH_OPS[True].apply(*_without_running_stat_tangents(args, True))
    return torch.ops.bn_gpu.forward_train(*args)


def forward_eval(input, weight, bias, running_mean, running_var, eps, backend, residual=None, relu=False):
    """torch.ops.bn_gpu.forward_eval, through the eager fast path where it applies."""
    plain = plain_eager(input, weight, bias, running_mean, running_var, residual)
    if plain and not _differentiating(input, weight, bias, residual):
        return _forward_eval(input, weight, bias, running_mean, running_var, eps, backend, residual, relu)
    args = (input, weight, bias, running_mean, running_var, eps, backend, residual, relu)
    if plain:
        return _apply_eager(False, _without_running_stat_tangents(args, False))
    if _in_torch_func_transform():
        return _THROUGH_OPS[False].apply(*_without_running_stat_tangents(args, False))
    return torch.ops.bn_gpu.forward_eval(*args)
