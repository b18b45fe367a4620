"""Rules for timm's generic no-trace layers: norm + activation, SAME-padded convs and pools; its activation
modules and functional stochastic depth.

timm asks tracers to keep these modules whole (``register_notrace_module``) and nrfx honours
that, so without a rule each would be an unknown op that freezes every space it touches —
BatchNormAct2d alone sits in a third of timm's families.  Model-specific no-trace modules
(attention blocks, positional encodings) stay unknown: they are frozen, never guessed.  timm's own
activation modules (``timm.layers.activations``) are traced into where they stand alone, but inside a
BatchNormAct2d only a rule can say whether they keep zeros; ``drop_path`` (autowrapped by the tracer, so that it
follows train / eval) scales whole samples: channel-wise.  The no-trace functions that put windows back into an image
(swin's, davit's, gcvit's, maxxvit's ``window_reverse`` / ``grid_reverse``, nest's ``deblockify``) move positions
around one channel dim, read from the shape when they run: that dim passes.
"""

from __future__ import annotations

import importlib

from torch import nn

from nrfx.analysis.rules.elementwise import zero_breaking_module, zero_keeping_function, zero_keeping_module
from nrfx.analysis.rules.layers import conv_module, per_channel_norm
from nrfx.analysis.rules.movement import rearranged_positions, spatial_op
from nrfx.analysis.rules.registry import function_rule, lookup, module_rule
from nrfx.analysis.specs import TensorSpec

__all__: list[str] = []

# timm's no-trace functions that only move positions around one channel dim (read from the shape when they run):
# -1 for channels-last tokens, 1 for NCHW maps
TIMM_REARRANGERS = {("swin_transformer", "window_reverse"): -1, ("swin_transformer_v2", "window_reverse"): -1,
                    ("swin_transformer_v2_cr", "window_reverse"): -1, ("davit", "window_reverse"): -1,
                    ("gcvit", "window_reverse"): -1, ("maxxvit", "window_reverse"): -1,
                    ("maxxvit", "grid_reverse"): -1, ("nest", "deblockify"): -1,
                    ("maxxvit", "window_reverse_nchw"): 1, ("maxxvit", "grid_reverse_nchw"): 1}

try:  # timm is optional; import the submodules (timm.layers re-exports same-named functions)
    conv2d_same, norm_act, pool2d_same, std_conv = (
        importlib.import_module(f"timm.layers.{name}")
        for name in ("conv2d_same", "norm_act", "pool2d_same", "std_conv")
    )
    activations, activations_me, drop = (importlib.import_module(f"timm.layers.{name}")
                                         for name in ("activations", "activations_me", "drop"))
except Exception:  # timm absent or broken: nothing to register
    conv2d_same = norm_act = pool2d_same = std_conv = activations = activations_me = drop = None

# timm activation modules by f(0): zero (kept) or not (lost); tests/test_vocabulary.py checks each
TIMM_ZERO_KEEPING = ("GELU", "GELUTanh", "HardMish", "HardSwish", "Mish", "QuickGELU", "Swish", "Tanh",
                     "HardMishMe", "HardSwishMe", "MishMe", "SwishMe")
TIMM_ZERO_BREAKING = ("HardSigmoid", "Sigmoid", "HardSigmoidMe")


def timm_activations(names: tuple[str, ...]) -> list[type]:
    """The timm activation classes of these names that this timm has."""
    found = (getattr(module, name, None) for module in (activations, activations_me) if module for name in names)
    return [kind for kind in found if isinstance(kind, type)]


def norm_act_module(ctx, node):
    """BatchNormAct2d: batch norm, dropout, activation, all per channel: same space in and out.

    γ marks the live channels as for a batch norm; zeros pass only when the dropout and the
    activation keep f(0) = 0.  An activation with no rule freezes the space.
    """
    spec = per_channel_norm(ctx, node)
    if not isinstance(spec, TensorSpec):
        return spec
    layout = spec.dims[1] if spec.ndim > 1 else spec.dims[0]
    keeps_zero = True
    for part in (getattr(ctx.module, "drop", None), getattr(ctx.module, "act", None)):
        keeps_zero &= _channelwise(ctx, part, layout)
    return spec if keeps_zero else ctx.tensor(spec.shape, spec.dims)


def _channelwise(ctx, part: nn.Module | None, layout) -> bool:
    """Follow one per-channel sub-layer; True when it keeps zeros (unknown ones freeze the space)."""
    if part is None:
        return True
    if isinstance(part, nn.PReLU):
        if part.weight.numel() > 1:
            ctx.param(part.weight, (layout,))
        return True
    rule = lookup("call_module", None, part)
    if rule is zero_keeping_module:
        return True
    if rule is not zero_breaking_module:
        ctx.freeze(layout, f"activation {type(part).__name__} inside {type(ctx.module).__name__} has no rule")
    return False


def same_conv_module(ctx, node):
    """Conv2dSame: TF 'SAME' padding then a conv: the conv rule (output size read from the trace)."""
    return conv_module(ctx, node)


def std_conv_module(ctx, node):
    """StdConv2d / ScaledStdConv2d (and their SAME-padded twins): a conv whose weight is standardised over its fan-in.

    The standardisation couples the input channels (removing one changes the others' weights),
    so the input space freezes; output channels stay free, and the gain follows them.
    """
    spec = conv_module(ctx, node)
    in_l = ctx.records[node.name].input
    ctx.freeze(in_l, f"{type(ctx.module).__name__} standardises its weight over the input channels")
    gain = getattr(ctx.module, "gain", None)
    if gain is not None:
        ctx.param(gain, (ctx.records[node.name].output,) + (None,) * (gain.ndim - 1))
    return spec


def _register_rearrangers() -> None:
    """Register ``rearranged_positions`` for the timm functions this timm has."""
    for (module_name, function_name), channel_dim in TIMM_REARRANGERS.items():
        try:
            module = importlib.import_module(f"timm.models.{module_name}")
        except Exception:  # a timm without this family
            continue
        function = getattr(module, function_name, None)
        if callable(function):
            function_rule(function)(rearranged_positions(channel_dim))


def same_pool_module(ctx, node):
    """MaxPool2dSame / AvgPool2dSame: SAME padding then pooling over the spatial dims: same space."""
    return spatial_op(ctx, ctx.spec(node.args[0]), 2)


if norm_act is not None:
    module_rule(*(getattr(norm_act, n) for n in ("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
                  if hasattr(norm_act, n)))(norm_act_module)
    module_rule(conv2d_same.Conv2dSame)(same_conv_module)
    module_rule(std_conv.StdConv2dSame, std_conv.ScaledStdConv2dSame, std_conv.StdConv2d,
                std_conv.ScaledStdConv2d)(std_conv_module)
    module_rule(pool2d_same.MaxPool2dSame, pool2d_same.AvgPool2dSame)(same_pool_module)
    module_rule(*timm_activations(TIMM_ZERO_KEEPING))(zero_keeping_module)
    module_rule(*timm_activations(TIMM_ZERO_BREAKING))(zero_breaking_module)
    function_rule(drop.drop_path)(zero_keeping_function)  # x, or x·mask/keep per sample: channel-wise, zeros kept
    _register_rearrangers()
