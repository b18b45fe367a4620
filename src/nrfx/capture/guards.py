"""Guards that leave a user's model as it was: whatever a forward run by nrfx touches is put back.

``untouched``: attributes, buffers, parameters and dict / list caches of every module restored, and
buffers a forward updated in place get their data back (so do embedding tables with ``max_norm``, which torch
renormalises in place); ``in_eval_mode``: every module's training flag
put back; ``hooks_silenced``: the user's own hooks do not fire (torch's own stay).  The capture's
acceptance run, shape propagation, the islands' recording run, constant measurement and the in-place
check all run under them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.utils._pytree as pytree
from torch import nn

__all__ = ["copy_of", "untouched", "in_eval_mode", "in_mode", "hooks_silenced", "python_modules", "buffer_values",
           "restore_buffer_values", "renormed_tables", "BufferValue", "HOOK_STATE", "has_hooks", "torch_own_hook",
           "user_forward_hooks", "tied_names"]


def tied_names(module: nn.Module, buffers: bool = True) -> list[list[str]]:
    """The names of every parameter (and buffer) held under more than one, each group in ``named_parameters``'s
    order (its first name is the one ``named_parameters`` gives): weights tied across modules."""
    names: dict[int, list[str]] = {}
    held = [module.named_parameters(remove_duplicate=False)]
    for named in (*held, module.named_buffers(remove_duplicate=False)) if buffers else held:
        for name, tensor in named:
            names.setdefault(id(tensor), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def copy_of(module: nn.Module, shared: dict[int, torch.Tensor] | None = None) -> nn.Module:
    """A deep copy of a module.  Rule: a tensor a forward cached in a module's attributes with autograd history
    (EfficientFormerV2's attention-bias cache after an eval-mode call with grad: torch refuses to deep-copy a
    non-leaf tensor) is copied detached; the tensors in ``shared`` ({id: tensor}) are not copied at all;
    everything else as ``copy.deepcopy`` copies it."""
    memo: dict[int, torch.Tensor] = dict(shared or {})
    for m in module.modules():
        for value in m.__dict__.values():
            if isinstance(value, (torch.Tensor, dict, list, tuple)):
                for t in pytree.tree_leaves(value):
                    if isinstance(t, torch.Tensor) and not t.is_leaf:
                        memo[id(t)] = t.detach().clone()
    return copy.deepcopy(module, memo)


@contextmanager
def in_eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` and every submodule in eval mode for the block; each training flag put back after."""
    with in_mode(module, training=False):
        yield


@contextmanager
def in_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """``module`` and every submodule in train (or eval) mode for the block; each training flag put back after."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.train(training)
        yield
    finally:
        for m, flag in modes:
            m.training = flag


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
HOOK_STATE = (*_HOOK_DICTS, "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook")  # a module's hooks


def python_modules(module: nn.Module) -> list[nn.Module]:
    """Rule: ``module`` and its submodules, less TorchScript modules and what they hold: compiled code nothing
    traces into, with C++ dicts for buffers and no Python hooks (a trace calls them as leaves)."""
    found, seen, stack = [], set(), [module]
    while stack:
        current = stack.pop()
        if isinstance(current, torch.jit.ScriptModule) or id(current) in seen:
            continue
        found.append(current)
        seen.add(id(current))
        stack.extend(reversed(list(current.children())))
    return found


def has_hooks(module: nn.Module) -> bool:
    """Whether any forward, pre-forward or backward hook is registered on the module itself."""
    return any(getattr(module, name, None) for name in HOOK_STATE)


@contextmanager
def hooks_silenced(module: nn.Module) -> Iterator[None]:
    """Rule: the user's forward hooks do not fire in the block; torch's own (weight_norm, spectral_norm) still do.

    Each submodule's hook dicts are swapped for copies holding only torch's hooks and put back on
    exit, so hooks registered inside the block vanish with them.
    """
    saved = [(m, {k: m.__dict__[k] for k in _HOOK_DICTS if k in m.__dict__}) for m in python_modules(module)]
    try:
        for m, hooks in saved:
            kept = {k: v for k, v in hooks["_forward_pre_hooks"].items() if torch_own_hook(v)} \
                if "_forward_pre_hooks" in hooks else {}
            for key, value in hooks.items():
                m.__dict__[key] = type(value)(kept.items()) if key == "_forward_pre_hooks" else type(value)()
        yield
    finally:
        for m, hooks in saved:
            m.__dict__.update(hooks)


def user_forward_hooks(module: nn.Module) -> bool:
    """Whether the module itself has forward or pre-forward hooks other than torch's own (those ``hooks_silenced``
    silences)."""
    pre = getattr(module, "_forward_pre_hooks", None) or {}
    return bool(getattr(module, "_forward_hooks", None)) or not all(map(torch_own_hook, pre.values()))


def torch_own_hook(hook: object) -> bool:
    """A hook torch.nn.utils installs (weight_norm, spectral_norm, a prune mask): part of the model's forward."""
    return type(hook).__module__.startswith("torch.nn.utils")


@contextmanager
def untouched(module: nn.Module) -> Iterator[None]:
    """Rule: whatever a forward assigns to any submodule's attributes, buffers or dicts and lists is undone on exit,
    and so are in-place updates of buffer data (a step counter's ``add_``, an EMA's ``mul_``).

    The dicts and lists are put back in place: a cache a forward fills (timm's attention-bias cache,
    which an FX trace fills with a proxy of its own graph) is emptied again.
    """
    saved = [(m, dict(m.__dict__), dict(m._buffers), dict(m._parameters), _contents(m))
             for m in python_modules(module)]
    values = buffer_values(module) + renormed_tables(module)
    try:
        yield
    finally:
        for m, attributes, buffers, parameters, contents in saved:
            _restore(m.__dict__, attributes)
            _restore(m._buffers, buffers)
            _restore(m._parameters, parameters)
            for container, items in contents:
                _refill(container, items)
        restore_buffer_values(values)


BufferValue = tuple[str, torch.Tensor, int, torch.Tensor]


def buffer_values(module: nn.Module) -> list[BufferValue]:
    """(name, buffer, its version counter, a copy of its data) of every buffer with data (not on meta)."""
    return [(name, b, b._version, b.detach().clone()) for name, b in module.named_buffers()
            if isinstance(b, torch.Tensor) and not b.is_meta]


def renormed_tables(module: nn.Module) -> list[BufferValue]:
    """(name, weight, version, a copy) of every embedding table with ``max_norm``: torch's forward renormalises
    the rows it reads in place, so ``untouched`` puts the table back as it puts back a buffer."""
    return [(f"{name}.weight", m.weight, m.weight._version, m.weight.detach().clone())
            for name, m in module.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
            and m.max_norm is not None and not m.weight.is_meta]


def restore_buffer_values(values: list[BufferValue]) -> list[str]:
    """Rule: a buffer a forward updated in place gets its data back; returns their names.

    Updated means its version moved or its data changed: a kernel that writes a buffer itself (BatchNorm's
    running stats in training) does not move the version.
    """
    changed = []
    with torch.no_grad():
        for name, buffer, version, data in values:
            if buffer._version != version or not _same(buffer, data):
                buffer.copy_(data)
                changed.append(name)
    return changed


def _same(buffer: torch.Tensor, data: torch.Tensor) -> bool:
    """Whether a buffer still holds ``data`` (same shape, equal values, NaN where ``data`` has NaN)."""
    if buffer.shape != data.shape or buffer.dtype != data.dtype:
        return False
    if not buffer.is_floating_point():
        return torch.equal(buffer, data)
    return bool(((buffer == data) | (buffer.isnan() & data.isnan())).all())


def _contents(module: nn.Module) -> list[tuple[dict | list, dict | list]]:
    """Every dict / list attribute of a module with a shallow copy of its items (torch's own dicts apart)."""
    return [(value, copy.copy(value)) for key, value in module.__dict__.items()
            if isinstance(value, (dict, list)) and key not in _MODULE_INTERNALS]


def _refill(container: dict | list, items: dict | list) -> None:
    """Put a dict or list back to its saved items, in place (the same object stays referenced)."""
    if isinstance(container, dict):
        if container.keys() != items.keys() or any(container[k] is not v for k, v in items.items()):
            container.clear()
            container.update(items)
    elif len(container) != len(items) or any(a is not b for a, b in zip(container, items, strict=True)):
        container[:] = items


def _restore(current: dict, saved: dict) -> None:
    """Put a dict back to its saved items (same objects), dropping keys added since."""
    for key in [k for k in current if k not in saved]:
        del current[key]
    for key, value in saved.items():
        if current.get(key, _MISSING) is not value:
            current[key] = value


_MISSING = object()
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)  # hooks, _parameters, _buffers, _modules: not caches
