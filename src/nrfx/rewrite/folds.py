"""The rewrite pass writing the constants a plan folds (``plan.folds``) into their consumers.

Each consumer's folded inputs add ``Σ W·v`` per output channel (kernel taps summed, within the input's
group) to its bias; without a bias, they are taken from the running mean of the BatchNorm that is its
only reader (through shape-only ops, normalising its output channels in order); with neither, the
rewritten layer gets a bias holding them (``new_bias_params`` counts them: a params budget pays for them).
A function call (``F.linear(x, w, b)``, keyed ``"node <name>"``) folds into the bias parameter it reads; a
recurrent layer into each direction's ``bias_ih_l0`` (its input enters through ``weight_ih_l0``).
Which constants fold, and why, is planned in ``nrfx.plan.fold``.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from nrfx.ops.layer_kinds import input_projections
from nrfx.plan.fold import NODE_PREFIX, record_of
from nrfx.plan.maps import dim_map

__all__ = ["apply_folds", "new_bias_params"]

_SHAPE_OPS = frozenset({"flatten", "reshape", "view", "permute", "transpose", "contiguous", "_unsafe_view",
                        "clone", "t"})


# -- which consumers absorb a constant, and where ---------------------------------------------------------------


def _op_name(node: torch.fx.Node) -> str:
    """A node's op as a bare name: a method name, or a function's / aten overload's name without overload."""
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return str(target).split(".")[0]


_SHAPE_ONLY = frozenset({"reshape_as", "view_as", "expand_as", "type_as"})  # read their second argument's shape


def _value_readers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users that read a node's values, not only its shape (``size``, ``.shape``, ``y.reshape_as(node)``)."""
    readers = []
    for user in node.users:
        name = _op_name(user)
        if name in ("size", "dim") or (user.target is getattr and user.args[1:2] == ("shape",)):
            continue
        if name in _SHAPE_ONLY and user.args[0] is not node:
            continue
        readers.append(user)
    return readers


def _norm_after(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The BatchNorm call a node feeds as its only reader, through single-reader shape-only ops (or None)."""
    while len(readers := _value_readers(node)) == 1:
        (node,) = readers
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            return node if isinstance(module, nn.modules.batchnorm._BatchNorm) else None
        if node.op not in ("call_method", "call_function") or _op_name(node) not in _SHAPE_OPS:
            return None
    return None


def _module_node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node | None:
    """The one call of a module in a graph (None when it is called more than once or not at all)."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == name]
    return calls[0] if len(calls) == 1 else None


_PARAMETER = "parameter "  # a shift target naming the bias parameter a function call reads


def _tensor_at(gm: torch.fx.GraphModule, path: str) -> torch.Tensor:
    """The parameter or buffer at a dotted path."""
    owner, _, leaf = path.rpartition(".")
    return getattr(gm.get_submodule(owner), leaf)


def _shift_target(gm: torch.fx.GraphModule, analysis, name: str) -> str:
    """Where a consumer's constant shift goes: "bias", the name of the BatchNorm after it, "new bias", or, for a
    function call, "parameter <the bias it reads>"."""
    if name.startswith(NODE_PREFIX):
        return _PARAMETER + record_of(analysis, name).bias
    module = gm.get_submodule(name)
    if getattr(module, "bias", None) is not None:
        return "bias"
    node = _module_node(gm, name)
    norm = _norm_after(gm, node) if node is not None else None
    if norm is None or getattr(gm.get_submodule(norm.target), "running_mean", None) is None:
        return "new bias"
    ours, theirs = analysis.records.get(node.name), analysis.records.get(norm.name)
    same = ours is not None and theirs is not None and ours.output is not None and ours.output == theirs.input
    return norm.target if same and ours.output.inner == 1 else "new bias"


def new_bias_params(analysis, plan, names=None) -> int:
    """Parameters the fold pass adds: a bias, one entry per output channel after the rewrite, on every layer of
    ``names`` (default: ``plan.folds``) that has neither a bias nor a BatchNorm after it to take its shift."""
    total = 0
    for name in (plan.folds or {}) if names is None else names:
        for weight, _, weight_name, target in _fold_sites(analysis, name):
            if target == "new bias":
                info = analysis.param_info.get(weight_name)
                rows = info.dims[0] if info is not None and info.dims else None
                total += weight.shape[0] if rows is None else dim_map(analysis, plan, rows, 0).source.numel()
    return total


def _fold_sites(analysis, name: str) -> list[tuple[torch.Tensor, int, str, str]]:
    """(original weight, groups, weight name, shift target) per weight reading a consumer's input: a conv's or a
    linear's ``weight`` (target from ``_shift_target``), each direction's ``weight_ih_l0`` of a recurrent layer
    (target its ``bias_ih_l0``)."""
    if not name.startswith(NODE_PREFIX):
        module = analysis.gm.get_submodule(name)
        pairs = input_projections(module)
        if pairs != (("weight", "bias"),):
            return [(getattr(module, w), 1, f"{name}.{w}", b) for w, b in pairs]
    weight, groups, weight_name = _weight_of(analysis, name)
    return [(weight, groups, weight_name, _shift_target(analysis.gm, analysis, name))]


def _weight_of(analysis, name: str) -> tuple[torch.Tensor, int, str]:
    """A consumer's original weight, its groups and its parameter name (a module's, or a function call's)."""
    if name.startswith(NODE_PREFIX):
        record = record_of(analysis, name)
        return _tensor_at(analysis.gm, record.weight), record.groups, record.weight
    module = analysis.gm.get_submodule(name)
    return module.weight, getattr(module, "groups", 1), f"{name}.weight"


def _dense_columns(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A layer's weight as [out, in] with kernel taps summed and groups laid out block-diagonally (float64, CPU)."""
    weight = weight.detach().to("cpu", torch.float64)
    taps = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(-1)
    if groups == 1:
        return taps
    rows, cols = taps.shape[0] // groups, taps.shape[1]
    dense = torch.zeros(taps.shape[0], cols * groups, dtype=torch.float64)
    for g in range(groups):
        dense[g * rows:(g + 1) * rows, g * cols:(g + 1) * cols] = taps[g * rows:(g + 1) * rows]
    return dense


def _delta(weight: torch.Tensor, groups: int, values: dict[str, float]) -> torch.Tensor:
    """Per old output channel: Σ over folded inputs c and kernel taps k of W[o, c, k]·v_c (within c's group)."""
    cols = torch.tensor([int(k) for k in values], dtype=torch.long)
    vals = torch.tensor(list(values.values()), dtype=torch.float64)
    return _dense_columns(weight, groups)[:, cols] @ vals


def apply_folds(gm: torch.fx.GraphModule, analysis, plan, maps) -> list[str]:
    """Rewrite pass: add each consumer's folded constants to its bias, or to the following BatchNorm's mean."""
    notes = []
    for name, values in (plan.folds or {}).items():
        for weight, groups, weight_name, target in _fold_sites(analysis, name):
            delta = _delta(weight, groups, values)
            pmap = maps.get(weight_name)
            dims = pmap.dims if pmap is not None else ()
            source = dims[0].source if dims and dims[0].dim == 0 else torch.arange(delta.numel())
            kept = torch.nonzero(source >= 0).flatten()
            shift = torch.zeros(source.numel(), dtype=torch.float64)
            shift[kept] = delta[source[kept]]
            notes.append(_fold_into(gm, name, shift, target))
    return notes


def _fold_into(gm: torch.fx.GraphModule, name: str, shift: torch.Tensor, target: str) -> str:
    """Add ``shift`` to a consumer's bias (made at zero if it has none), or take it from its BatchNorm's mean."""
    if target.startswith(_PARAMETER):
        bias = _tensor_at(gm, target[len(_PARAMETER):])
        with torch.no_grad():
            bias.add_(shift.to(bias.device, bias.dtype))
        return f"fold: constants of removed inputs of {name} added to the bias it reads, {target[len(_PARAMETER):]}"
    module = gm.get_submodule(name)
    with torch.no_grad():
        if target == "new bias":
            weight = module.weight
            module.register_parameter("bias", nn.Parameter(shift.to(weight.device, weight.dtype),
                                                           requires_grad=weight.requires_grad))
            return f"fold: constants of removed inputs of {name} make its new bias (it had none)"
        if target in module._parameters:  # "bias", a recurrent layer's "bias_ih_l0"
            bias = module._parameters[target]
            bias.add_(shift.to(bias.device, bias.dtype))
            return f"fold: constants of removed inputs of {name} added to its {target}"
        mean = gm.get_submodule(target).running_mean
        mean.sub_(shift.to(mean.device, mean.dtype))
    return f"fold: constants of removed inputs of {name} moved into {target}.running_mean"
