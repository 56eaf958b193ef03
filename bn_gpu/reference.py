"""Float64 reference of BatchNorm, written plainly from its definition (docs/semantics.md): the oracle of every test.

x has shape (N, C) or (N, C, *spatial); every function works in float64 on x's device and
returns float64 tensors. Per-channel vectors have shape (C,).
"""
from __future__ import annotations

import torch


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _per_channel(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (C,) vector so it broadcasts against x along dim 1."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a mini-batch (seed steps 2-3)."""
    x = x.double()
    dims = _reduce_dims(x)
    mean = x.mean(dim=dims)
    var = ((x - _per_channel(mean, x)) ** 2).mean(dim=dims)
    return mean, var


def normalize(x, mean, var, weight=None, bias=None, eps=1e-5) -> torch.Tensor:
    """x_hat = (x - mean) / sqrt(var + eps); y = weight * x_hat + bias (seed steps 4-5)."""
    x = x.double()
    x_hat = (x - _per_channel(mean.double(), x)) / torch.sqrt(_per_channel(var.double(), x) + eps)
    y = x_hat
    if weight is not None:
        y = y * _per_channel(weight.double(), x)
    if bias is not None:
        y = y + _per_channel(bias.double(), x)
    return y


def forward_train(x, weight=None, bias=None, eps=1e-5):
    """Training forward: (y, mean, biased var, invstd), all float64."""
    mean, var = batch_stats(x)
    y = normalize(x, mean, var, weight, bias, eps)
    return y, mean, var, 1.0 / torch.sqrt(var + eps)


def momentum_factor(momentum, num_batches_tracked: int) -> float:
    """momentum, or 1 / num_batches_tracked (cumulative average) when momentum is None.

    num_batches_tracked is the counter after this batch's increment.
    """
    return 1.0 / num_batches_tracked if momentum is None else momentum


def update_running_stats(running_mean, running_var, mean, var, count: int, factor: float,
                         unbiased: bool = True):
    """New (running_mean, running_var) after one batch of `count` values per channel (seed step 4).

    PyTorch feeds the unbiased variance var * count / (count - 1) into running_var; the seed's text
    (as Keras) feeds the biased one: unbiased=False.
    """
    batch_var = var * count / (count - 1) if unbiased else var
    new_mean = (1 - factor) * running_mean.double() + factor * mean.double()
    new_var = (1 - factor) * running_var.double() + factor * batch_var.double()
    return new_mean, new_var


def forward_eval(x, running_mean, running_var, weight=None, bias=None, eps=1e-5):
    """Inference forward: normalize with the running statistics."""
    return normalize(x, running_mean, running_var, weight, bias, eps)


def backward_train(grad_y, x, weight=None, eps=1e-5):
    """Closed-form training backward: (grad_x, grad_weight, grad_bias), float64.

    With x_hat = (x - mean) * invstd and m values per channel:
        grad_bias   = sum(dy)
        grad_weight = sum(dy * x_hat)
        grad_x      = weight * invstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))
    """
    x = x.double()
    grad_y = grad_y.double()
    dims = _reduce_dims(x)
    m = x.numel() // x.shape[1]
    mean, var = batch_stats(x)
    invstd = 1.0 / torch.sqrt(var + eps)
    x_hat = (x - _per_channel(mean, x)) * _per_channel(invstd, x)
    sum_dy = grad_y.sum(dim=dims)
    sum_dy_xhat = (grad_y * x_hat).sum(dim=dims)
    w = weight.double() if weight is not None else torch.ones_like(mean)
    grad_x = _per_channel(w * invstd / m, x) * (
        m * grad_y - _per_channel(sum_dy, x) - x_hat * _per_channel(sum_dy_xhat, x))
    return grad_x, sum_dy_xhat, sum_dy


def backward_eval(grad_y, x, running_mean, running_var, weight=None, eps=1e-5):
    """Eval-mode backward, elementwise in x: (grad_x, grad_weight, grad_bias), float64."""
    x = x.double()
    grad_y = grad_y.double()
    dims = _reduce_dims(x)
    invstd = 1.0 / torch.sqrt(running_var.double() + eps)
    x_hat = (x - _per_channel(running_mean.double(), x)) * _per_channel(invstd, x)
    w = weight.double() if weight is not None else torch.ones_like(invstd)
    grad_x = grad_y * _per_channel(w * invstd, x)
    return grad_x, (grad_y * x_hat).sum(dim=dims), grad_y.sum(dim=dims)


# ---- the BatchNorm family -------------------------------------------------------------------------

def frozen_batch_norm(x, weight, bias, running_mean, running_var, eps=1e-5):
    """FrozenBatchNorm as torchvision.ops.misc.FrozenBatchNorm2d computes it:
    y = x * scale + shift, scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale."""
    x = x.double()
    scale = weight.double() / torch.sqrt(running_var.double() + eps)
    shift = bias.double() - running_mean.double() * scale
    return x * _per_channel(scale, x) + _per_channel(shift, x)


def batch_renorm_train(x, weight, bias, running_mean, running_var, momentum, eps, r_max, d_max, warmup: bool):
    """Batch Renormalization's training forward (Ioffe, "Batch Renormalization: Towards Reducing
    Minibatch Dependence in Batch-Normalized Models", NeurIPS 2017, Algorithm 1), with the running
    statistics kept as BatchNorm keeps them (running_var the EMA of the unbiased batch variance;
    sigma = sqrt(running_var + eps)):

        sigma_B = sqrt(var_B + eps)
        r = clip(sigma_B / sigma, 1 / r_max, r_max),  d = clip((mean_B - mean) / sigma, -d_max, d_max)
        y = weight * ((x - mean_B) / sigma_B * r + d) + bias
    r and d are constants for the gradient; during warm-up r = 1 and d = 0 (BatchNorm).
    Returns (y, r, d, new running_mean, new running_var), float64.
    """
    mean_b, var_b = batch_stats(x)
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(running_var.double() + eps)
    if warmup:
        r, d = torch.ones_like(sigma), torch.zeros_like(sigma)
    else:
        r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
        d = ((mean_b - running_mean.double()) / sigma).clamp(-d_max, d_max).detach()
    x = x.double()
    x_hat = (x - _per_channel(mean_b, x)) / _per_channel(sigma_b, x) * _per_channel(r, x) + _per_channel(d, x)
    y = x_hat * _per_channel(weight.double(), x) + _per_channel(bias.double(), x)
    count = x.numel() // x.shape[1]
    new_mean, new_var = update_running_stats(running_mean, running_var, mean_b.detach(), var_b.detach(), count,
                                             momentum)
    return y, r, d, new_mean, new_var


def ghost_batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps, virtual_batch_size: int):
    """Ghost BatchNorm (Hoffer et al., "Train longer, generalize better", NeurIPS 2017), as the
    common chunked implementation computes it: x split along dim 0 into chunks of
    virtual_batch_size rows (the last may be shorter), each normalized with its own statistics and
    the same weight and bias, the running statistics updated once per chunk, in order.
    Returns (y, new running_mean, new running_var), float64."""
    outputs = []
    running_mean, running_var = running_mean.double(), running_var.double()
    for chunk in x.double().split(virtual_batch_size, dim=0):
        y, mean, var, _ = forward_train(chunk, weight, bias, eps)
        outputs.append(y)
        count = chunk.numel() // chunk.shape[1]
        running_mean, running_var = update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return torch.cat(outputs), running_mean, running_var


def epilogue(y, residual=None, relu: bool = False):
    """The fused epilogue, as the unfused torch sequence computes it: relu(y + residual)
    (F.relu(bn(x) + residual) in a ResNet block), float64."""
    y = y.double()
    if residual is not None:
        y = y + residual.double()
    return torch.relu(y) if relu else y


def epilogue_backward(grad_y, output, relu: bool = False):
    """The gradient reaching the BatchNorm (and the residual) through the epilogue: dy where the
    ReLU's output is positive, float64."""
    grad_y = grad_y.double()
    return torch.where(output.double() <= 0, torch.zeros_like(grad_y), grad_y) if relu else grad_y
