"""Plans read from outside are checked whole before anything is built: every field's type and range, then the fit.

A plan is plain data (JSON) and may have been edited, truncated or crafted.  ``check_plan_data``
checks a dict field by field (a ``PlanError`` names the first bad field and what it must be);
``check_plan_fits`` checks a plan against the analysed model it is replayed on: widths, whole
groups, frozen spaces untouched, folds on layers that exist, and a size no larger than the plan's
own budget allows (and never over ``MAX_GROWTH`` × the model's parameters).  Nothing in a plan is
ever executed or imported.  The option checks (``check_seed``, ``check_align``, ``check_gamma0``,
``check_constants``, ``check_residual``) live here too: ``make_plan`` and the driver use the same ones.  A plan
written before a field existed reads as it was built: ``align`` 1, ``constants`` "drop", ``residual`` "rejuvenate".
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from nrfx.errors import PlanError
from nrfx.plan.fold import consumer_records
from nrfx.plan.maps import dim_map

__all__ = ["PLAN_VERSION", "MAX_GROWTH", "CONSTANTS", "RESIDUAL", "check_plan_data", "check_plan_fits", "check_seed",
           "check_align", "check_gamma0", "check_constants", "check_residual"]

PLAN_VERSION = 1
MAX_GROWTH = 64  # a replayed plan never builds a model of more than this many times the original's parameters
_SCHEMES = ("nr", "cr", "ca")
_CAPTURES = ("fx", "export")
CONSTANTS = ("drop", "keep")  # dead channels whose constant cannot be folded exactly: removed (the paper) or kept
RESIDUAL = ("rejuvenate", "keep")  # residual streams: planned like every space, or kept whole (the paper's ResNets)


def _fail(field: str, must: str, value: Any) -> PlanError:
    """The error for one bad field: its name, what it must be, what it was (cut short)."""
    shown = repr(value)
    return PlanError(f"plan field '{field}' must be {must}, got {shown[:80] + '…' if len(shown) > 80 else shown}")


def _is_int(value: Any, low: int = 0, high: int | None = None) -> bool:
    """An int (not a bool) in [low, high)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value < high)


def _check_scalars(data: dict[str, Any]) -> None:
    """scheme, flags, seed, γ0, budget and costs, α, capture, align, constants, residual, version."""
    if data["scheme"] not in _SCHEMES:
        raise _fail("scheme", f"one of {_SCHEMES}", data["scheme"])
    for key in ("rescale", "realloc"):
        if not isinstance(data[key], bool):
            raise _fail(key, "true or false", data[key])
    if data["seed"] is None:
        raise _fail("seed", "an int in [0, 2**63)", None)
    check_seed(data["seed"])
    check_gamma0(data["gamma0"])
    if data["budget_kind"] not in ("params", "macs", "flops"):  # 'flops': plans written before the rename
        raise _fail("budget_kind", "'params' or 'macs'", data["budget_kind"])
    for key in ("budget", "cost_before", "cost_live", "cost_after"):
        if not _is_int(data[key]):
            raise _fail(key, "an int >= 0", data[key])
    alpha = data["alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
        raise _fail("alpha", "a finite number >= 0", alpha)
    if data.get("capture", "fx") not in _CAPTURES:
        raise _fail("capture", f"one of {_CAPTURES}", data.get("capture"))
    check_align(data.get("align", 1))
    if data.get("constants", "drop") not in CONSTANTS:  # plans written before the field: "drop", as they were built
        raise _fail("constants", f"one of {CONSTANTS}", data.get("constants"))
    if data.get("residual", "rejuvenate") not in RESIDUAL:  # plans written before the field: "rejuvenate"
        raise _fail("residual", f"one of {RESIDUAL}", data.get("residual"))
    if data.get("version", PLAN_VERSION) != PLAN_VERSION:
        raise _fail("version", f"{PLAN_VERSION} (this nrfx reads plans of version {PLAN_VERSION})", data.get("version"))


def _check_lists(data: dict[str, Any]) -> None:
    """widths, keep (sorted, unique, in range), grow, input shapes, notes, folds."""
    widths = data["widths"]
    if not isinstance(widths, list) or not all(_is_int(w) for w in widths):
        raise _fail("widths", "a list of ints >= 0", widths)
    for key in ("keep", "grow"):
        if not isinstance(data[key], list) or len(data[key]) != len(widths):
            raise _fail(key, f"a list of {len(widths)} entries (one per channel space)", data[key])
    for s, (kept, width) in enumerate(zip(data["keep"], widths, strict=True)):
        if not isinstance(kept, list) or not all(_is_int(k, 0, width) for k in kept):
            raise _fail(f"keep[{s}]", f"a list of channel indices in [0, {width})", kept)
        if any(a >= b for a, b in itertools.pairwise(kept)):
            raise _fail(f"keep[{s}]", "strictly increasing (no duplicate channel)", kept)
    if not all(_is_int(g) for g in data["grow"]):
        raise _fail("grow", "a list of ints >= 0", data["grow"])
    shapes = data["input_shapes"]
    if not isinstance(shapes, list) or not all(isinstance(s, list) and all(_is_int(d, 1) for d in s) for s in shapes):
        raise _fail("input_shapes", "a list of shapes (lists of ints >= 1)", shapes)
    if not isinstance(data.get("notes", []), list) or not all(isinstance(n, str) for n in data.get("notes", [])):
        raise _fail("notes", "a list of strings", data.get("notes"))
    _check_folds(data.get("folds"))


def _check_folds(folds: Any) -> None:
    """null, or {layer name: {input position: finite constant}}."""
    if folds is None:
        return
    if not isinstance(folds, dict):
        raise _fail("folds", "null or {layer: {position: constant}}", folds)
    for layer, constants in folds.items():
        if not isinstance(layer, str) or not isinstance(constants, dict):
            raise _fail("folds", "null or {layer: {position: constant}}", {layer: constants})
        for position, value in constants.items():
            if not (isinstance(position, str) and position.isdigit()) or isinstance(value, bool) or \
                    not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _fail(f"folds[{layer!r}]", "{position (digits): finite number}", {position: value})


def check_seed(seed: Any) -> int:
    """The R initialisation's seed: None (0) or an int in [0, 2**63)."""
    if seed is None:
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise PlanError(f"seed must be None or an int from 0 to 2**63 - 1, got {seed!r}")
    return seed


def check_align(align: Any) -> int:
    """``align``: a positive int (1 = unaligned, the paper's exact allocation)."""
    if isinstance(align, bool) or not isinstance(align, int) or not 1 <= align <= 1024:
        raise PlanError(f"align must be an int from 1 (no rounding, the paper's allocation) to 1024, got {align!r}")
    return align


def check_gamma0(gamma0: Any) -> float | str | None:
    """γ0 of rejuvenated norm channels: None (the layer's initial 1), a positive number, or "match"."""
    if gamma0 is None or gamma0 == "match":
        return gamma0
    if isinstance(gamma0, (int, float)) and not isinstance(gamma0, bool) and math.isfinite(gamma0) and gamma0 > 0:
        return float(gamma0)
    raise PlanError(f"gamma0 must be None (the layer's initial value), a finite positive number or 'match' (per norm, "
                    f"the median |γ| of its surviving channels), got {gamma0!r}")


def check_constants(constants: Any) -> str:
    """``constants``: "drop" (unfoldable constants of dead channels dropped, warned: the paper) or "keep" (exact)."""
    return _one_of(constants, CONSTANTS, "constants must be 'drop' (dead channels whose constant output cannot be "
                   "folded exactly are removed anyway, the paper's behaviour) or 'keep' (such channels survive: exact)")


def check_residual(residual: Any) -> str:
    """``residual``: "rejuvenate" (residual streams planned like every space) or "keep" (the paper's ResNet setting)."""
    return _one_of(residual, RESIDUAL, "residual must be 'rejuvenate' (residual streams lose dead channels and grow "
                   "like every other space) or 'keep' (every channel of a residual stream is kept at its width, as "
                   "the paper does for ResNets)")


def _one_of(value: Any, choices: tuple[str, ...], what: str) -> str:
    """An option that is one of a few strings, else a PlanError that says what each means."""
    if isinstance(value, str) and value in choices:
        return value
    raise PlanError(f"{what}, got {value!r}")


REQUIRED = ("scheme", "rescale", "realloc", "seed", "gamma0", "budget_kind", "budget", "alpha", "widths", "keep",
            "grow", "cost_before", "cost_live", "cost_after", "input_shapes")
OPTIONAL = ("notes", "folds", "capture", "align", "constants", "residual", "version")


def check_plan_data(data: Any) -> dict[str, Any]:
    """A plan's dict checked field by field (unknown or missing fields, types, ranges); returns it."""
    if not isinstance(data, dict):
        raise PlanError(f"a plan is a dict (Plan.to_dict() / JSON object), got {type(data).__name__}")
    missing = [k for k in REQUIRED if k not in data]
    unknown = sorted(str(k) for k in data if k not in REQUIRED + OPTIONAL)
    if missing or unknown:
        problems = ([f"missing field(s) {missing}"] if missing else []) + \
            ([f"unknown field(s) {unknown}"] if unknown else [])
        raise PlanError("not an nrfx plan: " + "; ".join(problems))
    _check_scalars(data)
    _check_lists(data)
    return {**data, "budget_kind": "macs"} if data["budget_kind"] == "flops" else data


def check_plan_fits(plan: Any, analysis: Any) -> None:
    """The plan fits the analysed model: widths, whole groups, frozen spaces unchanged, folds, size within budget."""
    if [s.width for s in analysis.spaces] != plan.widths:
        raise PlanError("the plan does not fit this model: its channel spaces differ (was it made for another "
                        "architecture or another set of trace options?)")
    for space in analysis.spaces:
        s, new = space.index, len(plan.keep[space.index]) + plan.grow[space.index]
        fixed = space.is_frozen or (space.summed and plan.residual == "keep")
        if fixed and (plan.grow[s] or len(plan.keep[s]) != space.width):
            why = "frozen" if space.is_frozen else "a residual stream and the plan keeps them"
            raise _fail(f"keep[{s}]/grow[{s}]", f"every channel kept and none grown (space {s} is {why})",
                        (len(plan.keep[s]), plan.grow[s]))
        if space.contracted and plan.grow[s]:
            raise _fail(f"grow[{s}]", f"none grown (space {s} is summed over by a product of two activations, "
                        "q·kᵀ: a new channel would add to every product)", plan.grow[s])
        if len(plan.keep[s]) % space.block or new % space.block or (new == 0 and space.width):
            raise _fail(f"keep[{s}]/grow[{s}]", f"whole groups of {space.block} channels, at least one",
                        (len(plan.keep[s]), plan.grow[s]))
    _check_units(plan, analysis)
    _check_fold_layers(plan, analysis)
    _check_size(plan, analysis)


def _check_units(plan: Any, analysis: Any) -> None:
    """The spaces a grouped conv ties keep the same whole blocks and get the same number of them."""
    units: dict[int, list] = {}
    for space in analysis.spaces:
        units.setdefault(space.unit, []).append(space)
    for members in units.values():
        blocks, counts = set(), set()
        for space in members:
            kept = plan.keep[space.index]
            ids = [k // space.block for k in kept[::space.block]] if space.block > 1 else kept
            if space.block > 1 and kept != [b * space.block + j for b in ids for j in range(space.block)]:
                raise _fail(f"keep[{space.index}]", f"whole groups of {space.block} channels", kept)
            blocks.add(tuple(ids))
            counts.add((len(kept) + plan.grow[space.index]) // space.block)
        if len(blocks) > 1 or len(counts) > 1:
            raise _fail(f"keep/grow of spaces {[s.index for s in members]}",
                        "the same groups kept and the same number of groups in spaces a grouped conv ties",
                        sorted(counts))


def _check_fold_layers(plan: Any, analysis: Any) -> None:
    """Every folded constant names a conv/linear layer of the model (a module, or a function call reading a bias
    parameter: ``"node <fx node name>"``) and one of its input positions."""
    if not plan.folds:
        return
    layers = dict(consumer_records(analysis))
    for name, constants in plan.folds.items():
        record = layers.get(name)
        if record is None or (record.module is None and record.bias is None):
            raise _fail("folds", "keys naming conv/linear layers that read a channel space (a module's name, or "
                        "'node <name>' of a function call with a bias parameter)", name)
        source = dim_map(analysis, plan, record.input, 0).source
        removed = set(range(analysis.atoms.channels(record.input) * record.input.inner)) - set(source.tolist())
        bad = [p for p in constants if int(p) not in removed]
        if bad:
            raise _fail(f"folds[{name!r}]", "positions of input features the plan removes", bad[:5])


def _check_size(plan: Any, analysis: Any) -> None:
    """The new widths cost no more than the plan's budget (realloc) and never more than MAX_GROWTH × the params."""
    widths = plan.new_widths
    params = analysis.cost_model("params")(widths)
    if params > MAX_GROWTH * max(analysis.params, 1):
        raise PlanError(f"the plan's widths would build a model of {params:,} parameters, over {MAX_GROWTH}× this "
                        f"model's {analysis.params:,}: refused (an edited or corrupt plan?)")
    if plan.realloc:
        cost = analysis.cost_model(plan.budget_kind)(widths)
        if cost > plan.budget:
            raise PlanError(f"the plan's widths cost {cost:,} {plan.budget_kind}, over its own budget of "
                            f"{plan.budget:,}: refused (an edited or corrupt plan?)")
    elif widths != plan.widths:
        raise _fail("grow", "the removed channels' count in each space when realloc is false (widths unchanged)",
                    plan.grow)
