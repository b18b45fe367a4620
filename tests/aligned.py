"""Test helper: the alignment a plan promises (widths and their S and R parts multiples of ``align``)."""

from __future__ import annotations

from nrfx.plan import align_steps, planning_units


def assert_aligned(analysis, plan) -> int:
    """Every space of a free unit whose widths are multiples of ``plan.align`` keeps |S| and |S| + |R| so.

    (A unit narrower than one alignment step keeps its unaligned behaviour.)  Returns how many spaces were checked.
    """
    units = planning_units(analysis)
    full = [analysis.spaces[u.spaces[0]].width // u.blocks[0] for u in units]
    checked = 0
    for unit, step, n in zip(units, align_steps(units, full, plan.align), full, strict=True):
        widths = [analysis.spaces[s].width for s in unit.spaces]
        if unit.frozen or any(w % plan.align for w in widths) or n < step:
            continue
        for s in unit.spaces:
            width = len(plan.keep[s]) + plan.grow[s]
            assert len(plan.keep[s]) % plan.align == 0 and width % plan.align == 0, (s, len(plan.keep[s]), width)
            checked += 1
    return checked
