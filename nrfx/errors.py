"""The exceptions and warnings nrfx raises; each message says what to do next."""

from __future__ import annotations

import os

import torch
import torch.fx

__all__ = [
    "NrfxError",
    "TraceError",
    "ShapeError",
    "MaskError",
    "BudgetError",
    "PlanError",
    "RewriteError",
    "UnknownOpWarning",
    "NrfxWarning",
    "node_location",
]


class NrfxError(Exception):
    """Base class of every error nrfx raises on bad input or an unsupported model."""


class TraceError(NrfxError):
    """The model cannot be turned into an FX graph."""


class ShapeError(NrfxError):
    """The example inputs do not run through the traced graph."""


class MaskError(NrfxError):
    """A mask names an unknown module, has the wrong length or dtype, or γ is not finite."""


class BudgetError(NrfxError):
    """A budget cannot be met (for instance it is below the cost of the frozen part)."""


class PlanError(NrfxError):
    """A plan does not fit the model it is applied to."""


class RewriteError(NrfxError):
    """The rewritten module broke an invariant; this is a bug in nrfx, please report it."""


class NrfxWarning(UserWarning):
    """Something was done conservatively (a mask ignored, a channel kept)."""


class UnknownOpWarning(NrfxWarning):
    """An op without a rule was met: the channel spaces it touches are frozen."""


def node_location(node: torch.fx.Node) -> str:
    """``node 'name' (op target)`` plus the user's source line when FX recorded one."""
    target = getattr(node.target, "__name__", node.target)
    text = f"node '{node.name}' ({node.op} {target})"
    trace = node.stack_trace or node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
        files = [i for i, ln in enumerate(lines) if ln.startswith("File ")]
        mine = [i for i in files if not _internal_frame(lines[i])]
        if files:
            index = (mine or files)[-1]
            text += f" at {lines[index]}"
            if index + 1 < len(lines) and not lines[index + 1].startswith("File "):
                text += f": {lines[index + 1]}"
    return text


def _internal_frame(line: str) -> bool:
    """Whether a 'File "..."' stack line points into torch or nrfx itself (not the user's code)."""
    path = line.split('"')[1] if line.count('"') >= 2 else ""
    return any(path.startswith(root) for root in _INTERNAL_ROOTS)


_INTERNAL_ROOTS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)
