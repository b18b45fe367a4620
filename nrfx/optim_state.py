"""Optimizer state across a rejuvenation: every surviving slot keeps its state, every R slot starts at zero.

A state tensor shaped like its parameter (SGD ``momentum_buffer``, Adam ``exp_avg`` and
``exp_avg_sq``, ...) is rebuilt at the new shape with the rewrite's own block copy: the S×S
block is copied from the old state, every slot that touches an R channel is zero.  Scalar state
(Adam's ``step``) is copied.  State that is not shaped like its parameter (factored optimizers)
has no slot-by-slot meaning: that parameter starts fresh and is reported.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .errors import NrfxWarning
from .rewrite import ParamMap, copy_block

__all__ = ["carry_optimizer_state", "copy_group_settings", "slice_state"]


def slice_state(old: torch.Tensor, pmap: ParamMap) -> torch.Tensor:
    """A state tensor at the new shape: the surviving (S×S) slots copied from ``old``, every other slot zero."""
    new = torch.zeros(pmap.new_shape, dtype=old.dtype, device=old.device)
    with torch.no_grad():
        copy_block(new, old.detach(), pmap, rejuvenated=False)
    return new


def _carry_one(state: dict[str, Any], old: nn.Parameter, pmap: ParamMap | None) -> dict[str, Any] | None:
    """The new state of one parameter: slices of param-shaped tensors, copies of the rest; None if unsliceable."""
    carried: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and pmap is not None:
            if tuple(value.shape) != tuple(old.shape):
                return None  # a factored or flattened state: no slot-by-slot meaning
            carried[key] = slice_state(value, pmap)
        else:
            carried[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return carried


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer, old_module: nn.Module,
                          new_module: nn.Module, param_map: dict[str, ParamMap]) -> list[str]:
    """Copy every parameter's optimizer state into ``new``: S slots kept, R slots zero; returns dropped names.

    Parameters are matched by name.  State tensors shaped like the parameter (momentum,
    Adam moments) are sliced with the parameter's map; scalar state (Adam's ``step``) is
    copied.  A parameter whose state cannot be sliced starts fresh and is named in the result.
    """
    old_named = dict(old_module.named_parameters())
    dropped = []
    for name, param in new_module.named_parameters():
        source = old_named.get(name)
        if source is None or source not in old.state:
            continue
        pmap = param_map.get(name)
        before, after = (pmap.old_shape, pmap.new_shape) if pmap is not None else (source.shape, source.shape)
        carried = None
        if tuple(before) == tuple(source.shape) and tuple(after) == tuple(param.shape):
            carried = _carry_one(old.state[source], source, pmap)
        if carried is None:
            dropped.append(name)
            continue
        new.state[param] = carried
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
