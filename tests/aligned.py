"""Test helper: the alignment a plan promises (widths and their S and R parts multiples of ``align``)."""

from __future__ import annotations

from nrfx.plan import align_steps, planning_units


def assert_aligned(analysis, plan) -> int:
    """Every space of an alignable unit has |S| and |S| + |R| multiples of ``plan.align``; returns how many."""
    units = planning_units(analysis)
    full = [analysis.spaces[u.spaces[0]].width // u.blocks[0] for u in units]
    checked = 0
    for unit, step in zip(units, align_steps(units, full, plan.align), strict=True):
        if step == 1 and plan.align > 1:
            assert unit.frozen or any(analysis.spaces[s].width % plan.align for s in unit.spaces) or \
                full[units.index(unit)] < plan.align, unit
            continue
        for s in unit.spaces:
            width = len(plan.keep[s]) + plan.grow[s]
            assert len(plan.keep[s]) % plan.align == 0 and width % plan.align == 0, (s, len(plan.keep[s]), width)
            checked += 1
    return checked
