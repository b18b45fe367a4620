"""Rules for torchvision's ``torch.fx.wrap``-ped functions: stochastic depth and Swin's window ops (and nrfx's own
Swin helpers, ``nrfx.capture.swin``).

FX keeps these functions as single ``call_function`` nodes, so without a rule they would be
unknown ops.  Each rule states the channel flow of the whole function and counts its exact
multiply-accumulates (torchvision's ``_ops`` convention: conv/linear/matmul, bias excluded).
"""

from __future__ import annotations

import math

from nrfx.analysis.rules.common import param_of
from nrfx.analysis.rules.movement import parameter_with_own_space, rearranged_positions
from nrfx.analysis.rules.registry import function_rule
from nrfx.analysis.spaces import Layout
from nrfx.analysis.specs import TensorSpec, Zero
from nrfx.capture import swin as _nrfx_swin

__all__: list[str] = []

try:  # torchvision is a dependency, but keep nrfx importable without it
    from torchvision.models import swin_transformer as _swin
    from torchvision.ops import stochastic_depth as _stochastic_depth
except Exception:  # pragma: no cover - torchvision absent, or broken (built for another torch)
    _swin = _stochastic_depth = None


def stochastic_depth(ctx, node):
    """stochastic_depth: scales whole rows (or the whole batch) by 0 or 1/(1-p): same space, zeros kept."""
    x = ctx.spec(ctx.arg(0, "input"))
    if not isinstance(x, TensorSpec):
        return ctx.blank(ctx.out)
    return ctx.like(x, tuple(ctx.out.shape))


def patch_merging_pad(ctx, node):
    """Swin patch merging: the 2×2 pixels of each patch go to the channel dim, four copies of its atoms."""
    x = ctx.spec(node.args[0])
    out = ctx.out
    for d in range(x.ndim - 1):
        ctx.freeze(x.dims[d], "Swin patch merging moves pixels into channels")
    layout = x.dims[-1]
    if layout is None:
        return ctx.tensor(out.shape)
    merged = Layout(tuple(ctx.atoms.leaves(layout.atoms)) * 4, layout.inner)
    segments = x.whole(x.ndim - 1, ctx.atoms.channels(layout)) * 4
    dims = (None,) * (out.ndim - 1) + (merged,)
    zeros = (None,) * (out.ndim - 1) + (Zero("copy", (segments,)),)
    return ctx.tensor(out.shape, dims, zeros)


def relative_position_bias(ctx, node):
    """Swin relative position bias: a table gathered by a position index; the table's dims freeze."""
    for arg in node.all_input_nodes:
        ctx.freeze_all(ctx.spec(arg), "gathered by Swin's relative position index")
    return ctx.blank(ctx.out)


def shift_mask(ctx, node):
    """nrfx's Swin shift mask: built from the input's sizes alone, it carries no channels and reads none."""
    return ctx.blank(ctx.out)


def parameter_entries(ctx, node):
    """A function of one parameter that keeps its entries in place: its dim 0 takes the channels it meets.

    Swin V2's qkv bias with its key third zeroed, its clamped logit scale: ``parameter_with_own_space``, as a
    parameter in BEiT's concatenated qkv bias.  A computed argument carries none."""
    name, shape = param_of(ctx, node.args[0])
    if name is None or not shape or tuple(ctx.out.shape) != tuple(shape):
        return ctx.blank(ctx.out)
    return parameter_with_own_space(ctx, name, shape)


def shifted_window_attention(ctx, node):
    """Swin window attention called as a function: it reads C from the input shape, so in and out channels freeze.

    torchvision's own attention modules are opened by the capture (``nrfx.capture.swin``) and never reach this
    rule; a direct call of the function, or a subclass's, does.

    MACs: qkv and proj projections over the window-padded tokens, plus q·kᵀ and attn·v
    (each tokens × window area × C).
    """
    names = [param_of(ctx, ctx.arg(i, key)) for i, key in ((1, "qkv_weight"), (2, "proj_weight"))]
    if any(name is None for name, _ in names):
        return ctx.unknown_op("function shifted_window_attention with computed weights")
    (qkv_name, qkv_shape), (proj_name, proj_shape) = names
    x = ctx.spec(ctx.arg(0, "input"))
    batch, height, width, channels = ctx.value(ctx.arg(0, "input")).shape
    window = list(ctx.arg(4, "window_size"))
    padded_h = math.ceil(height / window[0]) * window[0]
    padded_w = math.ceil(width / window[1]) * window[1]
    tokens = batch * padded_h * padded_w
    in_l = ctx.consume(x, x.ndim - 1)
    ctx.freeze(in_l, "Swin attention reads the channel count from its input shape")
    out_l = ctx.fresh(proj_shape[0], (proj_name, "out"))
    ctx.freeze(out_l, "Swin attention reshapes its output to the input's channel count")
    _register_attention_params(ctx, qkv_name, qkv_shape, proj_name, proj_shape, in_l, out_l)
    area = window[0] * window[1]
    ctx.add_macs(tokens * (math.prod(qkv_shape) + 2 * area * channels + math.prod(proj_shape)))
    dims = (None,) * (x.ndim - 1) + (out_l,)
    return ctx.tensor(ctx.out.shape, dims, (None,) * (x.ndim - 1) + (Zero("none"),))


def _register_attention_params(ctx, qkv_name, qkv_shape, proj_name, proj_shape, in_l, out_l) -> None:
    """qkv reads the input space into frozen heads; proj writes the output space."""
    heads = ctx.fresh(qkv_shape[0], (qkv_name, "out"))
    ctx.freeze(heads, "split into attention heads")
    mixed = ctx.fresh(proj_shape[1], (proj_name, "in"))
    ctx.freeze(mixed, "attention heads merged")
    ctx.param_named(qkv_name, qkv_shape, (heads, in_l))
    ctx.param_named(proj_name, proj_shape, (out_l, mixed))
    for key, index, layout in (("qkv_bias", 9, heads), ("proj_bias", 10, out_l)):
        bias_name, bias_shape = param_of(ctx, ctx.arg(index, key))
        if bias_name is not None:
            ctx.param_named(bias_name, bias_shape, (layout,))


if _stochastic_depth is not None:
    function_rule(_stochastic_depth)(stochastic_depth)
    function_rule(_swin._patch_merging_pad)(patch_merging_pad)
    function_rule(_swin._get_relative_position_bias)(relative_position_bias)
    function_rule(_swin.shifted_window_attention)(shifted_window_attention)
function_rule(_nrfx_swin.swin_windows)(rearranged_positions(-1))
function_rule(_nrfx_swin.swin_unwindows)(rearranged_positions(-1))
function_rule(_nrfx_swin.swin_shift_mask)(shift_mask)
function_rule(_nrfx_swin.swin_v2_qkv_bias)(parameter_entries)
function_rule(_nrfx_swin.swin_v2_logit_scale)(parameter_entries)
