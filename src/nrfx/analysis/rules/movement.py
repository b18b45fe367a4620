"""Rules for ops that move, merge, cut, scan or reduce dims (cat, split, view, permute, pool, cumsum, gather…),
and for parameter products outside any module (addmm: HF Conv1D; F.embedding)."""

from __future__ import annotations

import builtins
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from nrfx.analysis.context import Consumer
from nrfx.analysis.records import LayerRecord, SliceRecord, SumRecord, ViewRecord
from nrfx.analysis.rules.common import SizeSpec, copy_zero, move, norm_dim, param_of, tensor_args
from nrfx.analysis.rules.elementwise import union_rule
from nrfx.analysis.rules.layers import linear_layout
from nrfx.analysis.rules.registry import function_rule, method_rule, module_rule, reads_counts
from nrfx.analysis.spaces import Layout
from nrfx.analysis.specs import ChannelCount, Segment, TensorSpec, Zero
from nrfx.capture.positional import holds_node
from nrfx.ops.vocabulary import Trait, functions_with, methods_with, modules_with, op_info

__all__: list[str] = []


# -- cat / stack ----------------------------------------------------------------------------
@function_rule(torch.cat, torch.concat, torch.concatenate)
def cat(ctx, node):
    """cat along a channel dim: the output layout is the inputs' atoms in order; other dims tie."""
    out = ctx.out
    tensors = [(spec, n) for spec, n in tensor_args(ctx, ctx.arg(0, "tensors"))
               if not (out.ndim > 1 and tuple(spec.shape) == (0,))]  # torch skips a legacy empty 1-d input
    dim = norm_dim(ctx.literal(1, "dim", 0), out.ndim)
    vectors = _parameter_vectors(ctx, ctx.arg(0, "tensors")) if out.ndim == 1 else None
    tensors = vectors or tensors
    dims, zeros = [], []
    for d in range(out.ndim):
        if d == dim:
            layout, zero = _cat_layout(ctx, tensors, d)
        else:
            layout, zero = _tie_dim(ctx, tensors, d)
        dims.append(layout)
        zeros.append(zero)
    return ctx.tensor(out.shape, tuple(dims), tuple(zeros))


def _parameter_vectors(ctx, parts) -> list | None:
    """Rule: a 1-d cat of parameters / buffers only (BEiT's ``cat((q_bias, k_bias, v_bias))``) is a vector of
    per-channel values: each part gets a fresh channel space of its own, which it takes from the channels it meets
    (a linear's output, as its bias), so the parts are resized with them.  Returns the parts' (spec, node) with
    those spaces, or None where the rule does not apply."""
    if not isinstance(parts, (list, tuple)) or not parts:
        return None
    found = [param_of(ctx, part) for part in parts]
    if any(name is None or len(shape) != 1 for name, shape in found):
        return None
    return [(parameter_with_own_space(ctx, name, shape), part)
            for part, (name, shape) in zip(parts, found, strict=True)]


def parameter_with_own_space(ctx, name: str, shape: tuple[int, ...]) -> TensorSpec:
    """A parameter's spec whose dim 0 is a fresh channel space of its own (one per parameter), which it takes from
    the channels it meets (a linear's output as its bias, the heads it scales), so it is resized with them; its
    other dims stay plain, no zeros known."""
    layout = ctx.fresh(shape[0], (name, "vector"))
    dims = (layout,) + (None,) * (len(shape) - 1)
    ctx.param_named(name, shape, dims)
    return ctx.tensor(shape, dims, (None,) * len(shape))


def _cat_layout(ctx, tensors, d: int):
    """Concatenate the inputs' layouts along ``d`` (plain parts become frozen atoms)."""
    atoms, segments, inners = [], [], set()
    if all(spec.dims[d] is None for spec, _ in tensors):
        return None, None
    for spec, _ in tensors:
        layout = spec.dims[d]
        if layout is None:
            layout = ctx.fresh(spec.shape[d])
            ctx.freeze(layout, "plain part of a concatenation")
        inners.add(layout.inner)
        atoms.extend(ctx.atoms.leaves(layout.atoms))
        segments.append(Segment(spec.vid, d, 0, ctx.atoms.channels(layout)))
    if len(inners) > 1:
        return _frozen_cat(ctx, tensors, d)
    return Layout(tuple(atoms), inners.pop()), Zero("copy", (tuple(segments),))


def _frozen_cat(ctx, tensors, d: int):
    """Inputs flattened with different inner sizes: freeze them, the output is one frozen space."""
    for spec, _ in tensors:
        ctx.freeze(spec.dims[d], "concatenation of differently flattened channels")
    layout = ctx.fresh(sum(spec.shape[d] for spec, _ in tensors))
    ctx.freeze(layout, "concatenation of differently flattened channels")
    return layout, Zero("none")


def _tie_dim(ctx, tensors, d: int):
    """A dim that must match across inputs: tie the layouts (a plain one freezes them); a channel is zero where it
    is zero in every input (``cat([y, y], 2)``, a stack of zero maps)."""
    layouts = [spec.dims[d] for spec, _ in tensors]
    present = [x for x in layouts if x is not None]
    if not present:
        return None, None
    for other in present[1:]:
        ctx.unify(present[0], other, "tied by a concatenation")
    if len(present) < len(layouts):
        ctx.freeze(present[0], "tied to a plain dim by a concatenation")
        return present[0], Zero("none")
    channels = ctx.atoms.channels(present[0])
    return present[0], Zero("and", tuple(spec.whole(d, channels) for spec, _ in tensors))


@function_rule(torch.stack)
def stack(ctx, node):
    """stack: a new plain dim; the stacked dims tie (zero where every input is)."""
    tensors = tensor_args(ctx, ctx.arg(0, "tensors"))
    out = ctx.out
    dim = norm_dim(ctx.literal(1, "dim", 0), out.ndim)
    dims, zeros = [], []
    for d in range(out.ndim):
        layout, zero = (None, None) if d == dim else _tie_dim(ctx, tensors, d - (d > dim))
        dims.append(layout)
        zeros.append(zero)
    return ctx.tensor(out.shape, tuple(dims), tuple(zeros))


# -- split / chunk / narrow / getitem ----------------------------------------------------------
def _select(ctx, spec: TensorSpec, dim: int, start: int, stop: int):
    """Layout and zero rule of features ``[start, stop)`` of a dim (a cut splits atoms)."""
    layout = spec.dims[dim]
    if layout is None:
        return None, None
    full = ctx.atoms.channels(layout) * layout.inner
    if start == 0 and stop == full:
        return layout, copy_zero(ctx, spec, dim)
    if start % layout.inner or stop % layout.inner:
        ctx.freeze(layout, "slice cuts inside a flattened channel")
        return layout, Zero("none")
    lo, hi = start // layout.inner, stop // layout.inner
    return ctx.atoms.select(layout, lo, hi), Zero("copy", ((Segment(spec.vid, dim, lo, hi),),))


def _record_slice(ctx, spec: TensorSpec, dim: int, bounds: list[tuple[int, int]], style: str,
                  position: int | None = None) -> None:
    """Remember literal channel bounds so the rewrite can move them to the new widths."""
    layout = spec.dims[dim]
    if layout is not None:
        ctx.record(SliceRecord(style, layout, dim, tuple((int(a), int(b)) for a, b in bounds), position))


def _pieces(ctx, spec: TensorSpec, dim: int, sizes: list[int]) -> tuple:
    """Specs of consecutive pieces of ``sizes`` along ``dim``."""
    out, start = [], 0
    for size in sizes:
        layout, zero = _select(ctx, spec, dim, start, start + size)
        shape = list(spec.shape)
        shape[dim] = size
        dims = list(spec.dims)
        dims[dim] = layout
        zeros = [copy_zero(ctx, spec, i) if (i != dim and d is not None) else None for i, d in enumerate(spec.dims)]
        zeros[dim] = zero
        out.append(ctx.tensor(shape, tuple(dims), tuple(zeros)))
        start += size
    return tuple(out)


@function_rule(torch.split, torch.chunk, torch.tensor_split, torch.unbind)
def split_function(ctx, node):
    """split/chunk along a dim: each piece selects its channels (atoms split at the borders)."""
    return _split(ctx, node, node.target.__name__)


@method_rule("split", "chunk", "tensor_split", "unbind", "split_with_sizes")
def split_method(ctx, node):
    """x.split/x.chunk: as torch.split."""
    return _split(ctx, node, node.target)


def _split(ctx, node, name: str):
    """Pieces of a split-like op, sized from the traced outputs."""
    x = ctx.spec(node.args[0])
    default = 0
    dim_index = 1 if name == "unbind" else 2
    dim = norm_dim(ctx.literal(dim_index, "dim", default), x.ndim)
    pieces = list(ctx.out)
    if name == "unbind":
        if x.dims[dim] is not None:
            ctx.freeze(x.dims[dim], "unbind over channels")
            return tuple(ctx.blank(p) for p in pieces)
        order = [d for d in range(x.ndim) if d != dim]  # along a plain dim the other dims keep their channels
        return tuple(move(ctx, x, order, p.shape) for p in pieces)
    sizes = [p.shape[dim] for p in pieces]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    _record_slice(ctx, x, dim, [(a, a + n) for a, n in zip(starts, sizes, strict=True)], "split")
    return _pieces(ctx, x, dim, sizes)


@module_rule(nn.GLU)
@function_rule(F.glu)
def glu(ctx, node):
    """GLU: the two halves of ``dim`` are one space (``a · σ(b)`` pairs channel i of each); the output is a's half.

    σ(b) is never zero, so the output is zero exactly where a is.  The halves are implicit (no width is
    spelled), so a rewrite that keeps them one space keeps the split in the middle.
    """
    x = ctx.spec(node.args[0])
    if not isinstance(x, TensorSpec) or not x.ndim:
        return ctx.unknown_op("GLU of a non-tensor")
    dim = norm_dim(ctx.module.dim if node.op == "call_module" else ctx.literal(1, "dim", -1), x.ndim)
    half = x.shape[dim] // 2
    a, b = _pieces(ctx, x, dim, [half, half])
    ctx.unify(a.dims[dim], b.dims[dim], "GLU multiplies the halves channel by channel")
    return a


@method_rule("narrow")
def narrow_method(ctx, node):
    """x.narrow(dim, start, length): selects a channel range."""
    return _narrow(ctx, node)


@function_rule(torch.narrow)
def narrow_function(ctx, node):
    """torch.narrow(x, dim, start, length): selects a channel range."""
    return _narrow(ctx, node)


def _narrow(ctx, node):
    """A narrow as one piece of a split."""
    x = ctx.spec(node.args[0])
    dim = norm_dim(ctx.value(node.args[1]), x.ndim)
    start = norm_dim(int(ctx.value(node.args[2])), x.shape[dim])
    length = int(ctx.value(node.args[3]))
    if isinstance(node.args[2], torch.fx.Node) or isinstance(node.args[3], torch.fx.Node):
        ctx.freeze(x.dims[dim], "narrow with bounds computed in the graph")
    _record_slice(ctx, x, dim, [(start, start + length)], "narrow")
    layout, zero = _select(ctx, x, dim, start, start + length)
    dims = list(x.dims)
    dims[dim] = layout
    zeros = [copy_zero(ctx, x, i) if d is not None else None for i, d in enumerate(x.dims)]
    zeros[dim] = zero
    return ctx.tensor(ctx.out.shape, tuple(dims), tuple(zeros))


@function_rule(operator.getitem)
def getitem(ctx, node):
    """Indexing: tuples pick a spec; a tensor slice along a channel dim selects channels."""
    source, index = node.args[0], node.args[1]
    spec = ctx.spec(source)
    if isinstance(spec, SizeSpec):
        return _size_item(ctx, spec, index)
    if isinstance(spec, (tuple, list)):
        picked = spec[index]
        return tuple(picked) if isinstance(picked, list) else picked
    if isinstance(spec, dict):
        return spec.get(index)
    if not isinstance(spec, TensorSpec):
        return ctx.blank(ctx.out)
    rows = _row_index(ctx, index)
    if rows is not None:
        return _lookup(ctx, source, rows) if _is_table(ctx, source) else _gathered_rows(ctx, spec, rows)
    return _tensor_index(ctx, spec, index if isinstance(index, tuple) else (index,))


def _is_table(ctx, source) -> bool:
    """Whether ``source`` is a 2-d parameter: ``table[i]`` with one integer tensor then reads its rows (a relative
    position bias table indexed by a buffer: BEiT, Swin), which is ``F.embedding(i, table)``."""
    _, shape = param_of(ctx, source)
    return shape is not None and len(shape) == 2


def _row_index(ctx, index) -> torch.fx.Node | None:
    """The integer tensor of ``x[i]`` (one index item, an int32 / int64 tensor computed or read in the graph), or
    None for any other index (a bool mask's result size depends on its values)."""
    if isinstance(index, tuple):
        index = index[0] if len(index) == 1 else None
    value = ctx.value(index) if isinstance(index, torch.fx.Node) else None
    is_rows = isinstance(value, torch.Tensor) and value.dtype in (torch.int64, torch.int32)
    return index if is_rows else None


def _gathered_rows(ctx, spec: TensorSpec, index: torch.fx.Node) -> TensorSpec:
    """Rule: ``x[i]`` with an integer tensor gathers rows of dim 0 (Swin V2's computed bias table read by its
    position index): dim 0 freezes, so do channels in the index; the other dims pass, after the index's dims."""
    ctx.freeze(spec.dims[0] if spec.ndim else None, "rows gathered by an index tensor")
    indices = ctx.spec(index)
    ctx.freeze_all(indices, "an index tensor's values pick rows")
    lead = ctx.out.ndim - (spec.ndim - 1)
    return move(ctx, spec, [None] * lead + list(range(1, spec.ndim)), ctx.out.shape)


def _lookup(ctx, source, index):
    """Rule: ``table[i]`` on a parameter is an embedding lookup: the table's dim 1 is a new space, the output's last
    dim (resized with it; a per-head bias table's columns join the heads it is added to)."""
    name, shape = param_of(ctx, source)
    indices = ctx.spec(index)
    dims = indices.dims if isinstance(indices, TensorSpec) else (None,) * (ctx.out.ndim - 1)
    return _table_rows(ctx, name, shape, dims)


def _table_rows(ctx, name: str, shape, index_dims, frozen: str | None = None) -> TensorSpec:
    """Rows of a parameter table read by indices: the table's dim 1 is a new space (frozen with ``frozen`` when
    given), the output's last dim after the indices' dims."""
    out_l = ctx.fresh(shape[1], (name, "out"))
    if frozen is not None:
        ctx.freeze(out_l, frozen)
    ctx.param_named(name, shape, (None, out_l))
    ctx.record(LayerRecord("embedding", weight=name, output=out_l))
    return ctx.tensor(ctx.out.shape, (*index_dims, out_l))


def _size_item(ctx, spec: SizeSpec, index):
    """Reading a size: one channel dim's size is a ``ChannelCount`` (free while it only sizes views of its space);
    a slice of sizes with a channel dim, or an index computed in the graph, freezes (code may use it anywhere)."""
    if isinstance(index, int) and spec.dims[index] is not None:
        return ChannelCount(spec.dims[index], ctx.where)
    if not isinstance(index, (int, slice)):
        index = slice(None)  # a computed index may read any dim
    picked = spec.dims[index] if isinstance(index, int) else tuple(d for d in spec.dims[index])
    for layout in picked if isinstance(picked, tuple) else (picked,):
        ctx.freeze(layout, "channel count read as a number")
    return None


def _tensor_index(ctx, spec: TensorSpec, index: tuple):
    """Basic indexing (ints, slices, None, Ellipsis); anything else freezes the indexed dims."""
    computed = [holds_node(i) for i in index]
    index = tuple(_index_value(ctx, i) for i in index)
    if any(isinstance(i, torch.fx.Node) or isinstance(i, (list, torch.Tensor)) for i in index):
        ctx.freeze_all(spec, "advanced indexing")
        return ctx.blank(ctx.out)
    n_real = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = []
    for i in index:
        if i is Ellipsis:
            expanded.extend([slice(None)] * (spec.ndim - n_real))
        else:
            expanded.append(i)
    expanded.extend([slice(None)] * (spec.ndim - sum(1 for i in expanded if i is not None)))
    dims, zeros, src = [], [], 0
    ellipsis_at = index.index(Ellipsis) if Ellipsis in index else len(index)
    for position, item in enumerate(expanded):
        if item is None:
            dims.append(None)
            zeros.append(None)
            continue
        layout = spec.dims[src]
        if isinstance(item, int):
            ctx.freeze(layout, "integer index into channels")
        else:
            start, stop, step = item.indices(spec.shape[src])
            stop = max(start, stop)
            if step != 1:  # every other channel: the dim is plain
                ctx.freeze(layout, "strided slice of channels")
                dims.append(None)
                zeros.append(None)
            else:
                partial = (start, stop) != (0, spec.shape[src])
                if partial and layout is not None and (position >= ellipsis_at or computed[position]):
                    ctx.freeze(layout, "channel slice after an Ellipsis or with bounds computed in the graph")
                elif partial or not (_open_ended(item) or computed[position]):
                    _record_slice(ctx, spec, src, [(start, stop)], "getitem", position=position)
                layout, zero = _select(ctx, spec, src, start, stop)
                dims.append(layout)
                zeros.append(zero)
        src += 1
    return ctx.tensor(ctx.out.shape, tuple(dims), tuple(zeros))


def _open_ended(item: slice) -> bool:
    """Whether a slice takes every channel at any width (``[:]``, ``[0:]``); ``[:24]`` on 24 channels does not."""
    return item.start in (None, 0) and (item.stop is None or item.stop >= 2**31)


def _index_value(ctx, item):
    """An index item with graph values filled in: sizes read from shapes become ints, slices too."""
    if isinstance(item, slice):
        parts = [_index_value(ctx, v) for v in (item.start, item.stop, item.step)]
        return slice(*parts) if all(p is None or isinstance(p, int) for p in parts) else item.stop
    if isinstance(item, torch.fx.Node):
        value = ctx.value(item)
        return int(value) if isinstance(value, (int, torch.SymInt)) else item
    return item


# -- sizes ------------------------------------------------------------------------------------
@method_rule("size")
def size_method(ctx, node):
    """x.size() / x.size(d): the sizes as numbers; a channel dim's is a ChannelCount (free while it only sizes views
    of its channels)."""
    x = ctx.spec(node.args[0])
    dim = ctx.literal(1, "dim")
    if dim is None:
        return SizeSpec(x.dims)
    layout = x.dims[norm_dim(dim, x.ndim)]
    return None if layout is None else ChannelCount(layout, ctx.where)


@method_rule("dim", "ndimension", "numel", "element_size", "is_contiguous", "get_device")
def plain_query(ctx, node):
    """Queries that do not depend on channel widths (numel does; it freezes)."""
    x = ctx.spec(node.args[0])
    if node.target == "numel":
        ctx.freeze_all(x, "numel() read as a number")
    return None


@function_rule(builtins.getattr)
def getattr_rule(ctx, node):
    """x.shape reads sizes (SizeSpec); x.T / x.mT move dims; dtype/device carry no channels."""
    x, name = ctx.spec(node.args[0]), node.args[1]
    if not isinstance(x, TensorSpec):
        return ctx.blank(ctx.out)
    if name == "shape":
        return SizeSpec(x.dims)
    if name in ("T", "mT"):
        order = list(range(x.ndim))
        order[-1], order[-2] = order[-2], order[-1]
        return move(ctx, x, order if name == "mT" else order[::-1], ctx.out.shape)
    if isinstance(ctx.out, torch.Tensor):
        return ctx.unknown_op(f"attribute Tensor.{name}")
    return None


# -- reshape / flatten / permute ----------------------------------------------------------------
def _groups(in_shape, out_shape):
    """Pair runs of input and output dims whose sizes multiply to the same number."""
    groups, i, j = [], 0, 0
    while i < len(in_shape) or j < len(out_shape):
        gi, gj = [i] if i < len(in_shape) else [], [j] if j < len(out_shape) else []
        pi = in_shape[i] if gi else 1
        pj = out_shape[j] if gj else 1
        i, j = i + bool(gi), j + bool(gj)
        while pi != pj:
            if pi < pj and i < len(in_shape):
                pi *= in_shape[i]
                gi.append(i)
                i += 1
            elif j < len(out_shape):
                pj *= out_shape[j]
                gj.append(j)
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def _reshape(ctx, x: TensorSpec, out_shape, literal: set[int] = frozenset(),
             sized: set[int] | None = None) -> TensorSpec:
    """Reshape: a channel dim merged with trailing plain dims keeps its space (inner grows);
    an unflatten back undoes it; any other mix of a channel dim, or a literal size, freezes.

    ``sized`` (view / reshape only: the out dims whose size the code spells, a literal or a value): a channel
    dim split into ``(H, d)`` or ``(P, H, d)`` becomes attention heads (``_head_split``), and a size spelling
    heads, or heads merged back into channels, is recorded (``ViewRecord``) for the rewrite to set instead of
    freezing."""
    groups = _groups(list(x.shape), list(out_shape))
    dims: list = [None] * len(out_shape)
    zeros: list = [None] * len(out_shape)
    if groups is None:
        ctx.freeze_all(x, "reshape not understood")
        return ctx.tensor(out_shape, tuple(dims), tuple(zeros))
    resized: list[tuple[int, Layout]] = []
    merged = False
    for gi, gj in groups:
        carried = [d for d in gi if x.dims[d] is not None]
        if not carried:
            continue
        target = _reshape_group(ctx, x, gi, gj, out_shape)
        split = _head_split(ctx, x, gi, gj, out_shape) if target is None and sized is not None else None
        if split is not None:
            h_dim, heads = split
            dims[h_dim], zeros[h_dim] = heads, Zero("none")
            if h_dim in sized:
                resized.append((h_dim, heads))
            continue
        heads = target is not None and ctx.atoms.is_heads(target[1])
        merge = heads and target[1].inner > x.dims[target[2]].inner
        if merge and target[0] != len(out_shape) - 1:
            if not _repeated_heads(x, gi, target[2]):
                target, heads = None, False  # heads merged into anything else but the last dim: not understood
            merge = False  # (kv heads, r) merged into a head dim: each kv head spans its r query heads (GQA)
        if heads and sized is not None and target[0] in sized:
            resized.append((target[0], target[1]))
        if target is None or (target[0] in literal and not heads):
            for d in carried:
                ctx.freeze(x.dims[d], "reshape mixes channels with other dims"
                           if target is None else "reshape to a literal channel count")
            if target is None:
                continue
        out_dim, layout, src = target
        dims[out_dim] = layout
        zeros[out_dim] = copy_zero(ctx, x, src)
        if merge:  # (H, d) merged back into the last dim: H·d channels
            _head_readers(ctx, x, src, layout.inner)
            merged = True
    if resized or merged:
        ctx.record(ViewRecord(tuple(resized), merge=merged))
    return ctx.tensor(out_shape, tuple(dims), tuple(zeros))


def _head_split(ctx, x: TensorSpec, gi, gj, out_shape):
    """Rule: a channel dim (one feature per channel) reshaped into ``(H, d)`` or ``(P, H, d)`` is split into
    attention heads: the ``H`` dim carries a fresh head layout, each of the ``P`` parts (q, k, v of a fused
    projection) is tied to it in blocks of ``d`` channels, the ``d`` and ``P`` dims stay plain (their sizes
    never change).  Returns (H's out dim, head layout), or None when the pattern does not match."""
    big_in = [d for d in gi if x.shape[d] != 1]
    big_out = [d for d in gj if out_shape[d] != 1]
    carried = [d for d in gi if x.dims[d] is not None]
    if len(carried) != 1 or big_in != carried or len(big_out) not in (2, 3) or carried[0] != x.ndim - 1:
        return None  # heads split the last dim (tokens × channels): a channel dim before spatial dims is no head split
    layout = x.dims[carried[0]]
    *part_dims, h_dim, d_dim = big_out
    if d_dim != len(out_shape) - 1:
        return None
    parts = out_shape[part_dims[0]] if part_dims else 1
    heads, d = int(out_shape[h_dim]), int(out_shape[d_dim])
    if layout.inner != 1 or parts * heads * d != ctx.atoms.channels(layout):
        return None
    head_layout = ctx.atoms.new_heads(heads)
    for p in range(parts):
        part = ctx.atoms.select(layout, p * heads * d, (p + 1) * heads * d)
        ctx.atoms.tie_blocks(part, head_layout, d, 1, f"attention heads of {d} channels [{ctx.where}]")
    return h_dim, head_layout


def _repeated_heads(x: TensorSpec, group: list[int], src: int) -> bool:
    """Whether a head dim is merged with plain dims after it into a dim other than the last: kv heads
    repeated for grouped-query attention (``k[:, :, None].expand(B, Hkv, r, N, d).reshape(B, Hkv·r, N, d)``)."""
    return group[0] == src and all(x.dims[d] is None for d in group[1:])


def _head_readers(ctx, x: TensorSpec, src: int, inner: int) -> None:
    """Rule: where heads merge back into channels, the channels of each head in the q, k, v projections are read
    as that head: a consumer per tied part whose zeros are the head's (head h dead: its d channels dead).  Parts
    without such a reader count as alive, so their heads never die."""
    atoms, heads = ctx.atoms, x.dims[src]
    classes = _classes(atoms, heads)
    count = atoms.channels(heads)
    for tie in atoms.ties:
        if tie.block_b != 1 or _classes(atoms, tie.b) != classes:
            continue
        if atoms.channels(tie.a) != count * tie.block_a or tie.a.inner != 1 or heads.inner != 1 or inner < 2:
            continue
        segments = tuple(Segment(x.vid, src, h, h + 1) for h in range(count) for _ in range(tie.block_a))
        reader = ctx.tensor((count * tie.block_a,), (tie.a,), (Zero("copy", (segments,)),))
        ctx.state.consumers.append(Consumer(ctx.node.name, reader.vid, 0, tie.a))
    _kv_head_readers(ctx, x, src, classes, count)


def _classes(atoms, layout: Layout) -> list[tuple[int, int]]:
    """(class root, width) of every leaf atom of a layout: two layouts are the same channels when these agree."""
    return [(atoms.find(leaf), atoms.width[leaf]) for leaf in atoms.leaves(layout.atoms)]


def _kv_head_readers(ctx, x: TensorSpec, src: int, classes: list, count: int) -> None:
    """Rule: under grouped-query attention the k and v channels of kv head j are read as the r query heads of its
    group: dead where all r are (a consumer per k / v projection, zero where every one of the r heads is)."""
    atoms = ctx.atoms
    groups = [tie for tie in atoms.ties if tie.block_b == 1 and tie.block_a > 1 and _classes(atoms, tie.a) == classes]
    for group in groups:
        r, kv = group.block_a, _classes(atoms, group.b)
        parts = [tie for tie in atoms.ties if tie.block_b == 1 and tie.a.inner == 1 and tie is not group and
                 _classes(atoms, tie.b) == kv and atoms.channels(tie.a) == count // r * tie.block_a]
        for layout, block in [(group.b, 1)] + [(tie.a, tie.block_a) for tie in parts]:  # kv heads, then k / v
            sources = tuple(tuple(Segment(x.vid, src, j * r + i, j * r + i + 1) for j in range(count // r)
                                  for _ in range(block)) for i in range(r))
            reader = ctx.tensor((atoms.channels(layout),), (layout,), (Zero("and", sources),))
            ctx.state.consumers.append(Consumer(ctx.node.name, reader.vid, 0, layout))


def _reshape_group(ctx, x: TensorSpec, gi, gj, out_shape):
    """(out dim, layout, in dim) for one group, or None when the channels get mixed."""
    big_in = [d for d in gi if x.shape[d] != 1]
    big_out = [d for d in gj if out_shape[d] != 1]
    carried = [d for d in gi if x.dims[d] is not None]
    if len(carried) != 1 or not big_out:
        return None
    src = carried[0]
    layout = x.dims[src]
    if big_in and big_in[0] != src:
        return None
    trailing = math.prod(x.shape[d] for d in big_in[1:])
    if len(big_out) == 1:
        return big_out[0], Layout(layout.atoms, layout.inner * trailing), src
    rest = math.prod(out_shape[d] for d in big_out[1:])
    total_inner = layout.inner * trailing
    if total_inner % rest or out_shape[big_out[0]] * rest != x.shape[src] * trailing:
        return None
    return big_out[0], Layout(layout.atoms, total_inner // rest), src


@function_rule(torch.flatten)
def flatten_function(ctx, node):
    """torch.flatten: merge dims; a channel dim followed by spatial dims becomes blocks."""
    return _reshape(ctx, ctx.spec(node.args[0]), tuple(ctx.out.shape))


@module_rule(nn.Flatten, nn.Unflatten)
def flatten_module(ctx, node):
    """nn.Flatten / nn.Unflatten: as a reshape."""
    return _reshape(ctx, ctx.spec(node.args[0]), tuple(ctx.out.shape))


@method_rule("flatten", "unflatten", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_")
def flatten_method(ctx, node):
    """x.flatten / squeeze / unsqueeze: as a reshape."""
    return _reshape(ctx, ctx.spec(node.args[0]), tuple(ctx.out.shape))


@function_rule(torch.squeeze, torch.unsqueeze, torch.unflatten)
def squeeze_function(ctx, node):
    """torch.squeeze / unsqueeze / unflatten: as a reshape."""
    return _reshape(ctx, ctx.spec(node.args[0]), tuple(ctx.out.shape))


@method_rule("view", "reshape")
@reads_counts
def view_method(ctx, node):
    """x.view / x.reshape: as a reshape; a literal size on a channel dim freezes it."""
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return _view(ctx, node, sizes)


@function_rule(torch.reshape)
@reads_counts
def reshape_function(ctx, node):
    """torch.reshape(x, shape): as x.reshape."""
    return _view(ctx, node, ctx.arg(1, "shape"))


def _view(ctx, node, sizes):
    """Reshape with the given size arguments (ints are literals; nodes come from the graph)."""
    x = ctx.spec(node.args[0])
    if not isinstance(ctx.value(sizes[0]) if sizes else None, (int, torch.SymInt)) and sizes and \
            isinstance(ctx.spec(sizes[0]) if isinstance(sizes[0], torch.fx.Node) else None, SizeSpec):
        ctx.freeze_all(x, "reshape to a size read from a tensor")
        return _reshape(ctx, x, tuple(ctx.out.shape))
    literal = {i for i, s in enumerate(sizes) if isinstance(s, int) and s != -1}
    counts = {i: ctx.spec(s) for i, s in enumerate(sizes)
              if isinstance(s, torch.fx.Node) and isinstance(ctx.spec(s), ChannelCount)}
    sized = literal | {i for i, s in enumerate(sizes) if isinstance(s, torch.fx.Node)}
    if len(sizes) != len(ctx.out.shape):
        for count in counts.values():
            ctx.freeze(count.layout, f"channel count read as a number [{count.where}] sizes a view of other rank")
        return _reshape(ctx, x, tuple(ctx.out.shape), literal)
    out = _reshape(ctx, x, tuple(ctx.out.shape), literal, sized)
    for i, count in counts.items():
        _sized_by_count(ctx, out.dims[i], count)
    return out


def _sized_by_count(ctx, layout: Layout | None, count: ChannelCount) -> None:
    """Rule: a view dim sized by a channel count read from the graph follows the rewrite (the graph reads the count
    again when it runs) where it carries channels spread as the count's: the two are one space.  A dim of attention
    heads sized so keeps today's way (its size is recorded for the rewrite to set; the count's own space freezes),
    and so does a dim without channels."""
    if layout is not None and not ctx.atoms.is_heads(layout) and layout.inner == count.layout.inner:
        ctx.unify(layout, count.layout, f"a view sized by a channel count read as a number [{count.where}]")
    else:
        ctx.freeze(count.layout, f"channel count read as a number [{count.where}] sizes another dim")


def view_sizes(node: torch.fx.Node) -> tuple[list, object]:
    """The size arguments of a view / reshape node and how to put them back (``set(new_sizes)``)."""
    if node.op == "call_function":
        shape = node.args[1] if len(node.args) > 1 else node.kwargs["shape"]

        def put(new):
            if len(node.args) > 1:
                node.args = (node.args[0], tuple(new), *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "shape": tuple(new)}
        return list(shape), put
    packed = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    sizes = list(node.args[1]) if packed else list(node.args[1:])

    def put_method(new):
        node.args = (node.args[0], tuple(new)) if packed else (node.args[0], *new)
    return sizes, put_method


@method_rule("view_as", "reshape_as")
def view_as(ctx, node):
    """x.view_as(y): as a reshape to y's shape."""
    return _reshape(ctx, ctx.spec(node.args[0]), tuple(ctx.out.shape))


@method_rule("permute")
def permute_method(ctx, node):
    """x.permute(*dims): layouts move with their dims."""
    order = torch.fx.node.map_arg(node.args[1:], ctx.value)  # a dim read as x.dim() - 1: its value
    if len(order) == 1 and isinstance(order[0], (tuple, list)):
        order = order[0]
    x = ctx.spec(node.args[0])
    return move(ctx, x, [norm_dim(d, x.ndim) for d in order], ctx.out.shape)


@function_rule(torch.permute)
def permute_function(ctx, node):
    """torch.permute(x, dims): layouts move with their dims."""
    x = ctx.spec(node.args[0])
    return move(ctx, x, [norm_dim(d, x.ndim) for d in ctx.literal(1, "dims")], ctx.out.shape)


@method_rule("transpose", "swapaxes", "swapdims", "transpose_")
def transpose_method(ctx, node):
    """x.transpose(a, b): the two dims swap layouts."""
    return _transpose(ctx, node)


@function_rule(torch.transpose, torch.swapaxes, torch.swapdims)
def transpose_function(ctx, node):
    """torch.transpose(x, a, b): the two dims swap layouts."""
    return _transpose(ctx, node)


@method_rule("t", "t_")
@function_rule(torch.t)
def t_rule(ctx, node):
    """x.t() / torch.t(x): a 2-d tensor's two dims swap layouts (a 0-d or 1-d one passes as it is)."""
    x = ctx.spec(node.args[0])
    return move(ctx, x, [1, 0] if x.ndim == 2 else list(range(x.ndim)), ctx.out.shape)


def _transpose(ctx, node):
    """Swap two dims."""
    x = ctx.spec(node.args[0])
    a, b = norm_dim(ctx.value(node.args[1]), x.ndim), norm_dim(ctx.value(node.args[2]), x.ndim)
    order = list(range(x.ndim))
    order[a], order[b] = order[b], order[a]
    return move(ctx, x, order, ctx.out.shape)


@method_rule("expand", "expand_as", "broadcast_to")
def expand(ctx, node):
    """expand: size-1 dims grow without coupling; other layouts stay."""
    x = ctx.spec(node.args[0])
    out = tuple(ctx.out.shape)
    offset = len(out) - x.ndim
    order = [None] * offset + [d if x.shape[d] == out[d + offset] else None for d in range(x.ndim)]
    _expand_literals(ctx, node, x, offset)
    return move(ctx, x, order, out)


def _expand_literals(ctx, node, x: TensorSpec, offset: int) -> None:
    """Rule: a channel dim whose size ``expand`` spells as a number freezes (the rewrite cannot follow it),
    except a head count (kv heads repeated for grouped-query attention), recorded for the rewrite to set; one it
    broadcasts (one channel to many, whatever spells the size) freezes too: that channel must stay one."""
    if node.target != "expand":
        return
    sizes, _ = view_sizes(node)
    resized = []
    for d, layout in enumerate(x.dims):
        size = sizes[d + offset] if d + offset < len(sizes) else -1
        if layout is None or size == -1:
            continue
        if ctx.value(size) != x.shape[d]:
            ctx.freeze(layout, "expand broadcasts one channel")
            continue
        if isinstance(size, torch.fx.Node):
            continue  # a size read at run time follows the width
        if ctx.atoms.is_heads(layout) and layout.inner == 1:
            resized.append((d + offset, layout))
        else:
            ctx.freeze(layout, "expand to a literal channel count")
    if resized:
        ctx.record(ViewRecord(tuple(resized)))


# -- reductions and softmax ----------------------------------------------------------------------
def _reduce(ctx, node, dims_arg, keepdim: bool):
    """Reduce over dims: a reduced channel dim is frozen (channels are summed together), except in a plain
    sum or mean over one channel dim, which reads its channels and is restricted to the survivors (``_sum_over``)."""
    x = ctx.spec(node.args[0])
    out = ctx.out if isinstance(ctx.out, torch.Tensor) else ctx.out[0]
    if dims_arg is None:
        reduced = set(range(x.ndim))
    else:
        dims_arg = dims_arg if isinstance(dims_arg, (tuple, list)) else (dims_arg,)
        reduced = {norm_dim(d, x.ndim) for d in dims_arg}
    if not _sum_over(ctx, node, x, reduced):
        for d in reduced:
            ctx.freeze(x.dims[d], f"reduction {getattr(node.target, '__name__', node.target)} over channels")
    order = [d for d in range(x.ndim) if keepdim or d not in reduced]
    order = [None if d in reduced else d for d in order]
    spec = move(ctx, x, order, out.shape)
    if isinstance(ctx.out, torch.Tensor):
        return spec
    return (spec, ctx.blank(ctx.out[1]))


_SUMS = {"sum": "sum", "mean": "mean", torch.sum: "sum", torch.mean: "mean"}


def _sum_over(ctx, node, x: TensorSpec, reduced: set[int]) -> bool:
    """Rule: a sum or mean over exactly one channel dim (plus plain dims) reads those channels and records a
    ``SumRecord``; the rewrite then sums the surviving channels only (a mean keeps its original divisor), so
    removed channels (zeros) and rejuvenated ones leave it as it was.  Anything else: False (it freezes)."""
    op = _SUMS.get(node.target)
    channels = [d for d in reduced if x.dims[d] is not None]
    if op is None or len(channels) != 1 or set(node.kwargs) - {"dim", "keepdim"} or len(node.args) > 3:
        return False
    dim = channels[0]
    layout = ctx.consume(x, dim)
    count = math.prod(int(x.shape[d]) for d in reduced) if op == "mean" else 1
    ctx.record(SumRecord(layout, dim, count, kind=op))
    return True


@method_rule(*methods_with(Trait.REDUCTION), "max", "min")
def reduce_method(ctx, node):
    """x.mean(dims, keepdim) and friends: reduced channel dims freeze (a plain sum/mean over one reads it)."""
    if node.target in ("max", "min") and len(tensor_args(ctx, node.args)) > 1:
        return union_rule(ctx, node)
    dims_arg = ctx.literal(1, "dim", None)
    if node.target == "norm":
        dims_arg = ctx.literal(2, "dim", None)
    return _reduce(ctx, node, dims_arg, bool(ctx.arg(2, "keepdim", False)) or _keeps(ctx, node))


def _keeps(ctx, node) -> bool:
    """Whether a reduction kept its dims (read from the traced output rank)."""
    x = ctx.value(node.args[0])
    out = ctx.out if isinstance(ctx.out, torch.Tensor) else ctx.out[0]
    return isinstance(out, torch.Tensor) and out.ndim == x.ndim


@function_rule(*functions_with(Trait.REDUCTION), torch.max, torch.min)
def reduce_function(ctx, node):
    """torch.mean(x, dims) and friends: reduced channel dims freeze (a plain sum/mean over one reads it)."""
    if node.target in (torch.max, torch.min) and len(tensor_args(ctx, node.args)) > 1:
        return union_rule(ctx, node)
    return _reduce(ctx, node, ctx.literal(1, "dim", None), _keeps(ctx, node))


def _softmax(ctx, node):
    """softmax over a dim couples its entries: a channel dim there freezes; zeros are lost."""
    x = ctx.spec(node.args[0])
    ctx.freeze(x.dims[norm_dim(_softmax_dim(ctx.literal(1, "dim"), x.ndim), x.ndim)], "softmax over channels")
    return ctx.tensor(ctx.out.shape, x.dims)


def _softmax_dim(dim: int | None, ndim: int) -> int:
    """The dim a softmax normalises: the given one, else torch's legacy choice (0 for 0-, 1- and 3-d, else 1)."""
    if dim is not None:
        return dim
    return 0 if ndim in (0, 1, 3) else 1


function_rule(F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax)(_softmax)
method_rule("softmax", "log_softmax")(_softmax)


@module_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)
def softmax_module(ctx, node):
    """nn.Softmax / LogSoftmax / Softmin (dim) / Softmax2d (dim -3): freezes a channel dim it normalises over
    (dim=None: torch's legacy choice, 0 for 0-, 1- and 3-d inputs, else 1)."""
    x = ctx.spec(node.args[0])
    dim = -3 if isinstance(ctx.module, nn.Softmax2d) else _softmax_dim(ctx.module.dim, x.ndim)
    ctx.freeze(x.dims[norm_dim(dim, x.ndim)], "softmax over channels")
    return ctx.tensor(ctx.out.shape, x.dims)


# -- pooling, resizing, padding ---------------------------------------------------------------------
def spatial_op(ctx, x: TensorSpec, n_spatial: int) -> TensorSpec:
    """Ops over the last ``n_spatial`` dims: channel dims there freeze, the rest pass through."""
    for d in range(x.ndim - n_spatial, x.ndim):
        ctx.freeze(x.dims[d], "pooled or resized over channels")
    out = ctx.out[0] if isinstance(ctx.out, tuple) else ctx.out
    return ctx.like(x, tuple(out.shape))


def _with_indices(ctx, spec: TensorSpec):
    """A pooling's output, and with ``return_indices`` its indices: shaped as the output, on its channel spaces
    (an unpooling reads them channel by channel), no zeros."""
    return (spec, ctx.tensor(ctx.out[1].shape, spec.dims)) if isinstance(ctx.out, tuple) else spec


@module_rule(*modules_with(Trait.SPATIAL))
def pool_module(ctx, node):
    """Pooling / resizing / padding / unpooling modules act on trailing (spatial) dims: the channel space passes."""
    x = ctx.spec(node.args[0])
    return _with_indices(ctx, spatial_op(ctx, x, op_info("call_module", None, ctx.module).spatial or x.ndim - 2))


@function_rule(*functions_with(Trait.SPATIAL))
def pool_function(ctx, node):
    """Functional pooling / interpolation: the channel space passes through (spatial 0: every dim past N, C)."""
    x = ctx.spec(node.args[0])
    return _with_indices(ctx, spatial_op(ctx, x, op_info("call_function", node.target).spatial or x.ndim - 2))


_UNPOOL_DIMS = {nn.MaxUnpool1d: 1, nn.MaxUnpool2d: 2, nn.MaxUnpool3d: 3,
                F.max_unpool1d: 1, F.max_unpool2d: 2, F.max_unpool3d: 3}


@module_rule(nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d)
@function_rule(F.max_unpool1d, F.max_unpool2d, F.max_unpool3d)
def max_unpool(ctx, node):
    """MaxUnpool(x, indices): channel c of x is scattered by channel c of the indices (its pooling's), so their
    channel dims are one space (plain indices freeze x's); the trailing dims grow; zeros pass."""
    x = ctx.spec(node.args[0])
    indices = ctx.spec(ctx.arg(1, "indices"))
    n = _UNPOOL_DIMS[type(ctx.module) if node.op == "call_module" else node.target]
    for d in range(x.ndim - n):
        other = indices.dims[d] if isinstance(indices, TensorSpec) and indices.ndim == x.ndim else None
        if x.dims[d] is not None or other is not None:
            ctx.unify(x.dims[d], other, "an unpooling scatters each channel by its pooling's indices")
    return spatial_op(ctx, x, n)


@module_rule(nn.PixelShuffle)
@function_rule(F.pixel_shuffle)
def pixel_shuffle(ctx, node):
    """PixelShuffle(r): output channel c is input channels [c·r², (c+1)·r²) spread over an r×r patch, so the input
    keeps and adds channels in blocks of r², block c tied to output channel c; zero where all r² are."""
    factor = ctx.module.upscale_factor if node.op == "call_module" else ctx.arg(1, "upscale_factor")
    if isinstance(factor, torch.fx.Node):
        return ctx.unknown_op("pixel_shuffle with a factor computed at run time")
    return _space_to_depth(ctx, ctx.spec(node.args[0]), int(factor) ** 2, 1)


@module_rule(nn.PixelUnshuffle)
@function_rule(F.pixel_unshuffle)
def pixel_unshuffle(ctx, node):
    """PixelUnshuffle(r): input channel c becomes output channels [c·r², (c+1)·r²), one per position of its r×r
    patches, so the output keeps and adds channels in blocks of r², block c tied to input channel c."""
    factor = ctx.module.downscale_factor if node.op == "call_module" else ctx.arg(1, "downscale_factor")
    if isinstance(factor, torch.fx.Node):
        return ctx.unknown_op("pixel_unshuffle with a factor computed at run time")
    return _space_to_depth(ctx, ctx.spec(node.args[0]), 1, int(factor) ** 2)


def _space_to_depth(ctx, x: TensorSpec, block_in: int, block_out: int) -> TensorSpec:
    """Rule: a pixel (un)shuffle moves channel dim −3 in whole blocks (``block_in`` input channels to
    ``block_out`` output channels, block k to block k: a fresh output layout tied to the input's); the two
    spatial dims freeze if they carry channels, leading dims pass."""
    c = x.ndim - 3
    for d in (c + 1, c + 2):
        ctx.freeze(x.dims[d], "a pixel shuffle moves spatial positions into channels")
    dims, zeros = list(x.dims), [copy_zero(ctx, x, i) if d is not None else None for i, d in enumerate(x.dims)]
    dims[c + 1] = dims[c + 2] = zeros[c + 1] = zeros[c + 2] = None
    layout = x.dims[c]
    if layout is None:
        return ctx.tensor(ctx.out.shape, tuple(dims), tuple(zeros))
    if block_out == 1 and layout.inner > 1 and layout.inner % block_in == 0:
        # each channel's features are whole blocks (patches unfolded into channels): the shuffle folds them back
        dims[c] = Layout(layout.atoms, layout.inner // block_in)
        return ctx.tensor(ctx.out.shape, tuple(dims), tuple(zeros))
    if layout.inner != 1:
        ctx.freeze(layout, "a pixel shuffle of channels merged with other dims")
        dims[c] = zeros[c] = None
        return ctx.tensor(ctx.out.shape, tuple(dims), tuple(zeros))
    blocks = x.shape[c] // block_in
    dims[c] = ctx.atoms.layout(blocks * block_out)
    ctx.atoms.tie_blocks(layout, dims[c], block_in, block_out, f"pixel shuffle of {block_in}:{block_out} channels "
                         f"[{ctx.where}]")
    # output entry j·block_out + i reads input entries j·block_in + [0, block_in): zero where all of them are
    zeros[c] = Zero("and", tuple(tuple(Segment(x.vid, c, j * block_in + k, j * block_in + k + 1)
                                       for j in range(blocks) for _ in range(block_out)) for k in range(block_in)))
    return ctx.tensor(ctx.out.shape, tuple(dims), tuple(zeros))


@module_rule(nn.Unfold)
@function_rule(F.unfold)
def unfold_patches(ctx, node):
    """Unfold(k): (N, C, H, W) → (N, C·∏k, L), entry c·∏k + j the j-th tap of channel c's patch: each channel
    becomes a block of ∏k features (as flatten makes); the spatial dims become the plain L; zeros kept (padding
    adds zeros)."""
    size = ctx.module.kernel_size if node.op == "call_module" else ctx.arg(1, "kernel_size")
    if holds_node(size):  # a size read at run time: it may follow a width
        return ctx.unknown_op("unfold with a kernel size computed at run time")
    return _patches(ctx, ctx.spec(node.args[0]), math.prod(_pair(size)), unfold=True)


@module_rule(nn.Fold)
@function_rule(F.fold)
def fold_patches(ctx, node):
    """Fold(k): (N, C·∏k, L) → (N, C, H, W), summing each channel's taps into its own plane: a channel whose
    features are whole blocks of ∏k taps comes out as itself; zeros kept."""
    size = ctx.module.kernel_size if node.op == "call_module" else ctx.arg(2, "kernel_size")
    if holds_node(size):  # a size read at run time: it may follow a width
        return ctx.unknown_op("fold with a kernel size computed at run time")
    return _patches(ctx, ctx.spec(node.args[0]), math.prod(_pair(size)), unfold=False)


def _pair(size) -> tuple[int, ...]:
    """A kernel size as a tuple (an int means a square kernel)."""
    return (int(size),) * 2 if isinstance(size, int) else tuple(int(k) for k in size)


def _patches(ctx, x: TensorSpec, taps: int, unfold: bool) -> TensorSpec:
    """Rule: the channel dim (1, or 0 unbatched) keeps its atoms with ``inner`` × or ÷ ``taps``; the other dims
    are positions (a channel layout there freezes); a channel dim that does not split into whole taps freezes."""
    c = x.ndim - (3 if unfold else 2)
    for d in range(c + 1, x.ndim):
        ctx.freeze(x.dims[d], "patches unfolded or folded over channels")
    dims = [None] * len(ctx.out.shape)
    dims[:c] = x.dims[:c]
    layout = x.dims[c]
    if layout is not None and unfold:
        dims[c] = Layout(layout.atoms, layout.inner * taps)
    elif layout is not None and layout.inner % taps == 0:
        dims[c] = Layout(layout.atoms, layout.inner // taps)
    else:
        ctx.freeze(layout, "patches folded from channels that are not whole blocks of taps")
    zeros = tuple(copy_zero(ctx, x, d) if dims[d] is not None else None for d in range(c + 1))
    return ctx.tensor(ctx.out.shape, tuple(dims), zeros + (None,) * (len(dims) - c - 1))


@method_rule("unfold")
def sliding_windows(ctx, node):
    """x.unfold(dim, size, step): windows along ``dim`` (now their count) in a new last dim: along a channel dim it
    freezes (a window spans channels), other channels pass, zeros kept."""
    x = ctx.spec(node.args[0])
    if not isinstance(x, TensorSpec):
        return ctx.blank(ctx.out)
    dim = norm_dim(int(ctx.literal(1, "dimension")), x.ndim)
    ctx.freeze(x.dims[dim], "sliding windows along channels")
    dims = (*(None if d == dim else layout for d, layout in enumerate(x.dims)), None)
    zeros = (*(copy_zero(ctx, x, d) if dims[d] is not None else None for d in range(x.ndim)), None)
    return ctx.tensor(ctx.out.shape, dims, zeros)


@module_rule(nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
def constant_pad_module(ctx, node):
    """ConstantPadNd (ZeroPadNd): pads the trailing dims as the other padding modules; a value ≠ 0 makes a zero
    channel nonzero at its border (zeros lost)."""
    x = ctx.spec(node.args[0])
    spec = spatial_op(ctx, x, len(ctx.module.padding) // 2)
    return spec if ctx.module.value == 0 else ctx.tensor(spec.shape, spec.dims)


@function_rule(F.pad)
def pad(ctx, node):
    """F.pad: pads the last len(pad)/2 dims; a padded channel dim freezes."""
    x = ctx.spec(node.args[0])
    amounts = ctx.arg(1, "pad")  # a node (x.shape[-2:]) pads by amounts read at run time: each counts as nonzero
    amounts = [amounts] * len(ctx.value(amounts)) if isinstance(amounts, torch.fx.Node) else list(amounts)
    for k in range(len(amounts) // 2):
        if amounts[2 * k] or amounts[2 * k + 1]:
            ctx.freeze(x.dims[x.ndim - 1 - k], "padding along channels")
    mode = ctx.arg(2, "mode", "constant")
    value = ctx.arg(3, "value", 0) or 0
    spec = ctx.like(x, tuple(ctx.out.shape))
    # reflect / replicate / circular copy values inside each channel: a zero channel stays zero
    return spec if mode != "constant" or value == 0 else ctx.tensor(spec.shape, spec.dims)


# -- tensor factories ---------------------------------------------------------------------------------
_FACTORIES = (torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn, torch.arange,
              torch.linspace, torch.tensor, torch.eye, torch.randint)
_LIKE = (torch.zeros_like, torch.ones_like, torch.empty_like, torch.rand_like, torch.randn_like, torch.full_like,
         torch.randint_like, torch.bernoulli)


@function_rule(*_FACTORIES)
def factory(ctx, node):
    """Tensor factories create values with no channel space."""
    return ctx.blank(ctx.out)


@function_rule(*_LIKE)
def factory_like(ctx, node):
    """``ones_like(x)`` and kin: new values shaped as x, so its channel dims stay x's spaces (they resize with x)."""
    x = ctx.spec(node.args[0]) if node.args else None
    if not isinstance(x, TensorSpec) or tuple(x.shape) != tuple(ctx.out.shape):
        return ctx.blank(ctx.out)
    return ctx.tensor(x.shape, x.dims)


@method_rule("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor", "bernoulli_", "bernoulli",
             "uniform_", "normal_", "fill_", "zero_")
def factory_method(ctx, node):
    """x.new_*() and in-place random fills produce values with no channel space of their own."""
    x = ctx.spec(node.args[0])
    if node.target in ("bernoulli_", "uniform_", "normal_", "fill_", "zero_") and isinstance(x, TensorSpec):
        return ctx.tensor(x.shape, x.dims)
    return ctx.blank(ctx.out)


@function_rule(torch.linalg.vector_norm, torch.norm)
def vector_norm(ctx, node):
    """vector_norm(x, ord, dim): a reduction; a channel dim in ``dim`` freezes, other channels pass (‖0‖ = 0)."""
    keepdim = bool(ctx.arg(3, "keepdim", False)) or _keeps(ctx, node)
    return _reduce(ctx, node, ctx.literal(2, "dim", None), keepdim)


# -- scans, rolls, gathers, repeats -------------------------------------------------------------------
def _along(ctx, node, dims, reason: str, keeps_zero: bool = True) -> TensorSpec:
    """An op along ``dims`` (None: the flattened tensor): channel dims there freeze, the others pass."""
    x = ctx.spec(node.args[0])
    if not isinstance(x, TensorSpec):
        return ctx.blank(ctx.out)
    along = range(x.ndim) if dims is None else [norm_dim(int(d), x.ndim) for d in dims]
    spec = ctx.like(x, tuple(ctx.out.shape))
    zeros = list(spec.zero)
    for d in along:
        ctx.freeze(x.dims[d], reason)
        zeros[d] = None if x.dims[d] is None else Zero("none")
    if not keeps_zero:
        zeros = [None if z is None else Zero("none") for z in zeros]
    return ctx.tensor(spec.shape, spec.dims, tuple(zeros))


@function_rule(torch.cumsum, torch.cumprod)
@method_rule("cumsum", "cumsum_", "cumprod", "cumprod_")
def cumulative(ctx, node):
    """cumsum / cumprod along a dim: along channels it freezes (channel c reads those before it); else channels pass."""
    return _along(ctx, node, [ctx.literal(1, "dim")], "cumulative sum or product along channels")


@function_rule(torch.triu, torch.tril)
@method_rule("triu", "triu_", "tril", "tril_")
def triangle(ctx, node):
    """triu / tril keep one triangle of the last two dims: channel dims there freeze (which entries survive depends
    on the position), the other channels pass, zeros kept."""
    return _along(ctx, node, [-2, -1], "triangle of a matrix over channels")


@function_rule(torch.diff)
@method_rule("diff")
def diff(ctx, node):
    """diff along a dim: along channels it freezes (neighbours subtract); else channels pass, zeros kept."""
    ends = [ctx.arg(3, "prepend"), ctx.arg(4, "append")]
    for end in ends:
        ctx.freeze_all(ctx.spec(end), "prepended or appended to a diff")
    keeps_zero = all(end is None for end in ends)  # a prepended value enters the first difference
    return _along(ctx, node, [ctx.literal(2, "dim", -1)], "difference along channels", keeps_zero)


@function_rule(torch.roll)
@method_rule("roll")
def roll(ctx, node):
    """roll: a rolled channel dim freezes (channels change places, wrapping at the width); other dims pass."""
    dims = ctx.literal(2, "dims", None)
    dims = [dims] if isinstance(dims, int) else dims
    return _along(ctx, node, dims or None, "roll along channels")


@function_rule(torch.flip, torch.fliplr, torch.flipud)
@method_rule("flip", "fliplr", "flipud")
def flip(ctx, node):
    """flip along dims (fliplr: dim 1, flipud: dim 0): a reversed channel dim freezes (channels change places);
    other dims pass, zeros kept."""
    name = getattr(node.target, "__name__", node.target)
    if name in ("fliplr", "flipud"):
        return _along(ctx, node, [int(name == "fliplr")], "flip along channels")
    dims = torch.fx.node.map_arg([*node.args[1:], *node.kwargs.values()], ctx.value)
    dims = [d for item in dims for d in (item if isinstance(item, (list, tuple)) else [item])]
    return _along(ctx, node, dims, "flip along channels")


@function_rule(torch.rot90)
@method_rule("rot90")
def rot90(ctx, node):
    """rot90(x, k, dims): the two dims are flipped (and swapped for odd k); spatial dims pass, channels there
    freeze."""
    k, dims = ctx.literal(1, "k", 1), ctx.literal(2, "dims", (0, 1))
    x = ctx.spec(node.args[0])
    along = [norm_dim(int(d), x.ndim) for d in dims] if isinstance(x, TensorSpec) else []
    if k % 2 and any(x.dims[d] is not None for d in along):
        ctx.freeze_all(x, "rot90 swapping a channel dim")
        return ctx.blank(ctx.out)
    return _along(ctx, node, along, "rot90 along channels")


@function_rule(torch.gather)
@method_rule("gather")
def gather(ctx, node):
    """gather(x, dim, index): a channel dim gathered along freezes; every other dim ties x, index and output."""
    x, index = ctx.spec(node.args[0]), ctx.spec(ctx.arg(2, "index"))
    if not isinstance(x, TensorSpec) or not isinstance(index, TensorSpec):
        ctx.freeze_all(x, "gather with an index nrfx cannot follow")
        return ctx.blank(ctx.out)
    dim = norm_dim(int(ctx.literal(1, "dim")), x.ndim)
    dims, zeros = [], []
    for d in range(x.ndim):
        if d == dim or x.shape[d] != index.shape[d]:  # gathered along, or only a prefix of it read
            for layout in (x.dims[d], index.dims[d]):
                ctx.freeze(layout, "gather along channels" if d == dim else "gather reads part of a channel dim")
            dims.append(None)
            zeros.append(None)
        elif x.dims[d] is None and index.dims[d] is None:
            dims.append(None)
            zeros.append(None)
        else:
            dims.append(ctx.unify(x.dims[d], index.dims[d], "tied by gather"))
            zeros.append(copy_zero(ctx, x, d) if x.dims[d] is not None else Zero("none"))
    return ctx.tensor(ctx.out.shape, tuple(dims), tuple(zeros))


@function_rule(torch.tile)
@method_rule("repeat", "tile")
def repeat(ctx, node):
    """x.repeat(*sizes), x.tile(dims): a channel dim repeated more than once freezes; dims repeated once pass; new
    dims are plain (tile's shorter ``dims`` count from the last dim)."""
    x = ctx.spec(node.args[0])
    if not isinstance(x, TensorSpec):
        return ctx.blank(ctx.out)
    sizes = node.args[1:] or [ctx.arg(1, "dims")]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    sizes = [ctx.value(s) for s in sizes]
    sizes = [1] * (x.ndim - len(sizes)) + sizes
    offset = len(sizes) - x.ndim
    order: list[int | None] = [None] * offset
    for d in range(x.ndim):
        once = isinstance(sizes[offset + d], int) and sizes[offset + d] == 1
        if not once:
            ctx.freeze(x.dims[d], "repeat along channels")
        order.append(d if once else None)
    return move(ctx, x, order, ctx.out.shape)


@function_rule(torch.repeat_interleave)
@method_rule("repeat_interleave")
def repeat_interleave(ctx, node):
    """repeat_interleave(x, repeats, dim): a channel dim repeated (each channel in place, more than once) freezes
    and its output dim is plain; other dims pass, zeros kept; without ``dim`` (the flattened tensor) all freeze."""
    x, repeats, dim = ctx.spec(node.args[0]), ctx.value(ctx.arg(1, "repeats")), ctx.literal(2, "dim")
    if not isinstance(x, TensorSpec) or not isinstance(ctx.out, torch.Tensor):
        return ctx.blank(ctx.out)  # torch.repeat_interleave(counts): indices, no channels
    if dim is None:
        ctx.freeze_all(x, "repeat_interleave of the flattened tensor")
        return ctx.blank(ctx.out)
    dim = norm_dim(int(dim), x.ndim)
    once = isinstance(repeats, int) and repeats == 1
    if not once:
        ctx.freeze(x.dims[dim], "repeat_interleave along channels")
    return move(ctx, x, [d if once or d != dim else None for d in range(x.ndim)], ctx.out.shape)


# -- coordinates and resampling ---------------------------------------------------------------------------
@function_rule(torch.meshgrid)
def meshgrid(ctx, node):
    """meshgrid: coordinate grids with no channel space (a channel vector given as input freezes)."""
    ctx.freeze_all(tuple(ctx.spec(a) for a in node.all_input_nodes), "input of meshgrid")
    return ctx.blank(ctx.out)


@function_rule(F.one_hot)
def one_hot(ctx, node):
    """F.one_hot(indices): integer indices spread over a new class dim: no channel space (channels read as
    indices freeze)."""
    ctx.freeze_all(ctx.spec(node.args[0]), "indices of one_hot")
    return ctx.blank(ctx.out)


@function_rule(F.grid_sample)
def grid_sample(ctx, node):
    """F.grid_sample(x, grid): channels are resampled one by one: dim 1 passes, zeros kept; the grid has none."""
    x, grid = ctx.spec(node.args[0]), ctx.spec(ctx.arg(1, "grid"))
    ctx.freeze_all(grid, "sampling grid of grid_sample")
    if not isinstance(x, TensorSpec):
        return ctx.blank(ctx.out)
    for d in (0, *range(2, x.ndim)):
        ctx.freeze(x.dims[d], "resampled by grid_sample")
    dims = [None] * x.ndim
    zeros: list = [None] * x.ndim
    if x.dims[1] is not None:
        dims[1], zeros[1] = x.dims[1], copy_zero(ctx, x, 1)
    return ctx.tensor(ctx.out.shape, tuple(dims), tuple(zeros))


# -- products with a parameter and lookups in a parameter table, outside any module ---------------------------
@function_rule(torch.addmm)
def addmm(ctx, node):
    """addmm(b, x, W) = b + x @ W on parameters W (in, out), b (out,): a linear layer whose weight dims are (in, out).

    Hugging Face ``Conv1D`` (GPT-2).  x's channels are consumed, the output's are a new space; W's dim 0
    carries the input space and dim 1 the output space, so the rewrite resizes it in place.  A computed W
    or b (not a parameter, or b not one vector of the output width) is an unknown op.
    """
    name, w_shape = param_of(ctx, ctx.arg(2, "mat2"))
    bias_name, bias_shape = param_of(ctx, ctx.arg(0, "input"))
    x = ctx.spec(ctx.arg(1, "mat1"))
    if name is None or len(w_shape) != 2 or not isinstance(x, TensorSpec) or x.ndim != 2:
        return ctx.unknown_op("function addmm with a computed weight")
    if bias_name is None or bias_shape != (w_shape[1],):
        return ctx.unknown_op("function addmm with a computed or broadcast input")
    spec, in_l, out_l = linear_layout(ctx, x, (w_shape[1], w_shape[0]), name, None, True)
    ctx.param_named(name, w_shape, (in_l, out_l))
    ctx.param_named(bias_name, bias_shape, (out_l,))
    ctx.record(LayerRecord("linear", weight=name, bias=bias_name, input=in_l, output=out_l, transposed=True))
    return spec


@function_rule(F.embedding)
def embedding_function(ctx, node):
    """F.embedding(indices, table) on a parameter table: the table's dim 1 is a new space, the output's last dim."""
    name, shape = param_of(ctx, ctx.arg(1, "weight"))
    indices = ctx.spec(node.args[0])
    if name is None or len(shape) != 2 or not isinstance(indices, TensorSpec):
        return ctx.unknown_op("function embedding with a computed table")
    norm = "embedding max_norm rescales rows by their norm over the channels"
    return _table_rows(ctx, name, shape, indices.dims, norm if ctx.arg(3, "max_norm") is not None else None)


def rearranged_positions(channel_dim: int):
    """Rule factory for a function that rearranges positions (windows back into an image, blocks into a grid)
    around one channel dim: that dim passes, zeros kept; channels found on any other dim freeze."""

    def rule(ctx, node):
        """Positions rearranged, the channel dim in place: it passes; channels elsewhere freeze."""
        x, out = ctx.spec(node.args[0]), ctx.out
        name = getattr(node.target, "__name__", node.target)
        if not isinstance(x, TensorSpec) or not isinstance(out, torch.Tensor) or min(x.ndim, out.ndim) < 2 or \
                x.shape[channel_dim] != out.shape[channel_dim]:
            return ctx.unknown_op(f"function {name} on an unexpected input")
        source = channel_dim % x.ndim
        for d in range(x.ndim):
            if d != source:
                ctx.freeze(x.dims[d], f"positions rearranged by {name}")
        target = channel_dim % out.ndim
        return move(ctx, x, [source if d == target else None for d in range(out.ndim)], out.shape)

    return rule
