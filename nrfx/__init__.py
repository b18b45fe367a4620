"""nrfx: Neural Rejuvenation for any PyTorch model, as torch.fx graph transformations."""

from .analysis import Analysis, Space, Utilization, analyze
from .errors import (
    BudgetError,
    MaskError,
    NrfxError,
    NrfxWarning,
    PlanError,
    RewriteError,
    ShapeError,
    TraceError,
    UnknownOpWarning,
)
from .masks import norm_masks

__version__ = "0.1.0"

__all__ = [
    "analyze",
    "Analysis",
    "Space",
    "Utilization",
    "norm_masks",
    "NrfxError",
    "TraceError",
    "ShapeError",
    "MaskError",
    "BudgetError",
    "PlanError",
    "RewriteError",
    "NrfxWarning",
    "UnknownOpWarning",
]
