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
    plain = math.prod(s for s, lay in zip(out.shape, dims) if lay is None)
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
