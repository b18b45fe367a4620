"""The driver's record of a run: history as JSON, the r(θ)/λ plot (paper Fig. 1), a progress bar.

A history is a list of dicts ``{step, r, lam, event, rounds, cost}`` (+ ``lam_before, r_after,
cost_before, widths`` for ``"rejuvenate"`` and ``collapsed`` where the collapse warning fired).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from .errors import NrfxWarning

__all__ = ["save_history", "plot_history", "Progress", "PROGRESS_KINDS"]

PROGRESS_KINDS = ("tqdm", "rich")


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


class Progress:
    """A tqdm or rich progress bar showing r, λ and the round (``kind`` is one of PROGRESS_KINDS)."""

    def __init__(self, kind: str, total: int | None) -> None:
        self.kind = kind
        if kind == "tqdm":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="nrfx", unit="step")
        else:
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress()
            self.task = self.bar.add_task("nrfx", total=total)
            self.bar.start()

    def update(self, text: str | None) -> None:
        """One step; a new status text after a check."""
        if self.kind == "tqdm":
            self.bar.update(1)
            if text:
                self.bar.set_postfix_str(text)
        else:
            self.bar.update(self.task, advance=1, **({"description": f"nrfx {text}"} if text else {}))

    def close(self) -> None:
        """Finish the bar."""
        (self.bar.close if self.kind == "tqdm" else self.bar.stop)()
