"""Calls that pass a callee's leading tensor parameters by keyword pass them positionally.

Every channel rule reads a layer's input (and a functional layer's weight) from ``node.args``;
``self.bn(input=x)``, ``F.conv2d(input=x, weight=w)`` or ``torch.cat(tensors=[a, b], dim=1)`` keep them
in ``node.kwargs``. The same call with those arguments moved to their positions computes the same.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.fx
from torch.fx.operator_schemas import get_signature_for_torch_op

__all__ = ["positional_calls", "holds_node"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def positional_calls(gm: torch.fx.GraphModule) -> None:
    """Rule: a call's leading graph-valued parameters given by keyword move to their positions, as long as every
    signature the callee has (a builtin's overloads) names the same parameter there; the rest stay keywords."""
    changed = False
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or not node.kwargs:
            continue
        signatures = _binding(_signatures(_callee(gm, node)), node)
        if node.op == "call_method":
            signatures = [s for s in signatures if _positional_name(s, 0) in ("input", "self")]
        args, kwargs = _moved(signatures, list(node.args), dict(node.kwargs))
        if len(args) > len(node.args):
            node.args, node.kwargs, changed = tuple(args), kwargs, True
    if changed:
        gm.recompile()


def _callee(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Callable | None:
    """The function a node calls: a module's forward, the function, or a method's ``torch`` namesake (whose
    signatures stand for the method's only where the tensor comes first, as ``input`` or ``self``)."""
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "forward", None)
    if node.op == "call_method":
        return getattr(torch, node.target, None)
    return node.target if callable(node.target) else None


def _signatures(callee: Callable | None) -> list[inspect.Signature]:
    """Python's signature of the callee, else the signatures of a builtin's schemas (none when neither is known)."""
    if callee is None:
        return []
    try:
        return [inspect.signature(callee)]
    except (TypeError, ValueError):
        pass
    try:
        return list(get_signature_for_torch_op(callee) or [])
    except Exception:  # an unknown builtin (or schema) keeps its call as written
        return []


def _binding(signatures: list[inspect.Signature], node: torch.fx.Node) -> list[inspect.Signature]:
    """The signatures the call's arguments bind to by name (``torch.add``'s ``(a, b)`` overloads do not bind
    ``input=``)."""
    bound = []
    for signature in signatures:
        try:
            signature.bind(*node.args, **node.kwargs)
        except TypeError:
            continue
        bound.append(signature)
    return bound


def _moved(signatures: list[inspect.Signature], args: list, kwargs: dict) -> tuple[list, dict]:
    """The arguments with each next positional parameter taken out of ``kwargs`` while all signatures agree on it
    and it passes graph values (a tensor, a list of them); literals stay keywords (``inplace=True`` is read by
    name)."""
    while signatures:
        names = {_positional_name(signature, len(args)) for signature in signatures}
        name = names.pop() if len(names) == 1 else None
        if name is None or name not in kwargs or not holds_node(kwargs[name]):
            break
        args.append(kwargs.pop(name))
    return args, kwargs


def holds_node(value) -> bool:
    """Whether a call argument is or contains an fx node (in a list, tuple, dict or slice): a value computed in the
    graph, such as a size read from a tensor's shape."""
    found = []
    torch.fx.node.map_arg(value, found.append)
    return bool(found)


def _positional_name(signature: inspect.Signature, index: int) -> str | None:
    """The name of the signature's ``index``-th parameter when it can be passed positionally."""
    parameters = list(signature.parameters.values())
    if index < len(parameters) and parameters[index].kind in _POSITIONAL:
        return parameters[index].name
    return None
