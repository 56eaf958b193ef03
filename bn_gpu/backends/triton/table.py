"""The Triton backend: its kernel table for bn_gpu.backends.orchestration, which owns the control flow.

Each method marshals the arguments of one kernel of bn_gpu.kernels (channels-first or
channels-last by the geometry's family) in the kernel's parameter order and launches it at its
`Site` -- the kernel, grid, constexprs and integer arguments of one geometry and set of flags,
built once -- with the call's tensors and floats. Arguments a kernel does not read under its flags
are passed as None.

CUDA tensors run compiled kernels; CPU tensors run them in the Triton interpreter, which must be
switched on with TRITON_INTERPRET=1 before the kernels are first used.
"""
from __future__ import annotations

import torch

from .. import ghost
from ..plan import Geometry, geometry, tuning_and_sms
from . import launcher, sites


def _momentum_and_eps(momentum, eps) -> tuple:
    return 0.0 if momentum is None else float(momentum), float(eps)


class TritonKernels:
    """The kernel table of bn_gpu.backends.orchestration for Triton: each method gathers one kernel's tensors
    and floats in parameter order and launches them at its site."""

    def geometry(self, x: torch.Tensor, grad_y: torch.Tensor | None = None) -> Geometry:
        tuning, sms = tuning_and_sms(x.device)
        return geometry(x, grad_y, tuning, sms)

    def ghost_geometry(self, x: torch.Tensor, chunks: int) -> Geometry:
        """Ghost BatchNorm's geometry: x in `chunks` virtual batches (bn_gpu/backends/ghost.py)."""
        return ghost.geometry(x, chunks, *tuning_and_sms(x.device))

    def statistics(self, g, x, partials):
        self._statistics(g, x, partials)

    def statistics_finalized(self, g, x, partials, counters, mean, invstd, running_mean, running_var, counter,
                             momentum, eps):
        self._statistics(g, x, partials, counters, mean, invstd, running_mean, running_var, counter, momentum, eps)

    def _statistics(self, g, x, partials, counters=None, mean=None, invstd=None, running_mean=None, running_var=None,
                    counter=None, momentum=None, eps=0.0):
        """The statistics kernel; with counters, finalizing in the same launch."""
        part_count, part_mean, m2 = partials
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launcher.launch(sites.statistics_site(g, counters is not None, tracked, cumulative),
                        (x, part_count, part_mean, m2, counters, mean, invstd, running_mean, running_var,
                         counter if cumulative else None),
                        _momentum_and_eps(momentum, eps))

    def finalize_statistics(self, g, x, partials, mean, invstd, running_mean, running_var, counter, momentum, eps):
        count, part_mean, m2 = partials
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launcher.launch(sites.finalize_statistics_site(g, tracked, cumulative),
                        (count, part_mean, m2, x, mean, invstd, running_mean, running_var, counter if cumulative else None),
                        _momentum_and_eps(momentum, eps))

    def normalize(self, g, x, y, mean, invstd, weight, bias, counter, eps, running_mean=None, running_var=None,
                  residual=None, relu=False):
        from_running = running_mean is not None
        # Eval reads the running statistics and writes mean and invstd for the backward.
        statistics = (running_mean, running_var, invstd, mean) if from_running else (mean, None, invstd, None)
        launcher.launch(sites.normalize_site(g, weight is not None, bias is not None, from_running, counter is not None,
                                             residual is not None, relu),
                        (x, y, residual, *statistics, weight, bias, counter), (float(eps),))

    def single_pass_forward(self, g, x, y, mean, invstd, weight, bias, running_mean, running_var, counter,
                            momentum, eps, count_batch, residual=None, relu=False, counters=None):
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launcher.launch(sites.single_pass_forward_site(g, weight is not None, bias is not None, tracked, cumulative, count_batch,
                                                       residual is not None, relu),
                        (x, y, residual, mean, invstd, running_mean, running_var,
                         counter if cumulative or count_batch else None, counters if cumulative and count_batch else None,
                         weight, bias),
                        _momentum_and_eps(momentum, eps))

    def on_chip_forward(self, g, x, y, mean, invstd, weight, bias, running_mean, running_var, counter, momentum, eps,
                        partials, counters, residual=None, relu=False):
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        count_batch = counter is not None
        part_count, part_mean, m2 = partials if partials is not None else (None, None, None)
        launcher.launch(sites.on_chip_forward_site(g, weight is not None, bias is not None, tracked, cumulative,
                                                   count_batch, residual is not None, relu),
                        (x, y, residual, part_count, part_mean, m2, counters, mean, invstd, running_mean, running_var,
                         counter, weight, bias),
                        _momentum_and_eps(momentum, eps))

    def on_chip_backward(self, g, grad_y, x, grad_x, mean, invstd, weight, grad_weight, grad_bias, partials, counters,
                         bias=None, relu=False):
        sum_dy, sum_dy_xmu = partials if partials is not None else (None, None)
        launcher.launch(sites.on_chip_backward_site(g, weight is not None, relu and bias is not None,
                                                    grad_x is not None, relu),
                        (grad_y, x, grad_x, mean, invstd, weight, bias if relu else None, sum_dy, sum_dy_xmu, counters,
                         grad_weight, grad_bias),
                        (1.0 / g.count,))

    def gradient_sums(self, g, grad_y, x, mean, partials, invstd=None, weight=None, bias=None, relu=False):
        self._gradient_sums(g, grad_y, x, mean, partials, invstd, weight, bias, relu)

    def gradient_sums_finalized(self, g, grad_y, x, mean, partials, counters, invstd, totals, grad_weight, grad_bias,
                                weight=None, bias=None, relu=False):
        self._gradient_sums(g, grad_y, x, mean, partials, invstd, weight, bias, relu, counters, totals, grad_weight,
                            grad_bias)

    def _gradient_sums(self, g, grad_y, x, mean, partials, invstd, weight, bias, relu, counters=None, totals=None,
                       grad_weight=None, grad_bias=None):
        """The gradient-sums kernel; with counters, finalizing in the same launch."""
        sum_dy, sum_dy_xmu = partials
        finalize = counters is not None
        total_dy, total_dy_xmu = totals if finalize else (None, None)
        launcher.launch(sites.gradient_sums_site(g, relu, relu and weight is not None, relu and bias is not None, finalize),
                        (grad_y, x, mean, invstd if relu or finalize else None, weight if relu else None,
                         bias if relu else None, sum_dy, sum_dy_xmu, counters, total_dy, total_dy_xmu, grad_weight, grad_bias))

    def finalize_gradients(self, g, partials, invstd, totals, grad_weight, grad_bias):
        sum_dy, sum_dy_xmu = partials
        total_dy, total_dy_xmu = totals
        launcher.launch(sites.finalize_gradients_site(g),
                        (sum_dy, sum_dy_xmu, invstd, total_dy, total_dy_xmu, grad_weight, grad_bias))

    def input_gradient(self, g, grad_y, x, grad_x, mean, invstd, weight, totals, training, bias=None, relu=False):
        total_dy, total_dy_xmu = totals if training else (None, None)
        launcher.launch(sites.input_gradient_site(g, weight is not None, relu and bias is not None, training, relu),
                        (grad_y, x, grad_x, mean, invstd, weight, bias if relu else None, total_dy, total_dy_xmu),
                        (1.0 / g.count,))

    def single_pass_backward(self, g, grad_y, x, grad_x, mean, invstd, weight, grad_weight, grad_bias, training,
                             bias=None, relu=False):
        launcher.launch(sites.single_pass_backward_site(g, weight is not None, relu and bias is not None, training,
                                                        grad_x is not None, relu),
                        (grad_y, x, grad_x, mean, invstd, weight, bias if relu else None, grad_weight, grad_bias),
                        (1.0 / g.count,))

    def finalize_ghost_statistics(self, g, x, partials, mean, invstd, running_mean, running_var, counter, momentum,
                                  eps):
        """Ghost BatchNorm (g.chunk_channels): each virtual batch's mean and invstd; the running
        statistics updated once per virtual batch, in order (counter read, not written)."""
        count, part_mean, m2 = partials
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launcher.launch(sites.finalize_ghost_statistics_site(g, tracked, cumulative),
                        (count, part_mean, m2, x, mean, invstd, running_mean, running_var, counter if cumulative else None),
                        _momentum_and_eps(momentum, eps))

    def finalize_ghost_gradients(self, g, partials, invstd, totals, grad_weight, grad_bias):
        """Ghost BatchNorm: each virtual batch's totals; dweight and dbias summed over them."""
        sum_dy, sum_dy_xmu = partials
        total_dy, total_dy_xmu = totals
        launcher.launch(sites.finalize_ghost_gradients_site(g),
                        (sum_dy, sum_dy_xmu, invstd, total_dy, total_dy_xmu, grad_weight, grad_bias))

    def finalize_moments(self, g, x, partials, moments):
        count, part_mean, m2 = partials
        launcher.launch(sites.finalize_moments_site(g), (count, part_mean, m2, x, moments))

    def merge_ranks(self, dtype, moments, mean, invstd, running_mean, running_var, counter, momentum, eps):
        ranks, C = moments.shape[0], (moments.shape[1] - 1) // 2
        tracked = running_mean is not None
        cumulative = tracked and momentum is None
        launcher.launch(sites.merge_ranks_site(ranks, C, tracked, cumulative, moments.dtype == torch.float64),
                        (moments, mean, invstd, running_mean, running_var, counter if cumulative else None),
                        _momentum_and_eps(momentum, eps))


KERNELS = TritonKernels()
