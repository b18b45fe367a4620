"""Front-door checks: what ``analyze`` and ``rejuvenate`` are given is a model and inputs nrfx can work on.

Each failure is an ``InputError`` that says what was passed and what to pass instead; none of
them reaches a trace, so none is mistaken for a model nrfx cannot capture.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import prune

from nrfx.capture.front_ends import Example
from nrfx.capture.guards import torch_own_hook
from nrfx.errors import InputError

__all__ = ["check_model", "check_example", "check_real_weights"]


def check_model(model: Any) -> None:
    """An eager ``nn.Module`` (not a function, not a TorchScript module), its lazy modules initialised."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(f"{type(model).__name__} is a TorchScript module: nrfx reads the eager model's Python "
                         "code. Pass the nn.Module it was scripted from")
    if not isinstance(model, nn.Module):
        raise InputError(f"nrfx works on a torch.nn.Module, got {type(model).__name__}; wrap a function in a Module "
                         "whose forward calls it")
    lazy = next((n for n, t in (*model.named_parameters(), *model.named_buffers()) if is_lazy(t)), None)
    if lazy is not None:
        raise InputError(f"'{lazy}' belongs to a lazy module not initialised yet (its shape is unknown): run the "
                         "model once on an example (model(x)) before nrfx, as a lazy module needs before any use")


def check_example(model: nn.Module, example: Example) -> None:
    """Inputs the forward takes: no empty batch (a positional tensor with dim 0 of size 0), no more positionals
    than it has, floats of the model's dtype."""
    args, tensors = example.args, list(example.tensors())
    empty = next((t for t in args if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 0), None)
    if empty is not None:
        raise InputError(f"example input of shape {tuple(empty.shape)} has an empty batch: give at least one example")
    room = _positional_room(model)
    if room is not None and len(args) > room:
        raise InputError(f"{type(model).__name__}.forward takes {room} positional argument(s), example_inputs has "
                         f"{len(args)}: pass a tensor or a tuple of exactly the forward's arguments")
    _check_dtypes(model, tensors)


def check_real_weights(model: nn.Module) -> None:
    """Weights rejuvenate can copy: none on the meta device, none computed by a parametrisation each forward."""
    meta = next((n for n, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise InputError(f"parameter '{meta}' is on the meta device (no data): rejuvenate copies the survivors' "
                         "weights. Materialise the model first (model.to_empty(device='cpu'), then load a state "
                         "dict); nrfx.analyze works on meta models")
    computed = next(((name, m) for name, m in model.named_modules() if _parametrised(m)), None)
    if computed is not None:
        name, module = computed
        pruned = _pruned(module)
        raise InputError(f"module '{name}' computes its weight from other parameters at every forward "
                         f"({_computed_by(pruned)}): rejuvenate would resize the computed weight, not the parameters "
                         f"behind it. {_remove_first(pruned)}")


def _parametrised(module: nn.Module) -> bool:
    """A weight computed per forward: torch's weight_norm / spectral_norm / pruning hook, or a parametrisation."""
    return any(map(torch_own_hook, module._forward_pre_hooks.values())) or \
        torch.nn.utils.parametrize.is_parametrized(module)


def _pruned(module: nn.Module) -> list[str]:
    """The tensor names a torch.nn.utils.prune method masks on this module (its hooks' ``_tensor_name``)."""
    hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
    return [name for h in hooks for name in _pruned_names(h)]


def _pruned_names(hook: Any) -> list[str]:
    """A pruning hook's tensor names (a PruningContainer holds the methods applied one after another)."""
    if isinstance(hook, prune.PruningContainer):
        return sorted({m._tensor_name for m in hook})
    return [hook._tensor_name]


def _computed_by(pruned: list[str]) -> str:
    """What computes the module's weight, in torch's words (``pruned``: the tensors a prune mask computes)."""
    if pruned:
        return "a torch.nn.utils.prune mask: " + ", ".join(f"{n} = {n}_orig * {n}_mask" for n in pruned)
    return "weight_norm, spectral_norm or a torch.nn.utils.parametrize parametrisation"


def _remove_first(pruned: list[str]) -> str:
    """How to bake the computed weight in before rejuvenating."""
    if pruned:
        calls = ", ".join(f"torch.nn.utils.prune.remove(module, {n!r})" for n in pruned)
        return (f"Make the pruning permanent first ({calls}, for every pruned module): the pruned weights stay zero "
                "and rejuvenate reads them as they are")
    return ("Remove it first (torch.nn.utils.remove_weight_norm / remove_spectral_norm / "
            "parametrize.remove_parametrizations(..., leave_parametrized=True)) and add it back after")


def _check_dtypes(model: nn.Module, tensors: list[torch.Tensor]) -> None:
    """Floating inputs of the model's floating dtype (the forward would fail, or compute in another precision)."""
    params = {p.dtype for p in model.parameters() if p.is_floating_point()}
    inputs = {t.dtype for t in tensors if t.is_floating_point()}
    if len(params) == 1 and inputs and not inputs & params:
        (want,) = params
        raise InputError(f"example inputs are {', '.join(sorted(str(d) for d in inputs))} but the model's "
                         f"parameters are {want}: pass inputs of {want} (x.to({want})) or convert the model")


def _positional_room(model: nn.Module) -> int | None:
    """How many positional arguments ``model.forward`` takes (None: any number, or unknown)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params)

