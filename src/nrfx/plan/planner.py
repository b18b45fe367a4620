"""plan: which channels survive (S) and how many rejuvenated channels (R) every space gets.

A pure function of (analysis, masks, budget, options).  One expansion rate α is shared by
every free space (the paper's Sec. 3.2): ``w'' = max(1, ⌊α·w'⌋)``; α is found by bisection
so the cost is within the budget, then single channels are added greedily (largest
rounding loss first) until no channel fits: the result is within one channel's cost of the
budget.  With ``align`` (default 8) a space whose width is a multiple of it moves in steps of
``align`` channels: its survivors are rounded up (the most alive dead channels are kept, so
the function stays exact), α's widths round down to a step, the greedy step is ``align``
channels, and the budget holds within one step per space.  ``align=1`` is the paper's
exact allocation.  Spaces in whole blocks (grouped convs, GroupNorm) are planned per *unit*: the
spaces a grouped conv ties share a number of blocks n (``w = n·block``), α scales n, the
same blocks survive in each, and the greedy step adds one block to every space of a unit,
so the budget is met within the cost of one unit.  A plan is plain data: JSON in, JSON out,
replayable on the original model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from nrfx.analysis.cost import CostModel, by_kind, cost_kind
from nrfx.errors import BudgetError, NrfxWarning, PlanError, RenamedAttribute, renamed
from nrfx.plan.check import (
    PLAN_VERSION,
    check_align,
    check_constants,
    check_gamma0,
    check_plan_data,
    check_residual,
    check_seed,
)
from nrfx.plan.fold import probe_constants, split_folds, unfoldable_channels

__all__ = ["Budget", "Plan", "Unit", "make_plan", "planning_units", "align_steps", "check_align", "check_gamma0",
           "check_seed", "check_constants", "check_residual", "SCHEMES"]

SCHEMES = ("nr", "cr", "ca")


@dataclass(frozen=True, init=False)
class Budget:
    """A resource constraint C: parameters or MACs per example, absolute or a fraction of c(A).

    ``Budget(flops=N)`` is the deprecated spelling of ``Budget(macs=N)`` (the count is MACs).
    """

    params: int | None = None
    macs: int | None = None
    fraction_of: tuple[float, str] | None = None

    def __init__(self, params: int | None = None, macs: int | None = None,
                 fraction_of: tuple[float, str] | None = None, *, flops: int | None = None) -> None:
        if flops is not None:
            renamed("Budget(flops=...)", "Budget(macs=...)")
            if macs is not None:
                raise BudgetError("Budget(macs=..., flops=...): flops is the old name of macs, give one")
            macs = flops
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "macs", macs)
        object.__setattr__(self, "fraction_of", fraction_of)

    flops = RenamedAttribute("macs")

    @staticmethod
    def fraction(f: float, kind: str = "params") -> Budget:
        """A budget of ``f`` times the model's own cost c(A) in ``kind`` ('params' or 'macs')."""
        kind = cost_kind(kind)
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not f > 0:
            raise BudgetError(f"budget fraction must be a finite number > 0 (1.0 = the model's own cost c(A)), "
                              f"got {f!r}")
        if f > _MAX_FRACTION:
            raise BudgetError(f"budget fraction {f} is absurd: the largest meaningful one is {_MAX_FRACTION:.0e}")
        return Budget(fraction_of=(float(f), kind))

    @staticmethod
    def of(kind: str, value: int) -> Budget:
        """An absolute budget of ``value`` in ``kind`` ('params' or 'macs')."""
        return by_kind(kind, Budget(params=value), Budget(macs=value))

    @staticmethod
    def coerce(budget: Any) -> Budget:
        """A Budget from a Budget, a plain int (params) or None (c(A) in params); its numbers checked."""
        if budget is None:
            return Budget.fraction(1.0, "params")
        if isinstance(budget, Budget):
            if sum(x is not None for x in (budget.params, budget.macs, budget.fraction_of)) != 1:
                raise BudgetError("a Budget takes exactly one of params=, macs= or Budget.fraction(f, kind)")
            for name in ("params", "macs"):
                _check_count(name, getattr(budget, name))
            if budget.fraction_of is not None:
                Budget.fraction(*budget.fraction_of)
            return budget
        if isinstance(budget, int) and not isinstance(budget, bool):
            _check_count("params", budget)
            return Budget(params=budget)
        raise BudgetError(f"budget must be an nrfx.Budget or an int (params), got {type(budget).__name__}")

    @property
    def kind(self) -> str:
        """'params' or 'macs': what the budget counts."""
        if self.fraction_of is not None:
            return cost_kind(self.fraction_of[1])
        return "params" if self.params is not None else "macs"

    def resolve(self, analysis) -> tuple[str, int]:
        """(kind, absolute value) against an analysis."""
        kind = self.kind
        if self.fraction_of is not None:
            return kind, int(self.fraction_of[0] * by_kind(kind, analysis.params, analysis.macs))
        return kind, int(by_kind(kind, self.params, self.macs))


_MAX_FRACTION = 1e6


def _check_count(name: str, value: Any) -> None:
    """An absolute budget: None or a finite whole number > 0 (an int, or a float with no fraction)."""
    if value is None:
        return
    whole = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value) and value == int(value))
    if isinstance(value, bool) or not whole or not value > 0:
        raise BudgetError(f"Budget({name}=...) must be a whole number > 0, got {value!r}")


@dataclass(frozen=True)
class Plan:
    """Surviving channels and new widths per space; JSON-serialisable and replayable."""

    scheme: str
    rescale: bool
    realloc: bool
    seed: int
    gamma0: float | str | None
    budget_kind: str
    budget: int
    alpha: float
    widths: list[int]
    keep: list[list[int]]
    grow: list[int]
    cost_before: int
    cost_live: int
    cost_after: int
    input_shapes: list[list[int]]
    notes: list[str] = field(default_factory=list)
    folds: dict[str, dict[str, float]] | None = None
    capture: str = "fx"
    align: int = 1
    constants: str = "drop"
    residual: str = "rejuvenate"
    version: int = PLAN_VERSION

    def __repr__(self) -> str:
        """One line: scheme, budget and costs, α, channels removed and new (``to_dict()`` has everything)."""
        kept, grown = sum(len(k) for k in self.keep), sum(self.grow)
        return (f"<nrfx.Plan {self.scheme}{' +rescale' if self.rescale else ''}, align {self.align}: budget "
                f"{self.budget_kind} {self.budget:,}; cost {self.cost_before:,} -> live {self.cost_live:,} -> "
                f"{self.cost_after:,}; alpha {self.alpha:.4f}; {len(self.widths)} spaces, "
                f"{sum(self.widths) - kept:,} channels removed, {grown:,} new; {len(self.notes)} notes>")

    @property
    def new_widths(self) -> list[int]:
        """Width of every space after the rewrite: |S| + |R|."""
        return [len(k) + g for k, g in zip(self.keep, self.grow, strict=True)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-safe)."""
        return asdict(self)

    def to_json(self) -> str:
        """The plan as JSON text."""
        return json.dumps(self.to_dict())

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Plan:
        """A plan from ``to_dict`` output, every field checked first (a ``PlanError`` names the bad one)."""
        data = check_plan_data(data)
        return Plan(**{k: copy.deepcopy(v) for k, v in data.items()})

    @staticmethod
    def from_json(text: str) -> Plan:
        """A plan from ``to_json`` output (JSON text), checked as ``from_dict``."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as error:
            raise PlanError(f"a plan is JSON text (Plan.to_json()): {error}") from error
        return Plan.from_dict(data)


def _space_scores(analysis, model) -> list[torch.Tensor]:
    """Strength of every channel of every space: max |γ| over the norms on it (0 without norms)."""
    scores = [torch.zeros(s.width) for s in analysis.spaces]
    for _, norm, segments in analysis.norm_spaces(model):
        gamma = norm.weight.detach().abs().float().cpu().reshape(-1)
        for s, entries in segments:
            strength = gamma[entries].reshape(analysis.spaces[s].width, -1).amax(1)
            scores[s] = torch.maximum(scores[s], strength)
    return scores


@dataclass(frozen=True)
class Unit:
    """A planning unit: spaces that keep and add channels together, ``blocks[i]`` at a time in ``spaces[i]``.

    An untied space is a unit of one with blocks of one channel; the spaces a grouped conv ties
    group by group (or a GroupNorm's space) form one unit: the same number of blocks, the same
    blocks surviving.  Widths are ``n · block``, n the unit's number of blocks.
    """

    spaces: tuple[int, ...]
    blocks: tuple[int, ...]
    frozen: bool
    heads: tuple[bool, ...] = ()  # per space: it counts attention heads (no alignment of its own)

    def widths(self, n: int) -> list[tuple[int, int]]:
        """(space, width) of every space of the unit at ``n`` blocks."""
        return [(s, n * b) for s, b in zip(self.spaces, self.blocks, strict=True)]


def planning_units(analysis, fixed: frozenset[int] = frozenset()) -> list[Unit]:
    """The planning units of an analysis, in the order of their first space; a unit with a frozen space, or one
    in ``fixed`` (``kept_whole``: contracted spaces, kept residual streams), is frozen."""
    grouped: dict[int, list] = {}
    for space in analysis.spaces:
        grouped.setdefault(space.unit, []).append(space)
    return [Unit(tuple(s.index for s in members), tuple(s.block for s in members),
                 any(s.is_frozen or s.index in fixed for s in members), tuple(s.heads for s in members))
            for members in grouped.values()]


def kept_whole(analysis, residual: str) -> frozenset[int]:
    """The spaces a plan leaves whole, with the spaces planned in one unit with them: those a product of two
    activations sums over (a new channel would add q_R·k_R to it), and under ``residual="keep"`` every residual
    stream (an add joins two activations in it)."""
    units = {s.unit for s in analysis.spaces if s.contracted or (s.summed and residual == "keep")}
    return frozenset(s.index for s in analysis.spaces if s.unit in units)


def _block_scores(unit: Unit, scores) -> torch.Tensor:
    """Strength of every block of a unit: the max channel score over its spaces."""
    per_space = [scores[s].reshape(-1, b).amax(1) for s, b in zip(unit.spaces, unit.blocks, strict=True)]
    return torch.stack(per_space).amax(0)


def _survivors(analysis, units: list[Unit], alive, scores) -> list[list[int]]:
    """Live blocks per unit; a free unit with none keeps its strongest block (warned)."""
    blocks = []
    for unit in units:
        first, block = unit.spaces[0], unit.blocks[0]
        live = torch.nonzero(alive[first].reshape(-1, block).any(1)).flatten().tolist()
        if not live and not unit.frozen and analysis.spaces[first].width:
            live = [int(torch.argmax(_block_scores(unit, scores)))]
            what = f"channel {live[0]}" if block == 1 else f"block {live[0]} of {block} channels"
            warnings.warn(f"every channel of space {first} (width {analysis.spaces[first].width}) is dead; keeping "
                          f"the strongest one ({what})", NrfxWarning, stacklevel=3)
        blocks.append(live)
    return blocks


def _space_widths(units: list[Unit], counts: list[int], total: int) -> list[int]:
    """Width of every space when unit ``u`` has ``counts[u]`` blocks."""
    widths = [0] * total
    for unit, n in zip(units, counts, strict=True):
        for s, width in unit.widths(n):
            widths[s] = width
    return widths


def align_steps(units: list[Unit], full: list[int], align: int) -> list[int]:
    """Blocks a unit grows by so that every width stays a multiple of ``align`` (1: unaligned).

    A unit whose original widths are not all multiples of ``align`` keeps steps of one block.  A
    space counting attention heads is no layer's width: only q, k, v (blocks of the head dim) align,
    so heads of 64 channels move one at a time.
    """
    steps = []
    for unit, n in zip(units, full, strict=True):
        blocks = [b for b, heads in zip(unit.blocks, unit.heads or (False,) * len(unit.blocks), strict=True)
                  if not heads]
        step = math.lcm(*(align // math.gcd(b, align) for b in blocks)) if blocks else 1
        aligned = all((n * b) % align == 0 for b in blocks)
        steps.append(step if aligned and not unit.frozen and n >= step else 1)
    return steps


def _aligned_survivors(live: list[int], step: int, full: int, score: torch.Tensor) -> list[int]:
    """Live blocks rounded up to a multiple of ``step`` by keeping the most alive of the dead ones (in order)."""
    want, alive = min(full, -(-len(live) // step) * step), set(live)
    dead = sorted((b for b in range(full) if b not in alive), key=lambda b: (-float(score[b]), b))
    return sorted([*live, *dead[:want - len(live)]])


def _expanded(units: list[Unit], live: list[int], full: list[int], steps: list[int], alpha: float) -> list[int]:
    """Blocks ⌊α·n'⌋ rounded down to the unit's step (at least one step) per free unit; frozen units keep theirs."""
    return [f if u.frozen else max(step, step * math.floor(alpha * n / step + 1e-9))
            for u, n, f, step in zip(units, live, full, steps, strict=True)]


_MAX_ALPHA = 1e6


def _cost_at(cost: CostModel, units, live, full, steps, total: int, alpha: float) -> int:
    """The cost of the widths a shared expansion rate α gives (each free unit at ⌊α·n'⌋ blocks, in its steps)."""
    return cost(_space_widths(units, _expanded(units, live, full, steps, alpha), total))


def _unaligned_minimum(cost: CostModel, units, live, full, steps, total: int) -> str:
    """Where alignment raised the minimum (one step of ``align`` channels per aligned space), the hint that names
    the smaller minimum of ``align=1``; else nothing."""
    if all(step == 1 for step in steps):
        return ""
    smallest = _cost_at(cost, units, live, full, [1] * len(steps), total, 0.0)
    return f", or pass align=1 (one channel per space: at least {smallest:,})"


def _solve_within(cost: CostModel, units, live, full, steps, total: int, budget: tuple[int, int]):
    """``_solve`` for the budget less its reserve (cost the rewrite adds outside the widths: the biases folds add);
    a BudgetError then names the user's budget, the reserve, and a minimum that includes it."""
    value, reserve = budget
    try:
        return _solve(cost, units, live, full, steps, total, value - reserve)
    except BudgetError as error:
        if not reserve or error.minimum is None:
            raise
        minimum = error.minimum + reserve
        raise BudgetError(f"budget {value:,} {cost.kind} less the {reserve:,} the folds' new biases take (layers with "
                          f"no bias and no BatchNorm after them get one: nrfx.plan.fold) leaves {value - reserve:,}, "
                          f"below {error.minimum:,}, the {cost.kind} of the frozen part with one channel (one group, "
                          f"one alignment step) per free space; ask for at least {minimum:,}",
                          minimum=minimum) from None


def _solve(cost: CostModel, units, live, full, steps, total: int, budget: int) -> tuple[float, list[int]]:
    """Largest shared α whose widths fit the budget, then greedy single steps up to it (block counts per unit)."""
    at = lambda alpha: _cost_at(cost, units, live, full, steps, total, alpha)  # noqa: E731
    minimum = at(0.0)
    if budget < minimum:
        raise BudgetError(f"budget {budget:,} is below {minimum:,}, the {cost.kind} of the frozen part with one "
                          f"channel (one group, one alignment step) per free space; ask for at least {minimum:,}"
                          + _unaligned_minimum(cost, units, live, full, steps, total), minimum=minimum)
    if all(u.frozen for u in units):
        return 1.0, list(full)
    if at(_MAX_ALPHA) <= budget:
        raise BudgetError(f"budget {budget:,} {cost.kind} is beyond any meaningful width (every free space "
                          f"{_MAX_ALPHA:.0e} × its live channels costs {at(_MAX_ALPHA):,}); ask for less")
    lo, hi = 0.0, 1.0
    while at(hi) <= budget:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if at(mid) <= budget else (lo, mid)
    counts = _expanded(units, live, full, steps, lo)
    return lo, _fill(cost, units, counts, steps, live, lo, total, budget)


def _fill(cost: CostModel, units, counts, steps, live, alpha: float, total: int, budget: int) -> list[int]:
    """Add one step of blocks to a unit at a time, largest rounding loss first, until none fits the budget:
    first up to each unit's live blocks (a compression gives back live channels before it adds new ones), then on."""
    order = sorted((i for i, u in enumerate(units) if not u.frozen), key=lambda i: counts[i] - alpha * live[i])
    for cap in (live, None):
        added = True
        while added:
            added = False
            for i in order:
                if cap is not None and counts[i] + steps[i] > cap[i]:
                    continue
                counts[i] += steps[i]
                if cost(_space_widths(units, counts, total)) <= budget:
                    added = True
                else:
                    counts[i] -= steps[i]
    return counts


def make_plan(analysis, model, masks, budget, *, scheme: str = "nr", rescale: bool = False,
              gamma0: float | str | None = None, realloc: bool = True, seed: int | None = None,
              align: int = 8, constants: str = "drop", residual: str = "rejuvenate", reserve: int = 0) -> Plan:
    """The rejuvenation plan for an analysed model under masks and a budget.

    ``masks=None``: the masks are read from the norm scales of ``model`` now (not when it was analysed).
    ``align``: every resized space whose width is a multiple of it stays one, and so do its S and
    R parts (survivors rounded up with the most alive dead channels); ``align=1`` is the paper's
    exact allocation.  ``constants="keep"``: dead channels whose constant output no consumer can
    absorb exactly (``nrfx.plan.fold``) survive and count in the budget; the model runs once on the
    analysis' example inputs to find them and the plan carries its folds.  ``"drop"`` (the paper's
    behaviour, default): they are removed, and the plan is a pure function of its inputs.
    ``residual="keep"``: every channel of a residual stream (a space where an add joins two activations)
    is kept and its width stays, as the paper does for ResNets (only the neurons off the main stream are
    rejuvenated); ``"rejuvenate"`` (default) plans them like every other space.  ``reserve``: cost the rewrite adds
    outside the channel widths (the new biases of folds, ``nrfx.rewrite.folds``), set aside from the budget.
    """
    gamma0 = check_gamma0(gamma0)
    align = check_align(align)
    seed = check_seed(seed)
    constants = check_constants(constants)
    residual = check_residual(residual)
    if scheme not in SCHEMES:
        raise PlanError(f"unknown scheme {scheme!r}; use one of {SCHEMES} (nr: cross connections kept, "
                        "cr: removed, ca: cross attention)")
    kind, value = Budget.coerce(budget).resolve(analysis)
    masks = analysis.masks_from(model) if masks is None else masks
    options = {"scheme": scheme, "rescale": bool(rescale), "realloc": bool(realloc), "seed": seed, "gamma0": gamma0,
               "align": align, "constants": constants, "residual": residual}
    fixed = kept_whole(analysis, residual)
    build = lambda alive: _allocate(analysis, model, alive, kind, (value, reserve), options, fixed)  # noqa: E731
    alive = [a.clone() for a in analysis.alive(masks)]
    for s in fixed:
        alive[s].fill_(True)
    plan = build(alive)
    plan = plan if constants == "drop" else _keep_constants(analysis, plan, alive, build, masks)
    for note in plan.notes:  # the final plan's, once (a replanning round under constants="keep" makes its own)
        if note.startswith("compression: ") and _ALIGNED_AWAY in note:
            warnings.warn(note, NrfxWarning, stacklevel=3)
    return plan


def _allocate(analysis, model, alive: list[torch.Tensor], kind: str, budget: tuple[int, int], options: dict[str, Any],
              fixed: frozenset[int]) -> Plan:
    """The plan for given live channels per space (``fixed``: kept whole): survivors (aligned), α, the widths.
    ``budget``: (the budget, the part of it set aside for cost outside the widths)."""
    value, reserve = budget
    cost = analysis.cost_model(kind)
    units = planning_units(analysis, fixed)
    scores = _space_scores(analysis, model)
    full = [analysis.spaces[u.spaces[0]].width // u.blocks[0] for u in units]
    steps = align_steps(units, full, options["align"])
    survivors = _survivors(analysis, units, alive, scores)
    kept = [_aligned_survivors(blocks, step, n, _block_scores(unit, scores))
            for unit, blocks, step, n in zip(units, survivors, steps, full, strict=True)]
    live = [len(k) for k in kept]
    total = len(analysis.spaces)
    if options["realloc"]:
        alpha, counts = _solve_within(cost, units, live, full, steps, total, budget)
    else:
        alpha, counts = 1.0, list(full)
    keep: list[list[int]] = [[] for _ in range(total)]
    lost: list[int] = []  # live channels of each unit's first space that the budget removed
    for unit, blocks, n, live_blocks in zip(units, kept, counts, survivors, strict=True):
        blocks = _strongest(blocks, n, _block_scores(unit, scores))
        lost.append(len(set(live_blocks) - set(blocks)) * unit.blocks[0])
        for s, b in zip(unit.spaces, unit.blocks, strict=True):
            keep[s] = [k * b + j for k in blocks for j in range(b)]
    widths = _space_widths(units, counts, total)
    grow = [w - len(k) for k, w in zip(keep, widths, strict=True)]
    cost_live = cost(_space_widths(units, [len(b) for b in survivors], total))
    notes = _lost_live(lost, value - reserve, cost_live, cost(_space_widths(units, live, total)), options["align"])
    return Plan(
        **options, budget_kind=kind, budget=value, alpha=alpha, widths=[s.width for s in analysis.spaces],
        keep=keep, grow=grow, cost_before=cost([s.width for s in analysis.spaces]), cost_live=cost_live,
        cost_after=cost(widths), input_shapes=[list(s) for s in analysis.input_shapes],
        capture=getattr(analysis, "capture", "fx"), notes=notes,
    )


def _lost_live(lost: list[int], budget: int, cost_live: int, aligned_live: int, align: int) -> list[str]:
    """Rule: a plan that removes live channels says so; where the budget covers U(θ) and only the alignment of
    the survivors made it too small (the function then changes unexpectedly), it names the fix (and ``make_plan``
    warns with it, once)."""
    if not any(lost):
        return []
    note = (f"compression: {sum(lost):,} live channels in {sum(1 for n in lost if n)} spaces removed (the budget "
            f"{budget:,} is below the live cost {aligned_live:,}); the function changes")
    if budget >= cost_live:
        note += (f". The budget covers U(θ) = {cost_live:,}, but align={align} {_ALIGNED_AWAY} {aligned_live:,}: "
                 f"ask for at least {aligned_live:,}, or pass align=1, to keep every live channel")
    return [note]


_ALIGNED_AWAY = "rounds the survivors up to"  # in a note make_plan also warns with, once


def _keep_constants(analysis, plan: Plan, alive: list[torch.Tensor], build, masks: dict[str, torch.Tensor]) -> Plan:
    """constants="keep": removed channels whose constant no consumer folds exactly turn alive; replanned till none."""
    constants = probe_constants(analysis, plan, masks)
    if constants is None:  # no norm or layer can emit a constant: nothing to keep, nothing to fold
        return dataclasses.replace(plan, folds={})
    kept: set[tuple[int, int]] = set()
    while True:
        found = {(s, c) for s, cs in unfoldable_channels(analysis.gm, analysis, plan, constants).items() for c in cs}
        if not found - kept:
            break
        kept |= found
        _force_alive(analysis, alive, found)
        plan = build(alive)
    notes = [f"constants=keep: {len(kept)} dead channels whose output cannot be folded exactly are kept"]
    if found:
        notes.append(f"constants=keep: the budget is below the live cost; {len(found)} of them are still removed")
    folds, _ = split_folds(analysis.gm, analysis, plan, constants)
    return dataclasses.replace(plan, folds=folds, notes=[*plan.notes, *(notes if kept else [])])


def _force_alive(analysis, alive: list[torch.Tensor], channels: set[tuple[int, int]]) -> None:
    """Mark (space, channel) pairs alive, with their whole block in every space of the planning unit."""
    for s, c in channels:
        space = analysis.spaces[s]
        block = c // space.block
        for other in analysis.spaces:
            if other.unit == space.unit:
                alive[other.index][block * other.block:(block + 1) * other.block] = True


def _strongest(keep: list[int], width: int, score: torch.Tensor) -> list[int]:
    """When compressing below the live count, keep the strongest survivors (blocks; in channel order)."""
    if len(keep) <= width:
        return keep
    ranked = sorted(keep, key=lambda c: -float(score[c]))[:width]
    return sorted(ranked)
