"""Training schemes for mixed S/R neurons: cr (cross connections removed), ca (cross attention)."""

from __future__ import annotations

__all__ = ["apply_scheme"]


def apply_scheme(gm, analysis, plan, maps) -> list[str]:
    """Rewrite layers with S and R on both sides for the plan's scheme; returns notes."""
    raise NotImplementedError(plan.scheme)
