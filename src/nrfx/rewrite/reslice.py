"""Move literal channel sizes (slices, split sizes, chunks, narrow, depthwise ``groups``, a mean's divisor)
to the new widths.

The analysis records every slice of a free channel dim with its old bounds; each bound falls
on an atom border, so in the new layout it sits after the same atoms, now |S| + |R| wide.
split/chunk become ``split`` with explicit sizes, a getitem gets its new slice, narrow its new
start and length.  The literal ``groups`` of a functional grouped or depthwise conv and the
``num_groups`` of a GroupNorm (module or F.group_norm) follow the new width, channels per group unchanged.
A sum or mean over a resized channel dim (ConvNeXt-V2's GRN: ``Gx / Gx.mean(dim=C)``) becomes the sum of the
surviving channels only (``index_select``), divided by the original count for a mean: removed channels read
zero there and rejuvenated ones do not enter it, so it is what it was; a removed channel that carries a constant
there is a fold consumer that takes none (``plan/fold``: kept under ``constants="keep"``, dropped with a warning).
Attention heads: a view / reshape that spells a head count (``q.view(B, N, H, d)``) or heads merged back into
channels (``x.reshape(B, N, C)``, C = H·d, a literal or a size read from another tensor) gets the new count
(``reheads``); the head dim d never changes.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from nrfx.analysis.records import SumRecord, ViewRecord
from nrfx.ops.layer_kinds import set_group_norm_width
from nrfx.plan.maps import dim_map

__all__ = ["reslice", "regroup", "resum", "reheads"]


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


def _new_groups(analysis, plan, record, layout) -> int:
    """Groups after the plan: channels per group unchanged, the number of groups follows the width."""
    old = analysis.atoms.channels(layout)
    new = sum(len(plan.keep[s]) + plan.grow[s] for s in analysis.space_ids(layout))
    return new // (old // record.groups)


def _set_literal(node: torch.fx.Node, position: int | str, value: int) -> None:
    """Put ``value`` into a node's argument at ``position`` (an index or a keyword)."""
    if isinstance(position, int):
        args = list(node.args)
        args[position] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, position: value}


def regroup(gm: torch.fx.GraphModule, analysis, plan, maps=None) -> list[str]:
    """Rewrite pass: literal ``groups`` of functional grouped/depthwise convs and ``num_groups`` of
    F.group_norm follow the new widths; GroupNorm modules get their new ``num_groups`` (affine or not)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    changed = 0
    for name, record in analysis.layers("conv", "norm", "group_norm"):
        layout = record.input if record.transposed else record.output
        if record.groups <= 1 or layout is None or name not in nodes or (record.kind != "norm" and
                                                                          record.groups_arg is None):
            continue  # module convs get their groups with their new weight (layer_kinds.fix_attributes)
        groups = _new_groups(analysis, plan, record, layout)
        if record.kind == "norm":
            module = gm.get_submodule(record.module)
            if not isinstance(module, nn.GroupNorm):
                continue
            set_group_norm_width(module, groups * (module.num_channels // module.num_groups))
        else:
            _set_literal(nodes[name], record.groups_arg, groups)
        changed += groups != record.groups
    return [f"regroup: {changed} group counts (grouped convs, GroupNorm) set to the new widths"] if changed else []


def resum(gm: torch.fx.GraphModule, analysis, plan, maps=None) -> list[str]:
    """Rewrite pass: every recorded sum/mean over a resized channel dim sums the surviving channels only (a mean
    divides by its original count); removed channels with a constant there are ``plan/fold``'s (kept or warned)."""
    records = {name: record for name, record in analysis.records.items() if isinstance(record, SumRecord)}
    kept = {name: _survivors(analysis, plan, record) for name, record in records.items()}
    kept = {name: index for name, index in kept.items() if index is not None}
    if not kept:
        return []
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, index in kept.items():
        _restrict(gm, nodes[name], records[name], index)
    gm.graph.lint()
    return [f"resum: {len(kept)} sums/means over channels restricted to the surviving channels"]


def _survivors(analysis, plan, record: SumRecord) -> torch.Tensor | None:
    """Positions of the surviving channels in the new layout (None when the dim keeps every channel)."""
    source = dim_map(analysis, plan, record.layout, record.dim).source
    if torch.equal(source, torch.arange(analysis.atoms.channels(record.layout) * record.layout.inner)):
        return None
    return torch.nonzero(source >= 0).flatten()


def _restrict(gm: torch.fx.GraphModule, node: torch.fx.Node, record: SumRecord, index: torch.Tensor) -> None:
    """``x.sum/mean(dims)`` -> ``index_select(x, dim, survivors).sum(dims)`` (÷ the original count for a mean)."""
    name = f"_nrfx_survivors_{node.name}"
    gm.register_buffer(name, index, persistent=False)
    x = node.args[0]
    with gm.graph.inserting_before(node):
        picked = gm.graph.call_function(torch.index_select, (x, record.dim, gm.graph.get_attr(name)))
    node.args = (picked, *node.args[1:])
    node.target = "sum" if node.op == "call_method" else torch.sum
    if record.kind != "mean":
        return
    with gm.graph.inserting_after(node):
        divided = gm.graph.call_function(operator.truediv, (node, record.count))
    node.replace_all_uses_with(divided, delete_user_cb=lambda user: user is not divided)


def reheads(gm: torch.fx.GraphModule, analysis, plan, maps=None) -> list[str]:
    """Rewrite pass: every size a view / reshape spells for attention heads (``ViewRecord``: a head count, or heads
    × head dim where heads merge back into channels) becomes the new width of its layout times its inner."""
    from nrfx.analysis.rules.movement import view_sizes

    nodes = {n.name: n for n in gm.graph.nodes}
    changed = 0
    for name, record in analysis.records.items():
        if not isinstance(record, ViewRecord) or not record.sizes or name not in nodes:
            continue  # a merge that spells no size (``-1``, ``flatten``) needs nothing
        sizes, put = view_sizes(nodes[name])
        new = list(sizes)
        for dim, layout in record.sizes:
            width = layout.inner * sum(len(plan.keep[s]) + plan.grow[s] for s in analysis.space_ids(layout))
            if width != layout.inner * sum(analysis.spaces[s].width for s in analysis.space_ids(layout)):
                new[dim] = width  # the same count stays as the code spells it
        if new != sizes:
            put(new)
            changed += 1
    return [f"reheads: {changed} attention head counts (view / reshape sizes) set to the new widths"] if changed else []
