"""Helpers shared by the op rules: dims, broadcasting, moving layouts between dims."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..spaces import Layout
from ..specs import TensorSpec, Zero

__all__ = ["SizeSpec", "norm_dim", "tensor_args", "broadcast", "move", "param_of", "copy_zero"]


@dataclass(frozen=True)
class SizeSpec:
    """The value of ``x.shape`` / ``x.size()``: reading a channel dim's size freezes it."""

    dims: tuple[Layout | None, ...]


def norm_dim(dim: int, ndim: int) -> int:
    """A non-negative dim index."""
    return dim + ndim if dim < 0 else dim


def tensor_args(ctx, args) -> list[tuple[TensorSpec, Any]]:
    """(spec, meta value) of every tensor among ``args``."""
    out = []
    for a in args:
        value = ctx.value(a)
        spec = ctx.spec(a)
        if isinstance(value, torch.Tensor) and isinstance(spec, TensorSpec):
            out.append((spec, value))
    return out


def copy_zero(ctx, spec: TensorSpec, dim: int, mask: str | None = None) -> Zero:
    """Zero rule: the output dim is zero where ``spec``'s ``dim`` is zero."""
    return Zero("copy", (spec.whole(dim, ctx.atoms.channels(spec.dims[dim])),), mask)


def broadcast(ctx, operands: list[Any], zero_op: str) -> TensorSpec:
    """Elementwise op with broadcasting: aligned channel dims are tied; size-1 dims do not couple.

    ``zero_op`` says when the result is zero: ``and`` (add/sub: every operand zero),
    ``or`` (mul: any operand zero) or ``first`` (div: the first operand zero).
    """
    out = ctx.out
    shape = tuple(out.shape)
    tensors = tensor_args(ctx, operands)
    first = ctx.spec(operands[0]) if operands else None
    scalars = len(tensors) < len(operands)
    dims, zeros = [], []
    for d in range(len(shape)):
        layouts, sources, plain, skipped = [], [], False, scalars
        for spec, _ in tensors:
            k = d - (len(shape) - spec.ndim)
            if k < 0 or (spec.shape[k] == 1 and shape[d] != 1):
                skipped = True
                continue
            layout = spec.dims[k]
            if layout is None:
                plain = True
                continue
            layouts.append(layout)
            sources.append((spec, k))
        if not layouts:
            dims.append(None)
            zeros.append(None)
            continue
        for other in layouts[1:]:
            ctx.unify(layouts[0], other, "elementwise operands")
        if plain:
            ctx.freeze(layouts[0], "channels meet a plain dim in an elementwise op")
        dims.append(layouts[0])
        zeros.append(_broadcast_zero(ctx, sources, zero_op, plain or skipped, first))
    return ctx.tensor(shape, tuple(dims), tuple(zeros))


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
