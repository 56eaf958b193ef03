"""The ops' batching rules (torch.vmap).

Each vmapped sample is an independent batch_norm: the vmapped dim is folded into the channels,
(B, N, C, *S) -> (N, B*C, *S), so one call normalizes every sample's channels separately, and
per-channel tensors become B*C long (repeated when not vmapped).
"""
from __future__ import annotations

import torch

from .library import LIBRARY


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


@torch.library.register_vmap("bn_gpu::forward_train", lib=LIBRARY)
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


@torch.library.register_vmap("bn_gpu::forward_eval", lib=LIBRARY)
def _forward_eval_vmap(info, in_dims, input, weight, bias, running_mean, running_var, eps, backend, residual=None,
                       relu=False):
    B = info.batch_size
    per_channel = [_fold_per_channel(t, d, B) for t, d in zip((weight, bias, running_mean, running_var), in_dims[1:5])]
    output, mean, invstd = torch.ops.bn_gpu.forward_eval(_fold_input(input, in_dims[0], B), *per_channel, eps,
                                                         backend, _fold_residual(residual, in_dims, 7, B), relu)
    return (_unfold_input(output, B), mean.view(B, -1), invstd.view(B, -1)), (1, 0, 0)


@torch.library.register_vmap("bn_gpu::backward", lib=LIBRARY)
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
