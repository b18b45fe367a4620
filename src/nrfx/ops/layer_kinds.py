"""One record per layer kind: what the rewrite knows of a layer type besides its channel rule.

A ``LayerKind`` says how to set a layer's size attributes from its resized tensors (``fix``),
what must hold afterwards (``check``), how to draw a resized copy's initial values (``init``),
whether its weight is a per-channel scale γ (``scale``: the liveliness signal, R channels start
at γ0, neural rescaling raises it, γ = 0 with β ≠ 0 emits β), and whether a constant input gives
a constant output (``constant_passes``, for folding the constants of removed channels), and
whether its weight's dim 1 reads its input channels (``in_columns``: a per-input-channel scale
or gate folds into those columns exactly), and which (weight, bias) attributes its input enters
through when they are not ``weight`` and ``bias`` (``projections``: where a constant input folds).  A
module's record is the one of the nearest registered class in its MRO.  The built-in layers are
registered here; ``nrfx.register_layer`` adds a user's own (with its channel rule and shape
formula, which live in their tables).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from nrfx.layers.gates import Gate

__all__ = ["LayerKind", "LAYER_KINDS", "LEAF_LAYERS", "layer_kind", "add_layer_kind", "is_scale", "scale_types",
           "fix_attributes", "invariant_problem", "constant_input_problem", "conv_padding_problem",
           "set_group_norm_width", "scale_init", "in_columns", "input_projections", "zero_projections"]


@dataclass(frozen=True)
class LayerKind:
    """What nrfx knows of one layer type: resizing it, checking it, initialising it, what it is."""

    kind: type
    fix: Callable[[nn.Module], None] | None = None
    check: Callable[[nn.Module], str | None] | None = None
    init: Callable[[nn.Module, float | None], None] | None = None
    scale: bool = False
    constant_passes: Callable[[nn.Module], str | None] | None = None
    in_columns: Callable[[nn.Module], bool] | None = None  # weight[:, j] (per group) reads input channel j
    projections: Callable[[nn.Module], tuple[tuple[str, str], ...]] | None = None  # (weight, bias) reading input


LAYER_KINDS: dict[type, LayerKind] = {}
LEAF_LAYERS: set[type] = set()  # user layers registered with a channel rule: fx keeps them as leaves


def add_layer_kind(record: LayerKind) -> LayerKind:
    """Register (or replace) the record of one layer type."""
    LAYER_KINDS[record.kind] = record
    return record


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The record of the nearest registered class in the module's MRO (None: an unknown layer)."""
    for base in type(module).__mro__:
        if base in LAYER_KINDS:
            return LAYER_KINDS[base]
    return None


def is_scale(module: nn.Module) -> bool:
    """Whether a module is a per-channel scale layer (BatchNorm, InstanceNorm, GroupNorm, Gate, a registered one)."""
    kind = layer_kind(module)
    return kind is not None and kind.scale


def scale_types() -> tuple[type, ...]:
    """The registered per-channel scale layer types."""
    return tuple(k for k, record in LAYER_KINDS.items() if record.scale)


def fix_attributes(module: nn.Module) -> None:
    """Set a layer's size attributes (in/out channels, features, groups) from its weights."""
    kind = layer_kind(module)
    if kind is not None and kind.fix is not None:
        kind.fix(module)


def invariant_problem(module: nn.Module) -> str | None:
    """What is inconsistent in a layer's sizes, or None."""
    kind = layer_kind(module)
    return kind.check(module) if kind is not None and kind.check is not None else None


def constant_input_problem(module: nn.Module) -> str | None:
    """Why a constant input does not make a constant output in this layer (None: it does: linear, unpadded conv)."""
    kind = layer_kind(module)
    if kind is None or kind.constant_passes is None:
        return f"a {type(module).__name__} is not a linear or conv layer"
    return kind.constant_passes(module)


def in_columns(module: nn.Module) -> bool:
    """Rule: weight[:, j] (per group) multiplies input channel j, so a per-input-channel scale folds into it."""
    kind = layer_kind(module)
    return kind is not None and kind.in_columns is not None and kind.in_columns(module)


def input_projections(module: nn.Module) -> tuple[tuple[str, str], ...]:
    """Rule: the (weight, bias) attributes through which a layer's input enters: its kind's ``projections``
    (a recurrent layer's ``weight_ih_l0`` / ``bias_ih_l0`` per direction), else ``weight`` and ``bias``."""
    kind = layer_kind(module)
    return kind.projections(module) if kind is not None and kind.projections is not None else (("weight", "bias"),)


# -- the built-in layers -------------------------------------------------------------------------------------------
def _fix_conv(conv: nn.modules.conv._ConvNd) -> None:
    """Conv attributes: channels per group unchanged, ``groups`` follows the width (depthwise: groups == channels)."""
    w = conv.weight
    if conv.transposed:
        if conv.groups > 1:
            conv.groups = w.shape[0] // (conv.in_channels // conv.groups)
        conv.in_channels = w.shape[0]
        conv.out_channels = w.shape[1] * conv.groups
    else:
        if conv.groups > 1:
            conv.groups = w.shape[0] // (conv.out_channels // conv.groups)
        conv.out_channels = w.shape[0]
        conv.in_channels = w.shape[1] * conv.groups


def _check_conv(module: nn.modules.conv._ConvNd) -> str | None:
    """A conv's weight and bias agree with its channel counts and groups."""
    if module.transposed:
        return None
    w = module.weight
    if w.shape[0] != module.out_channels or w.shape[1] * module.groups != module.in_channels:
        return f"weight {tuple(w.shape)} vs in={module.in_channels} out={module.out_channels} g={module.groups}"
    if module.bias is not None and module.bias.shape[0] != module.out_channels:
        return f"bias {tuple(module.bias.shape)} vs out={module.out_channels}"
    return None


def _conv_constant(module: nn.modules.conv._ConvNd) -> str | None:
    """Rule: every tap of an unpadded (or non-zero-padded) conv reads the constant: Σₖ W·v is exact."""
    if not module.transposed and module.padding_mode != "zeros":
        return None
    padding = module.padding if module.padding != "same" else \
        tuple(d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True))
    return conv_padding_problem(padding, module.transposed)


def conv_padding_problem(padding: Any, transposed: bool = False) -> str | None:
    """Rule: a conv whose every tap reads its input (padding 0 or "valid", not transposed) turns a constant input
    into a constant output; zero padding (any other value, "same" included) breaks that near the borders."""
    if transposed:
        return "a transposed conv's output is not constant near its borders"
    sizes = padding if isinstance(padding, (tuple, list)) else (padding,)
    return None if padding == "valid" or all(p == 0 for p in sizes) else \
        "zero padding makes its output differ near the borders"


def _fix_linear(module: nn.Linear) -> None:
    module.out_features, module.in_features = module.weight.shape


def _check_linear(module: nn.Linear) -> str | None:
    if tuple(module.weight.shape) != (module.out_features, module.in_features):
        return f"weight {tuple(module.weight.shape)} vs ({module.out_features}, {module.in_features})"
    return None


def _fix_norm(module: nn.modules.batchnorm._NormBase) -> None:
    source = module.weight if module.weight is not None else module.running_mean
    if source is not None:
        module.num_features = source.shape[0]


def _check_norm(module: nn.modules.batchnorm._NormBase) -> str | None:
    if module.track_running_stats and module.running_mean.shape[0] != module.num_features:
        return f"running_mean {tuple(module.running_mean.shape)} vs num_features={module.num_features}"
    return None


def scale_init(module: nn.Module, gamma0: float | None) -> None:
    """Rule: a new channel's scale starts at γ0 (1 by default) and its shift at 0; running statistics reset."""
    if isinstance(module, nn.modules.batchnorm._NormBase):
        module.reset_running_stats()
    if getattr(module, "weight", None) is not None:
        nn.init.ones_(module.weight) if gamma0 is None else nn.init.constant_(module.weight, gamma0)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def set_group_norm_width(norm: nn.GroupNorm, channels: int) -> None:
    """GroupNorm over ``channels``: channels per group unchanged, ``num_groups`` follows the width."""
    per_group = norm.num_channels // norm.num_groups
    norm.num_channels, norm.num_groups = channels, channels // per_group


def _fix_group_norm(module: nn.GroupNorm) -> None:
    if module.weight is not None:
        set_group_norm_width(module, module.weight.numel())


def _check_group_norm(module: nn.GroupNorm) -> str | None:
    if module.num_channels % module.num_groups:
        return f"num_channels={module.num_channels} is not a multiple of num_groups={module.num_groups}"
    if module.weight is not None and module.weight.numel() != module.num_channels:
        return f"weight {tuple(module.weight.shape)} vs num_channels={module.num_channels}"
    return None


def _fix_gate(module: Gate) -> None:
    module.num_features = module.weight.numel()


def _check_gate(module: Gate) -> str | None:
    if module.weight.numel() != module.num_features:
        return f"weight {tuple(module.weight.shape)} vs num_features={module.num_features}"
    return None


def _fix_embedding(module: nn.Embedding | nn.EmbeddingBag) -> None:
    module.embedding_dim = module.weight.shape[1]


def _fix_prelu(module: nn.PReLU) -> None:
    module.num_parameters = module.weight.numel()


def _recurrent_directions(module: nn.RNNBase) -> tuple[tuple[str, str], ...]:
    """The first layer's input weight and bias, one pair per direction."""
    return tuple((f"weight_ih_l0{s}", f"bias_ih_l0{s}") for s in ("", "_reverse")[: 1 + module.bidirectional])


def _fix_recurrent(module: nn.RNNBase | nn.RNNCellBase) -> None:
    """``input_size`` follows the input weight's columns; an RNN's weight list is rebuilt from its new tensors (and
    compacted for cuDNN on a GPU: a no-op on the CPU)."""
    module.input_size = getattr(module, input_projections(module)[0][0]).shape[1]
    if isinstance(module, nn.RNNBase):
        module._init_flat_weights()
        module.flatten_parameters()


def _check_recurrent(module: nn.RNNBase | nn.RNNCellBase) -> str | None:
    for attr, _ in input_projections(module):
        shape = tuple(getattr(module, attr).shape)
        if shape[1] != module.input_size:
            return f"{attr} {shape} vs input_size={module.input_size}"
    return None


def zero_projections(module: nn.Module, gamma0: float | None) -> None:
    """Rule: a new input feature is read through a zero column of each input weight (``input_projections``), so
    the layer computes what it did until training moves it (the weights' rows are no channel space that could
    mark the new columns as cross entries)."""
    for attr, _ in input_projections(module):
        nn.init.zeros_(getattr(module, attr))


def _recurrent_constant(module: nn.RNNBase | nn.RNNCellBase) -> str | None:
    """Rule: a constant input feature adds ``W_ih[:, j]·v`` to the gates at every step: exact in ``bias_ih_l0``."""
    return None if module.bias else "a recurrent layer without biases (bias=False) has nowhere to hold it"


for _record in (
    LayerKind(nn.modules.conv._ConvNd, _fix_conv, _check_conv, constant_passes=_conv_constant,
              in_columns=lambda conv: not conv.transposed),
    LayerKind(nn.Linear, _fix_linear, _check_linear, constant_passes=lambda module: None,
              in_columns=lambda linear: True),
    LayerKind(nn.modules.batchnorm._NormBase, _fix_norm, _check_norm, scale_init, scale=True),
    LayerKind(nn.GroupNorm, _fix_group_norm, _check_group_norm, scale_init, scale=True),
    LayerKind(Gate, _fix_gate, _check_gate, scale_init, scale=True),
    LayerKind(nn.Embedding, _fix_embedding),
    LayerKind(nn.EmbeddingBag, _fix_embedding),
    LayerKind(nn.PReLU, _fix_prelu),
    LayerKind(nn.RNNBase, _fix_recurrent, _check_recurrent, zero_projections, constant_passes=_recurrent_constant,
              projections=_recurrent_directions),
    LayerKind(nn.RNNCellBase, _fix_recurrent, _check_recurrent, zero_projections,
              constant_passes=_recurrent_constant, projections=lambda cell: (("weight_ih", "bias_ih"),)),
):
    add_layer_kind(_record)
