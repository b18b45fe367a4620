"""Rules for layers with weights: conv, conv-transpose, linear, embedding, the recurrent layers and the norms."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nrfx.analysis.records import LayerRecord
from nrfx.analysis.rules.common import copy_zero, param_of
from nrfx.analysis.rules.registry import function_rule, module_rule
from nrfx.analysis.specs import TensorSpec, Zero
from nrfx.layers.gates import Gate
from nrfx.layers.srlayers import SR_LAYERS, block_names, unused_weights
from nrfx.ops.layer_kinds import input_projections

__all__: list[str] = []

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, *(c for c in SR_LAYERS if issubclass(c, nn.modules.conv._ConvNd)))
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _channel_dim(x: TensorSpec, weight_ndim: int) -> int:
    """Channel dim of a conv input: 1 when batched, 0 when not."""
    return 1 if x.ndim == weight_ndim else 0


def _conv(ctx, x: TensorSpec, w_shape, groups: int, key, transposed: bool, mask: str | None):
    """Conv rule: input channels consume a space, output channels produce a new one.

    Depthwise (groups == in == out) keeps the input space; other grouped convs tie their input
    and output group by group (``_grouped``).  Returns (out spec, in layout, out layout, weight dims).
    """
    cdim = _channel_dim(x, len(w_shape))
    _freeze_other_dims(ctx, x, cdim, "a conv's kernel mixes positions along its batch and spatial dims")
    cin = w_shape[0] if transposed else w_shape[1] * groups
    cout = w_shape[1] * groups if transposed else w_shape[0]
    in_l = ctx.consume(x, cdim)
    ctx.share((key, "in"), in_l)
    kernel = math.prod(w_shape[2:])
    out = ctx.out
    # MACs per weight element: output positions (conv) or input positions (transposed, fvcore's rule)
    positions = ctx.value(ctx.node.args[0]).numel() // cin if transposed else out.numel() // cout
    if groups > 1 and groups == cin == cout and not transposed:
        out_l = in_l if in_l is not None else ctx.fresh(cout, (key, "out"))
        if in_l is None:
            ctx.freeze(out_l, "depthwise conv over a plain dim")
        w_dims = (out_l,) + (None,) * (len(w_shape) - 1)
        ctx.add_macs(kernel * positions, out_l)
    elif groups > 1:
        out_l = ctx.fresh(cout, (key, "out"))
        w_dims = _grouped(ctx, in_l, out_l, w_shape, groups, transposed, kernel * positions)
    else:
        out_l = ctx.fresh(cout, (key, "out"))
        w_dims = ((in_l, out_l) if transposed else (out_l, in_l)) + (None,) * (len(w_shape) - 2)
        ctx.add_macs(kernel * positions * (cin if in_l is None else 1), in_l, out_l)
    dims = [None] * x.ndim
    dims[cdim] = out_l
    zero = [None] * x.ndim
    zero[cdim] = Zero("none", (), mask)
    spec = ctx.tensor(out.shape, tuple(dims), tuple(zero))
    return spec, in_l, out_l, w_dims


def _freeze_other_dims(ctx, x: TensorSpec, keep: int, reason: str) -> None:
    """Rule: channels found on a dim that a layer mixes or reduces (a conv's spatial dims, a norm's statistics) freeze.

    Such a layer spells that dim's size nowhere a rewrite could follow, and its output there no
    longer holds one value per channel.
    """
    for d, layout in enumerate(x.dims):
        if d != keep:
            ctx.freeze(layout, f"channels on dim {d} of {reason}")


def _grouped(ctx, in_l, out_l, w_shape, groups: int, transposed: bool, per_weight: int):
    """Grouped conv: fixed channels per group, the number of groups follows the width.

    Group k of the input feeds group k of the output only, so the two spaces keep and add
    channels in whole groups, group k with group k (a block tie); the weight's per-group dim
    (``cin/groups``, transposed ``cout/groups``) never changes.  Over a plain input dim both
    sides freeze.  Returns the weight dims.
    """
    cin = w_shape[0] if transposed else w_shape[1] * groups
    cout = w_shape[1] * groups if transposed else w_shape[0]
    reason = f"grouped conv (groups={groups})"
    if in_l is None:
        ctx.freeze(out_l, f"{reason} over a plain dim")
    else:
        ctx.atoms.tie_blocks(in_l, out_l, cin // groups, cout // groups, f"{reason} [{ctx.where}]")
    whole = in_l if transposed else out_l  # weight dim 0 carries a space, dim 1 is one group's channels
    ctx.add_macs(w_shape[1] * per_weight * (1 if whole is not None else w_shape[0]), whole)
    return (whole,) + (None,) * (len(w_shape) - 1)

def _layer_params(ctx, m: nn.Module, target: str, w_dims, out_l) -> None:
    """Register a layer's weight and bias; an S/R layer's blocks register as its dense ``weight`` and ``bias``."""
    if not isinstance(m, SR_LAYERS):
        ctx.param(m.weight, w_dims)
        ctx.param(m.bias, (out_l,))
        return
    for attr, dims in (("weight", w_dims), ("bias", (out_l,))):
        if block_names(m, attr):
            ctx.param_named(f"{target}.{attr}", m._dense_shape(attr), dims)


@module_rule(*_CONVS, *_TRANSPOSED)
def conv_module(ctx, node):
    """Conv / ConvTranspose module: in consumes a space, out produces one (depthwise: same space)."""
    m = ctx.module
    transposed = isinstance(m, _TRANSPOSED)
    x = ctx.spec(node.args[0])
    spec, in_l, out_l, w_dims = _conv(ctx, x, tuple(m.weight.shape), m.groups, node.target, transposed, node.target)
    _layer_params(ctx, m, node.target, w_dims, out_l)
    unused = unused_weights(m)
    ctx.record(LayerRecord("conv", module=node.target, input=in_l, output=out_l, groups=m.groups,
                           transposed=transposed, unused_params=unused,
                           unused_macs=unused * (ctx.out.numel() // m.weight.shape[0]), input_dim=1 - m.weight.dim()))
    return spec


@function_rule(F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
def conv_function(ctx, node):
    """F.conv*(x, weight, bias, ...) on model parameters: as the conv module."""
    name, w_shape = param_of(ctx, ctx.arg(1, "weight"))
    if name is None:
        return ctx.unknown_op(f"function {node.target.__name__} with a computed weight")
    transposed = "transpose" in node.target.__name__
    groups = ctx.arg(6, "groups", 1)
    if isinstance(groups, torch.fx.Node):  # read from a tensor at run time: it may follow a width
        return ctx.unknown_op(f"function {node.target.__name__} with groups computed at run time")
    x = ctx.spec(node.args[0])
    spec, in_l, out_l, w_dims = _conv(ctx, x, w_shape, int(groups), name, transposed, None)
    ctx.param_named(name, w_shape, w_dims)
    bias_name = _bias(ctx, ctx.arg(2, "bias"), out_l)
    ctx.record(LayerRecord("conv", weight=name, bias=bias_name, input=in_l, output=out_l, groups=int(groups),
                           transposed=transposed, groups_arg=_literal_groups(ctx, node, w_shape, transposed, out_l),
                           input_dim=1 - len(w_shape)))
    return spec


def _literal_groups(ctx, node, w_shape, transposed: bool, out_l) -> int | str | None:
    """Where a grouped or depthwise F.conv* spells ``groups`` (position 6 or the keyword): it follows the new width."""
    groups = ctx.arg(6, "groups", 1)
    if out_l is None or not isinstance(groups, int) or groups <= 1:
        return None
    return 6 if len(node.args) > 6 else "groups"


def linear_layout(ctx, x: TensorSpec, w_shape, key, mask: str | None, bias: bool):
    """Linear rule: the last dim consumes a space and produces a new one; leading dims pass (a zero row
    stays zero without a bias)."""
    in_l = ctx.consume(x, x.ndim - 1)
    ctx.share((key, "in"), in_l)
    out_l = ctx.fresh(w_shape[0], (key, "out"))
    lead = x.dims[:-1]  # each row is computed on its own: channels on a leading dim pass (MLP-Mixer's token mixing)
    rows = ctx.out.numel() // w_shape[0] // math.prod(ctx.atoms.channels(d) for d in lead if d is not None)
    ctx.add_macs(rows * (w_shape[1] if in_l is None else 1), in_l, out_l, *lead)
    passed = (None if d is None else copy_zero(ctx, x, i) if not bias else Zero("none") for i, d in enumerate(lead))
    zero = (*passed, Zero("none", (), mask))
    return ctx.tensor(ctx.out.shape, (*lead, out_l), zero), in_l, out_l


@module_rule(nn.Linear, *(c for c in SR_LAYERS if issubclass(c, nn.Linear)))
def linear_module(ctx, node):
    """Linear module: last dim in consumes a space, last dim out produces one."""
    m = ctx.module
    spec, in_l, out_l = linear_layout(ctx, ctx.spec(node.args[0]), tuple(m.weight.shape), node.target, node.target,
                                      m.bias is not None)
    _layer_params(ctx, m, node.target, (out_l, in_l), out_l)
    unused = unused_weights(m)
    ctx.record(LayerRecord("linear", module=node.target, input=in_l, output=out_l, unused_params=unused,
                           unused_macs=unused * (ctx.out.numel() // m.weight.shape[0]), input_dim=-1))
    return spec


@function_rule(F.linear)
def linear_function(ctx, node):
    """F.linear(x, weight, bias) on model parameters: as the linear module."""
    name, w_shape = param_of(ctx, ctx.arg(1, "weight"))
    if name is None or len(w_shape) != 2:
        return ctx.unknown_op("function linear with a computed weight")
    spec, in_l, out_l = linear_layout(ctx, ctx.spec(node.args[0]), w_shape, name, None, ctx.arg(2, "bias") is not None)
    ctx.param_named(name, w_shape, (out_l, in_l))
    bias_name = _bias(ctx, ctx.arg(2, "bias"), out_l)
    ctx.record(LayerRecord("linear", weight=name, bias=bias_name, input=in_l, output=out_l, input_dim=-1))
    return spec


def _bias(ctx, bias, out_l) -> str | None:
    """Rule: a bias parameter takes the output space; a computed bias (BEiT's ``cat((q_bias, k_bias, v_bias))``)
    ties its channel layout to it, and one that carries none freezes the output (its width is spelled elsewhere).
    Returns the bias parameter's name, or None."""
    bias_name, bias_shape = param_of(ctx, bias)
    if bias_name is not None:
        ctx.param_named(bias_name, bias_shape, (out_l,))
        return bias_name
    spec = ctx.spec(bias) if isinstance(bias, torch.fx.Node) else None
    if isinstance(spec, TensorSpec) and spec.ndim >= 1 and out_l is not None:
        if spec.dims[-1] is not None:
            ctx.unify(out_l, spec.dims[-1], "bias computed from other channels")
        else:
            ctx.freeze(out_l, "a computed bias without a channel space (its width is spelled elsewhere)")
    return None


@module_rule(nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell)
def recurrent(ctx, node):
    """RNN / LSTM / GRU and their cells: the input weights' columns consume the input features; the hidden size freezes.

    The input features (last dim) are read by ``weight_ih_l0`` (per direction; a cell's ``weight_ih``); the hidden
    size, the time and batch dims and any initial state freeze; MACs as measured.  Feature j enters only through
    column j of those weights, a linear map at every time step, so a removed feature goes with its column and a
    new one is read through a zero column (the layer kind's ``init``).
    """
    m = ctx.module
    name = type(m).__name__
    x = ctx.spec(node.args[0])
    if not isinstance(x, TensorSpec):
        return ctx.unknown_op(f"module {name} over a PackedSequence")
    for state in node.all_input_nodes[1:]:
        ctx.freeze_all(ctx.spec(state), f"initial state of {name} (its width is the hidden size)")
    _freeze_other_dims(ctx, x, x.ndim - 1, f"{name} (it mixes time steps)")
    in_l = ctx.consume(x, x.ndim - 1)
    weights = [getattr(m, attr) for attr, _ in input_projections(m)]
    for weight in weights:
        ctx.param(weight, (None, in_l))  # rows: the gates, sized by the hidden size (new columns start at zero)
    per_feature = (ctx.value(node.args[0]).numel() // x.shape[-1]) * sum(w.shape[0] for w in weights)
    reading = per_feature * x.shape[-1]  # the input projection's MACs; the rest (hidden to hidden) stays as is
    ctx.add_macs(max(ctx.measured_macs() - reading, 0))
    ctx.add_macs(per_feature * (x.shape[-1] if in_l is None else 1), in_l)
    spec = ctx.blank(ctx.out)
    ctx.freeze_all(spec, f"output of {name} (its width is the hidden size)")
    ctx.record(LayerRecord("recurrent", module=node.target, input=in_l, input_dim=-1))
    return spec


@module_rule(nn.Embedding, nn.EmbeddingBag)
def embedding(ctx, node):
    """Embedding / EmbeddingBag: the embedding dim is a new space produced by the table (a bag sums, averages or
    takes the max of rows, column by column); ``max_norm`` rescales the rows read by their norm over that dim, so
    it freezes."""
    m = ctx.module
    out_l = ctx.fresh(m.embedding_dim, (node.target, "out"))
    if m.max_norm is not None:
        ctx.freeze(out_l, "embedding max_norm rescales rows by their norm over the channels")
    ctx.param(m.weight, (None, out_l))
    shape = tuple(ctx.out.shape)
    ctx.record(LayerRecord("embedding", module=node.target, output=out_l))
    return ctx.tensor(shape, (None,) * (len(shape) - 1) + (out_l,))


_PER_CHANNEL = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


@module_rule(*_PER_CHANNEL)
def per_channel_norm(ctx, node):
    """BatchNorm / InstanceNorm: same space in and out; γ marks the live channels.

    Zeros do not pass through a norm: a channel that is zero at its input leaves as a constant
    (β − γ·μ/σ in eval mode, β in training), so the output is known zero only where the norm's
    own mask says so (γ = 0, and β = 0 for an exact zero).
    """
    m = ctx.module
    x = ctx.spec(node.args[0])
    cdim = 1 if x.ndim > 1 else 0
    _freeze_other_dims(ctx, x, cdim, f"{type(m).__name__} (its statistics reduce over them)")
    layout = x.dims[cdim]
    for tensor in (m.weight, m.bias, m.running_mean, m.running_var):
        ctx.param(tensor, (layout,))
    ctx.record(LayerRecord("norm", module=node.target, input=layout, output=layout))
    if layout is None:
        return ctx.tensor(ctx.out.shape)
    zero = [None] * x.ndim
    zero[cdim] = Zero("none", (), node.target)
    return ctx.tensor(ctx.out.shape, x.dims, tuple(zero))


@module_rule(Gate)
def gate(ctx, node):
    """nrfx.Gate: same space in and out on its ``dim``; its scale marks the live channels, as a norm's γ.

    The output is known zero only where the gate's own mask says so (like a norm), not where its
    input is: the rewrite may give the gate's new entries a value of its own (γ0).
    """
    m = ctx.module
    x = ctx.spec(node.args[0])
    if not isinstance(x, TensorSpec):
        return ctx.blank(ctx.out)
    cdim = m.dim % x.ndim
    layout = x.dims[cdim]
    ctx.param(m.weight, (layout,))
    ctx.record(LayerRecord("norm", module=node.target, input=layout, output=layout))
    if layout is None:
        return ctx.tensor(ctx.out.shape)
    zero = [None if d is None else Zero("none") for d in x.dims]
    zero[cdim] = Zero("none", (), node.target)
    return ctx.tensor(ctx.out.shape, x.dims, tuple(zero))


@function_rule(F.batch_norm, F.instance_norm)
def per_channel_norm_function(ctx, node):
    """F.batch_norm / F.instance_norm: same space in and out; parameters follow dim 1; zeros do not pass."""
    x = ctx.spec(node.args[0])
    cdim = 1 if x.ndim > 1 else 0
    _freeze_other_dims(ctx, x, cdim, f"{node.target.__name__} (its statistics reduce over them)")
    layout = x.dims[cdim]
    for arg in node.args[1:5]:
        name, shape = param_of(ctx, arg)
        if name is not None:
            ctx.param_named(name, shape, (layout,), buffer="running" in name)
    return ctx.tensor(ctx.out.shape, x.dims)


def _group_space(ctx, x, groups: int):
    """The channel layout of a GroupNorm input, tied to itself in whole groups (None: no channel space); channels
    on its other dims freeze (the statistics reduce over them)."""
    if not isinstance(x, TensorSpec) or x.ndim < 2:
        return None
    _freeze_other_dims(ctx, x, 1, "GroupNorm (its statistics reduce over them)")
    if x.dims[1] is None:
        return None
    layout = x.dims[1]
    width = ctx.atoms.channels(layout)
    if layout.inner != 1 or not isinstance(groups, int) or groups < 1 or width % groups:
        ctx.freeze(layout, f"GroupNorm with groups={groups!r} over {width} channels")
        return layout
    ctx.atoms.tie_blocks(layout, layout, width // groups, width // groups, f"GroupNorm(groups={groups}) [{ctx.where}]")
    return layout


def _norm_output(ctx, x, layout, mask: str | None):
    """A norm's output spec: the input's layouts; known zero only where the norm's own mask says."""
    if layout is None:
        return ctx.tensor(ctx.out.shape, x.dims if isinstance(x, TensorSpec) else None)
    zero = [None if d is None else Zero("none") for d in x.dims]
    zero[1] = Zero("none", (), mask)
    return ctx.tensor(ctx.out.shape, x.dims, tuple(zero))


@module_rule(nn.GroupNorm)
def group_norm(ctx, node):
    """GroupNorm: same space in and out, resized in whole groups (channels per group fixed); γ marks live channels.

    A group is dead when all its channels are; removing whole groups leaves the statistics of
    the others exactly as they were, and ``num_groups`` follows the new width.  Without affine
    there is no liveliness signal, but the space may still be resized in whole groups.
    """
    m = ctx.module
    x = ctx.spec(node.args[0])
    layout = _group_space(ctx, x, m.num_groups)
    for tensor in (m.weight, m.bias):
        ctx.param(tensor, (layout,))
    ctx.record(LayerRecord("norm", module=node.target, input=layout, output=layout, groups=m.num_groups))
    return _norm_output(ctx, x, layout, node.target)


@function_rule(F.group_norm)
def group_norm_function(ctx, node):
    """F.group_norm(x, num_groups, weight, bias): as the module; a literal ``num_groups`` follows the new width."""
    x = ctx.spec(node.args[0])
    groups = ctx.arg(1, "num_groups")
    layout = _group_space(ctx, x, groups)
    names = []
    for index, key in ((2, "weight"), (3, "bias")):
        name, shape = param_of(ctx, ctx.arg(index, key))
        if name is not None:
            ctx.param_named(name, shape, (layout,))
        names.append(name)
    position = 1 if len(node.args) > 1 else "num_groups"
    ctx.record(LayerRecord("group_norm", weight=names[0], bias=names[1], input=layout, output=layout,
                           groups=groups if isinstance(groups, int) else 1, groups_arg=position))
    return _norm_output(ctx, x, layout, None)


@module_rule(nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)
def coupling_norm(ctx, node):
    """LayerNorm / RMSNorm / LRN: statistics couple all the normalised channels, freeze them.

    (A LayerNorm is a GroupNorm with one group: removing a channel changes every other one's
    statistics, so it stays frozen.)
    """
    m = ctx.module
    x = ctx.spec(node.args[0])
    shape = getattr(m, "normalized_shape", None)
    touched = range(x.ndim - len(shape), x.ndim) if shape is not None else [1]
    for d in touched:
        ctx.freeze(x.dims[d], f"{type(m).__name__} statistics couple the channels")
    return ctx.tensor(ctx.out.shape, x.dims)  # a zero slice leaves as β: zeros do not pass


def _normalized_rank(ctx, ndim: int) -> int:
    """How many trailing dims a functional layer/rms norm normalises: its ``normalized_shape``'s length, a literal
    or a size read from a tensor (``y.shape[1:]``, ``self.weight.shape``); unknown: every dim but the first."""
    shape = ctx.value(ctx.arg(1, "normalized_shape"))
    if isinstance(shape, int):
        return 1
    try:
        return min(len(shape), ndim)
    except TypeError:
        return ndim - 1


@function_rule(F.layer_norm, F.rms_norm, F.local_response_norm, F.normalize)
def coupling_norm_function(ctx, node):
    """Functional layer/rms norm, LRN and normalize: freeze the normalised dims; normalize keeps zeros
    (x / max(‖x‖, eps) is zero where x is)."""
    x = ctx.spec(node.args[0])
    name = node.target.__name__
    if name in ("layer_norm", "rms_norm"):
        touched = range(x.ndim - _normalized_rank(ctx, x.ndim), x.ndim)
    elif name == "normalize":
        touched = [ctx.literal(2, "dim", 1)]
    else:
        touched = [1]
    for d in touched:
        ctx.freeze(x.dims[d], f"{name} statistics couple the channels")
    return ctx.like(x, ctx.out.shape) if name == "normalize" else ctx.tensor(ctx.out.shape, x.dims)
