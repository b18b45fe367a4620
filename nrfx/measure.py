"""Measure the MACs of one node by running it on meta tensors under FlopCounterMode."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["measure_node_macs"]


def _meta_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Meta copies of a module's parameters and buffers."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return {k: torch.empty_like(v, device="meta") for k, v in tensors.items()}


def _run(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple, kwargs: dict) -> None:
    """Execute one node on the given (meta) arguments."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        torch.func.functional_call(module, _meta_state(module), args, kwargs, strict=False)
    elif node.op == "call_function":
        node.target(*args, **kwargs)
    elif node.op == "call_method":
        getattr(args[0], node.target)(*args[1:], **kwargs)


def measure_node_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, values: dict[torch.fx.Node, Any]) -> int:
    """MACs (whole batch) of ``node``; 0 when it cannot be re-run on meta tensors."""
    args = torch.fx.node.map_arg(node.args, lambda n: values[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            _run(gm, node, args, kwargs)
    except Exception:
        return 0
    return counter.get_total_flops() // 2
