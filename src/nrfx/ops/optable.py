"""One op-table type for every kind of per-op entry: channel rules, shape formulas, any front end's ops.

An ``OpTable`` maps an op to an entry, keyed by module type (``call_module``), function object
(``call_function``: torch functions, operators, aten overloads) or tensor method name
(``call_method``).  A module subclass inherits its base's entry only if it does not override
``forward`` (otherwise it is unknown).  Entries are registered with the decorators
``table.module(*types)``, ``table.function(*fns)``, ``table.method(*names)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch
from torch import nn

__all__ = ["OpTable"]

Entry = TypeVar("Entry")


class OpTable(Generic[Entry]):
    """Entries by module type, function or method name; ``lookup`` finds the one for a node."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.modules: dict[type, Entry] = {}
        self.functions: dict[Any, Entry] = {}
        self.methods: dict[str, Entry] = {}

    def module(self, *types: type) -> Callable[[Entry], Entry]:
        """Register an entry for ``call_module`` nodes of these module types."""
        return self._registrar(self.modules, types)

    def function(self, *functions: Any) -> Callable[[Entry], Entry]:
        """Register an entry for ``call_function`` nodes calling one of these functions (or aten ops)."""
        return self._registrar(self.functions, functions)

    def method(self, *names: str) -> Callable[[Entry], Entry]:
        """Register an entry for ``call_method`` nodes calling one of these tensor methods."""
        return self._registrar(self.methods, names)

    @staticmethod
    def _registrar(table: dict, keys: tuple) -> Callable[[Entry], Entry]:
        """A decorator that stores its argument under every key."""

        def register(entry: Entry) -> Entry:
            for key in keys:
                table[key] = entry
            return entry

        return register

    def for_module(self, module: nn.Module) -> Entry | None:
        """The entry of the nearest registered base class that shares the module's forward (none for TorchScript
        modules: compiled code, whatever class it was scripted from)."""
        if isinstance(module, torch.jit.ScriptModule):
            return None
        forward = type(module).forward
        for base in type(module).__mro__:
            entry = self.modules.get(base)
            if entry is not None:
                return entry if base.forward is forward else None
        return None

    def for_function(self, target: Any) -> Entry | None:
        """The entry of a function (None for unhashable targets)."""
        try:
            return self.functions.get(target)
        except TypeError:
            return None

    def lookup(self, op: str, target: Any, module: nn.Module | None = None) -> Entry | None:
        """The entry for a node (``op``, ``target``; the called module for ``call_module``), or None."""
        if op == "call_module":
            return self.for_module(module) if module is not None else None
        if op == "call_function":
            return self.for_function(target)
        if op == "call_method":
            return self.methods.get(target)
        return None
