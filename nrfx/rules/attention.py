"""Rules for matrix products and attention: matmul/bmm/mm, MultiheadAttention, SDPA."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..specs import TensorSpec
from .common import copy_zero, tensor_args
from .registry import function_rule, method_rule, module_rule

__all__: list[str] = []


def _matmul(ctx, node):
    """a @ b: a's last dim and b's second-to-last are one space (contracted); MACs = out × k."""
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
    dims = [None] * out.ndim
    zeros = [None] * out.ndim
    for spec, src, dst in ((a, a.ndim - 2, out.ndim - 2), (b, b.ndim - 1, out.ndim - 1)):
        if spec.dims[src] is not None:
            dims[dst] = spec.dims[src]
            zeros[dst] = copy_zero(ctx, spec, src)
    for d in range(out.ndim - 2):
        ctx.freeze(_batch_dim(a, d, out.ndim), "batch dim of a matmul")
        ctx.freeze(_batch_dim(b, d, out.ndim), "batch dim of a matmul")
    plain = math.prod(s for s, lay in zip(out.shape, dims, strict=True) if lay is None)
    ctx.add_macs(plain * (k if contract is None else 1), contract, *dims)
    return ctx.tensor(out.shape, tuple(dims), tuple(zeros))


def _batch_dim(spec: TensorSpec, d: int, out_ndim: int):
    """Layout of a broadcast batch dim of a matmul operand (None when absent)."""
    k = d - (out_ndim - spec.ndim)
    return spec.dims[k] if k >= 0 else None


function_rule(torch.matmul, operator.matmul, torch.bmm, torch.mm)(_matmul)
method_rule("matmul", "bmm", "mm")(_matmul)


@function_rule(F.scaled_dot_product_attention)
def sdpa(ctx, node):
    """SDPA: q·kᵀ contracts the head dim (frozen: the 1/√d scale depends on it); v's dim flows out."""
    q, k, v = (ctx.spec(a) for a in node.args[:3])
    qv, kv = ctx.value(node.args[0]), ctx.value(node.args[1])
    rows = math.prod(qv.shape[:-1]) * kv.shape[-2]
    head = ctx.unify(q.dims[-1], k.dims[-1], "q and k head dims") if (q.dims[-1] or k.dims[-1]) else None
    ctx.freeze(head, "attention scale depends on the head dim")
    for spec in (q, k, v):
        for d in range(spec.ndim - 1):
            ctx.freeze(spec.dims[d], "attention mixes tokens")
    ctx.consume(v, v.ndim - 1)
    ctx.add_macs(rows * qv.shape[-1])
    ctx.add_macs(rows * (1 if v.dims[-1] is not None else v.shape[-1]), v.dims[-1])
    out = ctx.out
    dims = (None,) * (out.ndim - 1) + (v.dims[-1],)
    zero = (None,) * (out.ndim - 1) + ((copy_zero(ctx, v, v.ndim - 1),) if v.dims[-1] is not None else (None,))
    return ctx.tensor(out.shape, dims, zero)


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
    """einsum of two operands: a label in both is contracted (consumed, one space) or a frozen batch
    dim; a label of one operand kept in the output carries its space there; MACs = Π of those labels."""
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


def _einsum_label(ctx, label, where, kept: bool, dims: dict):
    """Tie, consume or freeze the dims of one label; return the layout its MACs scale with (or None)."""
    if len(where) == 2:
        (a, da), (b, db) = where
        if kept:
            ctx.freeze(a.dims[da], "batch dim of an einsum")
            ctx.freeze(b.dims[db], "batch dim of an einsum")
            return None
        first, second = ctx.consume(a, da), ctx.consume(b, db)
        if first is None and second is None:
            return None
        return ctx.unify(first, second, "contracted by an einsum")
    spec, d = where[0]
    layout = spec.dims[d]
    if not kept:
        ctx.freeze(layout, "summed over by an einsum")
        return None
    if layout is not None:
        dims[label] = (layout, copy_zero(ctx, spec, d))
    return layout
