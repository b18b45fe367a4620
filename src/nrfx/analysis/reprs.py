"""Short reprs for notebooks and the REPL: one line of key numbers, never a tensor or a graph.

``Analysis``, ``IslandAnalysis`` and ``Utilization`` print the model, c(A), U(θ), r(θ) and the
channel spaces in a few hundred characters; ``Report`` has its own (``nrfx.report``) and
renders as an HTML table in Jupyter.
"""

from __future__ import annotations

from typing import Any

__all__ = ["format_count", "analysis_repr", "island_analysis_repr", "utilization_repr", "shapes_text"]


def format_count(n: int | float) -> str:
    """A count with an SI suffix: 4.089G, 25.56M, 9.41K, 512."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            digits = 3 if suffix == "G" else 2
            return f"{n / scale:.{digits}f}{suffix}"
    return str(int(n))


def shapes_text(shapes: tuple[tuple[int, ...], ...]) -> str:
    """Input shapes as ``1×3×224×224, 1×10``."""
    return ", ".join("×".join(str(d) for d in s) for s in shapes)


def utilization_repr(u: Any) -> str:
    """Rule: r(θ) and U(θ)/c(A) in params and MACs, and dead channels out of all (no mask tensors)."""
    text = (f"Utilization(r_params={u.r_params:.4f}, r_macs={u.r_macs:.4f}, "
            f"params {format_count(u.live_params)}/{format_count(u.params)}, "
            f"MACs {format_count(u.live_macs)}/{format_count(u.macs)}")
    if u.alive:
        total = sum(int(m.numel()) for m in u.alive)
        dead = total - sum(int(m.sum()) for m in u.alive)
        text += f", dead channels {dead:,}/{total:,} in {len(u.alive)} spaces"
    return text + ")"


def analysis_repr(a: Any) -> str:
    """Rule: model, inputs, capture, c(A), r(θ), spaces (frozen) and coverage on one line (never the graph)."""
    u, cover = a.utilization(), a.coverage()
    frozen = sum(1 for s in a.spaces if s.is_frozen)
    return (f"<nrfx.Analysis of {a.model_name} on {shapes_text(a.input_shapes)} ({a.capture}): "
            f"c(A) {format_count(a.params)} params, {format_count(a.macs)} MACs; "
            f"r(θ) params {u.r_params:.4f}, MACs {u.r_macs:.4f}; "
            f"{len(a.spaces)} channel spaces, {frozen} frozen; {cover.monitored:.0%} of "
            f"{cover.channels:,} channels monitored; {len(a.unknown_ops)} unknown ops>")


def island_analysis_repr(a: Any) -> str:
    """Rule: model, islands (their paths, cut short), c(A), r(θ) and coverage on one line."""
    paths = list(a.islands)
    shown = ", ".join(paths[:4]) + (f", … ({len(paths)} in all)" if len(paths) > 4 else "")
    u, cover = a.utilization(), a.coverage()
    return (f"<nrfx.IslandAnalysis of {a.model_name}: islands {shown}; "
            f"c(A) {format_count(a.params)} params, {format_count(a.macs)} MACs in the islands; "
            f"r(θ) params {u.r_params:.4f}, MACs {u.r_macs:.4f}; {cover.monitored:.0%} of "
            f"{cover.channels:,} channels monitored>")
