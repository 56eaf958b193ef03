"""The torch.fx tracing the model transforms share: BatchNorms kept whole, a fallback to
nn.Sequential order for models torch.fx cannot trace, and the note a report gives for them."""
from __future__ import annotations

import collections

import torch


def is_frozen_batch_norm(module) -> bool:
    """torchvision's FrozenBatchNorm2d and its kind: fixed statistics and affine parameters as buffers."""
    return "FrozenBatchNorm" in type(module).__name__ and all(
        isinstance(getattr(module, name, None), torch.Tensor)
        for name in ("weight", "bias", "running_mean", "running_var"))


def is_batch_norm(module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm) or is_frozen_batch_norm(module)


class Tracer(torch.fx.Tracer):
    """BatchNorms stay whole (bn_gpu's check their input's rank in Python, which a trace cannot)."""

    def is_leaf_module(self, module, qualname) -> bool:
        return is_batch_norm(module) or super().is_leaf_module(module, qualname)


def trace(model: torch.nn.Module) -> tuple[torch.fx.Graph | None, str | None]:
    """(graph, None) from torch.fx with BatchNorms kept whole, or (None, why it could not trace)."""
    try:
        return Tracer().trace(model), None
    except Exception as error:  # noqa: BLE001 -- any tracing failure means: fall back to module order
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def sequential_neighbours(model: torch.nn.Module):
    """(qualified name of a, a, qualified name of b, b, container) for each pair of neighbours a, b in
    an nn.Sequential of `model` where both are used once in the model: there order is dataflow."""
    uses = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for prefix, container in list(model.named_modules()):
        if not isinstance(container, torch.nn.Sequential):
            continue
        children = list(container.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if uses[id(a)] == 1 and uses[id(b)] == 1:
                yield qualified(prefix, a_name), a, qualified(prefix, b_name), b, container


def qualified(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def untraced_note(trace_error: str | None) -> str:
    """What a report says of a model torch.fx could not trace (nothing for one it could)."""
    if trace_error is None:
        return ""
    return f" (torch.fx could not trace the model, so only nn.Sequential containers were searched: {trace_error})"
