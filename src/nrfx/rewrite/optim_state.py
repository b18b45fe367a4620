"""Optimizer state across a rejuvenation: every surviving slot keeps its state, every R slot starts fresh.

A state tensor shaped like its parameter (SGD ``momentum_buffer``, Adam ``exp_avg`` and
``exp_avg_sq``, ...) is rebuilt at the new shape with the rewrite's own block copy: the S×S
block is copied from the old state, every slot that touches an R channel starts where a fresh
optimizer would start it (zero; Adagrad's ``initial_accumulator_value``, Rprop's ``lr``).  Scalar state
(Adam's ``step``) is copied.  State that is not shaped like its parameter (factored optimizers)
has no slot-by-slot meaning: that parameter starts fresh and is reported.  An S/R layer's
stored blocks are joined into its dense weight before and cut into the new blocks after.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from nrfx.errors import NrfxWarning, OptimizerStateError
from nrfx.layers.srlayers import SR_LAYERS, blocks_of, dense_names, join_blocks, zeros_like_layout
from nrfx.rewrite.tensors import ParamMap, copy_block

__all__ = ["carry_optimizer_state", "copy_group_settings", "dense_parameters", "dense_states", "slice_state",
           "fresh_fills", "inplace_states", "move_inplace_states"]


def slice_state(old: torch.Tensor, pmap: ParamMap, fill: float = 0.0) -> torch.Tensor:
    """A state tensor at the new shape: the surviving (S×S) slots copied from ``old``, every other slot ``fill``."""
    new = zeros_like_layout(pmap.new_shape, old)
    with torch.no_grad():
        if fill:
            new.fill_(fill)
        copy_block(new, old.detach(), pmap, rejuvenated=False)
    return new


# state slots a fresh optimizer does not start at zero: (optimizer type, state key) -> the group setting they start at
_FRESH_FROM_GROUP: dict[tuple[type, str], str] = {
    (torch.optim.Adagrad, "sum"): "initial_accumulator_value",
    (torch.optim.Rprop, "step_size"): "lr",
}


def fresh_fills(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, float]:
    """Rule: a new slot starts where a fresh optimizer starts it: Adagrad's ``sum`` at its
    ``initial_accumulator_value``, Rprop's ``step_size`` at the group's ``lr``; every other key at zero."""
    settings = {key: setting for (kind, key), setting in _FRESH_FROM_GROUP.items() if isinstance(optimizer, kind)}
    if not settings:  # every other optimizer: no need to find the parameter's group
        return {}
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        return {}
    return {key: float(group[setting]) for key, setting in settings.items() if setting in group}


def _carry_one(state: dict[str, Any], shape: tuple[int, ...], pmap: ParamMap | None,
               fills: dict[str, float] | None = None) -> dict[str, Any] | None:
    """The new state of one dense parameter: slices of param-shaped tensors (new slots at ``fills`` or zero),
    copies of the rest; None if unsliceable."""
    carried: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and pmap is not None:
            if tuple(value.shape) != tuple(shape):
                return None  # a factored or flattened state: no slot-by-slot meaning
            carried[key] = slice_state(value, pmap, (fills or {}).get(key, 0.0))
        else:
            carried[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return carried


DenseParam = tuple[nn.Module, str, tuple[int, ...], list[tuple[str, nn.Parameter]]]


def dense_parameters(module: nn.Module) -> dict[str, DenseParam]:
    """Dense name -> (owner, attribute, dense shape, stored parameters): an S/R layer's blocks under its weight/bias."""
    dense = dense_names(module)
    found: dict[str, DenseParam] = {}
    for name, param in module.named_parameters():
        key = dense.get(name, name)
        path, _, attr = key.rpartition(".")
        if key not in found:
            owner = module.get_submodule(path) if path else module
            shape = owner._dense_shape(attr) if isinstance(owner, SR_LAYERS) else tuple(param.shape)
            found[key] = (owner, attr, tuple(shape), [])
        found[key][3].append((name.rpartition(".")[2], param))
    return found


def _joined_state(optimizer: torch.optim.Optimizer, entry: DenseParam) -> dict[str, Any] | None:
    """The optimizer state of a dense parameter, param-shaped tensors joined from its stored blocks."""
    owner, attr, _, members = entry
    states = [optimizer.state.get(p) for _, p in members]
    if any(not state for state in states):
        return None
    if len(members) == 1 and not isinstance(owner, SR_LAYERS):
        return states[0]
    joined: dict[str, Any] = {}
    for key, value in states[0].items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            parts = {name: state[key] for (name, p), state in zip(members, states, strict=True)}
            if any(tuple(parts[name].shape) != tuple(p.shape) for name, p in members):
                return None
            joined[key] = join_blocks(owner, attr, parts)
        else:
            joined[key] = value
    return joined


def dense_states(optimizer: torch.optim.Optimizer, module: nn.Module) -> dict[str, dict[str, Any]]:
    """The optimizer's state per dense parameter name (S/R blocks joined into their dense weight and bias)."""
    joined = {name: _joined_state(optimizer, entry) for name, entry in dense_parameters(module).items()}
    return {name: state for name, state in joined.items() if state is not None}


def _split_state(entry: DenseParam, state: dict[str, Any]) -> dict[nn.Parameter, dict[str, Any]]:
    """A dense parameter's new state cut into the state of each stored block."""
    owner, attr, _, members = entry
    if len(members) == 1 and not isinstance(owner, SR_LAYERS):
        return {members[0][1]: state}
    cut = {key: blocks_of(owner, attr, value) for key, value in state.items()
           if isinstance(value, torch.Tensor) and value.dim() > 0}
    return {p: {key: cut[key][name] if key in cut else _copy(value) for key, value in state.items()}
            for name, p in members}


def _copy(value: Any) -> Any:
    """A tensor cloned, anything else as is."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer, old_module: nn.Module,
                          new_module: nn.Module, param_map: dict[str, ParamMap]) -> list[str]:
    """Copy every parameter's optimizer state into ``new``: S slots kept, R slots zero; returns dropped names.

    Parameters are matched by their dense name (an S/R layer's stored blocks read as its dense
    weight and bias, joined before and cut after).  State tensors shaped like the parameter
    (momentum, Adam moments) are sliced with the parameter's map; scalar state (Adam's
    ``step``) is copied.  A parameter whose state cannot be sliced starts fresh and is named.
    """
    before = dense_parameters(old_module)
    dropped = []
    for name, entry in dense_parameters(new_module).items():
        source = before.get(name)
        if source is None or not any(old.state.get(p) for _, p in source[3]):
            continue
        state = _joined_state(old, source)  # None: blocks whose state cannot be joined (factored, partial)
        pmap = param_map.get(name)
        shapes = (pmap.old_shape, pmap.new_shape) if pmap is not None else (source[2], source[2])
        carried = None
        if state is not None and tuple(shapes[0]) == source[2] and tuple(shapes[1]) == entry[2]:
            carried = _carry_one(state, source[2], pmap, fresh_fills(new, entry[3][0][1]))
        if carried is None:
            dropped.append(name)
            continue
        new.state.update(_split_state(entry, carried))
    return dropped


def copy_group_settings(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> None:
    """Group hyperparameters (lr as the scheduler left it, momentum, ...) from ``old`` into ``new``, group by group.

    With a different number of groups nothing is copied and an ``NrfxWarning`` says so.
    """
    if len(old.param_groups) != len(new.param_groups):
        warnings.warn("the rebuilt optimizer has a different number of param groups; its hyperparameters are the "
                      "factory's, not the ones the schedule reached", NrfxWarning, stacklevel=4)
        return
    for before, after in zip(old.param_groups, new.param_groups, strict=True):
        after.update({k: v for k, v in before.items() if k != "params"})


# -- in place: the user's optimizer object keeps working across a rewrite of its parameters -----
def _held(optimizer: torch.optim.Optimizer) -> set[int]:
    """ids of every parameter in the optimizer's groups."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def inplace_states(optimizer: torch.optim.Optimizer, before: dict[str, DenseParam], param_map: dict[str, ParamMap],
                   carry_state: bool = True) -> dict[str, dict[str, Any] | None]:
    """Per dense parameter the optimizer holds that the rewrite resizes or re-splits: its state at the new shape.

    Called before anything changes.  None means "start fresh" (``carry_state=False``, or no state
    yet); a state that cannot be sliced slot by slot raises, naming ``carry_state=False``.
    """
    held = _held(optimizer)
    states: dict[str, dict[str, Any] | None] = {}
    for name, entry in before.items():
        pmap = param_map.get(name)
        if not any(id(p) in held for _, p in entry[3]) or (pmap is None and not isinstance(entry[0], SR_LAYERS)):
            continue
        has_state = any(optimizer.state.get(p) for _, p in entry[3])
        state = _joined_state(optimizer, entry) if carry_state and has_state else None
        carried = None
        if state is not None:
            carried = _carry_one(state, entry[2], pmap, fresh_fills(optimizer, entry[3][0][1]))
        if carry_state and has_state and carried is None:
            raise OptimizerStateError(
                f"{type(optimizer).__name__}'s state of '{name}' is not shaped like the parameter, so it cannot be "
                "sliced to the surviving channels: pass carry_state=False (resized parameters start with fresh state)")
        states[name] = carried
    return states


def move_inplace_states(optimizer: torch.optim.Optimizer, before: dict[str, DenseParam],
                        after: dict[str, DenseParam], states: dict[str, dict[str, Any] | None]) -> None:
    """Rule: groups keep every parameter that survives (same object) in place, a new block joins the group of
    its dense parameter right after it, a gone one leaves; the rewritten parameters get ``states``."""
    survivors = {id(p) for entry in after.values() for _, p in entry[3]}
    known = {id(p) for entry in before.values() for _, p in entry[3]}
    owner = {id(p): name for name, entry in before.items() for _, p in entry[3]}
    extra = {name: [p for _, p in after[name][3] if id(p) not in known] for name in states if name in after}
    for name in after.keys() - before.keys():  # a parameter the rewrite created (a folded bias): beside its weight
        sibling = f"{name.rpartition('.')[0]}.weight".lstrip(".")
        if sibling in before:
            extra.setdefault(sibling, []).extend(p for _, p in after[name][3])
    for group in optimizer.param_groups:
        params = []
        for p in group["params"]:
            if id(p) not in owner or id(p) in survivors:
                params.append(p)
            params.extend(extra.pop(owner.get(id(p)), []))
        group["params"][:] = params  # the same list object: LBFGS and wrappers keep a reference to it
    for name, state in states.items():
        for _, p in before[name][3]:
            optimizer.state.pop(p, None)
        if state is not None and name in after:
            optimizer.state.update(_split_state(after[name], state))
