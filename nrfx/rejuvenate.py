"""rejuvenate: analyse, plan and rewrite in one call; apply_plan replays a saved plan.

The plan is complete (survivors, widths, folded constants, planning notes) and immutable
before the build starts; the build is a fixed list of rewrite passes that share one
signature ``(gm, analysis, plan, maps) -> notes`` and never write the plan.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

from .analysis import Analysis, analyze
from .errors import BudgetError, NrfxError, PlanError, RewriteError
from .fold import apply_folds, measure_folds
from .inputs import check_model, check_real_weights
from .islands import IslandAnalysis
from .maps import ParamMap, param_maps
from .plan import Budget, Plan, make_plan
from .plan_check import check_plan_fits
from .rescale import apply_rescale
from .reslice import regroup, reslice
from .results import attach
from .rewrite import copy_for_rewrite, rewrite_params, verify
from .schemes import apply_scheme, densify
from .shapeprop import propagate_shapes
from .trace import keep_safe_inplace

__all__ = ["rejuvenate", "apply_plan", "plan_rejuvenation", "REWRITE_PASSES"]

RewritePass = Callable[[torch.fx.GraphModule, Analysis, Plan, dict[str, ParamMap]], list[str]]
# in order: new tensors, literal channel sizes, folded constants, neural rescaling, S/R schemes
REWRITE_PASSES: tuple[RewritePass, ...] = (rewrite_params, reslice, regroup, apply_folds, apply_rescale, apply_scheme)


def plan_rejuvenation(analysis: Analysis, model: nn.Module, masks: dict[str, torch.Tensor] | None, budget: Any,
                      example_inputs: Any = None, **options: Any) -> Plan:
    """The complete plan: survivors and widths (``make_plan``), then the constants removed channels emit.

    The constants are measured on the analysis' own example inputs (``example_inputs`` is accepted
    for compatibility and ignored).
    """
    plan = make_plan(analysis, model, masks, budget, **options)
    return _with_folds(analysis, plan)


def _with_folds(analysis: Analysis, plan: Plan) -> Plan:
    """The plan with its folded constants measured on the example inputs (kept when it has them)."""
    if plan.folds is not None:
        return plan
    folds, notes = measure_folds(analysis.gm, analysis, plan, analysis.example)
    return dataclasses.replace(plan, folds=folds, notes=[*plan.notes, *notes])


def rejuvenate(model: nn.Module, masks: dict[str, torch.Tensor] | None, budget: Any = None, *,
               example_inputs: Any, example_kwargs: dict[str, Any] | None = None, scheme: str = "nr",
               rescale: bool = False, gamma0: float | str | None = None, realloc: bool = True, seed: int | None = None,
               align: int = 8, analysis: Analysis | None = None, **capture_options: Any) -> torch.fx.GraphModule:
    """Remove dead channels, grow every free space by one shared rate α to the budget, re-initialise.

    Returns a new GraphModule (the model is not modified) with ``nrfx_plan`` (the replayable
    Plan, with the notes of the build) and ``nrfx_param_map`` ({name: ParamMap}) attached.
    It takes the model's own arguments (``example_inputs``, ``example_kwargs``) and returns its
    output structure; ``capture`` and the trace options are those of ``nrfx.analyze``.
    ``align`` (default 8): resized widths, and in cr/ca their S and R parts, stay multiples of it
    (tensor-core friendly); ``align=1`` is the paper's exact allocation.
    """
    check_model(model)
    check_real_weights(model)
    analysis = analysis or analyze(model, example_inputs, example_kwargs=example_kwargs, **capture_options)
    options = {"scheme": scheme, "rescale": rescale, "gamma0": gamma0, "realloc": realloc, "seed": seed,
               "align": align}
    if isinstance(analysis, IslandAnalysis):
        return _rejuvenate_islands(model, analysis, masks, budget, options)
    plan = plan_rejuvenation(analysis, model, masks, budget, **options)
    return _build(model, analysis, plan)


def _rejuvenate_islands(model: nn.Module, analysis: IslandAnalysis, masks: dict[str, torch.Tensor] | None,
                        budget: Any, options: dict[str, Any]) -> nn.Module:
    """A deep copy of the model with every island replaced by its rejuvenated module.

    Each island is planned on its own at one shared fraction of its cost: the budget less the
    parameters outside the islands, over the islands' c(A).  ``nrfx_plans`` maps island paths to plans.
    """
    fraction, kind = _island_fraction(analysis, budget)
    result = copy.deepcopy(model)
    plans: dict[str, Plan] = {}
    for path, island_masks in analysis.split_masks(masks).items():
        island = analysis.islands[path]
        plan = plan_rejuvenation(island, model.get_submodule(path), island_masks, Budget.fraction(fraction, kind),
                                 **options)
        module = _build(model.get_submodule(path), island, plan)
        parent, _, name = path.rpartition(".")
        setattr(result.get_submodule(parent), name, module)
        plans[path] = module.nrfx_plan
    attach(result, nrfx_plans=plans)
    return result


def _island_fraction(analysis: IslandAnalysis, budget: Any) -> tuple[float, str]:
    """The one fraction of their own cost every island gets so the whole model meets the budget."""
    kind, value = Budget.coerce(budget).resolve(analysis)
    inside = analysis.params - analysis.outside_params if kind == "params" else analysis.flops
    available = value - analysis.outside_params if kind == "params" else value
    if inside <= 0 or available <= 0:
        raise BudgetError(f"a budget of {value:,} {kind} leaves nothing for the islands "
                          f"({analysis.outside_params:,} parameters lie outside them)")
    return available / inside, kind


def apply_plan(model: nn.Module, plan: Plan | dict, example_inputs: Any = None, *,
               example_kwargs: dict[str, Any] | None = None, **capture_options: Any) -> torch.fx.GraphModule:
    """Rebuild the rejuvenated module a plan describes, from the original model (replay)."""
    plan = Plan.from_dict(plan.to_dict() if isinstance(plan, Plan) else plan)  # checked whole, whatever its source
    if example_inputs is None and plan.capture != "fx":
        raise PlanError(f"this plan was made on a model captured by {plan.capture}: pass example_inputs= "
                        "(and example_kwargs=) as the model takes them to replay it")
    if example_inputs is None:
        example_inputs = tuple(torch.zeros(s) for s in plan.input_shapes)
    capture_options.setdefault("capture", plan.capture)
    analysis = analyze(model, example_inputs, example_kwargs=example_kwargs, **capture_options)
    check_plan_fits(plan, analysis)
    return _build(model, analysis, _with_folds(analysis, plan))


def _build(model: nn.Module, analysis: Analysis, plan: Plan) -> torch.fx.GraphModule:
    """Copy the traced graph module, run every rewrite pass, verify; the plan is only read."""
    maps: dict[str, ParamMap] = param_maps(analysis, plan)
    gm = copy_for_rewrite(analysis.gm, maps)
    densify(gm)  # an earlier round's S/R layers are rewritten as the plain layers they stand for
    notes = list(plan.notes)
    for rewrite_pass in REWRITE_PASSES:
        notes += rewrite_pass(gm, analysis, plan, maps)
    keep_safe_inplace(gm)
    gm.recompile()
    verify(gm)
    _check_runs(gm, analysis.example.flat())
    attach(gm, nrfx_plan=dataclasses.replace(plan, notes=list(dict.fromkeys(notes))), nrfx_param_map=maps)
    gm.train(model.training)
    return gm


def _check_runs(gm: torch.fx.GraphModule, inputs) -> None:
    """The rewritten graph runs on the example inputs' shapes; a failure is nrfx's, not the inputs'."""
    try:
        propagate_shapes(gm, inputs)
    except NrfxError as error:
        raise RewriteError(
            f"the rewritten model does not run on the example inputs that the original ran on: {error}\n"
            "  An op in the model spells a channel count nrfx does not rewrite. Make its module a leaf "
            "(leaf_modules=[...]) so its channels freeze, and please report the op."
        ) from error
