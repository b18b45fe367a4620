"""The driver's record of a run: history as JSON, the r(θ)/λ plot (paper Fig. 1), a progress bar.

The bar is tqdm or rich when installed; ``progress=True`` falls back to plain text on stderr
with the core dependencies alone.

A history is a list of dicts ``{step, r, lam, event, rounds, cost}`` (+ ``lam_before, r_after,
cost_before, widths`` for ``"rejuvenate"`` and ``collapsed`` where the collapse warning fired).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from typing import Any, TextIO

from nrfx.errors import NrfxError, NrfxWarning

__all__ = ["save_history", "plot_history", "Progress", "TextBar", "resolve_kind", "PROGRESS_KINDS"]

PROGRESS_KINDS = ("auto", "tqdm", "rich", "text")  # progress=True is "auto": tqdm when installed, else text
_PACKAGES = {"tqdm": "tqdm", "rich": "rich"}


def save_history(history: list[dict[str, Any]], path: str) -> None:
    """History records to a JSON file (a list of {step, r, lam, event, rounds, cost, ...})."""
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(history, handle, indent=1)


def plot_history(history: list[dict[str, Any]], path: str, target: float | None = None) -> bool:
    """r(θ) and λ over steps, rejuvenations marked (paper Fig. 1); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plot written (pip install matplotlib)", NrfxWarning,
                      stacklevel=2)
        return False
    steps = [h["step"] for h in history]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    top.plot(steps, [h["r"] for h in history], label="r(θ)")
    bottom.plot(steps, [h.get("lam_before", h["lam"]) for h in history], color="tab:orange", label="λ")
    if target is not None:
        top.axhline(target, color="gray", linestyle="--", label="target")
    for h in history:
        if h["event"] == "rejuvenate":
            for axis in (top, bottom):
                axis.axvline(h["step"], color="tab:red", alpha=0.4)
    top.set_ylabel("utilization r")
    bottom.set_ylabel("λ")
    bottom.set_xlabel("step")
    top.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


class TextBar:
    """A plain-text progress report on stderr (core dependencies only): one line per status text."""

    def __init__(self, total: int | None, stream: TextIO | None = None) -> None:
        self.total, self.n, self.stream = total, 0, stream

    def update(self, text: str | None) -> None:
        """Rule: count the step; print a line only when a check brought a new status text."""
        self.n += 1
        if text:
            print(f"nrfx step {self.n}{'' if self.total is None else f'/{self.total}'}: {text}",
                  file=self.stream or sys.stderr, flush=True)

    def close(self) -> None:
        """Nothing to tear down (every line is already printed)."""


def _importable(name: str) -> bool:
    """Whether a module can be imported (None in sys.modules counts as missing, as import does)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def resolve_kind(kind: str) -> str:
    """Rule: "auto" is tqdm when installed, else plain text; "tqdm"/"rich" need their package (the error names it)."""
    if kind == "auto":
        return "tqdm" if _importable("tqdm") else "text"
    if kind in _PACKAGES and not _importable(_PACKAGES[kind]):
        raise NrfxError(f"progress={kind!r} needs the {_PACKAGES[kind]} package, which is not installed: "
                        f"pip install {_PACKAGES[kind]} (or pip install 'nrfx[progress]'), or pass progress=True "
                        "for a plain-text report with no extra package")
    return kind


class Progress:
    """A progress report showing r, λ and the round: a tqdm or rich bar, or plain text (``kind`` in PROGRESS_KINDS)."""

    def __init__(self, kind: str, total: int | None) -> None:
        self.kind = resolve_kind(kind)
        if self.kind == "tqdm":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="nrfx", unit="step")
        elif self.kind == "rich":
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress()
            self.task = self.bar.add_task("nrfx", total=total)
            self.bar.start()
        else:
            self.bar = TextBar(total)

    def update(self, text: str | None) -> None:
        """One step; a new status text after a check."""
        if self.kind == "tqdm":
            self.bar.update(1)
            if text:
                self.bar.set_postfix_str(text)
        elif self.kind == "rich":
            self.bar.update(self.task, advance=1, **({"description": f"nrfx {text}"} if text else {}))
        else:
            self.bar.update(text)

    def close(self) -> None:
        """Finish the bar."""
        (self.bar.stop if self.kind == "rich" else self.bar.close)()
