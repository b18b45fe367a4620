"""The channel-rule table: one small rule per op kind, an ``OpTable`` of ``Rule``.

A rule is ``rule(ctx, node) -> spec``: ``ctx`` is the analysis context of that one node
(``nrfx.analysis.context.Context``); it reads the specs of the node's inputs, ties or freezes channel
spaces, registers parameters and MACs, and returns the spec of the node's output.  A module
subclass inherits its base's rule only if it does not override ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from nrfx.capture.shape_formulas import FORMULAS
from nrfx.ops.layer_kinds import LAYER_KINDS, LEAF_LAYERS, LayerKind, add_layer_kind, scale_init, zero_projections
from nrfx.ops.optable import OpTable

if TYPE_CHECKING:
    import torch.fx

    from nrfx.analysis.context import Context

__all__ = ["Rule", "RULES", "module_rule", "function_rule", "method_rule", "lookup", "reads_counts", "COUNT_READERS",
           "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES", "register_layer", "unregister_layer"]

Rule = Callable[["Context", "torch.fx.Node"], Any]

RULES: OpTable[Rule] = OpTable("channel rules")
module_rule = RULES.module
function_rule = RULES.function
method_rule = RULES.method
lookup = RULES.lookup
MODULE_RULES, FUNCTION_RULES, METHOD_RULES = RULES.modules, RULES.functions, RULES.methods
COUNT_READERS: set[Rule] = set()


def reads_counts(rule: Rule) -> Rule:
    """Mark a rule that takes channel counts read as numbers itself (the sizes of a view or reshape); for every
    other rule the analysis freezes the spaces of the counts a node reads."""
    COUNT_READERS.add(rule)
    return rule


def register_layer(kind: type, *, rule: Callable[..., Any] | None = None, shape: Callable[..., Any] | None = None,
                   fix: Callable[[nn.Module], None] | None = None,
                   check: Callable[[nn.Module], str | None] | None = None,
                   init: Callable[[nn.Module, float | None], None] | None = None, scale: bool = False,
                   constant_passes: Callable[[nn.Module], str | None] | None = None,
                   in_columns: Callable[[nn.Module], bool] | None = None,
                   projections: Callable[[nn.Module], tuple[tuple[str, str], ...]] | None = None) -> LayerKind:
    """Teach nrfx a layer type it has never seen, so that it analyses *and* rewrites it.

    ``rule(ctx, node)``: its channel rule (see docs/op-rules.md; a built-in one such as
    ``nrfx.analysis.rules.layers.linear_module`` fits a layer shaped like it); with a rule, fx keeps the
    layer as a leaf and torch.export raises its calls to it.  ``shape(module, *inputs)``: its output
    on meta inputs, or None to run it (optional: a speed-up).  ``fix(module)``: set its size
    attributes from its resized tensors.  ``check(module)``: what is inconsistent after a resize, or
    None.  ``init(module, gamma0)``: initial values of a resized copy (default ``reset_parameters()``, else
    PyTorch's default init per tensor).  ``scale``: its ``weight`` is a per-channel scale γ (a liveliness
    signal; R channels start at γ0 and a ``bias`` at 0 unless ``init`` says otherwise).
    ``constant_passes(module)``: why a constant input does not give a constant output, or None when it
    does (constants of removed channels then fold exactly).  ``in_columns(module)``: whether
    ``weight[:, j]`` (per group) multiplies input channel j, so that neural rescaling and ``fold_gates``
    fold a per-channel factor into those columns.  ``projections(module)``: the (weight, bias) attribute pairs
    its input enters through when they are not ``weight`` and ``bias`` (a recurrent layer's ``weight_ih_l0`` /
    ``bias_ih_l0`` per direction: a constant input folds into each bias; their new columns start at zero unless
    ``init`` says otherwise).  Returns the record;
    ``unregister_layer`` takes it back.
    """
    if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
        raise TypeError(f"register_layer takes an nn.Module subclass, got {kind!r}")
    for name, value in (("rule", rule), ("shape", shape), ("fix", fix), ("check", check), ("init", init),
                        ("constant_passes", constant_passes), ("in_columns", in_columns),
                        ("projections", projections)):
        if value is not None and not callable(value):
            raise TypeError(f"register_layer({kind.__name__}, {name}=...) takes a callable, got {value!r}")
    if rule is not None:
        RULES.modules[kind] = rule
        LEAF_LAYERS.add(kind)
    if shape is not None:
        FORMULAS.modules[kind] = shape
    if scale and init is None:
        init = scale_init
    if projections is not None and init is None:
        init = zero_projections
    return add_layer_kind(LayerKind(kind, fix, check, init, bool(scale), constant_passes, in_columns, projections))


def unregister_layer(kind: type) -> None:
    """Forget what ``register_layer`` taught nrfx about ``kind`` (the built-in layers stay)."""
    if kind in LEAF_LAYERS:
        LEAF_LAYERS.discard(kind)
        RULES.modules.pop(kind, None)
    FORMULAS.modules.pop(kind, None)
    LAYER_KINDS.pop(kind, None)
