"""fuse_batch_norm_relu: a model's BatchNorm -> ReLU and BatchNorm -> add -> ReLU patterns onto
bn_gpu's fused BatchNormReLU modules, found with torch.fx.

Each fused pattern saves two passes over the activation in the forward (the add's and the ReLU's
read and write), as an opaque BatchNorm stops torch.compile from fusing them itself.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import operator

import torch

from ..backends import check_name
from ..nn import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d
from .tracing import sequential_neighbours, trace, untraced_note

_FUSED = {torch.nn.BatchNorm1d: BatchNormReLU1d, torch.nn.BatchNorm2d: BatchNormReLU2d,
          torch.nn.BatchNorm3d: BatchNormReLU3d, BatchNorm1d: BatchNormReLU1d, BatchNorm2d: BatchNormReLU2d,
          BatchNorm3d: BatchNormReLU3d}
_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


@dataclasses.dataclass
class FusionReport:
    """What fuse_batch_norm_relu did: each BatchNorm fused (and with what) or left (and why)."""
    fused: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (batch norm, pattern)
    left: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (batch norm, reason)
    trace_error: str | None = None  # why torch.fx could not trace the model; nn.Sequential order was used

    @property
    def traced(self) -> bool:
        return self.trace_error is None

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)} BatchNorm(s), left {len(self.left)}" + untraced_note(self.trace_error)]
        lines += [f"  fused {bn}: {pattern}" for bn, pattern in self.fused]
        lines += [f"  left  {bn}: {why}" for bn, why in self.left]
        return "\n".join(lines)


def _is_relu(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is torch.nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: torch.fx.Node) -> bool:
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return False
    return ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("add", "add_")))


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _pattern(bn_node: torch.fx.Node, modules: dict):
    """(nodes to replace in order, residual node or None, description) of the pattern starting at
    bn_node, or (None, None, why not)."""
    user = _only_user(bn_node)
    if user is None:
        return None, None, "its output has several users (or none)"
    if _is_relu(user, modules):
        return [bn_node, user], None, "BatchNorm -> ReLU"
    if _is_add(user):
        relu = _only_user(user)
        other = user.args[1] if user.args[0] is bn_node else user.args[0]
        if relu is not None and _is_relu(relu, modules) and isinstance(other, torch.fx.Node) and other is not bn_node:
            return [bn_node, user, relu], other, "BatchNorm + add -> ReLU"
        return None, None, "followed by an add that no ReLU alone follows"
    return None, None, f"followed by {_describe(user, modules)}, not a ReLU or an add"


def _describe(node: torch.fx.Node, modules: dict) -> str:
    """A node of the graph as a reader of the report knows it."""
    if node.op == "output":
        return "the model's output"
    if node.op == "call_module":
        return f"module {node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"function {getattr(node.target, '__name__', node.target)}"


def _fused_module(bn, backend: str | None):
    fused_type = _FUSED[type(bn)]
    fused = fused_type.__new__(fused_type)
    fused.__dict__.update(bn.__dict__)  # parameters, buffers, hooks, mode: the same objects
    fused.backend = backend or getattr(bn, "backend", "auto")
    return fused


def fuse_batch_norm_relu(model: torch.nn.Module, backend: str | None = None) -> tuple[torch.nn.Module, FusionReport]:
    """Replace, in a copy of `model`, each BatchNorm1d/2d/3d (torch's or bn_gpu's) whose output feeds
    only a ReLU -- or only an add whose sum feeds only a ReLU -- by a BatchNormReLU module computing
    relu(bn(x) + residual) in one pass, sharing the BatchNorm's parameters and buffers.

    Returns (fused model, FusionReport). The dataflow comes from torch.fx; a model it cannot trace
    is searched within its nn.Sequential containers only, where order is dataflow (BatchNorm then
    ReLU modules: an add is not a module there), and the report says so. backend: of the fused
    modules; None keeps a bn_gpu module's and gives torch's "auto".
    """
    if backend is not None:
        check_name(backend)
    model = copy.deepcopy(model)
    graph, trace_error = trace(model)
    if graph is None:
        return _fuse_in_sequentials(model, FusionReport(trace_error=trace_error), backend)
    module = torch.fx.GraphModule(model, graph)
    modules = dict(module.named_modules())
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    report = FusionReport()
    for node in list(graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) not in _FUSED:
            continue
        if calls[node.target] != 1:
            report.left.append((node.target, "the module is called more than once"))
            continue
        nodes, residual, description = _pattern(node, modules)
        if nodes is None:
            report.left.append((node.target, description))
            continue
        with graph.inserting_before(nodes[-1]):
            fused = graph.call_module(node.target, (node.args[0],) if residual is None else (node.args[0], residual))
        nodes[-1].replace_all_uses_with(fused)
        for replaced in reversed(nodes):
            graph.erase_node(replaced)
        module.delete_submodule(node.target)
        module.add_submodule(node.target, _fused_module(modules[node.target], backend))
        report.fused.append((node.target, description))
    graph.lint()
    module.delete_all_unused_submodules()  # the ReLU modules fused away
    module.recompile()
    return module, report


def _fuse_in_sequentials(model: torch.nn.Module, report: FusionReport, backend: str | None):
    fused = set()
    for bn_name, bn, relu_name, relu, container in sequential_neighbours(model):
        if type(bn) in _FUSED and type(relu) is torch.nn.ReLU:
            setattr(container, bn_name.rsplit(".", 1)[-1], _fused_module(bn, backend))
            setattr(container, relu_name.rsplit(".", 1)[-1], torch.nn.Identity())
            fused.add(id(bn))
            report.fused.append((bn_name, "BatchNorm -> ReLU"))
    for name, module in model.named_modules():
        if type(module) in _FUSED and id(module) not in fused:
            report.left.append((name, "not followed by a ReLU module in an nn.Sequential"))
    return model, report
