"""The taint run's arithmetic: which values the inputs decide.

``plan/fold`` runs the model the rewrite assumes on NaN inputs to tell which removed inputs of a consumer depend
on the inputs at all (a gate saturated on every example can make them look constant there).  NaN stands for
"some value the inputs decide"; the dispatch mode here keeps that meaning where IEEE arithmetic does not:

* an exact 0 absorbs: ``0 · NaN`` and ``0 / NaN`` are 0, so is a matrix product's entry whose row or column of a
  factor is all zeros, and attention's output over an all-zero value channel (a fused CPU kernel's 0 for NaN
  queries or keys becomes NaN again); an embedding lookup gives NaN;
* a bool or integer tensor cannot hold NaN: where a comparison (``x > 0``), an ``argmax`` or ``topk`` reads a
  NaN, the mode marks the elements the inputs decide, a mark follows the tensor through pointwise ops, views and
  concatenations (through any other op it covers the whole output), and a float computed from a marked element
  is NaN there: a ReLU written ``x * (x > 0)`` or a hard sigmoid written with ``torch.where`` keeps the taint;
* the model's integer and bool inputs (token ids, labels, masks) are marked whole: a parameter indexed by a label
  (a class-conditional gate) is NaN;
* a float op that drops a NaN (``sign``, ``nan_to_num``, ``fmax``) gives NaN where it read one.

Over-marking only keeps a channel that could have been folded; a lost mark could fold a varying value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from functools import cache
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

__all__ = ["NanTaint", "integer_inputs", "poisoned"]

_NAN = float("nan")
aten = torch.ops.aten


class NanTaint(TorchDispatchMode):
    """NaN (and, in bool or integer tensors, a mark) stands for a value the inputs decide; an exact zero absorbs it
    (the module docstring lists the rules)."""

    def __init__(self, undecided: Iterable[torch.Tensor] = ()) -> None:
        """``undecided``: bool or integer tensors whose every element the inputs decide (the model's integer
        inputs: token ids, class labels)."""
        super().__init__()
        self._marks = WeakTensorKeyDictionary()
        for tensor in undecided:
            self._marks[tensor] = torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _absorbing(func, args, kwargs)
        self._carry(func, args, kwargs, out)
        return out

    def undecided(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Where a bool or integer tensor made under this mode holds values the inputs decide (None: nowhere)."""
        return self._marks.get(tensor)

    def _carry(self, func, args: tuple, kwargs: dict, out: Any) -> None:
        """Rule: an output element is undecided where it reads an undecided one; NaN carries itself through floats
        (but through ``_NAN_DROPPING``), a mark through bool and integer tensors, and a float is NaN where a mark
        reaches it."""
        results = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        floats_only = all(t.is_floating_point() for t in results) and func not in _NAN_DROPPING
        if func in _VALUE_BLIND or (floats_only and not len(self._marks)):
            return  # the common case: floats from floats, nothing marked (NaN carries itself)
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        for result in results:
            floating = result.is_floating_point()
            marks = [(t, m) for t in inputs if (m := self._mark(t, not floating or func in _NAN_DROPPING)) is not None]
            if not marks:
                continue
            where = _spread(func, args, kwargs, marks, result)
            if floating:
                result.masked_fill_(where, _NAN)
            else:
                self._marks[result] = where

    def _mark(self, tensor: torch.Tensor, nan: bool) -> torch.Tensor | None:
        """An input's undecided elements: its mark, or (``nan``) where a float holds NaN; None where there are none."""
        if tensor.is_floating_point():
            mark = torch.isnan(tensor) if nan else None
        else:
            mark = self._marks.get(tensor)
        return mark if mark is not None and bool(mark.any()) else None


def _spread(func, args: tuple, kwargs: dict, marks: list[tuple[torch.Tensor, torch.Tensor]],
            result: torch.Tensor) -> torch.Tensor:
    """Where the inputs' undecided elements reach an output: elementwise (broadcast) for a pointwise op, the view
    or concatenation of the marks for a view or ``cat``, the whole output otherwise."""
    try:
        if _pointwise(func):
            return _or(m.expand(result.shape) for _, m in marks)
        if func.is_view and func not in _STRIDED and len(marks) == 1 and marks[0][0] is args[0]:
            return _checked(func(marks[0][1], *args[1:], **kwargs), result)
        if func in (aten.cat.default, aten.stack.default):
            masks = dict((id(t), m) for t, m in marks)
            parts = [masks.get(id(t), torch.zeros(t.shape, dtype=torch.bool, device=t.device)) for t in args[0]]
            return _checked(func(parts, *args[1:], **kwargs), result)
    except (RuntimeError, TypeError, IndexError, ValueError):
        pass  # the op does not take a mark for its tensor: the whole output
    return torch.ones(result.shape, dtype=torch.bool, device=result.device)


def _checked(mark: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """A mark computed by the op itself, if it has the output's shape (else a RuntimeError: the whole output)."""
    if mark.shape != result.shape:
        raise RuntimeError("the op's mark does not have its output's shape")
    return mark


def _or(masks) -> torch.Tensor:
    """The union of broadcast masks."""
    masks = list(masks)
    union = masks[0].clone()
    for mask in masks[1:]:
        union |= mask
    return union


@cache
def _pointwise(func) -> bool:
    """Whether an aten op computes each output element from the same element of its (broadcast) inputs; an in-place
    op as its functional form, a dtype conversion too."""
    if func in _CONVERSIONS or torch.Tag.pointwise in func.tags:
        return True
    name = func._schema.name.split("::")[-1]
    functional = getattr(getattr(aten, name[:-1], None), func._overloadname, None) if name.endswith("_") else None
    return functional is not None and torch.Tag.pointwise in functional.tags


_STRIDED = frozenset({aten.as_strided.default})  # reads the storage's strides, which a mark does not share
_CONVERSIONS = frozenset({aten._to_copy.default, aten.to.dtype, aten.to.device, aten.to.dtype_layout,
                          aten.type_as.default, aten.copy_.default, aten.clone.default})
_NAN_DROPPING = frozenset({aten.sign.default, aten.sgn.default, aten.nan_to_num.default, aten.fmax.default,
                           aten.fmin.default, aten.heaviside.default})
_VALUE_BLIND = frozenset({aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
                          aten.full_like.default, aten.new_zeros.default, aten.new_ones.default,
                          aten.new_empty.default, aten.new_full.default, aten.rand_like.default,
                          aten.randn_like.default, aten.randint_like.default, aten.new_empty_strided.default})


def _absorbing(func, args: tuple, kwargs: dict) -> Any:
    """The op's result where an exact zero absorbs NaN (products, quotients, matrix products, attention) and an
    embedding lookup is NaN."""
    if func in _PRODUCTS or func in _QUOTIENTS:
        zero = _is_zero(args[0]) | _is_zero(args[1]) if func in _PRODUCTS else _is_zero(args[0])
        out = func(*args, **kwargs)
        return out.masked_fill_(zero, 0) if isinstance(zero, torch.Tensor) else out.fill_(0) if zero else out
    if func in _MATMULS:
        return _matmul(func, args, kwargs)
    out = func(*args, **kwargs)
    if func.overloadpacket.__name__.startswith("_scaled_dot_product") and isinstance(out, tuple):
        _attention(out[0], *args[:3])
    return out.fill_(_NAN) if func is aten.embedding.default else out


_PRODUCTS = frozenset({aten.mul.Tensor, aten.mul_.Tensor, aten.mul.Scalar, aten.mul_.Scalar})
_QUOTIENTS = frozenset({aten.div.Tensor, aten.div_.Tensor})
_MATMULS = {aten.mm.default: 0, aten.bmm.default: 0,  # -> where its two factors are
            aten.addmm.default: 1, aten.baddbmm.default: 1}


def _attention(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Attention's output, in place: NaN in every row whose query or keys hold a NaN (a fused CPU kernel returns 0
    there), then 0 over an all-zero value channel, whatever the weights."""
    if not query.shape[:-2] == key.shape[:-2] == value.shape[:-2] == out.shape[:-2]:
        return  # grouped-query kv heads: left as the kernel gave them
    undecided = torch.isnan(query).any(-1, keepdim=True) | torch.isnan(key).any(-1).any(-1)[..., None, None]
    out.masked_fill_(undecided, _NAN).masked_fill_((value == 0).all(-2, keepdim=True), 0)


def _matmul(func, args: tuple, kwargs: dict) -> torch.Tensor:
    """A matrix product: 0 where a row of the left factor or a column of the right one is all exact zeros
    (``addmm``/``baddbmm``: the added term there)."""
    first = _MATMULS[func]
    left, right = args[first], args[first + 1]
    zero = (left == 0).all(-1, keepdim=True) | (right == 0).all(-2, keepdim=True)
    if first == 0:
        return func(*args, **kwargs).masked_fill_(zero, 0)
    product = torch.matmul(left, right).masked_fill_(zero, 0)
    return kwargs.get("beta", 1) * args[0] + kwargs.get("alpha", 1) * product


def _is_zero(value: Any) -> torch.Tensor | bool:
    """Where a factor is exactly 0 (a tensor mask, or a bool for a number)."""
    return value == 0 if isinstance(value, torch.Tensor) else bool(value == 0)


def poisoned(example):
    """The example with every floating-point tensor NaN; integer and bool inputs stay (``integer_inputs``: marked
    undecided whole, as an embedding lookup or an index into a parameter reads them)."""
    def poison(leaf: Any) -> Any:
        return torch.full_like(leaf, _NAN) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() else leaf
    args, kwargs = pytree.tree_map(poison, (example.args, example.kwargs))
    return replace(example, args=args, kwargs=kwargs)


def integer_inputs(example) -> list[torch.Tensor]:
    """The example's tensors that cannot hold NaN (token ids, labels, masks)."""
    leaves = pytree.tree_leaves((example.args, example.kwargs))
    return [t for t in leaves if isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex()]
