"""plan: which channels survive (S) and how many rejuvenated channels (R) every space gets.

A pure function of (analysis, masks, budget, options).  One expansion rate α is shared by
every free space (the paper's Sec. 3.2): ``w'' = max(1, ⌊α·w'⌋)``; α is found by bisection
so the cost is within the budget, then single channels are added greedily (largest
rounding loss first) until no channel fits: the result is within one channel's cost of the
budget.  A plan is plain data: JSON in, JSON out, replayable on the original model.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .cost import CostModel
from .errors import BudgetError, NrfxWarning, PlanError

__all__ = ["Budget", "Plan", "make_plan", "SCHEMES"]

SCHEMES = ("nr", "cr", "ca")


@dataclass(frozen=True)
class Budget:
    """A resource constraint C: parameters or MACs per example, absolute or a fraction of c(A)."""

    params: int | None = None
    flops: int | None = None
    fraction_of: tuple[float, str] | None = None

    @staticmethod
    def fraction(f: float, kind: str = "params") -> Budget:
        """A budget of ``f`` times the model's own cost c(A) in ``kind`` ('params' or 'flops')."""
        if kind not in ("params", "flops"):
            raise BudgetError(f"budget kind must be 'params' or 'flops', got {kind!r}")
        if not f > 0:
            raise BudgetError(f"budget fraction must be positive, got {f}")
        return Budget(fraction_of=(float(f), kind))

    @staticmethod
    def coerce(budget: Any) -> Budget:
        """A Budget from a Budget, a plain int (params) or None (c(A) in params)."""
        if budget is None:
            return Budget.fraction(1.0, "params")
        if isinstance(budget, Budget):
            if sum(x is not None for x in (budget.params, budget.flops, budget.fraction_of)) != 1:
                raise BudgetError("a Budget takes exactly one of params=, flops= or Budget.fraction(f, kind)")
            return budget
        if isinstance(budget, int) and not isinstance(budget, bool):
            return Budget(params=budget)
        raise BudgetError(f"budget must be an nrfx.Budget or an int (params), got {type(budget).__name__}")

    def resolve(self, analysis) -> tuple[str, int]:
        """(kind, absolute value) against an analysis."""
        if self.fraction_of is not None:
            f, kind = self.fraction_of
            return kind, int(f * (analysis.params if kind == "params" else analysis.flops))
        if self.params is not None:
            return "params", int(self.params)
        return "flops", int(self.flops)


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
        """A plan from ``to_dict`` output."""
        try:
            return Plan(**data)
        except TypeError as error:
            raise PlanError(f"not an nrfx plan: {error}") from error


def _space_scores(analysis, model) -> list[torch.Tensor]:
    """Strength of every channel of every space: max |γ| over the norms on it (0 without norms)."""
    scores = [torch.zeros(s.width) for s in analysis.spaces]
    for _, norm, segments in analysis.norm_spaces(model):
        gamma = norm.weight.detach().abs().float().cpu().reshape(-1)
        for s, entries in segments:
            strength = gamma[entries].reshape(analysis.spaces[s].width, -1).amax(1)
            scores[s] = torch.maximum(scores[s], strength)
    return scores


def _survivors(analysis, alive, scores) -> list[list[int]]:
    """Live channel indices per space; a space with none keeps its strongest channel (warned)."""
    keep = []
    for space, mask, score in zip(analysis.spaces, alive, scores, strict=True):
        idx = torch.nonzero(mask).flatten().tolist()
        if not idx and not space.is_frozen:
            idx = [int(torch.argmax(score))] if space.width else []
            warnings.warn(f"every channel of space {space.index} (width {space.width}) is dead; keeping the "
                          f"strongest one (channel {idx[0]})", NrfxWarning, stacklevel=3)
        keep.append(idx)
    return keep


def _expanded(live: list[int], frozen: list[bool], full: list[int], alpha: float) -> list[int]:
    """Widths ⌊α·w'⌋ (at least 1) for free spaces; frozen ones keep their width."""
    return [f if fr else max(1, math.floor(alpha * w + 1e-9)) for w, fr, f in zip(live, frozen, full, strict=True)]


def _solve(cost: CostModel, live, frozen, full, budget: int) -> tuple[float, list[int]]:
    """Largest shared α whose widths fit the budget, then greedy single channels up to it."""
    minimum = cost(_expanded(live, frozen, full, 0.0))
    if budget < minimum:
        raise BudgetError(f"budget {budget:,} is below {minimum:,}, the {cost.kind} of the frozen part with one "
                          f"channel per free space; ask for at least {minimum:,}")
    lo, hi = 0.0, 1.0
    while cost(_expanded(live, frozen, full, hi)) <= budget and hi < 1e6:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cost(_expanded(live, frozen, full, mid)) <= budget else (lo, mid)
    widths = _expanded(live, frozen, full, lo)
    return lo, _fill(cost, widths, live, frozen, lo, budget)


def _fill(cost: CostModel, widths, live, frozen, alpha: float, budget: int) -> list[int]:
    """Add single channels, largest rounding loss first, until none fits the budget."""
    order = sorted((i for i, fr in enumerate(frozen) if not fr), key=lambda i: widths[i] - alpha * live[i])
    added = True
    while added:
        added = False
        for i in order:
            widths[i] += 1
            if cost(widths) <= budget:
                added = True
            else:
                widths[i] -= 1
    return widths


def make_plan(analysis, model, masks, budget, *, scheme: str = "nr", rescale: bool = False,
              gamma0: float | str | None = None, realloc: bool = True, seed: int | None = None) -> Plan:
    """The rejuvenation plan for an analysed model under masks and a budget."""
    gamma0 = check_gamma0(gamma0)
    if scheme not in SCHEMES:
        raise PlanError(f"unknown scheme {scheme!r}; use one of {SCHEMES} (nr: cross connections kept, "
                        "cr: removed, ca: cross attention)")
    kind, value = Budget.coerce(budget).resolve(analysis)
    cost = analysis.cost_model(kind)
    alive = analysis.alive(masks)
    scores = _space_scores(analysis, model)
    keep = _survivors(analysis, alive, scores)
    full = [s.width for s in analysis.spaces]
    frozen = [s.is_frozen for s in analysis.spaces]
    live = [len(k) for k in keep]
    if realloc:
        alpha, widths = _solve(cost, live, frozen, full, value)
    else:
        alpha, widths = 1.0, list(full)
    keep = [_strongest(k, w, s) for k, w, s in zip(keep, widths, scores, strict=True)]
    grow = [w - len(k) for k, w in zip(keep, widths, strict=True)]
    return Plan(
        scheme=scheme, rescale=bool(rescale), realloc=bool(realloc), seed=int(seed if seed is not None else 0),
        gamma0=gamma0, budget_kind=kind, budget=value, alpha=alpha, widths=full, keep=keep, grow=grow,
        cost_before=cost(full), cost_live=cost(live), cost_after=cost(widths),
        input_shapes=[list(s) for s in analysis.input_shapes],
    )


def check_gamma0(gamma0: Any) -> float | str | None:
    """γ0 of rejuvenated norm channels: None (the layer's initial 1), a positive number, or "match"."""
    if gamma0 is None or gamma0 == "match":
        return gamma0
    if isinstance(gamma0, (int, float)) and not isinstance(gamma0, bool) and gamma0 > 0:
        return float(gamma0)
    raise PlanError(f"gamma0 must be None (the layer's initial value), a positive number or 'match' (per norm, "
                    f"the median |γ| of its surviving channels), got {gamma0!r}")


def _strongest(keep: list[int], width: int, score: torch.Tensor) -> list[int]:
    """When compressing below the live width, keep the strongest survivors (in channel order)."""
    if len(keep) <= width:
        return keep
    ranked = sorted(keep, key=lambda c: -float(score[c]))[:width]
    return sorted(ranked)
