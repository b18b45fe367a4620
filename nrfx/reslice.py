"""Move literal channel sizes (slices, split sizes, chunks, narrow, depthwise ``groups``) to the new widths.

The analysis records every slice of a free channel dim with its old bounds; each bound falls
on an atom border, so in the new layout it sits after the same atoms, now |S| + |R| wide.
split/chunk become ``split`` with explicit sizes, a getitem gets its new slice, narrow its new
start and length.  A functional depthwise conv's literal ``groups`` becomes its new channel count.
"""

from __future__ import annotations

import torch
import torch.fx

__all__ = ["reslice", "regroup"]


def _new_offset(analysis, plan, layout, old: int) -> int:
    """Feature offset in the new layout of a border at feature ``old`` of the old layout."""
    pos_old = pos_new = 0
    for s in analysis.space_ids(layout):
        if pos_old >= old:
            break
        pos_old += analysis.spaces[s].width * layout.inner
        pos_new += (len(plan.keep[s]) + plan.grow[s]) * layout.inner
    if pos_old != old:
        raise ValueError(f"bound {old} is not on an atom border")
    return pos_new


def _new_bounds(analysis, plan, record) -> list[tuple[int, int]]:
    """The record's bounds in the new layout."""
    layout = record.layout
    offset = lambda old: _new_offset(analysis, plan, layout, old)  # noqa: E731 - a local shorthand
    return [(offset(a), offset(b)) for a, b in record.bounds]


def _rewrite_node(node: torch.fx.Node, record, bounds) -> None:
    """Put the new bounds into one slicing node."""
    dim, style = record.dim, record.style
    if style == "split":
        sizes = [b - a for a, b in bounds]
        if node.op == "call_method":
            node.target = "split"
        else:
            node.target = torch.split
        node.args, node.kwargs = (node.args[0], sizes, dim), {}
    elif style == "narrow":
        (a, b), = bounds
        node.args = (node.args[0], node.args[1], a, b - a)
    else:
        (a, b), = bounds
        index = node.args[1]
        items = list(index) if isinstance(index, tuple) else [index]
        old = items[record.position]
        items[record.position] = slice(a, b, old.step)
        node.args = (node.args[0], tuple(items) if isinstance(index, tuple) else items[0])


def reslice(gm: torch.fx.GraphModule, analysis, plan, maps=None) -> list[str]:
    """Rewrite pass: every recorded slice whose bounds move gets its new bounds."""
    nodes = {n.name: n for n in gm.graph.nodes}
    changed = 0
    for name, record in analysis.slices():
        if name not in nodes:
            continue
        bounds = _new_bounds(analysis, plan, record)
        if bounds != list(record.bounds):
            _rewrite_node(nodes[name], record, bounds)
            changed += 1
    return [f"reslice: {changed} literal channel bounds moved to the new widths"] if changed else []


def regroup(gm: torch.fx.GraphModule, analysis, plan, maps=None) -> list[str]:
    """Rewrite pass: a functional depthwise conv's literal ``groups`` becomes its new width."""
    nodes = {n.name: n for n in gm.graph.nodes}
    changed = 0
    for name, record in analysis.layers("conv"):
        if record.groups_arg is None or name not in nodes:
            continue
        width = sum(len(plan.keep[s]) + plan.grow[s] for s in analysis.space_ids(record.output))
        node = nodes[name]
        if isinstance(record.groups_arg, int):
            args = list(node.args)
            args[record.groups_arg] = width
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, "groups": width}
        changed += width != record.groups
    return [f"regroup: {changed} literal depthwise groups set to the new widths"] if changed else []
