"""One op-table type for every kind of per-op entry: channel rules, shape formulas, any front end's ops.

An ``OpTable`` maps an op to an entry, keyed by module type (``call_module``), function object
(``call_function``: torch functions, operators, aten overloads) or tensor method name
(``call_method``).  A module subclass inherits its base's entry only if it computes what the base
computes: no class between them overrides a method of the base (``forward``, ``_conv_forward``,
``__call__``, …) other than construction and printing (``keeps_behaviour``); otherwise it is unknown.
Entries are registered with the decorators ``table.module(*types)``, ``table.function(*fns)``,
``table.method(*names)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import torch
from torch import nn

__all__ = ["OpTable", "keeps_behaviour"]

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
        """The entry of the nearest registered base class whose behaviour the module's class keeps
        (``keeps_behaviour``; none for TorchScript modules: compiled code, whatever class it was scripted from)."""
        if isinstance(module, torch.jit.ScriptModule):
            return None
        for base in type(module).__mro__:
            entry = self.modules.get(base)
            if entry is not None:
                return entry if keeps_behaviour(type(module), base, module) else None
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


# Methods a subclass may override and still compute what its base computes: construction, initialisation, printing,
# (de)serialisation, replication (the lazy layers' mixin), and the input-rank check of the norms (it raises or not).
_CONSTRUCTION = frozenset({"__init__", "__new__", "reset_parameters", "reset_running_stats", "extra_repr", "__repr__",
                           "__getstate__", "__setstate__", "_load_from_state_dict", "_save_to_state_dict",
                           "_replicate_for_data_parallel", "_check_input_dim", "__init_subclass__",
                           "__class_getitem__"})


def keeps_behaviour(cls: type, base: type, instance: object = None) -> bool:
    """Rule: ``cls`` computes what its base ``base`` computes when no class between them (``cls`` included) overrides
    a method ``base`` has, other than construction and printing (``_CONSTRUCTION``), nor defines a property (a
    ``weight`` computed from other parameters), and ``instance`` (when given) holds no callable of its own under such
    a name (``self.forward = …``): a ``Conv2d`` subclass with its own ``__init__`` keeps the conv rule; one that
    standardises its weight in ``_conv_forward`` does not."""
    for klass in cls.__mro__:
        if klass is base:
            break
        for name, value in vars(klass).items():
            if isinstance(value, property):
                return False
            if name not in _CONSTRUCTION and _is_method(value) and hasattr(base, name):
                return False
    own = vars(instance) if instance is not None and hasattr(instance, "__dict__") else {}
    return not any(callable(v) and name not in _CONSTRUCTION and hasattr(base, name) for name, v in own.items())


def _is_method(value: Any) -> bool:
    """A function, static or class method defined in a class body."""
    return callable(value) or isinstance(value, (staticmethod, classmethod))
