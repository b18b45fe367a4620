"""nrfx: Neural Rejuvenation for any PyTorch model, as torch.fx graph transformations."""

from nrfx.analysis.front import analyze
from nrfx.analysis.islands import IslandAnalysis
from nrfx.analysis.masks import norm_masks
from nrfx.analysis.rules import register_layer, unregister_layer
from nrfx.analysis.whole import Analysis, Coverage, ModelAnalysis, Space, Utilization
from nrfx.errors import (
    BudgetError,
    InputError,
    MaskError,
    NrfxError,
    NrfxWarning,
    OptimizerStateError,
    PlanError,
    RewriteError,
    RuleError,
    ShapeError,
    TraceError,
    UnknownOpWarning,
)
from nrfx.layers.gates import Gate
from nrfx.plan.planner import Budget, Plan
from nrfx.rewrite.gating import add_gates, fold_gates
from nrfx.rewrite.rejuvenate import apply_plan, load_rejuvenated, rejuvenate
from nrfx.train.driver import DriverError, NeuralRejuvenation

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
    "RuleError",
    "MaskError",
    "BudgetError",
    "PlanError",
    "RewriteError",
    "OptimizerStateError",
    "NrfxWarning",
    "UnknownOpWarning",
]
