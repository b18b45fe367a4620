"""Output shapes of the common ops by formula, so shape propagation rarely runs a meta kernel.

Running an op on meta tensors goes through Python decompositions: a batch norm costs ~2 ms,
an activation ~1 ms, a layer norm ~5 ms, while its output shape is a one-line formula.  Each
rule here returns the meta output of one op from the meta inputs, or ``None`` when the case
is not plain (odd dtypes, mismatched sizes, extra keywords): the caller then runs the real
meta kernel, which also raises the real error for a bad shape.  A rule never guesses.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nrfx.ops.optable import OpTable
from nrfx.ops.vocabulary import Trait, functions_with, methods_with, modules_with

__all__ = ["FORMULAS", "module_shape", "function_shape", "method_shape"]

Shape = Callable[..., Any]


def _empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A meta tensor (``torch.empty`` is ~40× cheaper than ``empty_like``)."""
    return torch.empty(tuple(shape), dtype=dtype, device="meta")


def _broadcast(*shapes) -> tuple[int, ...] | None:
    """NumPy broadcasting of sizes, or None when they do not broadcast (torch's version is ~50× slower)."""
    ndim = max(len(s) for s in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1:
                if out[i] != 1 and out[i] != size:
                    return None
                out[i] = size
    return tuple(out)


def _float(x: Any) -> bool:
    """A floating-point meta tensor."""
    return isinstance(x, torch.Tensor) and x.is_meta and x.is_floating_point()


# -- same shape as the input ------------------------------------------------------------------------
def _same(x, *args, **kwargs):
    """Channel-wise op: the output has the input's shape and dtype."""
    return _empty(x.shape, x.dtype) if _float(x) and not kwargs.get("dtype") else None


def _same_module(m: nn.Module, x, *args, **kwargs):
    """Channel-wise module called on one tensor."""
    return _same(x) if not args and not kwargs else None


def _batch_norm_module(m: nn.Module, x, *args, **kwargs):
    """BatchNorm / InstanceNorm: same shape when the channel count matches."""
    if args or kwargs or not _float(x) or x.ndim < 2 or m.num_features != x.shape[1]:
        return None
    return _same(x)


def _layer_norm_module(m: nn.Module, x, *args, **kwargs):
    """LayerNorm / RMSNorm: same shape when the trailing dims are the normalised shape."""
    shape = tuple(m.normalized_shape)
    if args or kwargs or not _float(x) or tuple(x.shape[x.ndim - len(shape):]) != shape:
        return None
    return _same(x)


def _group_norm_module(m: nn.Module, x, *args, **kwargs):
    """GroupNorm: same shape when the channel count matches."""
    if args or kwargs or not _float(x) or x.ndim < 2 or x.shape[1] != m.num_channels:
        return None
    return _same(x)


# -- conv, linear, pooling -------------------------------------------------------------------------------
def _conv_module(m: nn.Module, x, *args, **kwargs):
    """Conv1d/2d/3d: (N, C_out, *L_out) with L_out from padding, dilation, kernel and stride."""
    n = len(m.kernel_size)
    if args or kwargs or not _float(x) or x.ndim not in (n + 1, n + 2) or x.shape[-n - 1] != m.in_channels:
        return None
    if isinstance(m.padding, str):
        if m.padding != "same" and m.padding != "valid":
            return None
        padding = [None] * n if m.padding == "same" else [0] * n
    else:
        padding = list(m.padding)
    sizes = []
    for size, k, s, d, p in zip(x.shape[-n:], m.kernel_size, m.stride, m.dilation, padding, strict=True):
        out = size if p is None else (size + 2 * p - d * (k - 1) - 1) // s + 1
        if out <= 0:
            return None
        sizes.append(out)
    return _empty((*x.shape[:-n - 1], m.out_channels, *sizes), x.dtype)


def _linear_module(m: nn.Linear, x, *args, **kwargs):
    """Linear: the last dim becomes out_features."""
    if args or kwargs or not _float(x) or x.ndim < 1 or x.shape[-1] != m.in_features:
        return None
    return _empty((*x.shape[:-1], m.out_features), x.dtype)


def _tuple(value, n: int) -> tuple:
    """An int or a sequence as an n-tuple."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _pool_size(size: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """Pooled length (PyTorch's rule, ceil mode included)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_module(m: nn.Module, x, *args, **kwargs):
    """MaxPool / AvgPool: spatial dims pooled, the others kept."""
    n = {nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool3d: 3}[type(m)]
    if args or kwargs or not _float(x) or x.ndim not in (n + 1, n + 2) or getattr(m, "return_indices", False):
        return None
    k = _tuple(m.kernel_size, n)
    s = _tuple(m.stride if m.stride is not None else m.kernel_size, n)
    p = _tuple(m.padding, n)
    d = _tuple(getattr(m, "dilation", 1), n)
    if any(2 * pi > ki for pi, ki in zip(p, k, strict=True)):
        return None
    sizes = [_pool_size(*a, m.ceil_mode) for a in zip(x.shape[-n:], k, s, p, d, strict=True)]
    return _empty((*x.shape[:-n], *sizes), x.dtype) if all(v > 0 for v in sizes) else None


def _adaptive_module(m: nn.Module, x, *args, **kwargs):
    """Adaptive pooling: spatial dims become the output size (None keeps a dim)."""
    n = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}[type(m)]
    if args or kwargs or not _float(x) or x.ndim not in (n + 1, n + 2):
        return None
    sizes = [old if new is None else new for old, new in zip(x.shape[-n:], _tuple(m.output_size, n), strict=True)]
    return _empty((*x.shape[:-n], *sizes), x.dtype)


def _flatten_module(m: nn.Flatten, x, *args, **kwargs):
    """nn.Flatten: as torch.flatten (a view, cheap on meta)."""
    return None if args or kwargs else torch.flatten(x, m.start_dim, m.end_dim)


def _mha_module(m: nn.MultiheadAttention, query, key=None, value=None, *args, **kwargs):
    """MultiheadAttention without attention weights: (output shaped as the query, None)."""
    if args or kwargs.get("need_weights", True) or not _float(query) or query.shape[-1] != m.embed_dim:
        return None
    if set(kwargs) != {"need_weights"} or not (_float(key) and _float(value)):
        return None
    if key.shape[-1] != m.kdim or value.shape[-1] != m.vdim or key.shape[:-1] != value.shape[:-1]:
        return None
    batch = 0 if m.batch_first else 1
    if key.ndim != query.ndim or (query.ndim == 3 and key.shape[batch] != query.shape[batch]):
        return None
    return (_empty(query.shape, query.dtype), None)


# -- functions and methods ------------------------------------------------------------------------------
def _binary(a, b, *args, **kwargs):
    """Elementwise binary op: broadcast shape; dtype when it is unambiguous (same float dtype or scalar)."""
    if args or kwargs:
        return None
    tensors = [v for v in (a, b) if isinstance(v, torch.Tensor)]
    if not tensors or not all(_float(t) for t in tensors) or len({t.dtype for t in tensors}) > 1:
        return None
    if any(not isinstance(v, (torch.Tensor, int, float)) or isinstance(v, bool) for v in (a, b)):
        return None
    shape = _broadcast(*(t.shape for t in tensors))
    return None if shape is None else _empty(shape, tensors[0].dtype)


def _inplace_binary(a, b, *args, **kwargs):
    """In-place elementwise op: the result keeps ``a``'s shape, which the broadcast must not grow."""
    out = _binary(a, b, *args, **kwargs)
    return out if out is not None and isinstance(a, torch.Tensor) and out.shape == a.shape else None


def _cat(tensors, dim=0, *args, **kwargs):
    """cat: sizes add along ``dim``, every other dim must match."""
    if args or kwargs or not isinstance(tensors, (list, tuple)) or not tensors:
        return None
    if not all(_float(t) for t in tensors) or len({(t.dtype, t.ndim) for t in tensors}) > 1 or tensors[0].ndim == 0:
        return None
    ndim = tensors[0].ndim
    dim = dim + ndim if dim < 0 else dim
    rest = {tuple(s for i, s in enumerate(t.shape) if i != dim) for t in tensors}
    if len(rest) > 1:
        return None
    shape = list(tensors[0].shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return _empty(shape, tensors[0].dtype)


def _matmul(a, b, *args, **kwargs):
    """matmul of two ≥2-d tensors: broadcast batch dims, (…, n, k) @ (…, k, m) -> (…, n, m)."""
    if args or kwargs or not (_float(a) and _float(b)) or a.dtype != b.dtype or a.ndim < 2 or b.ndim < 2:
        return None
    if a.shape[-1] != b.shape[-2]:
        return None
    batch = _broadcast(a.shape[:-2], b.shape[:-2])
    return None if batch is None else _empty((*batch, a.shape[-2], b.shape[-1]), a.dtype)


def _bmm(a, b, *args, **kwargs):
    """bmm: (B, n, k) @ (B, k, m) -> (B, n, m), no broadcasting."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.ndim != 3 or b.ndim != 3:
        return None
    return _matmul(a, b, *args, **kwargs) if a.shape[0] == b.shape[0] else None


def _sdpa(q, k, v, attn_mask=None, *args, **kwargs):
    """scaled_dot_product_attention: (…, L, E) with (…, S, E) and (…, S, Ev) -> (…, L, Ev)."""
    if not all(_float(t) for t in (q, k, v)) or len({q.dtype, k.dtype, v.dtype}) > 1 or q.ndim < 2:
        return None
    if args or set(kwargs) - {"dropout_p", "is_causal", "scale"}:
        return None
    if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or
                                  _broadcast(attn_mask.shape, (*q.shape[:-1], k.shape[-2])) is None):
        return None
    if q.ndim != k.ndim or k.ndim != v.ndim or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        return None
    batch = _broadcast(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    if batch != tuple(q.shape[:-2]):
        return None
    return _empty((*q.shape[:-1], v.shape[-1]), q.dtype)


def _softmax(x, dim=None, *args, **kwargs):
    """softmax / log_softmax over a valid dim: same shape (an explicit dtype falls back)."""
    if args or kwargs or dim is None:
        return None
    return _same(x) if _float(x) and isinstance(dim, int) and -x.ndim <= dim < max(x.ndim, 1) else None


def _layer_norm(x, normalized_shape, weight=None, bias=None, *args, **kwargs):
    """F.layer_norm: same shape when the trailing dims are the normalised shape (and γ, β have it)."""
    shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else (normalized_shape,)
    if not _float(x) or tuple(x.shape[x.ndim - len(shape):]) != shape or kwargs:
        return None
    if any(t is not None and tuple(getattr(t, "shape", ())) != shape for t in (weight, bias)):
        return None
    return _same(x)


def _pow(x, exponent, *args, **kwargs):
    """x ** p with a number exponent: x's shape (a tensor exponent, or an int tensor, falls back: promotion)."""
    if args or kwargs or isinstance(exponent, bool) or not isinstance(exponent, (int, float)):
        return None
    return _same(x)


def _addmm(bias, x, weight, *args, **kwargs):
    """addmm(b, x, W): (n, k) @ (k, m) -> (n, m) when b is (m,) or a scalar-like (1,) (beta/alpha keep it)."""
    if args or set(kwargs) - {"beta", "alpha"} or not all(_float(t) for t in (bias, x, weight)):
        return None
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[0] or len({bias.dtype, x.dtype, weight.dtype}) > 1:
        return None
    out = (x.shape[0], weight.shape[1])
    return _empty(out, x.dtype) if _broadcast(bias.shape, out) == out else None


def _masked_fill(x, mask, value, *args, **kwargs):
    """masked_fill: x's shape when the bool mask broadcasts to it and the value is a number."""
    if args or kwargs or not _float(x) or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return _same(x) if _broadcast(x.shape, mask.shape) == tuple(x.shape) else None


def _unary(x, *args, **kwargs):
    """Channel-wise function whose extra arguments are plain numbers (slopes, p, inplace)."""
    values = list(args) + [v for k, v in kwargs.items() if k != "approximate"]
    if any(isinstance(v, torch.Tensor) for v in values) or kwargs.get("dtype"):
        return None
    return _same(x)


def _channelwise(pick) -> tuple:
    """The channel-wise unary ops (f(0) = 0 or not) that keep dtype and device, from the op vocabulary."""
    return tuple(op for trait in (Trait.ZERO_KEEPING, Trait.ZERO_BREAKING, Trait.ZERO_BY_ARGS)
                 for op in pick(trait, Trait.CONVERTS))


FORMULAS: OpTable[Shape] = OpTable("shape formulas")
FORMULAS.module(*_channelwise(modules_with))(_same_module)
FORMULAS.module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)(_batch_norm_module)
FORMULAS.module(nn.LayerNorm, nn.RMSNorm)(_layer_norm_module)
FORMULAS.module(nn.GroupNorm)(_group_norm_module)
FORMULAS.module(nn.Linear)(_linear_module)
FORMULAS.module(nn.Flatten)(_flatten_module)
FORMULAS.module(nn.MultiheadAttention)(_mha_module)
FORMULAS.module(nn.Conv1d, nn.Conv2d, nn.Conv3d)(_conv_module)
FORMULAS.module(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)(_pool_module)
FORMULAS.module(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)(_adaptive_module)

FORMULAS.function(*_channelwise(functions_with))(_unary)
FORMULAS.function(operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
                  torch.div)(_binary)
FORMULAS.function(operator.iadd, operator.isub, operator.imul, operator.itruediv)(_inplace_binary)
FORMULAS.function(torch.cat, torch.concat)(_cat)
FORMULAS.function(operator.matmul, torch.matmul)(_matmul)
FORMULAS.function(torch.bmm)(_bmm)
FORMULAS.function(F.scaled_dot_product_attention)(_sdpa)
FORMULAS.function(F.softmax, torch.softmax, F.log_softmax)(_softmax)
FORMULAS.function(F.layer_norm)(_layer_norm)
FORMULAS.method(*_channelwise(methods_with))(_unary)
FORMULAS.method("add", "sub", "mul", "div")(_binary)
FORMULAS.method("add_", "sub_", "mul_", "div_")(_inplace_binary)
FORMULAS.method("matmul")(_matmul)
FORMULAS.function(torch.pow, operator.pow)(_pow)
FORMULAS.method("pow")(_pow)
FORMULAS.function(torch.addmm)(_addmm)
FORMULAS.function(torch.masked_fill)(_masked_fill)
FORMULAS.method("masked_fill")(_masked_fill)
FORMULAS.method("softmax", "log_softmax")(_softmax)


def module_shape(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Meta output of calling ``module``, or None when no formula applies."""
    rule = FORMULAS.for_module(module)
    return rule(module, *args, **kwargs) if rule is not None and args else None


def function_shape(target: Any, args: tuple, kwargs: dict) -> Any:
    """Meta output of ``target(*args, **kwargs)``, or None when no formula applies."""
    rule = FORMULAS.for_function(target)
    return rule(*args, **kwargs) if rule is not None and args else None


def method_shape(name: str, args: tuple, kwargs: dict) -> Any:
    """Meta output of ``args[0].name(*args[1:], **kwargs)``, or None when no formula applies."""
    rule = FORMULAS.methods.get(name)
    return rule(*args, **kwargs) if rule is not None and args else None
