"""Neural rescaling: |γ'| = max(|γ|, γ0), compensated exactly in consumers where possible."""

from __future__ import annotations

__all__ = ["apply_rescale"]


def apply_rescale(gm, analysis, plan, maps) -> list[str]:
    """Rescale small norm scales and divide the consumers' weights; returns notes."""
    raise NotImplementedError("rescale")
