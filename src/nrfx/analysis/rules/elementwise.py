"""Rules for channel-wise ops: activations, dropout, identity-like methods, binary arithmetic."""

from __future__ import annotations

import math
import operator

import torch
from torch import nn

from nrfx.analysis.rules.common import broadcast, channel_param, copy_zero, param_of
from nrfx.analysis.rules.registry import function_rule, method_rule, module_rule
from nrfx.analysis.specs import TensorSpec, Zero
from nrfx.capture.contexts import REGION_CALLS
from nrfx.capture.modes import by_mode
from nrfx.ops.vocabulary import Trait, functions_with, methods_with, modules_with

__all__: list[str] = []

# the channel-wise unary ops, by whether f(0) == 0 (a dead channel stays dead): from the one op vocabulary


@module_rule(*modules_with(Trait.ZERO_BY_ARGS))
def zero_by_args_module(ctx, node):
    """Channel-wise module whose f(0) depends on its settings (Hardtanh(0.5, 1)): zeros kept iff f(0) = 0."""
    return _unary(ctx, node, _maps_zero_to_zero(ctx, node, ctx.module))


@function_rule(*functions_with(Trait.ZERO_BY_ARGS))
def zero_by_args_function(ctx, node):
    """clamp, clip, hardtanh, threshold: same space; zeros kept iff f(0) = 0 with these numbers."""
    return _bounded(ctx, node) or _unary(ctx, node, _maps_zero_to_zero(ctx, node, node.target))


@method_rule(*methods_with(Trait.ZERO_BY_ARGS))
def zero_by_args_method(ctx, node):
    """x.clamp(...) and friends: same space; zeros kept iff f(0) = 0 with these numbers."""
    return _bounded(ctx, node) or _unary(
        ctx, node, _maps_zero_to_zero(ctx, node, lambda x, *a, **k: getattr(x, node.target)(*a, **k)))


def _bounded(ctx, node) -> TensorSpec | None:
    """Rule: ``clamp(x, min=t)`` with tensor bounds is elementwise in x and t (broadcast: a per-channel parameter
    bound takes x's space, a computed one of the channels' width freezes it); zeros are kept only where every bound
    is a number or a buffer that puts 0 inside [min, max] (Gemma 4's clipped linears: ±inf by default).  None when
    every bound is a number."""
    bounds = [a for a in (*node.args[1:], *node.kwargs.values()) if isinstance(ctx.value(a), torch.Tensor)]
    if not bounds or not isinstance(ctx.spec(node.args[0]), TensorSpec):
        return None
    spec = broadcast(ctx, [node.args[0], *bounds], "first")
    return spec if _zero_inside(ctx) else ctx.tensor(spec.shape, spec.dims)


def _zero_inside(ctx) -> bool:
    """Whether clamp's bounds keep a zero: each a number or a buffer (fixed while training) with min ≤ 0 ≤ max
    everywhere; a parameter or a computed bound may move, so it keeps none."""
    for bound, below in ((ctx.arg(1, "min"), True), (ctx.arg(2, "max"), False)):
        value = ctx.value(bound) if bound is not None else None
        if isinstance(value, torch.Tensor):
            value = _buffer_value(ctx, bound)
            if value is None:
                return False
        if value is not None and not bool(torch.all(torch.as_tensor(value) <= 0 if below else
                                                    torch.as_tensor(value) >= 0)):
            return False
    return True


def _buffer_value(ctx, node) -> torch.Tensor | None:
    """The data of a buffer the graph reads (the analysis runs on meta copies), or None for anything else."""
    name, _ = param_of(ctx, node)
    if name is None or name in ctx.state.param_names:
        return None
    try:
        value = ctx.state.gm.get_buffer(name)
    except AttributeError:
        return None
    return None if value.is_meta else value


def _maps_zero_to_zero(ctx, node, call) -> bool:
    """Rule: f(0) = 0 for the node's own number arguments (a tensor argument, or a failing call: not known, False)."""
    args = [ctx.value(a) for a in node.args[1:]]
    kwargs = {k: ctx.value(v) for k, v in node.kwargs.items() if k != "inplace"}
    if any(isinstance(v, torch.Tensor) for v in (*args, *kwargs.values())):
        return False
    try:
        return bool((call(torch.zeros(1), *args, **kwargs) == 0).all())
    except (TypeError, ValueError, RuntimeError):
        return False


def _unary(ctx, node, keeps_zero: bool) -> TensorSpec:
    """Same spaces in and out; zeros pass through only when f(0) == 0."""
    x = ctx.spec(node.args[0])
    if not isinstance(x, TensorSpec):
        return ctx.blank(ctx.out)
    spec = ctx.like(x, ctx.out.shape)
    if keeps_zero:
        return spec
    return ctx.tensor(spec.shape, spec.dims)


@module_rule(*modules_with(Trait.ZERO_KEEPING))
def zero_keeping_module(ctx, node):
    """Channel-wise activation/dropout with f(0) = 0: same space, zeros kept."""
    return _unary(ctx, node, True)


@module_rule(*modules_with(Trait.ZERO_BREAKING))
def zero_breaking_module(ctx, node):
    """Channel-wise activation with f(0) ≠ 0 (sigmoid, softplus): same space, zeros lost."""
    return _unary(ctx, node, False)


@module_rule(nn.PReLU)
def prelu(ctx, node):
    """PReLU: same space; its per-channel slope follows the channel dim."""
    m = ctx.module
    x = ctx.spec(node.args[0])
    if m.weight.numel() > 1:
        ctx.param(m.weight, (x.dims[1] if x.ndim > 1 else x.dims[0],))
    return ctx.like(x, ctx.out.shape)


@function_rule(*functions_with(Trait.ZERO_KEEPING))
def zero_keeping_function(ctx, node):
    """Channel-wise function with f(0) = 0: same space, zeros kept."""
    return _unary(ctx, node, True)


@function_rule(*functions_with(Trait.ZERO_BREAKING))
def zero_breaking_function(ctx, node):
    """Channel-wise function with f(0) ≠ 0: same space, zeros lost."""
    return _unary(ctx, node, False)


@method_rule(*methods_with(Trait.ZERO_KEEPING))
def zero_keeping_method(ctx, node):
    """Channel-wise tensor method with f(0) = 0 (relu, clone, to, ...): same space."""
    return _unary(ctx, node, True)


@method_rule(*methods_with(Trait.ZERO_BREAKING))
def zero_breaking_method(ctx, node):
    """Channel-wise tensor method with f(0) ≠ 0: same space, zeros lost."""
    return _unary(ctx, node, False)


def _binary(zero_op: str):
    """Rule factory for elementwise binary ops with broadcasting."""

    def rule(ctx, node):
        """Elementwise: aligned channel dims are one space; size-1 dims broadcast without coupling."""
        operands = [a for a in node.args[:2]]
        if not isinstance(ctx.out, torch.Tensor):
            return None
        return broadcast(ctx, operands, zero_op)

    return rule


union_rule = _binary("and")
_MUL = _binary("or")
_DIV = _binary("first")

function_rule(operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub, torch.subtract,
              torch.maximum, torch.minimum, torch.fmax, torch.fmin, torch.hypot)(union_rule)  # f(0, 0) = 0
function_rule(operator.mul, operator.imul, torch.mul, torch.multiply)(_MUL)
function_rule(operator.truediv, operator.itruediv, torch.div, torch.true_divide, operator.floordiv, operator.mod,
              torch.floor_divide, torch.remainder, torch.fmod,
              torch.copysign, torch.xlogy, torch.special.xlogy)(_DIV)  # 0 / y, 0 mod y, 0 · log y: zero where x is
method_rule("add", "add_", "sub", "sub_", "maximum", "minimum", "fmax", "fmin", "hypot", "hypot_")(union_rule)
method_rule("mul", "mul_", "multiply")(_MUL)
method_rule("div", "div_", "true_divide", "floor_divide", "remainder", "fmod", "copysign", "copysign_",
            "xlogy", "xlogy_")(_DIV)


_ZEROS_LOST = (torch.logaddexp, torch.logaddexp2, torch.atan2, torch.arctan2, torch.heaviside, torch.lerp)


@function_rule(*_ZEROS_LOST)
@method_rule("logaddexp", "logaddexp2", "atan2", "atan2_", "arctan2", "arctan2_", "heaviside", "heaviside_",
             "lerp", "lerp_")
def zeros_lost(ctx, node):
    """Elementwise op with f(0, 0) ≠ 0 or a sign-dependent zero (logaddexp: log 2; atan2(0, -0) = π; heaviside,
    lerp's weight): tensor operands tie aligned channel dims as add's do; zeros lost, no residual stream."""
    if not isinstance(ctx.out, torch.Tensor):
        return ctx.blank(ctx.out)
    spec = broadcast(ctx, list(node.args[:3]), "or")
    return ctx.tensor(spec.shape, spec.dims)


@function_rule(torch.addcmul)
@method_rule("addcmul", "addcmul_")
def addcmul(ctx, node):
    """addcmul(input, t1, t2, value=v) = input + v·t1·t2: broadcast; zero where input and (t1 or t2) are zero
    (a per-channel parameter as input counts as zero: a constant, folded like a norm's β)."""
    if not isinstance(ctx.out, torch.Tensor):
        return ctx.blank(ctx.out)
    x, t1, t2 = node.args[0], ctx.arg(1, "tensor1"), ctx.arg(2, "tensor2")
    product = broadcast(ctx, [t1, t2], "or")  # zero where t1 or t2 is
    whole = broadcast(ctx, [x, t1, t2], "and")  # ties every aligned channel dim
    spec, zeros = ctx.spec(x), []
    if channel_param(ctx, x) is not None:  # a per-channel bias (GRN's β): zero where the product is, as a norm's
        return ctx.tensor(whole.shape, whole.dims, tuple(product.zero))
    for d, layout in enumerate(whole.dims):
        k = d - (whole.ndim - spec.ndim) if isinstance(spec, TensorSpec) else -1
        direct = k >= 0 and spec.dims[k] is not None and spec.shape[k] == whole.shape[d]
        if layout is None or not direct or product.dims[d] is None:
            zeros.append(None if layout is None else Zero("none"))
            continue
        channels = ctx.atoms.channels(layout)
        zeros.append(Zero("and", (spec.whole(k, channels), product.whole(d, channels))))
    return ctx.tensor(whole.shape, whole.dims, tuple(zeros))


_COMPARISONS = (operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge)


def _compare(ctx, node):
    """Comparison: on numbers no channels; on tensors elementwise (aligned channel dims tie), zeros lost."""
    if not isinstance(ctx.out, torch.Tensor):
        return None
    spec = broadcast(ctx, list(node.args[:2]), "or")  # zeros dropped: "or" marks no residual stream
    return ctx.tensor(spec.shape, spec.dims)


function_rule(*_COMPARISONS)(_compare)
method_rule("eq", "ne", "lt", "le", "gt", "ge")(_compare)


@function_rule(torch._assert, torch.fx._symbolic_trace._assert_is_none)
def assertion(ctx, node):
    """torch._assert(condition, message): a check with no value, no channels."""
    return None


@function_rule(math.ceil, math.floor, math.trunc, math.sqrt, math.log, math.log2, math.exp, math.pow, math.prod,
               math.gcd, math.isqrt)
def number_function(ctx, node):
    """Python arithmetic on numbers (``math.ceil(h / 7)``, sizes and scales): no channels; a channel count read
    as a number is frozen before (its use is arithmetic); a tensor result is an op nrfx cannot follow."""
    if isinstance(ctx.out, torch.Tensor):
        return ctx.unknown_op(f"function {getattr(node.target, '__name__', node.target)} returning a tensor")
    return None


@function_rule(*REGION_CALLS)
def context_switch(ctx, node):
    """Entering or leaving an autocast or grad-mode region (torch.export's, inlined): no tensor, no channels."""
    return None


@function_rule(by_mode)
def mode_value(ctx, node):
    """nrfx's by_mode(input, module, in_train, in_eval): a number or flag of the module's mode, no channels."""
    return None


# logical / bitwise: 0 & y = 0 (zero where any operand is), 0 | 0 = 0 (zero where every operand is)
function_rule(operator.and_, operator.iand, torch.bitwise_and, torch.logical_and)(_MUL)
function_rule(operator.or_, operator.ior, torch.bitwise_or, torch.logical_or, operator.xor, operator.ixor,
              torch.bitwise_xor, torch.logical_xor)(union_rule)  # 0 ^ 0 = 0
method_rule("bitwise_and", "bitwise_and_", "logical_and", "logical_and_")(_MUL)
method_rule("bitwise_or", "bitwise_or_", "logical_or", "logical_or_", "bitwise_xor", "bitwise_xor_", "logical_xor",
            "logical_xor_")(union_rule)


@function_rule(torch.pow, operator.pow, operator.ipow)
@method_rule("pow", "pow_")
def power(ctx, node):
    """x ** p: a number exponent is channel-wise (zeros kept when p > 0); tensor operands broadcast, zeros lost."""
    if not isinstance(ctx.out, torch.Tensor):
        return None
    base, exponent = ctx.arg(0, "input"), ctx.arg(1, "exponent")
    if isinstance(ctx.spec(base), TensorSpec) and not isinstance(ctx.value(exponent), torch.Tensor):
        literal = isinstance(exponent, (int, float)) and not isinstance(exponent, bool)
        return _unary(ctx, node, literal and exponent > 0)
    spec = broadcast(ctx, [base, exponent], "and")
    return ctx.tensor(spec.shape, spec.dims)


@function_rule(torch.masked_fill)
@method_rule("masked_fill", "masked_fill_")
def masked_fill(ctx, node):
    """x.masked_fill(mask, v): x and the (broadcast) mask tie aligned channel dims; zeros kept only when v is 0."""
    if not isinstance(ctx.out, torch.Tensor):
        return ctx.blank(ctx.out)
    value = ctx.arg(2, "value")
    spec = broadcast(ctx, [node.args[0], ctx.arg(1, "mask")], "first")
    if isinstance(value, (int, float)) and value == 0:
        return spec
    return ctx.tensor(spec.shape, spec.dims)


@function_rule(torch.where)
def where(ctx, node):
    """torch.where(cond, x, y): cond, x and y tie aligned channel dims (size-1 dims broadcast); zero where x and
    y both are (a scalar 0 is zero, any other scalar: nothing known)."""
    if len(node.args) < 3 or not isinstance(ctx.out, torch.Tensor):
        return ctx.unknown_op("function torch.where with one argument (nonzero indices)")
    return _where(ctx, *node.args[:3])


@method_rule("where")
def where_method(ctx, node):
    """x.where(cond, y): as torch.where(cond, x, y)."""
    if len(node.args) < 3 or not isinstance(ctx.out, torch.Tensor):
        return ctx.unknown_op("method Tensor.where without y")
    return _where(ctx, node.args[1], node.args[0], node.args[2])


def _where(ctx, cond, x, y) -> TensorSpec:
    """The spec of a where: layouts from all three operands, zeros from the two values."""
    spec = broadcast(ctx, [cond, x, y], "and")
    values = [v for v in (x, y) if isinstance(v, torch.fx.Node)]
    constants = [v for v in (x, y) if not isinstance(v, torch.fx.Node)]
    if any(c != 0 for c in constants) or not values:
        return ctx.tensor(spec.shape, spec.dims)
    return ctx.tensor(spec.shape, spec.dims, broadcast(ctx, values, "and").zero)


@method_rule("copy_")
def copy_(ctx, node):
    """dst.copy_(src): aligned channel dims of dst and src tie (a plain one freezes the other); zeros are src's.

    Later readers of ``dst`` read the copied values: they get the result's spec.
    """
    dst, src = ctx.spec(node.args[0]), ctx.spec(ctx.arg(1, "src"))
    if not isinstance(dst, TensorSpec):
        return ctx.blank(ctx.out)
    dims, zeros = [], []
    for d, dst_layout in enumerate(dst.dims):
        k = d - (dst.ndim - src.ndim) if isinstance(src, TensorSpec) else -1
        if k < 0 or src.shape[k] != dst.shape[d]:  # src broadcast along d: no channel of src to tie
            dims.append(dst_layout)
            zeros.append(None if dst_layout is None else Zero("none"))
        elif dst_layout is None and src.dims[k] is None:
            dims.append(None)
            zeros.append(None)
        else:
            dims.append(ctx.unify(dst_layout, src.dims[k], "tied by copy_"))
            zeros.append(copy_zero(ctx, src, k) if src.dims[k] is not None and dst_layout is not None else Zero("none"))
    spec = ctx.tensor(dst.shape, tuple(dims), tuple(zeros))
    ctx.specs[node.args[0]] = spec
    return spec
