"""Islands: the largest submodules that can be captured, when the whole model cannot.

Rule: one real forward on the example inputs (eval mode, no grad, nothing of the model kept)
records what every submodule receives; from the root down, a submodule called exactly once
whose capture (fx, then torch.export) succeeds is an *island*, otherwise its children are
tried.  Each island is analysed as its own graph on the inputs it received: every space that
reaches its boundary (its inputs, its outputs) is frozen by the analysis as usual, so any
rewrite of an island leaves the rest of the model untouched.  Parameters outside every island
count as constants; MACs outside the islands are not counted (the report says so).
"""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .analysis import COVERAGE_MIN_CHANNELS, COVERAGE_WARN_BELOW, Analysis, Coverage, Utilization, analyze_whole
from .capture import Example
from .errors import NrfxError, NrfxWarning, TraceError
from .reprs import island_analysis_repr
from .shapeprop import in_eval_mode, untouched

__all__ = ["IslandAnalysis", "find_islands"]

def record_calls(model: nn.Module, example: Example) -> dict[str, list[Example]]:
    """The (args, kwargs) every submodule receives in one forward on the example (eval, no grad, untouched)."""
    calls: dict[str, list[Example]] = {}
    hooks = [m.register_forward_pre_hook(_recorder(calls, name), with_kwargs=True)
             for name, m in model.named_modules() if name]
    try:
        with torch.no_grad(), untouched(model), in_eval_mode(model):
            example.call(model)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _recorder(calls: dict[str, list[Example]], name: str):
    """A pre-hook storing one call's inputs under ``name``."""

    def hook(_module, args, kwargs):
        calls.setdefault(name, []).append(Example(tuple(args), dict(kwargs)))

    return hook


@dataclass
class IslandAnalysis:
    """The analyses of a model's islands, with the reporting API of ``Analysis`` summed over them."""

    model_name: str
    islands: dict[str, Analysis]
    left_out: dict[str, str]
    outside_params: int
    capture: str = "islands"
    capture_notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        """c(A) in parameters: every island's plus every parameter outside the islands."""
        return sum(a.params for a in self.islands.values()) + self.outside_params

    @property
    def flops(self) -> int:
        """MACs per example inside the islands (MACs outside them are not counted)."""
        return sum(a.flops for a in self.islands.values())

    @property
    def unknown_ops(self) -> dict[str, tuple[str, ...]]:
        """Unknown ops of every island, their nodes prefixed by the island path."""
        found: dict[str, tuple[str, ...]] = {}
        for path, a in self.islands.items():
            for op, nodes in a.unknown_ops.items():
                found[op] = (*found.get(op, ()), *(f"{path}:{n}" for n in nodes))
        return found

    @property
    def auto_leaves(self) -> dict[str, str]:
        """Automatic fx leaves of every island, by their path in the model."""
        return {f"{path}.{leaf}": why for path, a in self.islands.items() for leaf, why in a.auto_leaves.items()}

    def coverage(self) -> Coverage:
        """Channels over all islands (frozen spaces at the boundaries included)."""
        parts = [a.coverage() for a in self.islands.values()]
        return Coverage(sum(c.channels for c in parts), sum(c.free_channels for c in parts),
                        sum(c.monitored_channels for c in parts), ())

    def coverage_by_island(self) -> dict[str, Coverage]:
        """``coverage()`` of each island."""
        return {path: a.coverage() for path, a in self.islands.items()}

    def split_masks(self, masks: dict[str, torch.Tensor] | None) -> dict[str, dict[str, torch.Tensor] | None]:
        """Masks keyed by the model's module names, routed to the island that holds each (prefix dropped)."""
        if masks is None:
            return dict.fromkeys(self.islands)
        routed: dict[str, dict[str, torch.Tensor]] = {path: {} for path in self.islands}
        for name, mask in masks.items():
            path = next((p for p in self.islands if name.startswith(p + ".")), None)
            if path is None:
                warnings.warn(f"mask '{name}' is outside every island: ignored", NrfxWarning, stacklevel=3)
                continue
            routed[path][name[len(path) + 1:]] = mask
        return dict(routed)

    def utilization(self, masks: dict[str, torch.Tensor] | None = None) -> Utilization:
        """U(θ) and r(θ) summed over the islands; parameters outside them count as alive."""
        parts = {p: self.islands[p].utilization(m) for p, m in self.split_masks(masks).items()}
        live = sum(u.live_params for u in parts.values()) + self.outside_params
        return Utilization(self.params, self.flops, live, sum(u.live_flops for u in parts.values()), ())

    def masks_from(self, model: nn.Module, threshold: float = 0.01) -> dict[str, torch.Tensor]:
        """Masks from the norm scales of ``model``, keyed by the model's module names."""
        return {f"{path}.{name}": mask for path, a in self.islands.items()
                for name, mask in a.masks_from(model.get_submodule(path), threshold).items()}

    def __repr__(self) -> str:
        """One line: model, islands, c(A), r(θ) and coverage."""
        return island_analysis_repr(self)

    def report(self, masks: dict[str, torch.Tensor] | None = None) -> IslandReport:
        """Each island's report, and what was left out and why."""
        routed = self.split_masks(masks)
        return IslandReport(self, {p: a.report(routed[p]) for p, a in self.islands.items()})


@dataclass
class IslandReport:
    """Reports per island, with the summary the single-graph report has."""

    analysis: IslandAnalysis
    reports: dict[str, Any]

    def summary_lines(self) -> list[str]:
        """Capture, coverage, islands and what was left out."""
        a, cover = self.analysis, self.analysis.coverage()
        lines = [f"{a.model_name}: capture islands — {len(a.islands)} captured submodules, "
                 f"{a.outside_params:,} parameters outside them (constants; their MACs not counted)",
                 f"coverage: {cover.free:.0%} of {cover.channels:,} channels free, {cover.monitored:.0%} monitored"]
        for path, part in a.coverage_by_island().items():
            lines.append(f"  island {path} ({a.islands[path].capture}): {part.channels:,} channels, "
                         f"{part.free:.0%} free, {part.monitored:.0%} monitored")
        lines += [f"  left out {path}: {why}" for path, why in a.left_out.items()]
        return lines

    def table(self, width: int = 150) -> str:
        """Every island's per-layer table under its name."""
        return "\n".join(f"── island {path} ──\n{r.table(width)}" for path, r in self.reports.items())

    def summary(self) -> str:
        """The island summary, then every island's totals."""
        parts = ["\n".join(self.summary_lines())]
        parts += [f"── island {path} ──\n{r.summary()}" for path, r in self.reports.items()]
        return "\n".join(parts)

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()

    def __repr__(self) -> str:
        """One line: the model and each island's r(θ)."""
        parts = ", ".join(f"{p} r(θ) {r.totals.r_params:.4f}" for p, r in list(self.reports.items())[:4])
        more = f", … ({len(self.reports)} islands)" if len(self.reports) > 4 else ""
        return f"<nrfx.IslandReport of {self.analysis.model_name}: {parts}{more}>"

    def _repr_html_(self) -> str:
        """Jupyter: the island summary, then every island's table."""
        head = "<pre>" + html.escape("\n".join(self.summary_lines())) + "</pre>"
        return head + "".join(f"<h4>island {html.escape(p)}</h4>{r._repr_html_()}" for p, r in self.reports.items())

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the summary and every island's report."""
        cover = self.analysis.coverage()
        return {"model": self.analysis.model_name, "capture": "islands", "left_out": dict(self.analysis.left_out),
                "coverage": {"channels": cover.channels, "free": cover.free, "monitored": cover.monitored},
                "islands": {p: r.to_dict() for p, r in self.reports.items()}}


def find_islands(model: nn.Module, example: Example, why: str, **capture_options: Any) -> IslandAnalysis:
    """Analyse the largest capturable submodules (see the module docstring); ``why`` the whole model failed."""
    calls = record_calls(model, example)
    islands: dict[str, Analysis] = {}
    left_out: dict[str, str] = {}
    _descend(model, "", calls, islands, left_out, capture_options)
    if not islands:
        raise TraceError(f"nrfx cannot capture {type(model).__name__} nor any of its submodules: {why}")
    inside = {id(p) for path in islands for p in model.get_submodule(path).parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    notes = [f"capture: islands, because {why}"]
    result = IslandAnalysis(type(model).__name__, islands, left_out, outside, capture_notes=notes)
    _warn_low_coverage(result)
    return result


def _warn_low_coverage(analysis: IslandAnalysis) -> None:
    """One warning when under half of the islands' channels are monitored; it names each island's share."""
    cover = analysis.coverage()
    if cover.channels < COVERAGE_MIN_CHANNELS or cover.monitored >= COVERAGE_WARN_BELOW:
        return
    by_island = analysis.coverage_by_island().items()
    parts = ", ".join(f"{path} {c.monitored:.0%} of {c.channels:,}" for path, c in by_island)
    warnings.warn(f"nrfx can rejuvenate only {cover.monitored:.0%} of the channels of {analysis.model_name}'s "
                  f"islands ({parts}); the rest is frozen at island boundaries or by its ops, or has no norm scale "
                  "(nrfx.add_gates on an island gives it one). analysis.report() says which.",
                  NrfxWarning, stacklevel=3)


def _descend(module: nn.Module, prefix: str, calls, islands, left_out, options) -> None:
    """Try each child as an island; recurse into the ones that cannot be captured whole."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if not any(True for _ in child.parameters()):
            continue
        received = calls.get(path, [])
        if len(received) != 1:
            left_out[path] = "not called in the forward" if not received else f"called {len(received)} times"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NrfxWarning)
                islands[path] = analyze_whole(child, received[0], "auto", **options)
        except NrfxError as error:
            if not any(True for _ in child.children()):
                left_out[path] = str(error).splitlines()[0]
                continue
            _descend(child, path + ".", calls, islands, left_out, options)
