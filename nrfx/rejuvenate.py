"""rejuvenate: analyse, plan and rewrite in one call; apply_plan replays a saved plan."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import nn

from .analysis import Analysis, analyze
from .fold import apply_folds, measure_folds
from .plan import Plan, make_plan
from .rescale import apply_rescale
from .reslice import reslice
from .rewrite import ParamMap, copy_for_rewrite, param_maps, rewrite_params, verify
from .schemes import apply_scheme
from .trace import keep_safe_inplace, propagate_shapes

__all__ = ["rejuvenate", "apply_plan"]



def _check_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """A tuple of tensors."""
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def rejuvenate(model: nn.Module, masks: dict[str, torch.Tensor] | None, budget: Any = None, *,
               example_inputs: Any, scheme: str = "nr", rescale: bool = False, gamma0: float | str | None = None,
               realloc: bool = True, seed: int | None = None, analysis: Analysis | None = None,
               **trace_options: Any) -> torch.fx.GraphModule:
    """Remove dead channels, grow every free space by one shared rate α to the budget, re-initialise.

    Returns a new GraphModule (the model is not modified) with ``nrfx_plan`` (the replayable
    Plan) and ``nrfx_param_map`` ({name: ParamMap}) attached.
    """
    inputs = _check_inputs(example_inputs)
    analysis = analysis or analyze(model, inputs, **trace_options)
    plan = make_plan(analysis, model, masks, budget, scheme=scheme, rescale=rescale, gamma0=gamma0,
                     realloc=realloc, seed=seed)
    return _build(model, analysis, plan, inputs)


def apply_plan(model: nn.Module, plan: Plan | dict, example_inputs: Any = None, **trace_options: Any):
    """Rebuild the rejuvenated module a plan describes, from the original model (replay)."""
    plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
    inputs = _check_inputs(example_inputs) if example_inputs is not None else tuple(
        torch.zeros(s) for s in plan.input_shapes)
    analysis = analyze(model, inputs, **trace_options)
    from .errors import PlanError

    if [s.width for s in analysis.spaces] != plan.widths:
        raise PlanError("the plan does not fit this model: its channel spaces differ (was it made for another "
                        "architecture or another set of trace options?)")
    return _build(model, analysis, plan, inputs)


def _build(model: nn.Module, analysis: Analysis, plan: Plan, inputs) -> torch.fx.GraphModule:
    """Copy the traced graph module, rewrite its parameters, apply the scheme, verify."""
    maps: dict[str, ParamMap] = param_maps(analysis, plan)
    gm = copy_for_rewrite(analysis.gm, maps)
    if plan.folds is None:
        plan.folds, dropped = measure_folds(gm, analysis, plan, inputs)
        plan.notes = list(plan.notes) + dropped
    rewrite_params(gm, analysis, plan, maps)
    reslice(gm, analysis, plan)
    notes = list(plan.notes)
    notes += apply_folds(analysis.gm, gm, plan.folds, maps)
    if plan.rescale:
        notes += apply_rescale(gm, analysis, plan, maps)
    notes += apply_scheme(gm, analysis, plan, maps)
    keep_safe_inplace(gm)
    gm.recompile()
    verify(gm)
    propagate_shapes(gm, inputs)
    plan.notes = list(dict.fromkeys(notes))
    gm.nrfx_plan = plan
    gm.nrfx_param_map = maps
    gm.train(model.training)
    return gm
