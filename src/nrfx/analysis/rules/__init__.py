"""Op rules, one per op kind; importing this package registers the built-in ones."""

from nrfx.analysis.rules import attention, elementwise, layers, movement, timm_layers, vision  # noqa: F401 - registration side effect
from nrfx.analysis.rules.registry import (
    FUNCTION_RULES,
    METHOD_RULES,
    MODULE_RULES,
    function_rule,
    lookup,
    method_rule,
    module_rule,
    register_layer,
    unregister_layer,
)

__all__ = ["module_rule", "function_rule", "method_rule", "lookup", "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES",
           "register_layer", "unregister_layer"]
