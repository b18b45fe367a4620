"""rejuvenate: analyse, plan and rewrite in one call; apply_plan replays a saved plan.

The plan is complete (survivors, widths, folded constants, planning notes) and immutable
before the build starts; the build is a fixed list of rewrite passes that share one
signature ``(gm, analysis, plan, maps) -> notes`` and never write the plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.fx
from torch import nn

from nrfx.analysis.cost import by_kind
from nrfx.analysis.front import analyze
from nrfx.analysis.islands import IslandAnalysis, hooks_traced_through, record_calls
from nrfx.analysis.whole import Analysis, ModelAnalysis, as_example
from nrfx.capture.front_ends import Example
from nrfx.capture.guards import copy_of, user_forward_hooks
from nrfx.capture.inputs import check_model, check_real_weights
from nrfx.capture.shapeprop import propagate_shapes
from nrfx.capture.trace import keep_safe_inplace
from nrfx.errors import BudgetError, InputError, NrfxError, NrfxWarning, PlanError, RewriteError
from nrfx.plan.check import check_plan_fits
from nrfx.plan.fold import fold_candidates, measure_folds
from nrfx.plan.maps import ParamMap, param_maps
from nrfx.plan.planner import Budget, Plan, make_plan
from nrfx.rewrite.folds import apply_folds, new_bias_params
from nrfx.rewrite.inplace import (
    PLANS_KEY,
    Journal,
    carry_hooks,
    check_same_outputs,
    decode_rounds,
    freeze_for_inplace,
    materialise,
    pinned_notes,
    record_round,
    recorded_rounds,
    same_history,
    saves_plans,
    skeleton,
    transplant,
)
from nrfx.rewrite.optim_state import dense_parameters, inplace_states, move_inplace_states
from nrfx.rewrite.rescale import apply_rescale
from nrfx.rewrite.reslice import regroup, reheads, reslice, resum
from nrfx.rewrite.results import attach
from nrfx.rewrite.schemes import apply_scheme, densify
from nrfx.rewrite.tensors import copy_for_rewrite, rewrite_params, verify

__all__ = ["rejuvenate", "apply_plan", "plan_rejuvenation", "load_rejuvenated", "replays_plans", "REWRITE_PASSES"]

RewritePass = Callable[[torch.fx.GraphModule, Analysis, Plan, dict[str, ParamMap]], list[str]]
# in order: new tensors, literal channel sizes, folded constants, neural rescaling, S/R schemes
REWRITE_PASSES: tuple[RewritePass, ...] = (rewrite_params, reslice, regroup, resum, reheads, apply_folds, apply_rescale,
                                           apply_scheme)


def plan_rejuvenation(analysis: Analysis, model: nn.Module, masks: dict[str, torch.Tensor] | None, budget: Any,
                      **options: Any) -> Plan:
    """The complete plan: survivors and widths (``make_plan``), then the constants removed channels emit
    (measured on the analysis' own example inputs); the new biases of folds count in a params budget."""
    masks = analysis.masks_from(model) if masks is None else masks
    try:
        plan = make_plan(analysis, model, masks, budget, **options)
    except BudgetError as error:
        raise _workable_minimum(error, analysis, model, masks, budget, options) from None
    reserve = _bias_reserve(analysis, plan, masks)
    if reserve:
        plan = make_plan(analysis, model, masks, budget, **options, reserve=reserve)
    plan = _with_folds(analysis, plan, masks)
    added = new_bias_params(analysis, plan) if plan.budget_kind == "params" else 0
    if not added:
        return plan
    if plan.realloc and plan.cost_after + added > plan.budget:  # unreachable unless replanning changed the folds
        raise BudgetError(f"the biases the folds add ({added:,} params) take the plan over its budget of "
                          f"{plan.budget:,}: pass constants='keep', or a budget larger by {added:,}")
    note = (f"fold: {added:,} params of new biases (on layers with no bias and no BatchNorm after them) paid from the "
            "budget")
    return dataclasses.replace(plan, cost_after=plan.cost_after + added, notes=[*plan.notes, note])


def _workable_minimum(error: BudgetError, analysis: Analysis, model: nn.Module, masks: dict[str, torch.Tensor],
                      budget: Any, options: dict[str, Any]) -> BudgetError:
    """Rule: a BudgetError names a budget that works.  The planner's smallest params budget may leave nothing for the
    biases the folds add; then the error of planning at it (which counts them) is the one to raise."""
    if error.minimum is None or Budget.coerce(budget).resolve(analysis)[0] != "params":
        return error
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NrfxWarning)  # a probe: its fold warnings are not the user's
            plan_rejuvenation(analysis, model, masks, Budget(params=error.minimum), **options)
    except BudgetError as larger:
        if larger.minimum is not None and larger.minimum > error.minimum:
            return larger
    return error


def _bias_reserve(analysis: Analysis, plan: Plan, masks: dict[str, torch.Tensor]) -> int:
    """Rule: a params budget pays for the biases the folds add (``new_bias_params``).  The params to set aside
    when, under ``plan``, they would take the model over its budget (0: they fit, or no fold can add one)."""
    if plan.budget_kind != "params" or not plan.realloc:
        return 0
    if plan.folds is None and not new_bias_params(analysis, plan, fold_candidates(analysis.gm, analysis, plan)):
        return 0  # no layer that could fold a constant lacks a bias and a BatchNorm: nothing to measure
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NrfxWarning)  # the plan that is kept warns (``_with_folds``)
        added = new_bias_params(analysis, _with_folds(analysis, plan, masks))
    return added if plan.cost_after + added > plan.budget else 0


def _with_folds(analysis: Analysis, plan: Plan, masks: dict[str, torch.Tensor] | None = None) -> Plan:
    """The plan with its folded constants measured on the example inputs (kept when it has them); ``masks``: those
    it was made with (None: a replayed plan, every removed channel taken as dead)."""
    if plan.folds is not None:
        return plan
    folds, notes = measure_folds(analysis.gm, analysis, plan, analysis.example, masks)
    return dataclasses.replace(plan, folds=folds, notes=[*plan.notes, *notes])


def rejuvenate(model: nn.Module, masks: dict[str, torch.Tensor] | None, budget: Any = None, *,
               example_inputs: Any, example_kwargs: dict[str, Any] | None = None, scheme: str = "nr",
               rescale: bool = False, gamma0: float | str | None = None, realloc: bool = True, seed: int | None = None,
               align: int = 8, constants: str = "drop", residual: str = "rejuvenate", analysis: Analysis | None = None,
               inplace: bool = False,
               optimizer: torch.optim.Optimizer | None = None, carry_state: bool = True,
               **capture_options: Any) -> nn.Module:
    """Remove dead channels, grow every free space by one shared rate α to the budget, re-initialise.

    Returns a new GraphModule (the model is not modified) with ``nrfx_plan`` (the replayable
    Plan, with the notes of the build) and ``nrfx_param_map`` ({name: ParamMap}) attached.
    With ``inplace=True`` the model object itself is rewritten and returned (``nrfx.rewrite.inplace``):
    same class, module names and surviving ``nn.Parameter`` objects, resized; ``optimizer=``
    then follows (state sliced to the survivors, fresh for new entries; ``carry_state=False``
    starts every resized parameter fresh), and ``model.state_dict()`` carries the plans.
    It takes the model's own arguments (``example_inputs``, ``example_kwargs``) and returns its
    output structure; ``capture`` and the trace options are those of ``nrfx.analyze``.
    ``align`` (default 8): resized widths, and in cr/ca their S and R parts, stay multiples of it
    (tensor-core friendly); ``align=1`` is the paper's exact allocation.  ``residual="keep"``: residual
    streams keep every channel and their width, as the paper does for ResNets (``make_plan``).
    """
    check_model(model)
    check_real_weights(model)
    if optimizer is not None and not inplace:
        raise InputError("optimizer= follows a rewrite in place only: pass inplace=True (without it nrfx returns a new "
                         "module, and the driver NeuralRejuvenation rebuilds the optimizer for it)")
    analysis = analysis or analyze(model, example_inputs, example_kwargs=example_kwargs, **capture_options)
    options = {"scheme": scheme, "rescale": rescale, "gamma0": gamma0, "realloc": realloc, "seed": seed,
               "align": align, "constants": constants, "residual": residual}
    _warn_hooks_kept(model, analysis, inplace)
    if inplace:
        jobs = {}
        minimum = lambda: _islands_minimum(analysis, model, masks, budget, options, inplace=True)  # noqa: E731
        for path, (island, island_masks, island_budget) in _targets(analysis, masks, budget, minimum).items():
            with _island_budget(analysis, path, budget, minimum):
                jobs[path] = _inplace_job(model.get_submodule(path), island, island_masks, island_budget, options)
        return _apply_in_place(model, jobs, optimizer, carry_state, as_example(example_inputs, example_kwargs))
    if not analysis.whole:
        return _rejuvenate_islands(model, analysis, masks, budget, options)
    _warn_hooks_left_behind(model, analysis)
    plan = plan_rejuvenation(analysis, model, masks, budget, **options)
    return _build(model, analysis, plan)


def _warn_hooks_left_behind(model: nn.Module, analysis: Analysis) -> None:
    """Rule: the new GraphModule runs the hooks of the modules its graph calls (copies of them), not of those it
    traces through; a warning names those (their hooks are the user's, or a library's, such as Hugging Face's
    output capturing)."""
    skipped = hooks_traced_through(model, analysis.gm)
    if skipped:
        names = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        warnings.warn(f"{names} of {type(model).__name__} have hooks that the rewritten GraphModule does not run (its "
                      "graph traces through those modules): register them again on the result, or pass inplace=True "
                      "(your model object is rewritten and keeps its hooks)", NrfxWarning, stacklevel=3)


def _warn_hooks_kept(model: nn.Module, analysis: ModelAnalysis, inplace: bool) -> None:
    """Rule: nrfx never runs the user's forward hooks, so it analyses and preserves the forward without them; the
    result runs the hooks of the modules inside what it rewrites (the copies its graphs call; in place, every one),
    and a warning names them: one that changes a value would change the function unseen."""
    hooked = _hooked_inside(model, analysis, inplace)
    if hooked:
        names = ", ".join(hooked[:3]) + (f" and {len(hooked) - 3} more" if len(hooked) > 3 else "")
        warnings.warn(f"the rejuvenated model runs the forward hooks of {names} of {type(model).__name__}, which nrfx "
                      "never runs: the function it analyses and preserves is the forward without them. A hook that "
                      "only reads (logging, feature capture) is fine; one that changes a value (returns a new input or "
                      "output, or writes into one) is not preserved: remove it before nrfx and register it again on "
                      "the result, or write it into the forward", NrfxWarning, stacklevel=3)


def _hooked_inside(model: nn.Module, analysis: ModelAnalysis, inplace: bool) -> list[str]:
    """The modules strictly inside each rewritten region (the whole model, or each island) with user forward hooks
    that the result runs: the modules its graph calls, or in place every one."""
    regions = {"": analysis} if analysis.whole else analysis.islands
    hooked = []
    for path, region in regions.items():
        modules = dict(model.get_submodule(path).named_modules())
        inside = [name for name in modules if name] if inplace else \
            [node.target for node in region.gm.graph.nodes if node.op == "call_module"]
        hooked += [f"{path}.{name}" if path else name for name in inside
                   if name in modules and user_forward_hooks(modules[name])]
    return hooked


def _rejuvenate_islands(model: nn.Module, analysis: IslandAnalysis, masks: dict[str, torch.Tensor] | None,
                        budget: Any, options: dict[str, Any]) -> nn.Module:
    """A deep copy of the model with every island replaced by its rejuvenated module.

    Each island is planned on its own at one shared fraction of its cost (``_island_fractions``: the budget less
    what lies outside the islands or in islands with no free channel, over the other islands' c(A)).
    ``nrfx_plans`` maps island paths to plans.
    """
    minimum = lambda: _islands_minimum(analysis, model, masks, budget, options)  # noqa: E731
    fractions, kind = _island_fractions(analysis, budget, minimum)
    result = copy_of(model)
    plans: dict[str, Plan] = {}
    for path, island_masks in analysis.split_masks(masks).items():
        island = analysis.islands[path]
        with _island_budget(analysis, path, budget, minimum):
            plan = plan_rejuvenation(island, model.get_submodule(path), island_masks,
                                     Budget.fraction(fractions[path], kind), **options)
        module = _build(model.get_submodule(path), island, plan)
        carry_hooks(result.get_submodule(path), module)  # a hook on the island's module keeps working
        parent, _, name = path.rpartition(".")
        setattr(result.get_submodule(parent), name, module)
        plans[path] = module.nrfx_plan
    analysis.retie(model, result)  # a tensor two islands (or an island and the rest) share is one tensor again
    attach(result, nrfx_plans=plans)
    return result


def _targets(analysis: ModelAnalysis, masks, budget,
             minimum: Callable[[], int | None]) -> dict[str, tuple[Analysis, Any, Any]]:
    """What gets planned: the whole graph (path ""), or each island at the islands' shared budget fraction."""
    if analysis.whole:
        return {"": (analysis, masks, budget)}
    fractions, kind = _island_fractions(analysis, budget, minimum)
    return {path: (analysis.islands[path], island_masks, Budget.fraction(fractions[path], kind))
            for path, island_masks in analysis.split_masks(masks).items()}


def _inplace_job(model: nn.Module, analysis: Analysis, masks, budget, options: dict[str, Any]) -> tuple[Analysis, Plan]:
    """The analysis with the spaces the user's code pins frozen, and the plan made on it."""
    pinned = freeze_for_inplace(analysis, model)
    plan = plan_rejuvenation(pinned, model, masks, budget, **options)
    return pinned, dataclasses.replace(plan, notes=[*plan.notes, *pinned_notes(analysis, pinned)])


def _apply_in_place(model: nn.Module, jobs: dict[str, tuple[Analysis, Plan]], optimizer: torch.optim.Optimizer | None,
                    carry_state: bool, example: Example) -> nn.Module:
    """Build every job's GraphModule, then move it into ``model`` (undone whole on any failure), optimizer after."""
    built = {path: _build(model.get_submodule(path), analysis, plan) for path, (analysis, plan) in jobs.items()}
    maps = {_joined(path, name): pmap for path, gm in built.items() for name, pmap in gm.nrfx_param_map.items()}
    before = dense_parameters(model)
    states = inplace_states(optimizer, before, maps, carry_state) if optimizer is not None else {}
    journal = Journal()
    for path, gm in built.items():
        transplant(model.get_submodule(path), gm, journal)
        check_same_outputs(model.get_submodule(path), gm, jobs[path][0].example, journal)
    if optimizer is not None:
        move_inplace_states(optimizer, before, dense_parameters(model), states)
    plans = {path: gm.nrfx_plan for path, gm in built.items()}
    _remember(model, plans, example)
    attach(model, nrfx_plan=plans.get(""), nrfx_plans=plans, nrfx_param_map=maps)
    return model


def _joined(path: str, name: str) -> str:
    """``path.name``, or ``name`` at the root."""
    return f"{path}.{name}" if path else name


def _remember(model: nn.Module, plans: dict[str, Plan], example: Example) -> None:
    """Record the round for ``state_dict``, keep the inputs' shapes, and let ``load_state_dict`` replay rounds."""
    record_round(model, plans)
    model.__dict__.setdefault("_nrfx_example", skeleton(example))
    replays_plans(model)


def replays_plans(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` replay, in place, the rounds a state dict carries beyond the model's own."""
    saves_plans(model)
    if not model.__dict__.get("_nrfx_loads_plans"):
        model.register_load_state_dict_pre_hook(_load_plans)
        model.__dict__["_nrfx_loads_plans"] = True


def _load_plans(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
    """Load pre-hook: the rounds under ``prefix + nrfx_plans`` that the model has not had yet, replayed in place."""
    key = prefix + PLANS_KEY
    if key not in state_dict:
        return
    rounds, done = decode_rounds(state_dict.pop(key)), recorded_rounds(module)
    if not same_history(done, rounds):
        error_msgs.append(f"{key}: the state dict comes from a model rejuvenated differently from this one; load it "
                          "into a fresh instance of the original class with nrfx.load_rejuvenated(model, state_dict)")
        return
    for round_ in rounds[len(done):]:
        example = module.__dict__.get("_nrfx_example")
        jobs = {path: _replay_job(module, path, Plan.from_dict(data), example) for path, data in round_.items()}
        _apply_in_place(module, jobs, None, True, example or _example_from_plan(next(iter(jobs.values()))[1], module))


def _example_from_plan(plan: Plan, model: nn.Module) -> Example:
    """Zeros of the plan's input shapes, in the dtype and on the device of the model's first floating parameter:
    the example of an fx-captured plan replayed without one."""
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    options = {"dtype": first.dtype, "device": first.device} if first is not None else {}
    return Example(tuple(torch.zeros(s, **options) for s in plan.input_shapes))


def _replay_job(model: nn.Module, path: str, plan: Plan, example: Example | None) -> tuple[Analysis, Plan]:
    """The analysis (pinned spaces frozen, as when the plan was made) of the module a saved plan rewrites."""
    module = model.get_submodule(path)
    inputs = _replay_inputs(model, path, plan, example)
    analysis = freeze_for_inplace(analyze(module, inputs.args, example_kwargs=inputs.kwargs, capture=plan.capture),
                                  module)
    check_plan_fits(plan, analysis)
    return analysis, _with_folds(analysis, plan)


def _replay_inputs(model: nn.Module, path: str, plan: Plan, example: Example | None) -> Example:
    """The inputs module ``path`` receives: from the model's example (as zeros), else zeros of an fx plan's shapes."""
    if example is None:
        if plan.capture != "fx":
            raise PlanError(f"this plan was made on a model captured by {plan.capture}: pass example_inputs= (and "
                            "example_kwargs=) to nrfx.load_rejuvenated so the saved rounds can be replayed")
        return _example_from_plan(plan, model.get_submodule(path))
    device = next(model.parameters()).device
    whole = materialise(example, device)
    if not path:
        return whole
    return record_calls(model, whole)[id(model.get_submodule(path))][0]


def load_rejuvenated(model: nn.Module, state_dict: dict[str, Any], example_inputs: Any = None, *,
                     example_kwargs: dict[str, Any] | None = None, strict: bool = True) -> Any:
    """Load a state dict saved from an in-place-rejuvenated model into a fresh instance of the original class.

    The rounds of plans the state dict carries (``nrfx_plans``, under the prefix of the module that
    was rejuvenated: a LightningModule's ``net.nrfx_plans``) are replayed in place first, so the
    tensors fit; a state dict from before any rejuvenation loads as usual.  ``example_inputs`` (and
    ``example_kwargs``) are needed for plans made on a model captured by torch.export.  Returns what
    ``load_state_dict`` returns; afterwards the model saves and loads its plans by itself.
    """
    check_model(model)
    example = as_example(example_inputs, example_kwargs) if example_inputs is not None else None
    paths = {key[: -len(PLANS_KEY)].rstrip(".") for key in state_dict if key.split(".")[-1] == PLANS_KEY}
    for path in sorted(paths | {""}):
        _prepare_replay(model, path, example)
    return model.load_state_dict(state_dict, strict=strict)


def _prepare_replay(model: nn.Module, path: str, example: Example | None) -> None:
    """Let the submodule at ``path`` replay saved rounds on load, knowing its inputs' shapes when given."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return  # load_state_dict reports the key as unexpected
    if example is not None:
        inputs = example if not path else record_calls(model, example).get(id(module), [None])[0]
        if inputs is not None:
            module.__dict__["_nrfx_example"] = skeleton(inputs)
    replays_plans(module)


def _island_split(analysis: IslandAnalysis, kind: str) -> tuple[int, dict[str, int]]:
    """(fixed cost, {island: its cost} of the islands with a free space): the fixed part is what lies outside the
    islands and in islands with no free space (every space frozen), whose cost cannot change."""
    cost = {path: by_kind(kind, island.params, island.macs) for path, island in analysis.islands.items()}
    free = {path: c for path, c in cost.items() if not all(s.is_frozen for s in analysis.islands[path].spaces)}
    return by_kind(kind, analysis.params, analysis.macs) - sum(free.values()), free


def _island_fractions(analysis: IslandAnalysis, budget: Any,
                      minimum: Callable[[], int | None]) -> tuple[dict[str, float], str]:
    """The fraction of its own cost each island gets so the whole model meets the budget: one shared fraction
    for every island with a free space; an island with none (every space frozen) keeps its whole cost.
    ``minimum``: the whole model's smallest budget (``_islands_minimum``), computed only for the error."""
    kind, value = Budget.coerce(budget).resolve(analysis)
    fixed, free = _island_split(analysis, kind)
    inside, available = sum(free.values()), value - fixed
    if inside <= 0 or available <= 0:
        needed = minimum() if inside > 0 else None
        ask = f"at least {needed:,}" if needed is not None else f"more than {fixed:,}"
        raise BudgetError(f"a budget of {value:,} {kind} leaves nothing for the islands that can be rejuvenated "
                          f"({fixed:,} {kind} lie outside them or in islands whose channels are all frozen); ask for "
                          f"{ask} {kind} for the whole model", minimum=needed)
    return {path: available / inside if path in free else 1.0 for path in analysis.islands}, kind


def _islands_minimum(analysis: IslandAnalysis, model: nn.Module, masks: dict[str, torch.Tensor] | None, budget: Any,
                     options: dict[str, Any], inplace: bool = False) -> int | None:
    """Rule: the islands with a free channel share one fraction of their own cost, so the whole model's smallest
    budget is the fixed part plus the fraction the neediest island needs (its own smallest budget over its cost)
    of all of them.  None when an island's smallest budget is unknown."""
    kind, _ = Budget.coerce(budget).resolve(analysis)
    fixed, free = _island_split(analysis, kind)
    split, share = analysis.split_masks(masks), 0.0
    for path, own in free.items():
        island, module = analysis.islands[path], model.get_submodule(path)
        island = freeze_for_inplace(island, module) if inplace else island
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NrfxWarning)
                plan_rejuvenation(island, module, split.get(path), Budget(**{kind: 1}), **options)
        except BudgetError as error:
            if error.minimum is None:
                return None
            share = max(share, (error.minimum + 0.5) / own)  # + 0.5: an island's share is floored
    return fixed + math.ceil(share * sum(free.values()))


@contextlib.contextmanager
def _island_budget(analysis: ModelAnalysis, path: str, budget: Any,
                   minimum: Callable[[], int | None]) -> Iterator[None]:
    """Rule: an island's BudgetError speaks of the user's budget: the whole model's, with the smallest one that
    gives every island its own minimum (they share one fraction of their cost: ``_islands_minimum``)."""
    try:
        yield
    except BudgetError as error:
        if analysis.whole or error.minimum is None:
            raise
        kind, value = Budget.coerce(budget).resolve(analysis)
        fixed, free = _island_split(analysis, kind)
        if path not in free:  # an island with no free space is planned at its whole cost: never too small
            raise
        own, inside = free[path], sum(free.values())
        needed = minimum() or fixed + math.ceil((error.minimum + 0.5) / own * inside)
        raise BudgetError(f"a budget of {value:,} {kind} is too small for island '{path}': every island gets the "
                          f"same fraction of its own cost ({fixed:,} {kind} lie outside them or in islands with no "
                          f"free channel), and '{path}' needs "
                          f"{error.minimum:,} of its {own:,}; ask for at least {needed:,} {kind} for the whole model",
                          minimum=needed) from error


def apply_plan(model: nn.Module, plan: Plan | dict, example_inputs: Any = None, *,
               example_kwargs: dict[str, Any] | None = None, inplace: bool = False,
               optimizer: torch.optim.Optimizer | None = None, carry_state: bool = True,
               **capture_options: Any) -> nn.Module:
    """Rebuild the rejuvenated module a plan describes, from the original model (replay).

    ``inplace``, ``optimizer`` and ``carry_state`` as in ``rejuvenate``: the plan must then have been
    made in place too (its spaces pinned by the model's code are frozen), else a PlanError.
    """
    plan = Plan.from_dict(plan.to_dict() if isinstance(plan, Plan) else plan)  # checked whole, whatever its source
    if example_inputs is None and plan.capture != "fx":
        raise PlanError(f"this plan was made on a model captured by {plan.capture}: pass example_inputs= "
                        "(and example_kwargs=) as the model takes them to replay it")
    if example_inputs is None:
        example_inputs = _example_from_plan(plan, model).args
    capture_options.setdefault("capture", plan.capture)
    analysis = analyze(model, example_inputs, example_kwargs=example_kwargs, **capture_options)
    if optimizer is not None and not inplace:
        raise InputError("optimizer= follows a rewrite in place only: pass inplace=True")
    if inplace:
        analysis = freeze_for_inplace(analysis, model)
    check_plan_fits(plan, analysis)
    _warn_hooks_kept(model, analysis, inplace)
    if inplace:
        jobs = {"": (analysis, _with_folds(analysis, plan))}
        return _apply_in_place(model, jobs, optimizer, carry_state, as_example(example_inputs, example_kwargs))
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
    if hasattr(gm, "real_recompile"):  # a lazy GraphModule compiles at its first call by calling itself again:
        gm.real_recompile()  # the hooks of that call (an island keeps its module's) would fire twice
    verify(gm)
    _check_runs(gm, analysis.example.flat())
    attach(gm, nrfx_plan=dataclasses.replace(plan, notes=list(dict.fromkeys(notes))), nrfx_param_map=maps)
    gm.train(model.training)
    return gm


def _check_runs(gm: torch.fx.GraphModule, inputs) -> None:
    """The rewritten graph runs on the example inputs' shapes; a failure is nrfx's, not the inputs'."""
    try:
        propagate_shapes(gm, inputs, inputs_ran=True)
    except NrfxError as error:
        raise RewriteError(
            f"the rewritten model does not run on the example inputs that the original ran on: {error}\n"
            "  An op in the model spells a channel count nrfx does not rewrite. Make its module a leaf "
            "(leaf_modules=[...]) so its channels freeze, and please report the op."
        ) from error
