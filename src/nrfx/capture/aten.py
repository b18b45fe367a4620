"""aten ops written back as the torch-level calls of the op table: one vocabulary for every capture.

``torch.export`` records ``aten.add.Tensor``, ``aten.view.default``, ``aten.slice.Tensor``… where
``torch.fx.symbolic_trace`` records ``operator.add``, ``x.view(...)``, ``x[:, a:b]``.  Rule: every
aten overload in ``TORCH_LEVEL`` becomes, in place, the call plain FX would have recorded for the
same Python code, with the same meaning; the analysis rules, the cost model and every rewrite
pass (literal slices, split sizes, groups) then apply unchanged.  An aten op not in the table
stays as it is and the analysis treats it as an unknown op (the channels it touches freeze).
Checks with no value (``aten._assert_*``) are dropped.  ``aten.detach_`` (export's spelling of a
constant made in ``forward``: ``lift_fresh_copy`` then ``detach_``) becomes ``x.detach()``: the
values are the same and the graph reads the result, not ``x``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from nrfx.ops.optable import OpTable

__all__ = ["TORCH_LEVEL", "to_torch_level"]

aten = torch.ops.aten
Translate = Callable[[torch.fx.Node], None]
TORCH_LEVEL: OpTable[Translate] = OpTable("aten → torch")
_END = 2**63 - 1  # aten's "to the end" sentinel


def _set(node: torch.fx.Node, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> None:
    """Turn ``node`` into ``op(target)(*args, **kwargs)``, keeping its name and users."""
    node.op, node.target, node.args, node.kwargs = op, target, tuple(args), dict(kwargs or {})


def _function(target: Callable) -> Translate:
    """The aten overload takes the same arguments as ``target``."""
    return lambda node: _set(node, "call_function", target, node.args, node.kwargs)


def _method(name: str, splat: bool = False) -> Translate:
    """``x.name(*args)``; ``splat`` spreads a trailing size list (``x.view(a, b)``)."""

    def translate(node: torch.fx.Node) -> None:
        args = list(node.args)
        if splat and len(args) == 2 and isinstance(args[1], (list, tuple)):
            args = [args[0], *args[1]]
        _set(node, "call_method", name, args, node.kwargs)

    return translate


_SAME_ARGS: dict[Any, Callable] = {
    aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul, aten.div.Tensor: torch.div,
    aten.div.Tensor_mode: torch.div, aten.maximum.default: torch.maximum, aten.minimum.default: torch.minimum,
    aten.relu.default: torch.relu, aten.relu_.default: torch.relu_, aten.gelu.default: F.gelu,
    aten.silu.default: F.silu, aten.hardswish.default: F.hardswish, aten.hardsigmoid.default: F.hardsigmoid,
    aten.sigmoid.default: torch.sigmoid, aten.tanh.default: torch.tanh, aten.hardtanh.default: F.hardtanh,
    aten.leaky_relu.default: F.leaky_relu, aten.elu.default: F.elu, aten.mish.default: F.mish,
    aten.exp.default: torch.exp, aten.log.default: torch.log, aten.sqrt.default: torch.sqrt,
    aten.rsqrt.default: torch.rsqrt, aten.abs.default: torch.abs, aten.neg.default: torch.neg,
    aten.erf.default: torch.erf, aten.sin.default: torch.sin, aten.cos.default: torch.cos,
    aten.clamp.default: torch.clamp, aten.clone.default: torch.clone, aten.dropout.default: F.dropout,
    aten.rms_norm.default: F.rms_norm,
    aten.cat.default: torch.cat, aten.stack.default: torch.stack, aten.split.Tensor: torch.split,
    aten.split_with_sizes.default: torch.split, aten.chunk.default: torch.chunk, aten.unbind.int: torch.unbind,
    aten.narrow.default: torch.narrow, aten.transpose.int: torch.transpose, aten.flatten.using_ints: torch.flatten,
    aten.unflatten.int: torch.unflatten, aten.unsqueeze.default: torch.unsqueeze, aten.squeeze.dim: torch.squeeze,
    aten.squeeze.dims: torch.squeeze, aten.squeeze.default: torch.squeeze, aten.mean.dim: torch.mean,
    aten.sum.dim_IntList: torch.sum, aten.mean.default: torch.mean, aten.sum.default: torch.sum,
    aten.amax.default: torch.amax, aten.amin.default: torch.amin,
    aten.matmul.default: torch.matmul, aten.bmm.default: torch.bmm, aten.mm.default: torch.mm,
    aten.linear.default: F.linear, aten.conv1d.default: F.conv1d, aten.conv2d.default: F.conv2d,
    aten.conv3d.default: F.conv3d, aten.conv_transpose1d.default: F.conv_transpose1d,
    aten.conv_transpose2d.input: F.conv_transpose2d, aten.conv_transpose3d.input: F.conv_transpose3d,
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    aten.max_pool1d.default: F.max_pool1d, aten.max_pool2d.default: F.max_pool2d,
    aten.max_pool3d.default: F.max_pool3d, aten.avg_pool1d.default: F.avg_pool1d,
    aten.avg_pool2d.default: F.avg_pool2d, aten.avg_pool3d.default: F.avg_pool3d,
    aten.adaptive_avg_pool1d.default: F.adaptive_avg_pool1d, aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.adaptive_avg_pool3d.default: F.adaptive_avg_pool3d, aten.addcmul.default: torch.addcmul,
    aten.ge.Scalar: torch.ge, aten.ge.Tensor: torch.ge, aten.gt.Scalar: torch.gt, aten.gt.Tensor: torch.gt,
    aten.le.Scalar: torch.le, aten.le.Tensor: torch.le, aten.lt.Scalar: torch.lt, aten.lt.Tensor: torch.lt,
    aten.eq.Scalar: torch.eq, aten.eq.Tensor: torch.eq, aten.ne.Scalar: torch.ne, aten.ne.Tensor: torch.ne,
    aten.arange.default: torch.arange, aten.arange.start: torch.arange, aten.arange.start_step: torch.arange,
    aten.zeros.default: torch.zeros, aten.ones.default: torch.ones, aten.full.default: torch.full,
    aten.empty.memory_format: torch.empty, aten.zeros_like.default: torch.zeros_like,
    aten.ones_like.default: torch.ones_like, aten.full_like.default: torch.full_like,
    aten.pad.default: F.pad, aten.lift_fresh_copy.default: torch.clone, aten.addmm.default: torch.addmm,
    aten.linalg_vector_norm.default: torch.linalg.vector_norm, aten.pow.Tensor_Scalar: torch.pow,
    aten.pow.Tensor_Tensor: torch.pow, aten.pow.Scalar: torch.pow, aten.__and__.Tensor: torch.bitwise_and,
    aten.bitwise_and.Tensor: torch.bitwise_and, aten.__or__.Tensor: torch.bitwise_or,
    aten.bitwise_or.Tensor: torch.bitwise_or, aten.cumsum.default: torch.cumsum, aten.gather.default: torch.gather,
    aten.roll.default: torch.roll, aten.diff.default: torch.diff, aten.meshgrid.default: torch.meshgrid,
    aten.meshgrid.indexing: torch.meshgrid, aten.where.self: torch.where, aten.where.ScalarOther: torch.where,
    aten.where.ScalarSelf: torch.where, aten.where.Scalar: torch.where,
    aten.pixel_shuffle.default: F.pixel_shuffle, aten.pixel_unshuffle.default: F.pixel_unshuffle,
    aten.remainder.Scalar: torch.remainder, aten.remainder.Tensor: torch.remainder, aten.fmod.Scalar: torch.fmod,
    aten.fmod.Tensor: torch.fmod, aten.floor_divide.default: torch.floor_divide,
    aten.triu.default: torch.triu, aten.tril.default: torch.tril,
    aten.im2col.default: F.unfold, aten.col2im.default: F.fold,
    aten.sign.default: torch.sign, aten.sgn.default: torch.sgn, aten.ceil.default: torch.ceil,
    aten.floor.default: torch.floor, aten.round.default: torch.round, aten.trunc.default: torch.trunc,
    aten.tan.default: torch.tan, aten.atan.default: torch.atan, aten.sinh.default: torch.sinh,
    aten.asinh.default: torch.asinh, aten.expm1.default: torch.expm1, aten.log1p.default: torch.log1p,
    aten.erfc.default: torch.erfc, aten.cosh.default: torch.cosh, aten.exp2.default: torch.exp2,
    aten.sinc.default: torch.sinc, aten.log2.default: torch.log2, aten.log10.default: torch.log10,
    aten.fmax.default: torch.fmax, aten.fmin.default: torch.fmin, aten.hypot.default: torch.hypot,
    aten.copysign.Tensor: torch.copysign, aten.copysign.Scalar: torch.copysign, aten.xlogy.Tensor: torch.xlogy,
    aten.xlogy.Scalar_Other: torch.xlogy, aten.xlogy.Scalar_Self: torch.xlogy, aten.special_xlogy.default: torch.xlogy,
    aten.logaddexp.default: torch.logaddexp, aten.logaddexp2.default: torch.logaddexp2,
    aten.atan2.default: torch.atan2, aten.heaviside.default: torch.heaviside, aten.lerp.Scalar: torch.lerp,
    aten.lerp.Tensor: torch.lerp, aten.bitwise_xor.Tensor: torch.bitwise_xor, aten.__xor__.Tensor: torch.bitwise_xor,
    aten.logical_xor.default: torch.logical_xor, aten.logical_and.default: torch.logical_and,
    aten.logical_or.default: torch.logical_or, aten.tensor_split.indices: torch.tensor_split,
    aten.tensor_split.sections: torch.tensor_split, aten.flip.default: torch.flip, aten.rot90.default: torch.rot90,
    aten.fliplr.default: torch.fliplr, aten.flipud.default: torch.flipud, aten.bitwise_not.default: torch.bitwise_not,
    aten.logical_not.default: torch.logical_not, aten.repeat_interleave.self_int: torch.repeat_interleave,
    aten.repeat_interleave.self_Tensor: torch.repeat_interleave, aten.clamp.Tensor: torch.clamp,
    aten.one_hot.default: F.one_hot,
}
_INPLACE_METHODS = {aten.add_.Tensor: "add_", aten.sub_.Tensor: "sub_", aten.mul_.Tensor: "mul_",
                    aten.div_.Tensor: "div_", aten.hardtanh_.default: "hardtanh_", aten.clamp_.default: "clamp_",
                    aten.contiguous.default: "contiguous", aten.detach.default: "detach", aten.alias.default: "detach",
                    aten.type_as.default: "type_as", aten.to.device: "to", aten.to.dtype: "to", aten.to.other: "to",
                    aten.fill_.Scalar: "fill_", aten.fill_.Tensor: "fill_", aten.detach_.default: "detach",
                    aten.copy_.default: "copy_", aten.masked_fill.Scalar: "masked_fill",
                    aten.masked_fill.Tensor: "masked_fill", aten.masked_fill_.Scalar: "masked_fill_",
                    aten.masked_fill_.Tensor: "masked_fill_", aten.expand_as.default: "expand_as",
                    aten.unfold.default: "unfold", aten.reshape_as.default: "reshape_as",
                    aten.view_as.default: "view_as"}
_SIZE_METHODS = {aten.permute.default: "permute", aten.expand.default: "expand", aten.repeat.default: "repeat",
                 aten.tile.default: "tile"}

for _overload, _target in _SAME_ARGS.items():
    TORCH_LEVEL.function(_overload)(_function(_target))
for _overload, _name in _INPLACE_METHODS.items():
    TORCH_LEVEL.function(_overload)(_method(_name))
for _overload, _name in _SIZE_METHODS.items():
    TORCH_LEVEL.function(_overload)(_method(_name, splat=True))


@TORCH_LEVEL.function(aten.view.default, aten.reshape.default, aten._unsafe_view.default)
def _view(node: torch.fx.Node) -> None:
    """``aten.view(x, sizes)`` is ``x.view(*sizes)``; a last size equal to ``x``'s last dim is written as kept.

    export specialises every size but the batch, so a view that keeps the last dim (HF ``Conv1D``:
    ``x.view(-1, x.size(-1))`` then ``.view(*lead, nf)``) spells its width as a literal.  The same view
    with that size left to follow the input (``-1``; ``[-1, c]`` is ``x.flatten(0, -2)``) computes the
    same values at this width and still the right ones when the last dim is resized.
    """
    x, sizes = node.args[0], list(node.args[1])
    name = "reshape" if node.target is aten.reshape.default else "view"
    ndim, last = _ndim(x), _last_size(x)
    if ndim is None or last is None or not sizes or sizes[-1] != last or not isinstance(sizes[-1], int):
        _set(node, "call_method", name, [x, *sizes])
    elif sizes[:-1] == [-1] and ndim >= 2:
        _set(node, "call_method", "flatten", [x, 0, ndim - 2])
    elif -1 not in sizes[:-1]:
        _set(node, "call_method", name, [x, *sizes[:-1], -1])
    else:
        _set(node, "call_method", name, [x, *sizes])


def _last_size(value: Any) -> int | None:
    """The static size of the last dim of a node's recorded value (None when symbolic or absent)."""
    val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0 or not isinstance(val.shape[-1], int):
        return None
    return int(val.shape[-1])


@TORCH_LEVEL.function(aten.embedding.default)
def _embedding(node: torch.fx.Node) -> None:
    """``aten.embedding(weight, indices, padding_idx=-1, …)`` is ``F.embedding(indices, weight[, padding_idx])``."""
    weight, indices = node.args[:2]
    padding = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
    kwargs = {"padding_idx": padding} if isinstance(padding, int) and padding >= 0 else {}
    _set(node, "call_function", F.embedding, (indices, weight), kwargs)


@TORCH_LEVEL.function(aten.linspace.default)
def _linspace(node: torch.fx.Node) -> None:
    """``aten.linspace(start, end, steps, dtype=, layout=, device=, …)`` is ``torch.linspace`` (None keywords go)."""
    kwargs = {k: v for k, v in _given(dict(node.kwargs)).items() if k not in ("layout", "pin_memory")}
    _set(node, "call_function", torch.linspace, node.args, kwargs)


_GRID_MODES = ("bilinear", "nearest", "bicubic")
_GRID_PADDING = ("zeros", "border", "reflection")


@TORCH_LEVEL.function(aten.grid_sampler.default, aten.grid_sampler_2d.default, aten.grid_sampler_3d.default)
def _grid_sampler(node: torch.fx.Node) -> None:
    """``aten.grid_sampler(x, grid, mode, padding, align_corners)`` (enums as ints) is ``F.grid_sample``."""
    x, grid, mode, padding, align = node.args[:5]
    kwargs = {"mode": _GRID_MODES[mode], "padding_mode": _GRID_PADDING[padding], "align_corners": align}
    _set(node, "call_function", F.grid_sample, (x, grid), kwargs)


@TORCH_LEVEL.function(aten.silu_.default, aten.hardswish_.default)
def _inplace_activation(node: torch.fx.Node) -> None:
    """``aten.silu_(x)`` is ``F.silu(x, inplace=True)``."""
    target = F.silu if node.target is aten.silu_.default else F.hardswish
    _set(node, "call_function", target, node.args[:1], {"inplace": True})


def _given(kwargs: dict) -> dict:
    """The keyword arguments that were given (aten spells "not given" as None)."""
    return {k: v for k, v in kwargs.items() if v is not None}


@TORCH_LEVEL.function(aten.to.dtype_layout)
def _to_keywords(node: torch.fx.Node) -> None:
    """``aten.to.dtype_layout(x, dtype=, layout=, device=, …)`` is ``x.to(dtype=, device=, …)``.

    ``layout`` and ``pin_memory`` go (``Tensor.to`` has neither; export records strided, unpinned
    tensors); the keywords aten left at None are dropped.
    """
    kwargs = {k: v for k, v in _given(dict(node.kwargs)).items() if k not in ("layout", "pin_memory")}
    _set(node, "call_method", "to", node.args[:1], kwargs)


@TORCH_LEVEL.function(aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default, aten.new_full.default)
def _new_factory(node: torch.fx.Node) -> None:
    """``aten.new_zeros(x, size[, fill], dtype=…)`` is ``x.new_zeros(size[, fill], dtype=…)`` (None keywords go)."""
    _set(node, "call_method", node.target.__name__.split(".")[0], node.args, _given(dict(node.kwargs)))


@TORCH_LEVEL.function(aten.index.Tensor)
def _index(node: torch.fx.Node) -> None:
    """``aten.index(x, [None, i, …])`` is ``x[:, i, …]`` (advanced indexing; a None index is a full slice)."""
    x, indices = node.args
    _set(node, "call_function", operator.getitem, (x, tuple(slice(None) if i is None else i for i in indices)))


@TORCH_LEVEL.function(aten.sym_size.int)
def _sym_size(node: torch.fx.Node) -> None:
    """``aten.sym_size.int(x, d)`` is ``x.size(d)``."""
    _set(node, "call_method", "size", node.args)


@TORCH_LEVEL.function(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default)
def _softmax(node: torch.fx.Node) -> None:
    """``aten.softmax.int(x, dim[, dtype])`` is ``torch.softmax(x, dim)`` (the half-to-float flag dropped)."""
    log = node.target in (aten.log_softmax.int, aten._log_softmax.default)
    _set(node, "call_function", torch.log_softmax if log else torch.softmax, node.args[:2])


@TORCH_LEVEL.function(aten.einsum.default)
def _einsum(node: torch.fx.Node) -> None:
    """``einsum(equation, tensors, path=None)`` → ``torch.einsum(equation, tensors)`` (the contraction path is a
    speed hint)."""
    _set(node, "call_function", torch.einsum, tuple(node.args[:2]))


@TORCH_LEVEL.function(aten.clamp_min.default)
def _clamp_min(node: torch.fx.Node) -> None:
    """``aten.clamp_min(x, m)`` is ``torch.clamp(x, min=m)``."""
    _set(node, "call_function", torch.clamp, node.args[:1], {"min": node.args[1]})


@TORCH_LEVEL.function(aten.t.default)
def _t(node: torch.fx.Node) -> None:
    """``aten.t(x)`` swaps dims 0 and 1 (a 0-d or 1-d tensor is returned as is)."""
    ndim = _ndim(node.args[0])
    if ndim is not None and ndim < 2:
        _set(node, "call_method", "contiguous", node.args[:1])
    else:
        _set(node, "call_function", torch.transpose, (node.args[0], 0, 1))


def _ndim(value: Any) -> int | None:
    """Rank of a node's recorded value (export records a fake tensor in ``meta['val']``)."""
    val = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _axis_index(dim: int, item: Any) -> tuple:
    """The getitem index that applies ``item`` along ``dim`` (negative dims counted from the end)."""
    if dim >= 0:
        return (slice(None),) * dim + (item,)
    return (Ellipsis, item) + (slice(None),) * (-dim - 1)


@TORCH_LEVEL.function(aten.slice.Tensor)
def _slice(node: torch.fx.Node) -> None:
    """``aten.slice(x, dim, start, end, step)`` is ``x[:, …, start:end:step]``."""
    x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    start = None if start in (0, None) else start
    end = None if end is None or (isinstance(end, int) and end >= _END) else end
    step = None if step in (1, None) else step
    _set(node, "call_function", operator.getitem, (x, _axis_index(int(dim), slice(start, end, step))))


@TORCH_LEVEL.function(aten.select.int)
def _select(node: torch.fx.Node) -> None:
    """``aten.select(x, dim, i)`` is ``x[:, …, i]``."""
    x, dim, index = node.args
    _set(node, "call_function", operator.getitem, (x, _axis_index(int(dim), index)))


@TORCH_LEVEL.function(aten.batch_norm.default)
def _batch_norm(node: torch.fx.Node) -> None:
    """``aten.batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn)`` → ``F.batch_norm``."""
    x, w, b, mean, var, training, momentum, eps = node.args[:8]
    _set(node, "call_function", F.batch_norm, (x, mean, var, w, b, training, momentum, eps))


@TORCH_LEVEL.function(aten.layer_norm.default, aten.group_norm.default)
def _coupling_norm(node: torch.fx.Node) -> None:
    """``aten.layer_norm`` / ``aten.group_norm`` drop their trailing cudnn flag."""
    target = F.layer_norm if node.target is aten.layer_norm.default else F.group_norm
    _set(node, "call_function", target, node.args[:5])


@TORCH_LEVEL.function(aten.constant_pad_nd.default)
def _pad(node: torch.fx.Node) -> None:
    """``aten.constant_pad_nd(x, pad, value)`` is ``F.pad(x, pad, value=value)``."""
    value = node.args[2] if len(node.args) > 2 else 0.0
    _set(node, "call_function", F.pad, (node.args[0], node.args[1]), {"value": value})


@TORCH_LEVEL.function(aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec)
def _upsample(node: torch.fx.Node) -> None:
    """``aten.upsample_*.vec(x, size, [align_corners,] scales)`` is ``F.interpolate``."""
    nearest = node.target is aten.upsample_nearest2d.vec
    x, size = node.args[0], node.args[1]
    scales = node.args[2] if nearest else node.args[3]
    kwargs = {"size": size, "scale_factor": scales, "mode": "nearest" if nearest else "bilinear"}
    if not nearest:
        kwargs["align_corners"] = node.args[2]
    _set(node, "call_function", F.interpolate, (x,), kwargs)


_CHECKS = (aten._assert_tensor_metadata.default, aten._assert_scalar.default,
           aten.sym_constrain_range_for_size.default)


def to_torch_level(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Rewrite every aten node the table knows in place; drop value-less checks.

    Returns {aten op: count} of the aten ops left as they are (the analysis freezes their channels).
    """
    left: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target in _CHECKS and not node.users:
            gm.graph.erase_node(node)
            continue
        translate = TORCH_LEVEL.for_function(node.target)
        if translate is None:
            left[str(node.target)] = left.get(str(node.target), 0) + 1
            continue
        translate(node)
    return left
