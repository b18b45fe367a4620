"""A value read from ``self.training`` at trace time, made to follow the module's flag when the graph runs.

fx runs the model's Python code once, so ``dropout_p=self.p if self.training else 0.0`` (timm's and Hugging
Face's attention) is recorded as the number of that moment.  The capture traces the model again in the other
mode (``nrfx.capture.front_ends``); where the two graphs are the same calls and differ only in literal numbers
or flags, each such literal becomes ``by_mode(<input>, <module>, value in train mode, value in eval mode)``,
read from the calling module's flag when the graph runs, as ``.train()``/``.eval()`` set it.  The call takes
the module itself (its flag is read when the graph runs) and the graph's first input (unused): ``torch.save``
of a GraphModule traces its code again, and a call that reads no traced value would run then, its value of
that moment baked in; with them the retrace records the call again.  Graphs that
differ in their calls (a Python ``if self.training:`` block) are not mended here: the capture reports them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["by_mode", "node_keys", "follow_the_flag", "FLAG_READ", "flags_survive_retraces", "retraceable_call"]

_LITERALS = (bool, int, float)


def by_mode(anchor: Any, module: nn.Module, in_train: Any, in_eval: Any) -> Any:
    """The value of the mode ``module`` (the caller) is in (a node of the captured graph; ``anchor`` unused)."""
    return in_train if module.training else in_eval


torch.fx.wrap("by_mode")


def node_keys(nodes: list[torch.fx.Node]) -> list[tuple[str, str, str]]:
    """Per node: op, target and arguments, other nodes named by their position (comparable across traces)."""
    index = {n: i for i, n in enumerate(nodes)}
    return [(n.op, str(getattr(n.target, "__qualname__", n.target)),
             repr(torch.fx.node.map_arg((n.args, n.kwargs), lambda m: f"%{index[m]}"))) for n in nodes]


def _literal_pairs(mine: torch.fx.Node, theirs: torch.fx.Node, index: dict, their_index: dict) -> list[int] | None:
    """Positions of the flattened arguments where two calls differ only by a literal number or flag (None: they
    differ otherwise: op, target, structure, or an input)."""
    if (mine.op, mine.target) != (theirs.op, theirs.target):
        return None
    leaves, spec = pytree.tree_flatten((mine.args, mine.kwargs))
    other, other_spec = pytree.tree_flatten((theirs.args, theirs.kwargs))
    if spec != other_spec:
        return None
    found = []
    for i, (a, b) in enumerate(zip(leaves, other, strict=True)):
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
            same = index[a] == their_index[b]
        elif isinstance(a, _LITERALS) and isinstance(b, _LITERALS):
            if type(a) is not type(b) or a != b:
                found.append(i)
            continue
        else:
            same = a is b or (type(a) is type(b) and not isinstance(a, (torch.fx.Node, torch.Tensor)) and a == b)
        if not same:
            return None
    return found


def _caller(node: torch.fx.Node) -> str:
    """Path of the module whose forward made the call ('' for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


ROOT_FLAG = "nrfx_root_mode"  # the holder whose flag stands for the root's (a child follows .train()/.eval())


def _flag_holder(gm: torch.fx.GraphModule, path: str, training: bool) -> str:
    """Rule: the module path a flag is read from exists in ``gm``: a module fx traced through (no call of it left
    in the graph) gets an empty holder there, in mode ``training``, which ``gm.train()``/``.eval()`` then set;
    the root's flag is read from a holder child.  Returns the path."""
    path = path or ROOT_FLAG
    module = gm
    for name in path.split("."):
        if not isinstance(getattr(module, name, None), nn.Module):
            holder = nn.Module()
            holder.training = training
            module.add_module(name, holder)
        module = getattr(module, name)
    return path


FLAG_READ = "nrfx_flag_read"  # meta key of the tracer's get_attr nodes of '<module>.training'


def retraceable_call(graph: torch.fx.Graph, function: Any, args: tuple, anchored: bool = True) -> torch.fx.Node:
    """Rule: a call of an ``fx.wrap``-ped nrfx function (at the insertion point) that a retrace records again:
    marked wrapped (its code then registers the wrap) and, when ``anchored``, given the graph's first input as its
    first argument (unused): a retrace records a wrapped call only when it reads a traced value."""
    anchor = next((n for n in graph.nodes if n.op == "placeholder"), None)
    node = graph.call_function(function, (anchor, *args) if anchored else args)
    node.meta["is_wrapped"] = True
    return node


def flags_survive_retraces(gm: torch.fx.GraphModule) -> int:
    """Rule: each flag the tracer reads when the graph runs (``get_attr <module>.training``, handed to a dropout)
    becomes ``by_mode(<first input>, <module>, True, False)``: the same value, and a retrace (``torch.save``)
    records the call again instead of the flag of that moment.  Returns how many; recompiles when any."""
    reads = [n for n in gm.graph.nodes if n.op == "get_attr" and n.meta.get(FLAG_READ)]
    for node in reads:
        path = node.target.rpartition(".")[0]
        with gm.graph.inserting_before(node):
            caller = gm.graph.get_attr(_flag_holder(gm, path, gm.training))
            flag = retraceable_call(gm.graph, by_mode, (caller, True, False))
        node.replace_all_uses_with(flag)
        gm.graph.erase_node(node)
    if reads:
        gm.recompile()
    return len(reads)


def _follow(gm: torch.fx.GraphModule, node: torch.fx.Node, theirs: torch.fx.Node, positions: list[int],
            training: bool) -> None:
    """Rule: each differing literal of ``node`` becomes ``by_mode(<caller>.training, train value, eval value)``
    (``theirs`` holds the value of the other mode, ``training``)."""
    leaves, spec = pytree.tree_flatten((node.args, node.kwargs))
    other = pytree.tree_leaves((theirs.args, theirs.kwargs))
    with gm.graph.inserting_before(node):
        caller = gm.graph.get_attr(_flag_holder(gm, _caller(node), not training))
        for i in positions:
            in_train, in_eval = (other[i], leaves[i]) if training else (leaves[i], other[i])
            leaves[i] = retraceable_call(gm.graph, by_mode, (caller, in_train, in_eval))
    node.args, node.kwargs = pytree.tree_unflatten(leaves, spec)


def follow_the_flag(gm: torch.fx.GraphModule, other: torch.fx.GraphModule, training: bool) -> list[torch.fx.Node]:
    """Rule: where ``other`` (the model traced in the other mode, ``training``) has the same calls as ``gm`` and
    they differ only in literal numbers or flags, those literals follow the calling module's flag in ``gm``
    (changed in place, recompiled).  Returns the calls mended; none when the graphs differ otherwise."""
    mine, theirs = list(gm.graph.nodes), list(other.graph.nodes)
    if len(mine) != len(theirs):
        return []
    index, their_index = {n: i for i, n in enumerate(mine)}, {n: i for i, n in enumerate(theirs)}
    found = []
    for a, b in zip(mine, theirs, strict=True):
        positions = _literal_pairs(a, b, index, their_index)
        if positions is None:
            return []
        if positions:
            found.append((a, b, positions))
    for a, b, positions in found:
        _follow(gm, a, b, positions, training)
    gm.graph.lint()
    gm.recompile()
    return [a for a, _, _ in found]
