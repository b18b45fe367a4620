"""Helpers shared by the op rules: dims, broadcasting, moving layouts between dims."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nrfx.analysis.spaces import Layout
from nrfx.analysis.specs import TensorSpec, Zero

__all__ = ["SizeSpec", "norm_dim", "tensor_args", "broadcast", "move", "param_of", "copy_zero", "channel_param"]


@dataclass(frozen=True)
class SizeSpec:
    """The value of ``x.shape`` / ``x.size()``: reading a channel dim's size freezes it."""

    dims: tuple[Layout | None, ...]


def norm_dim(dim: int, ndim: int) -> int:
    """A non-negative dim index."""
    return dim + ndim if dim < 0 else dim


def tensor_args(ctx, args) -> list[tuple[TensorSpec, Any]]:
    """(spec, meta value) of every tensor among ``args``: a list of nodes, or one node holding a sequence
    computed in the graph (``torch.cat(x.chunk(2, 1)[::-1], 1)``)."""
    if isinstance(args, torch.fx.Node):
        specs, values = ctx.spec(args), ctx.value(args)
        pairs = zip(specs, values, strict=False) if isinstance(specs, (list, tuple)) and isinstance(
            values, (list, tuple)) else ()
    else:
        pairs = ((ctx.spec(a), ctx.value(a)) for a in args)
    return [(spec, value) for spec, value in pairs
            if isinstance(value, torch.Tensor) and isinstance(spec, TensorSpec)]


def copy_zero(ctx, spec: TensorSpec, dim: int, mask: str | None = None) -> Zero:
    """Zero rule: the output dim is zero where ``spec``'s ``dim`` is zero."""
    return Zero("copy", (spec.whole(dim, ctx.atoms.channels(spec.dims[dim])),), mask)


def broadcast(ctx, operands: list[Any], zero_op: str) -> TensorSpec:
    """Elementwise op with broadcasting: aligned channel dims are tied; size-1 dims do not couple (one
    channel broadcast against a wider dim freezes: a rewrite must keep it one wide).

    ``zero_op`` says when the result is zero: ``and`` (add/sub: every operand zero),
    ``or`` (mul: any operand zero) or ``first`` (div: the first operand zero).  A per-channel
    parameter (``channel_param``: GRN's weight and bias, a layer scale) aligned with a channel dim
    takes that space and is resized with it; like a norm's β it is no zero source (a constant it
    adds to a removed channel is folded into the next layer).
    """
    out = ctx.out
    shape = tuple(out.shape)
    tensors = [(a, *pair) for a in operands for pair in tensor_args(ctx, [a])]
    first = ctx.spec(operands[0]) if operands else None
    scalars = len(tensors) < len(operands)
    params = {id(a): channel_param(ctx, a) for a, _, _ in tensors}
    dims, zeros = [], []
    for d in range(len(shape)):
        layouts, sources, plain, skipped, held, activations = [], [], False, scalars, [], 0
        for operand, spec, _ in tensors:
            k = d - (len(shape) - spec.ndim)
            if k < 0 or (spec.shape[k] == 1 and shape[d] != 1):
                skipped = True
                if k >= 0:  # one channel read against many (a 1-channel attention map): its width must stay 1
                    ctx.freeze(spec.dims[k], "a single channel broadcast against a wider dim")
                continue
            layout = spec.dims[k]
            if layout is None and params[id(operand)] is not None and params[id(operand)][3] == k:
                held.append(params[id(operand)])
                continue
            if layout is None:
                plain = True
                continue
            layouts.append(layout)
            sources.append((spec, k))
            activations += not _is_parameter(ctx, operand)
        if not layouts:
            dims.append(None)
            zeros.append(None)
            plain = plain or bool(held)
            continue
        for other in layouts[1:]:
            ctx.unify(layouts[0], other, "elementwise operands")
        if zero_op == "and" and activations > 1:
            ctx.atoms.mark_summed(layouts[0])
        for name, param_shape, p, _ in held:
            ctx.param_named(name, param_shape, tuple(layouts[0] if i == p else None for i in range(len(param_shape))))
        if plain:
            ctx.freeze(layouts[0], "channels meet a plain dim in an elementwise op")
        dims.append(layouts[0])
        zeros.append(_broadcast_zero(ctx, sources, zero_op, plain or skipped, first))
    return ctx.tensor(shape, tuple(dims), tuple(zeros))


_VIEWS = frozenset({"view", "reshape", "unsqueeze", "expand", "contiguous", "to", "type_as"})


def _behind_views(node: Any) -> Any:
    """The node a chain of views (view, reshape, unsqueeze, expand, …) reads."""
    while getattr(node, "op", None) in ("call_method", "call_function") and (
            node.target in _VIEWS or getattr(node.target, "__name__", None) in ("reshape", "unsqueeze")):
        node = node.args[0]
    return node


def _is_parameter(ctx, node: Any) -> bool:
    """Whether an operand is a parameter or buffer, read directly or through views (not an activation)."""
    return param_of(ctx, _behind_views(node))[0] is not None


def channel_param(ctx, node: Any) -> tuple[str, tuple[int, ...], int, int] | None:
    """Rule: a parameter or buffer with one non-1 dim ``p``, reached through views only, read where that dim is
    dim ``k`` of the operand: (name, its shape, p, k); None for anything else."""
    value = ctx.value(node)
    name, param_shape = param_of(ctx, _behind_views(node))
    if name is None or not isinstance(value, torch.Tensor) or name not in ctx.state.param_names:
        return None
    wide = [i for i, n in enumerate(param_shape) if n != 1]
    seen = [i for i, n in enumerate(value.shape) if n != 1]
    if len(wide) != 1 or len(seen) != 1 or param_shape[wide[0]] != value.shape[seen[0]]:
        return None
    return name, param_shape, wide[0], seen[0]


def _broadcast_zero(ctx, sources, zero_op: str, partial: bool, first) -> Zero:
    """The zero rule of one output dim of an elementwise op."""
    segs = tuple(s.whole(k, ctx.atoms.channels(s.dims[k])) for s, k in sources)
    if zero_op == "or":
        return Zero("or", segs)
    if zero_op == "first":
        spec, _ = sources[0]
        return Zero("copy", (segs[0],)) if spec is first else Zero("none")
    if partial:
        return Zero("none")
    return Zero("and", segs)


def move(ctx, spec: TensorSpec, order: list[int | None], shape) -> TensorSpec:
    """Output dim i takes input dim ``order[i]`` (None: a new plain dim)."""
    dims, zeros = [], []
    for src in order:
        if src is None or spec.dims[src] is None:
            dims.append(None)
            zeros.append(None)
        else:
            dims.append(spec.dims[src])
            zeros.append(copy_zero(ctx, spec, src))
    return ctx.tensor(shape, tuple(dims), tuple(zeros))


def param_of(ctx, arg: Any) -> tuple[str | None, tuple[int, ...] | None]:
    """Name and shape of a parameter passed to a functional op (a get_attr node)."""
    if getattr(arg, "op", None) == "get_attr":
        value = ctx.value(arg)
        return arg.target, tuple(value.shape)
    return None, None
