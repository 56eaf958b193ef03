"""fold_batch_norms: BatchNorm folded into the layer before it, for inference.

In eval mode a BatchNorm is an affine map per channel, y = z * scale + shift with
scale = weight / sqrt(running_var + eps) and shift = bias - running_mean * scale; when z is the
output of a Conv/ConvTranspose/Linear that feeds nothing else, the map folds into that layer's
weight (scaled per output channel) and bias, and the BatchNorm disappears from the model.
"""
from __future__ import annotations

import collections
import copy
import dataclasses

import torch

from .tracing import (is_batch_norm, is_frozen_batch_norm, sequential_neighbours, trace,
                      untraced_note)

_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_CONV_TRANSPOSES = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_LAYERS = _CONVS + _CONV_TRANSPOSES + (torch.nn.Linear,)


@dataclasses.dataclass
class FoldReport:
    """What fold_batch_norms did: each BatchNorm folded (and into which layer) or left (and why)."""
    folded: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (batch norm, layer)
    left: list[tuple[str, str]] = dataclasses.field(default_factory=list)    # (batch norm, reason)
    trace_error: str | None = None  # why torch.fx could not trace the model; nn.Sequential order was used

    @property
    def traced(self) -> bool:
        return self.trace_error is None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BatchNorm(s), left {len(self.left)}" + untraced_note(self.trace_error)]
        lines += [f"  folded {bn} into {layer}" for bn, layer in self.folded]
        lines += [f"  left   {bn}: {why}" for bn, why in self.left]
        return "\n".join(lines)


def _why_not_foldable(bn) -> str | None:
    if bn.training and not is_frozen_batch_norm(bn):
        return "in training mode"
    if getattr(bn, "running_mean", None) is None:
        return "uses batch statistics in eval (track_running_stats=False)"
    return None


def _scale_and_shift(bn) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel affine map of an eval-mode BatchNorm, in float64."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _output_channels(layer) -> int:
    return layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels


def _scaled_weight(layer, scale: torch.Tensor) -> torch.Tensor:
    weight = layer.weight.detach().double()
    if isinstance(layer, _CONV_TRANSPOSES):  # weight is (in, out / groups, *kernel): outputs on dim 1, per group
        groups = layer.groups
        grouped = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:])
        per_output = scale.reshape(groups, 1, weight.shape[1], *([1] * (weight.dim() - 2)))
        return (grouped * per_output).reshape(weight.shape)
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


@torch.no_grad()
def _fold_into(layer, bn) -> None:
    scale, shift = _scale_and_shift(bn)
    weight = layer.weight
    layer.weight = torch.nn.Parameter(_scaled_weight(layer, scale).to(weight.dtype), weight.requires_grad)
    old_bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    new_bias = (old_bias.to(scale.device) * scale + shift).to(device=weight.device, dtype=weight.dtype)
    layer.bias = torch.nn.Parameter(new_bias, weight.requires_grad)


def _why_not_pair(layer, bn) -> str | None:
    if not isinstance(layer, _LAYERS):
        return f"its input comes from {type(layer).__name__}, not a Conv, ConvTranspose or Linear"
    why = _why_not_foldable(bn)
    if why is None and _output_channels(layer) != bn.running_mean.numel():
        why = "the channel counts of the layer and the BatchNorm differ"
    return why


def _check_eval(model: torch.nn.Module) -> None:
    training = [name or "the model" for name, m in model.named_modules() if m.training and is_batch_norm(m)]
    if model.training or training:
        raise RuntimeError("fold_batch_norms: the model is in training mode (" + ", ".join(training[:3] or ["model"])
                           + "); folding uses the running statistics, so call model.eval() first")


def _fold_traced(model: torch.nn.Module, graph: torch.fx.Graph, report: FoldReport) -> torch.fx.GraphModule:
    module = torch.fx.GraphModule(model, graph)
    modules = dict(module.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in list(graph.nodes):
        if node.op != "call_module" or not is_batch_norm(modules[node.target]):
            continue
        bn, source = modules[node.target], node.args[0] if node.args else None
        why = _why_not_foldable(bn)
        if why is None and not (isinstance(source, torch.fx.Node) and source.op == "call_module"):
            why = "its input is not the output of a module"
        if why is None:
            why = _why_not_pair(modules[source.target], bn)
        if why is None and (len(source.users) != 1 or calls[source.target] != 1 or calls[node.target] != 1):
            why = f"{source.target}'s output feeds more than this BatchNorm, or a module is called more than once"
        if why is not None:
            report.left.append((node.target, why))
            continue
        _fold_into(modules[source.target], bn)
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        module.delete_submodule(node.target)
        report.folded.append((node.target, source.target))
    graph.lint()
    module.recompile()
    return module


def _fold_in_sequentials(model: torch.nn.Module, report: FoldReport) -> torch.nn.Module:
    folded = set()
    for layer_name, layer, bn_name, bn, container in sequential_neighbours(model):
        if is_batch_norm(bn) and _why_not_pair(layer, bn) is None:
            _fold_into(layer, bn)
            setattr(container, bn_name.rsplit(".", 1)[-1], torch.nn.Identity())
            folded.add(id(bn))
            report.folded.append((bn_name, layer_name))
    for name, module in model.named_modules():
        if is_batch_norm(module) and id(module) not in folded:
            report.left.append((name, _why_not_foldable(module)
                                or "not right after a Conv, ConvTranspose or Linear in an nn.Sequential"))
    return model


def fold_batch_norms(model: torch.nn.Module) -> tuple[torch.nn.Module, FoldReport]:
    """Fold each eval-mode BatchNorm of `model` into the Conv/ConvTranspose/Linear feeding it.

    Works on a copy: returns (folded model, FoldReport); `model` is left as it was. Folds
    torch.nn.BatchNorm1d/2d/3d, bn_gpu's modules and FrozenBatchNorm (torchvision's, or any
    module of that name with its buffers) whose input is the output of a Conv1d/2d/3d,
    ConvTranspose1d/2d/3d (groups included) or Linear used nowhere else. The dataflow comes from
    torch.fx; a model fx cannot trace is folded within its nn.Sequential containers only, where
    order is dataflow. Linear + BatchNorm1d folds on (N, C) inputs, the only ones where both act on
    the same dim. Raises RuntimeError for a model (or any BatchNorm) in training mode.
    """
    _check_eval(model)
    model = copy.deepcopy(model)
    graph, trace_error = trace(model)
    report = FoldReport(trace_error=trace_error)
    if graph is None:
        return _fold_in_sequentials(model, report), report
    return _fold_traced(model, graph, report), report
