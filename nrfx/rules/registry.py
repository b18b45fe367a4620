"""The op-rule registry: one small rule per op kind, keyed by module type, function or method.

A rule is ``rule(ctx, node) -> spec``: it reads the specs of the node's inputs from the
analysis context, ties or freezes channel spaces, registers parameters and MACs, and
returns the spec of the node's output.  A module subclass inherits its base's rule only if
it does not override ``forward`` (otherwise it is unknown and freezes what it touches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["Rule", "module_rule", "function_rule", "method_rule", "lookup",
           "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES"]

Rule = Callable[[Any, Any], Any]

MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[Any, Rule] = {}
METHOD_RULES: dict[str, Rule] = {}


def module_rule(*types: type) -> Callable[[Rule], Rule]:
    """Register a rule for ``call_module`` nodes of these module types."""

    def register(rule: Rule) -> Rule:
        for t in types:
            MODULE_RULES[t] = rule
        return rule

    return register


def function_rule(*functions: Any) -> Callable[[Rule], Rule]:
    """Register a rule for ``call_function`` nodes calling one of these functions."""

    def register(rule: Rule) -> Rule:
        for f in functions:
            FUNCTION_RULES[f] = rule
        return rule

    return register


def method_rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for ``call_method`` nodes calling one of these tensor methods."""

    def register(rule: Rule) -> Rule:
        for n in names:
            METHOD_RULES[n] = rule
        return rule

    return register


def _module_rule(module: nn.Module) -> Rule | None:
    """The rule of the nearest registered base class that shares the module's forward."""
    forward = type(module).forward
    for base in type(module).__mro__:
        rule = MODULE_RULES.get(base)
        if rule is not None:
            return rule if base.forward is forward else None
    return None


def lookup(op: str, target: Any, module: nn.Module | None = None) -> Rule | None:
    """The rule for a node, or None when nrfx knows no rule for it."""
    if op == "call_module":
        return _module_rule(module)
    if op == "call_function":
        try:
            return FUNCTION_RULES.get(target)
        except TypeError:  # unhashable target
            return None
    if op == "call_method":
        return METHOD_RULES.get(target)
    return None
