"""The exceptions and warnings nrfx raises; each message says what to do next."""

from __future__ import annotations

import linecache
import os
import sys
import traceback
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.fx

__all__ = [
    "NrfxError",
    "TraceError",
    "ShapeError",
    "RuleError",
    "MaskError",
    "BudgetError",
    "PlanError",
    "OptimizerStateError",
    "RewriteError",
    "UnknownOpWarning",
    "NrfxWarning",
    "node_location",
    "InputError",
    "user_frame",
    "live_frames",
    "error_frames",
    "format_frame",
    "frame_line",
    "renamed",
    "RenamedAttribute",
]


class NrfxError(Exception):
    """Base class of every error nrfx raises on bad input or an unsupported model."""


class InputError(NrfxError):
    """What was passed in is not something nrfx can work on (not a Module, a scripted one, empty or odd inputs)."""


class TraceError(NrfxError):
    """The model cannot be turned into an FX graph."""


class ShapeError(NrfxError):
    """The example inputs do not run through the traced graph."""


class RuleError(NrfxError):
    """A channel rule raised on a node (a registered rule that does not fit its layer, or a bug in nrfx)."""


class MaskError(NrfxError):
    """A mask names an unknown module, has the wrong length or dtype, or γ is not finite."""


class BudgetError(NrfxError):
    """A budget cannot be met (for instance it is below the cost of the frozen part).

    ``minimum``: where the budget is too small, the smallest budget the planner can meet (else None)."""

    def __init__(self, message: str, minimum: int | None = None) -> None:
        super().__init__(message)
        self.minimum = minimum


class PlanError(NrfxError):
    """A plan does not fit the model it is applied to."""


class RewriteError(NrfxError):
    """The rewritten module broke an invariant; this is a bug in nrfx, please report it."""


class OptimizerStateError(NrfxError):
    """An optimizer's state cannot follow a rewrite of its parameters (it is not shaped like them)."""


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
    return is_internal(line.split('"')[1] if line.count('"') >= 2 else "")


_INTERNAL_ROOTS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)

Frame = tuple[str, int, str]  # file name, line number, function name


def is_internal(path: str) -> bool:
    """Whether a source file is torch's, nrfx's or generated code (``<...>``): not the user's."""
    return path.startswith(_INTERNAL_ROOTS) or path.startswith("<") or not path


def user_frame(frames: Iterable[Frame]) -> Frame | None:
    """Rule: the first frame, innermost first, whose file is the user's code."""
    return next((f for f in frames if not is_internal(f[0])), None)


def live_frames() -> Iterator[Frame]:
    """The frames of the running stack, innermost first (nrfx's and torch's own included)."""
    frame = sys._getframe(1)
    while frame is not None:
        yield frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name
        frame = frame.f_back


def error_frames(error: BaseException) -> Iterator[Frame]:
    """The frames of an exception's traceback, innermost first."""
    for summary in reversed(traceback.extract_tb(error.__traceback__)):
        yield summary.filename, summary.lineno or 0, summary.name


def format_frame(frame: Frame) -> str:
    """``File "path", line N, in name`` and the source line, as Python prints a stack."""
    filename, lineno, name = frame
    code = linecache.getline(filename, lineno).strip()
    return f'File "{filename}", line {lineno}, in {name}\n    {code}'


def frame_line(frame: Frame) -> str:
    """``path:line: code`` on one line."""
    return f"{frame[0]}:{frame[1]}: {linecache.getline(frame[0], frame[1]).strip()}"


def renamed(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` is the deprecated name of ``new`` (MACs are ``macs`` everywhere; aliases last one release)."""
    warnings.warn(f"{old} is deprecated: use {new} (the quantity is MACs; the alias goes in the next release)",
                  DeprecationWarning, stacklevel=stacklevel)


class RenamedAttribute:
    """A read-only deprecated alias (``flops`` of ``macs``): warns, then returns the attribute it now names."""

    def __init__(self, new: str) -> None:
        self.new = new
        self.old = new

    def __set_name__(self, owner: type, name: str) -> None:
        self.old = f"{owner.__name__}.{name}"

    def __get__(self, obj: object, owner: type | None = None) -> object:
        if obj is None:
            return self
        renamed(self.old, f"{type(obj).__name__}.{self.new}")
        return getattr(obj, self.new)
