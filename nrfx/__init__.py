"""nrfx: Neural Rejuvenation for any PyTorch model, as torch.fx graph transformations."""

from .analysis import Analysis, Coverage, ModelAnalysis, Space, Utilization
from .driver import DriverError, NeuralRejuvenation
from .errors import (
    BudgetError,
    InputError,
    MaskError,
    NrfxError,
    NrfxWarning,
    OptimizerStateError,
    PlanError,
    RewriteError,
    ShapeError,
    TraceError,
    UnknownOpWarning,
)
from .front import analyze
from .gates import Gate
from .gating import add_gates, fold_gates
from .islands import IslandAnalysis
from .masks import norm_masks
from .plan import Budget, Plan
from .rejuvenate import apply_plan, load_rejuvenated, rejuvenate
from .rules import register_layer, unregister_layer

__version__ = "0.1.0"

__all__ = [
    "analyze",
    "Analysis",
    "ModelAnalysis",
    "Space",
    "Utilization",
    "Coverage",
    "IslandAnalysis",
    "Gate",
    "add_gates",
    "fold_gates",
    "norm_masks",
    "rejuvenate",
    "apply_plan",
    "load_rejuvenated",
    "Budget",
    "Plan",
    "register_layer",
    "unregister_layer",
    "NeuralRejuvenation",
    "DriverError",
    "NrfxError",
    "InputError",
    "TraceError",
    "ShapeError",
    "MaskError",
    "BudgetError",
    "PlanError",
    "RewriteError",
    "OptimizerStateError",
    "NrfxWarning",
    "UnknownOpWarning",
]
