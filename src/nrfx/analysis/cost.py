"""One cost model per analysis: params and MACs per example as polynomials in the space widths.

A term is ``coef × Π (inner · Σ widths of the spaces a layout carries)``.  MAC terms of
nodes whose value depends on the example inputs scale with the batch and are divided by
it; work on weights alone (a weight standardisation, a computed kernel) is counted once.
``Analysis.params/macs/params_at/macs_at``, the planner and the report rows all evaluate
the same ``CostModel``, so c(A) and a plan's ``cost_before`` agree at any batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from nrfx.errors import BudgetError, renamed

__all__ = ["CostTerm", "CostModel", "param_cost", "mac_cost", "KINDS", "cost_kind", "by_kind", "Ratios"]

KINDS = ("params", "macs")  # the two costs: parameters, and MACs per example
T = TypeVar("T")

Factor = tuple[int, tuple[int, ...]]  # (inner, space ids) of one layout


@dataclass(frozen=True)
class CostTerm:
    """``coef × Π factors`` owned by ``owner`` (a node for MACs, a parameter for params)."""

    owner: str
    coef: int
    factors: tuple[Factor, ...]
    per_batch: bool = False

    def at(self, widths: Sequence[int]) -> int:
        """The term's value when space ``s`` has ``widths[s]`` channels."""
        value = self.coef
        for inner, ids in self.factors:
            value *= inner * sum(widths[s] for s in ids)
        return value


@dataclass(frozen=True)
class CostModel:
    """Cost = constant + Σ weight-only terms + (Σ per-batch terms) // batch."""

    kind: str
    terms: tuple[CostTerm, ...]
    batch: int = 1
    constant: int = 0
    by_owner: Mapping[str, tuple[CostTerm, ...]] = field(init=False, repr=False, compare=False)

    def __call__(self, widths: Sequence[int]) -> int:
        """Params, or MACs per example, at the given widths per space."""
        return self.constant + self.evaluate(self.terms, widths)

    def evaluate(self, terms: Iterable[CostTerm], widths: Sequence[int]) -> int:
        """The cost of a subset of the terms (rule: per-batch work is divided by the batch)."""
        batched = fixed = 0
        for term in terms:
            if term.per_batch:
                batched += term.at(widths)
            else:
                fixed += term.at(widths)
        return fixed + batched // self.batch

    def of(self, owner: str, widths: Sequence[int]) -> int:
        """The cost of one owner's terms (a node's MACs, a parameter's size)."""
        return self.evaluate(self.by_owner.get(owner, ()), widths)

    def __post_init__(self) -> None:
        """Terms grouped by owner, derived once when the model is built (it never changes after)."""
        collected: dict[str, list[CostTerm]] = {}
        for term in self.terms:
            collected.setdefault(term.owner, []).append(term)
        object.__setattr__(self, "by_owner", {k: tuple(v) for k, v in collected.items()})


def _factors(layouts, space_ids: Callable) -> tuple[Factor, ...]:
    """(inner, space ids) of every layout."""
    return tuple((lay.inner, tuple(space_ids(lay))) for lay in layouts)


def param_cost(param_info: dict, space_ids: Callable, constant: int) -> CostModel:
    """Parameters: one term per registered parameter (buffers excluded), unclaimed ones constant."""
    terms = []
    for info in param_info.values():
        if info.buffer:
            continue
        coef = math.prod(e for e, lay in zip(info.shape, info.dims, strict=True) if lay is None)
        layouts = [lay for lay in info.dims if lay is not None]
        terms.append(CostTerm(info.name, coef, _factors(layouts, space_ids)))
    return CostModel("params", tuple(terms), 1, constant)


def mac_cost(macs: Iterable, space_ids: Callable, batched_nodes: set[str], batch: int) -> CostModel:
    """MACs per example: one term per registered MAC term, divided by the batch when input-dependent."""
    terms = tuple(CostTerm(t.node, t.coef, _factors(t.layouts, space_ids), t.node in batched_nodes) for t in macs)
    return CostModel("macs", terms, max(int(batch), 1))


def cost_kind(kind: object) -> str:
    """'params' or 'macs'; 'flops', the old name of the same MACs, is read as 'macs' with a DeprecationWarning."""
    if kind == "flops":
        renamed("the cost kind 'flops'", "'macs'", stacklevel=4)
        return "macs"
    if kind not in KINDS:
        raise BudgetError(f"cost kind must be 'params' or 'macs' (MACs per example), got {kind!r}")
    return str(kind)


def by_kind(kind: object, params: T, macs: T) -> T:
    """The one place the choice is written: ``params`` for kind 'params', ``macs`` for 'macs'."""
    return params if cost_kind(kind) == "params" else macs


class Ratios:
    """r(θ) = U(θ)/c(A) in params and in MACs, for a record with ``params``, ``live_params``, ``macs`` and
    ``live_macs`` (1 where the model has none)."""

    @property
    def r_params(self) -> float:
        """Utilization ratio in parameters."""
        return self.live_params / self.params if self.params else 1.0

    @property
    def r_macs(self) -> float:
        """Utilization ratio in MACs."""
        return self.live_macs / self.macs if self.macs else 1.0
