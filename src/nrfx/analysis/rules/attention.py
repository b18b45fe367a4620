"""Rules for matrix products and attention: matmul/bmm/mm, MultiheadAttention, SDPA."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from nrfx.analysis.rules.common import copy_zero, tensor_args
from nrfx.analysis.rules.registry import function_rule, method_rule, module_rule
from nrfx.analysis.spaces import Layout
from nrfx.analysis.specs import TensorSpec, Zero

__all__: list[str] = []


def _matmul(ctx, node):
    """a @ b: a's last dim and b's second-to-last are one space (contracted: between two activations it may
    shrink, never grow); MACs = out × k."""
    pair = tensor_args(ctx, node.args[:2])
    out = ctx.out
    if len(pair) != 2 or pair[0][0].ndim < 2 or pair[1][0].ndim < 2:
        return ctx.unknown_op(f"{getattr(node.target, '__name__', node.target)} on vectors")
    (a, _), (b, _) = pair
    k = a.shape[-1]
    contract = ctx.consume(a, a.ndim - 1)
    other = ctx.consume(b, b.ndim - 2)
    if contract is not None or other is not None:
        contract = ctx.unify(contract, other, "contracted by a matmul")
    if contract is not None and other is not None:
        ctx.atoms.mark_contracted(contract)
    dims = [None] * out.ndim
    zeros = [None] * out.ndim
    for spec, src, dst in ((a, a.ndim - 2, out.ndim - 2), (b, b.ndim - 1, out.ndim - 1)):
        if spec.dims[src] is not None:
            dims[dst] = spec.dims[src]
            zeros[dst] = copy_zero(ctx, spec, src)
    for d in range(out.ndim - 2):
        dims[d], zeros[d] = _batch_heads(ctx, a, b, d, out)
    plain = math.prod(s for s, lay in zip(out.shape, dims, strict=True) if lay is None)
    ctx.add_macs(plain * (k if contract is None else 1), contract, *dims)
    return ctx.tensor(out.shape, tuple(dims), tuple(zeros))


def _batch_heads(ctx, a: TensorSpec, b: TensorSpec, d: int, out):
    """Rule: a batch dim of a matmul carrying attention heads on both operands (or on one, the other broadcast
    with size 1) is one head space, flowing to the output (each head multiplies on its own); any other channel
    layout on a batch dim freezes.  Returns (layout, zero rule) of the output dim."""
    sides = [(spec, k) for spec in (a, b) if (k := d - (out.ndim - spec.ndim)) >= 0]
    present = [(spec, k) for spec, k in sides if spec.dims[k] is not None]
    broadcast = all(spec.dims[k] is not None or spec.shape[k] == 1 for spec, k in sides)
    return heads_of_batch(ctx, present, broadcast, "a matmul")


def heads_of_batch(ctx, present: list[tuple[TensorSpec, int]], joinable: bool, what: str):
    """Rule: a batch dim carrying attention heads on every operand that has a layout there (``joinable``: any
    other operand is broadcast) is one head space flowing out, zero where an operand's head is (a product); any
    other channel layout there freezes.  Returns (layout, zero rule) of the output dim, (None, None) when none."""
    if not present:
        return None, None
    layout = None
    if joinable and all(ctx.atoms.is_heads(spec.dims[k]) for spec, k in present):
        layout = join_heads(ctx, [spec.dims[k] for spec, k in present], f"attention heads of {what}")
    if layout is None:
        for spec, k in present:
            ctx.freeze(spec.dims[k], f"batch dim of {what}")
        return None, None
    segments = tuple(spec.whole(k, ctx.atoms.channels(spec.dims[k])) for spec, k in present
                     if spec.dims[k].inner == layout.inner and ctx.atoms.channels(spec.dims[k]) ==
                     ctx.atoms.channels(layout))  # a repeated kv side says nothing per query head
    return layout, Zero("or", segments)


def join_heads(ctx, layouts: list, reason: str):
    """Rule: the head layouts one attention op reads on a batch dim are one head space; a side with r times
    fewer heads (``enable_gqa``, or kv heads repeated by ``expand`` + ``reshape``: each spans r) is tied to the
    query heads in groups of r (grouped-query attention: a kv head and its r query heads move together).
    Returns the query heads' layout (the output's), or None when the heads do not pair up."""
    atoms = ctx.atoms
    query = max(layouts, key=lambda lay: (atoms.channels(lay), -lay.inner))
    for other in layouts:
        if other is query:
            continue
        ratio, rest = divmod(atoms.channels(query), atoms.channels(other))
        if ratio == 1 and other.inner == query.inner:
            query = ctx.unify(query, other, reason)
        elif ratio > 1 and not rest and query.inner == 1 and other.inner in (1, ratio):
            atoms.tie_blocks(query, Layout(other.atoms), ratio, 1,
                             f"grouped-query attention: {ratio} query heads per kv head [{ctx.where}]")
            atoms.mark_attended(other)
        else:
            return None
    atoms.mark_attended(query)
    return query


function_rule(torch.matmul, operator.matmul, torch.bmm, torch.mm)(_matmul)
method_rule("matmul", "bmm", "mm")(_matmul)


@function_rule(F.scaled_dot_product_attention)
def sdpa(ctx, node):
    """SDPA: q·kᵀ contracts the head dim (frozen: 1/√d reads it); v's dim flows out; batch-dim heads are one space.

    A batch dim carrying attention heads in q, k and v is one head space (heads are independent), kept and added
    whole (``_sdpa_heads``)."""
    q, k, v = (ctx.spec(a) for a in node.args[:3])
    qv, kv, vv = ctx.value(node.args[0]), ctx.value(node.args[1]), ctx.value(node.args[2])
    head = ctx.unify(q.dims[-1], k.dims[-1], "q and k head dims") if (q.dims[-1] or k.dims[-1]) else None
    ctx.freeze(head, "attention scale depends on the head dim")
    heads = _sdpa_heads(ctx, node, (q, k, v))
    for spec in (q, k, v):
        for d in range(spec.ndim - 1):
            if d >= spec.ndim - 2 or d >= len(heads) or heads[d] is None:
                ctx.freeze(spec.dims[d], "attention mixes tokens")
    ctx.consume(v, v.ndim - 1)
    head_layouts = [lay for lay in heads if lay is not None]
    per_head = math.prod(qv.shape[d] for d in range(qv.ndim - 2) if heads[d] is None)
    rows = per_head * qv.shape[-2] * kv.shape[-2]
    ctx.add_macs(rows * qv.shape[-1], *head_layouts)
    ctx.add_macs(rows * (1 if v.dims[-1] is not None else vv.shape[-1]), v.dims[-1], *head_layouts)
    out = ctx.out
    dims = (*heads[:out.ndim - 2], None, v.dims[-1])
    zero = [None] * out.ndim
    for d, layout in enumerate(dims):
        if layout is not None and d < out.ndim - 2:
            zero[d] = Zero("none")
    if v.dims[-1] is not None:
        zero[-1] = copy_zero(ctx, v, v.ndim - 1)
    return ctx.tensor(out.shape, dims, tuple(zero))


def _sdpa_heads(ctx, node, qkv) -> list:
    """Rule: the layout of every batch dim of SDPA's q, k, v (None where plain): attention heads in all three (the
    same count, or r times fewer in k and v: grouped-query attention, see ``join_heads``; an ``attn_mask``
    broadcast over them, or carrying one entry per head: ``_mask_heads``) are one head space; any other channel
    layout on a batch dim freezes."""
    q = qkv[0]
    mask = ctx.spec(node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask"))
    gqa = bool(node.kwargs.get("enable_gqa", False))
    out = []
    for d in range(q.ndim - 2):
        specs = [s for s in qkv if s.ndim == q.ndim]
        layouts = [s.dims[d] for s in specs]
        extra = []
        if isinstance(mask, TensorSpec) and (m := d - (q.ndim - mask.ndim)) >= 0 and mask.shape[m] != 1:
            extra = [mask.dims[m]]
        present = [lay for lay in layouts + extra if lay is not None]
        if not present:
            out.append(None)
            continue
        same = len(specs) == 3 and (gqa or len({s.shape[d] for s in specs}) == 1)
        layout = None
        if same and None not in layouts + extra and all(ctx.atoms.is_heads(lay) for lay in layouts):
            layout = join_heads(ctx, layouts, "q, k and v heads of attention")
        if layout is not None and extra:
            layout = _mask_heads(ctx, layout, extra[0])
        if layout is None:
            for lay in present:
                ctx.freeze(lay, "batch dim of attention: q, k and v heads do not pair up")
        out.append(layout)
    return out


def _mask_heads(ctx, heads, mask):
    """Rule: an ``attn_mask`` carrying a channel layout on the heads dim (T5's relative position bias: a table
    with one column per head) has one entry per query head: it joins the head space (its table resized with the
    heads); anything else freezes the heads.  Returns the head layout, or None."""
    if mask.inner != heads.inner or ctx.atoms.channels(mask) != ctx.atoms.channels(heads):
        return None
    return ctx.unify(heads, mask, "attention mask per head")


@module_rule(nn.MultiheadAttention)
def multihead_attention(ctx, node):
    """nn.MultiheadAttention: its embedding dims are frozen; MACs of projections and attention."""
    m = ctx.module
    query, key, value = (ctx.spec(ctx.arg(i, n)) for i, n in enumerate(("query", "key", "value")))
    for spec in (query, key, value):
        ctx.freeze_all(spec, "input of MultiheadAttention")
    qv, kv = ctx.value(ctx.arg(0, "query")), ctx.value(ctx.arg(1, "key"))
    batched = qv.dim() == 3
    tokens_q = qv.shape[:-1].numel()
    tokens_k = kv.shape[:-1].numel()
    src_len = kv.shape[1 if m.batch_first else 0] if batched else kv.shape[0]
    e = m.embed_dim
    ctx.add_macs(tokens_q * e * e + tokens_k * m.kdim * e + tokens_k * m.vdim * e)
    ctx.add_macs(2 * tokens_q * src_len * e)
    ctx.add_macs(tokens_q * e * e)
    spec = ctx.blank(ctx.out)
    ctx.freeze_all(spec, "output of MultiheadAttention")
    return spec


def _einsum_labels(equation: str, ndims: list[int]) -> tuple[list[str], str] | None:
    """Input and output labels of an einsum equation (None for '...', diagonals or a rank mismatch)."""
    equation = equation.replace(" ", "")
    if "..." in equation:
        return None
    inputs, arrow, output = equation.partition("->")
    labels = inputs.split(",")
    if not arrow:
        joined = "".join(labels)
        output = "".join(sorted(c for c in set(joined) if joined.count(c) == 1))
    if len(labels) != len(ndims):
        return None
    if any(len(lab) != n or len(set(lab)) != n for lab, n in zip(labels, ndims, strict=True)):
        return None
    return labels, output


@function_rule(torch.einsum)
def einsum(ctx, node):
    """einsum of two operands: a label in both is contracted (consumed, one space) or a batch dim (attention
    heads flow out, others freeze); a label of one operand kept in the output carries its space there; MACs = Π of
    those labels."""
    operands = node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = operands[0]
    specs = [ctx.spec(o) for o in operands]
    parsed = None
    if len(specs) == 2 and all(isinstance(s, TensorSpec) for s in specs):
        parsed = _einsum_labels(node.args[0], [s.ndim for s in specs])
    if parsed is None or not _same_label_sizes(specs, parsed[0]):
        return ctx.unknown_op("function torch.einsum (two operands, no '...', no diagonals)")
    (a_labels, b_labels), out_labels = parsed
    dims: dict[str, object] = {}
    coef, mac_layouts = 1, []
    for label in dict.fromkeys(a_labels + b_labels):
        where = [(s, lab.index(label)) for s, lab in zip(specs, (a_labels, b_labels), strict=True) if label in lab]
        size = where[0][0].shape[where[0][1]]
        layout = _einsum_label(ctx, label, where, label in out_labels, dims)
        if len(where) == 1 and label not in out_labels:
            continue
        if layout is None:
            coef *= size
        else:
            mac_layouts.append(layout)
    ctx.add_macs(coef, *mac_layouts)
    out = ctx.out
    layouts = tuple(dims.get(label, (None, None))[0] for label in out_labels)
    zeros = tuple(dims.get(label, (None, None))[1] for label in out_labels)
    return ctx.tensor(out.shape, layouts, zeros)


def _same_label_sizes(specs, labels) -> bool:
    """Whether every label has one size across the operands (no broadcasting)."""
    sizes: dict[str, int] = {}
    for spec, lab in zip(specs, labels, strict=True):
        for d, label in enumerate(lab):
            if sizes.setdefault(label, spec.shape[d]) != spec.shape[d]:
                return False
    return True


def _einsum_batch(ctx, label, where, dims: dict):
    """Rule: a label kept from both operands is a batch dim; carrying attention heads on both (``"bghid,bghjd->
    bghij"``: torchvision's MaxViT) it is one head space flowing to the output, as a matmul's; any other channel
    layout there freezes.  Returns the layout its MACs scale with (or None)."""
    present = [(spec, d) for spec, d in where if spec.dims[d] is not None]
    layout, zero = heads_of_batch(ctx, present, len(present) == 2, "an einsum")
    if layout is not None:
        dims[label] = (layout, zero)
    return layout


def _einsum_label(ctx, label, where, kept: bool, dims: dict):
    """Tie, consume or freeze the dims of one label; return the layout its MACs scale with (or None)."""
    if len(where) == 2:
        (a, da), (b, db) = where
        if kept:
            return _einsum_batch(ctx, label, where, dims)
        first, second = ctx.consume(a, da), ctx.consume(b, db)
        if first is None and second is None:
            return None
        if first is not None and second is not None:
            ctx.atoms.mark_contracted(first)
        return ctx.unify(first, second, "contracted by an einsum")
    spec, d = where[0]
    layout = spec.dims[d]
    if not kept:
        ctx.freeze(layout, "summed over by an einsum")
        return None
    if layout is not None:
        dims[label] = (layout, copy_zero(ctx, spec, d))
    return layout
