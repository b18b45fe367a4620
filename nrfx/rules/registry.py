"""The channel-rule table: one small rule per op kind, an ``OpTable`` of ``Rule``.

A rule is ``rule(ctx, node) -> spec``: ``ctx`` is the analysis context of that one node
(``nrfx.context.Context``); it reads the specs of the node's inputs, ties or freezes channel
spaces, registers parameters and MACs, and returns the spec of the node's output.  A module
subclass inherits its base's rule only if it does not override ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..optable import OpTable

if TYPE_CHECKING:
    import torch.fx

    from ..context import Context

__all__ = ["Rule", "RULES", "module_rule", "function_rule", "method_rule", "lookup",
           "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES"]

Rule = Callable[["Context", "torch.fx.Node"], Any]

RULES: OpTable[Rule] = OpTable("channel rules")
module_rule = RULES.module
function_rule = RULES.function
method_rule = RULES.method
lookup = RULES.lookup
MODULE_RULES, FUNCTION_RULES, METHOD_RULES = RULES.modules, RULES.functions, RULES.methods
