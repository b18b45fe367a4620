"""Attributes nrfx attaches to the modules it returns: nrfx_plan, nrfx_param_map, nrfx_gates, nrfx_plans.

A ``torch.fx.GraphModule`` rebuilds itself on ``copy.deepcopy`` and drops attributes its graph
does not use; torch keeps those named in ``gm.meta["_user_preserved_attributes"]`` (the hook
torch's own quantization uses), so ``attach`` sets the attribute and records it there too.
Pickling (``torch.save``) keeps them without help.  The attributes are results to read: assign
a new value with ``attach``, not ``gm.nrfx_plan = ...``, or a deep copy restores the old one.
"""

from __future__ import annotations

from typing import Any

import torch.fx
from torch import nn

__all__ = ["attach", "PRESERVED_KEY"]

PRESERVED_KEY: str = getattr(torch.fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY", "_user_preserved_attributes")


def attach(module: nn.Module, **values: Any) -> nn.Module:
    """Rule: set each attribute on the module and, on a GraphModule, also record it so deep copies keep it."""
    for name, value in values.items():
        setattr(module, name, value)
    if isinstance(module, torch.fx.GraphModule):
        meta = getattr(module, "meta", None) or {}  # a new dict: copy.copy shares meta with its source
        module.meta = {**meta, PRESERVED_KEY: {**meta.get(PRESERVED_KEY, {}), **values}}
    return module
