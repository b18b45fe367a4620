"""Islands: the largest submodules that can be captured, when the whole model cannot.

Rule: one real forward on the example inputs (eval mode, no grad, nothing of the model kept)
records what every submodule receives; from the root down, a submodule called exactly once
whose capture (fx, then torch.export) succeeds is an *island*, otherwise its children are
tried.  A submodule never called itself whose children are (``nn.ModuleList``, ``nn.ModuleDict``,
any container the parent's forward indexes) is descended into too.  Each island is analysed as
its own graph on the inputs it received: every space that reaches its boundary (its inputs, its
outputs) is frozen by the analysis as usual, so any rewrite of an island leaves the rest of the
model untouched.  A parameter tensor held by two islands (tied embeddings) counts once, and a
candidate that would resize a tensor an earlier island holds is no island (its children are
tried).  Parameters outside every island count as constants; MACs outside the islands are not
counted (the report says so).
"""

from __future__ import annotations

import dataclasses
import html
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nrfx.analysis.reprs import island_analysis_repr
from nrfx.analysis.whole import (
    COVERAGE_MIN_CHANNELS,
    COVERAGE_WARN_BELOW,
    Analysis,
    Coverage,
    Utilization,
    analyze_whole,
)
from nrfx.capture.front_ends import Example, output_signature
from nrfx.capture.guards import has_hooks, in_eval_mode, python_modules, tied_names, untouched
from nrfx.errors import NrfxError, NrfxWarning, RenamedAttribute, TraceError

__all__ = ["IslandAnalysis", "find_islands", "hooks_traced_through"]

def record_calls(model: nn.Module, example: Example,
                 outputs: dict[int, list[list[tuple[str, str]]]] | None = None) -> dict[int, list[Example]]:
    """The (args, kwargs) every submodule receives in one forward on the example, keyed by ``id(module)``;
    ``outputs``, when given, gets the ``output_signature`` of what each call returns (forward hooks included).

    Keyed by the module object, so a module reachable under two names (a shared block) is one entry.
    Eval mode, no grad, the model untouched.
    """
    calls: dict[int, list[Example]] = {}
    modules = [m for m in python_modules(model) if m is not model]
    hooks = [m.register_forward_pre_hook(_recorder(calls, id(m)), with_kwargs=True) for m in modules]
    if outputs is not None:  # appended last: it sees the output the module's own forward hooks made
        hooks += [m.register_forward_hook(_output_recorder(outputs, id(m))) for m in modules]
    try:
        with torch.no_grad(), untouched(model), in_eval_mode(model):
            example.call(model)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def _output_recorder(outputs: dict[int, list[list[tuple[str, str]]]], key: int):
    """A forward hook storing one call's output signature under ``key``."""

    def hook(_module, _args, output):
        outputs.setdefault(key, []).append(output_signature(output))

    return hook


def _recorder(calls: dict[int, list[Example]], key: int):
    """A pre-hook storing one call's inputs under ``key``."""

    def hook(_module, args, kwargs):
        calls.setdefault(key, []).append(Example(tuple(args), dict(kwargs)))

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
    shared_params: int = 0  # elements of tensors held by several islands, counted once more per extra island

    @property
    def params(self) -> int:
        """c(A) in parameters: every island's plus every parameter outside the islands, each tensor once."""
        return sum(a.params for a in self.islands.values()) + self.outside_params - self.shared_params

    @property
    def macs(self) -> int:
        """MACs per example inside the islands (MACs outside them are not counted)."""
        return sum(a.macs for a in self.islands.values())

    flops = RenamedAttribute("macs")
    whole = False  # analysed island by island (ModelAnalysis)

    def parts(self) -> dict[str, Analysis]:
        """The islands' graph analyses, by their module path in the model."""
        return dict(self.islands)

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
        live = sum(u.live_params for u in parts.values()) + self.outside_params - self.shared_params
        return Utilization(self.params, self.macs, live, sum(u.live_macs for u in parts.values()), ())

    def masks_from(self, model: nn.Module, threshold: float = 0.01) -> dict[str, torch.Tensor]:
        """Masks from the norm scales of ``model``, keyed by the model's module names."""
        return {f"{path}.{name}": mask for path, a in self.islands.items()
                for name, mask in a.masks_from(model.get_submodule(path), threshold).items()}

    def retie(self, model: nn.Module, result: nn.Module) -> int:
        """Rule: every name of ``model`` holding a tensor an island holds names the first island's tensor in ``result``.

        For a ``result`` whose islands were rebuilt (new tensors): tied weights (an embedding and
        a head in two islands, or a module outside them) are one tensor again.  Returns how many
        names were re-pointed; a name ``result`` lacks is left alone.
        """
        moved = 0
        for names in tied_names(model, buffers=False):
            inside = [n for n in names if any(n.startswith(f"{path}.") for path in self.islands)]
            if not inside:
                continue
            source = _parameter(result, inside[0])
            for name in names:
                owner, _, leaf = name.rpartition(".")
                if name != inside[0] and source is not None and _parameter(result, name) is not None:
                    setattr(result.get_submodule(owner), leaf, source)
                    moved += 1
        return moved

    def __repr__(self) -> str:
        """One line: model, islands, c(A), r(θ) and coverage."""
        return island_analysis_repr(self)

    def report(self, masks: dict[str, torch.Tensor] | None = None) -> IslandReport:
        """Each island's report, and what was left out and why."""
        routed = self.split_masks(masks)
        return IslandReport(self, {p: a.report(routed[p]) for p, a in self.islands.items()})


def _parameter(module: nn.Module, name: str) -> nn.Parameter | None:
    """``module.get_parameter(name)``, or None where there is none."""
    try:
        return module.get_parameter(name)
    except AttributeError:
        return None


@dataclass
class IslandReport:
    """Reports per island, with the summary the single-graph report has."""

    analysis: IslandAnalysis
    reports: dict[str, Any]

    @property
    def totals(self) -> Any:
        """The model's ``nrfx.report.Totals``: params with those outside, each tensor once; MACs in the islands."""
        parts = [r.totals for r in self.reports.values()]
        a = self.analysis
        fixed = a.outside_params - a.shared_params
        return dataclasses.replace(
            parts[0], params=a.params, live_params=sum(t.live_params for t in parts) + fixed,
            macs=sum(t.macs for t in parts), live_macs=sum(t.live_macs for t in parts),
            spaces=sum(t.spaces for t in parts), frozen_spaces=sum(t.frozen_spaces for t in parts),
            unknown_ops=len(a.unknown_ops), auto_leaves=len(a.auto_leaves),
            effective_params=sum(t.effective_params or t.params for t in parts) + fixed,
            effective_macs=sum(t.effective_macs or t.macs for t in parts))

    def summary_lines(self) -> list[str]:
        """Capture, totals, coverage, islands and what was left out."""
        a, cover, t = self.analysis, self.analysis.coverage(), self.totals
        shared = f"; {a.shared_params:,} elements tied across islands counted once" if a.shared_params else ""
        lines = [f"{a.model_name}: capture islands — {len(a.islands)} captured submodules, "
                 f"{a.outside_params:,} parameters outside them (constants; their MACs not counted)",
                 f"c(A) params {t.params:,}, U(θ) params {t.live_params:,}, r(θ) params {t.r_params:.4f}; "
                 f"MACs in the islands {t.macs:,}, r(θ) MACs {t.r_macs:.4f}{shared}",
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
        totals = dataclasses.asdict(self.totals) | {"r_params": self.totals.r_params, "r_macs": self.totals.r_macs}
        return {"model": self.analysis.model_name, "capture": "islands", "left_out": dict(self.analysis.left_out),
                "totals": totals, "shared_params": self.analysis.shared_params,
                "coverage": {"channels": cover.channels, "free": cover.free, "monitored": cover.monitored},
                "islands": {p: r.to_dict() for p, r in self.reports.items()}}


def find_islands(model: nn.Module, example: Example, why: str, **capture_options: Any) -> IslandAnalysis:
    """Analyse the largest capturable submodules (see the module docstring); ``why`` the whole model failed."""
    outputs: dict[int, list[list[tuple[str, str]]]] = {}
    search = _Search(record_calls(model, example, outputs), outputs, capture_options)
    search.descend(model, "")
    if not search.islands:
        raise TraceError(f"nrfx cannot capture {type(model).__name__} nor any of its submodules: {why}")
    inside = set(search.owner)
    outside = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    notes = [f"capture: islands, because {why}"]
    result = IslandAnalysis(type(model).__name__, search.islands, search.left_out, outside, capture_notes=notes,
                            shared_params=search.shared)
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
                  "(nrfx.add_gates(model, example_inputs) gives it one, island by island). analysis.report() "
                  "says which.",
                  NrfxWarning, stacklevel=3)


@dataclass
class _Search:
    """The walk from the root down: the islands found, what was left out, which island holds each tensor."""

    calls: dict[int, list[Example]]
    outputs: dict[int, list[list[tuple[str, str]]]]  # what each call returned in the model's forward, hooks included
    options: dict[str, Any]
    islands: dict[str, Analysis] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)
    owner: dict[int, str] = field(default_factory=dict)  # id(parameter) -> the island that holds it first
    shared: int = 0  # elements of tensors an earlier island holds too
    seen: set[int] = field(default_factory=set)  # modules visited (a module under two names is tried once)

    def descend(self, module: nn.Module, prefix: str) -> None:
        """Try each child as an island; recurse into the ones that cannot be captured whole or are never called."""
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if id(child) in self.seen or not any(True for _ in child.parameters()):
                continue
            self.seen.add(id(child))
            received = self.calls.get(id(child), [])
            if not received and any(True for _ in child.children()):
                self.descend(child, path + ".")  # a container (ModuleList, ModuleDict): its children are called
            elif len(received) != 1:
                self.left_out[path] = "not called in the forward" if not received else f"called {len(received)} times"
            else:
                self._try(child, path, received[0])

    def _try(self, child: nn.Module, path: str, received: Example) -> None:
        """``child`` as an island; its children when it cannot be captured or would resize a tensor held already."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NrfxWarning)
                analysis = analyze_whole(child, received, "auto", **self.options)
        except NrfxError as error:
            why = str(error).splitlines()[0]
        else:
            why = _hooks_inside(child, analysis) or \
                _output_problem(analysis, received, self.outputs.get(id(child), [None])[0]) or \
                self._accept(child, path, analysis)
            if why is None:
                return
        if any(True for _ in child.children()):
            self.descend(child, path + ".")
        else:
            self.left_out[path] = why

    def _accept(self, child: nn.Module, path: str, analysis: Analysis) -> str | None:
        """Record ``child`` as an island, or say why not: it shares a tensor with an island and either may resize it."""
        params = {id(p): p for p in child.parameters()}
        shared = [key for key in params if key in self.owner]
        resized = [self.owner[key] for key in shared if not _tie_is_frozen(analysis, params[key]) or
                   not _tie_is_frozen(self.islands[self.owner[key]], params[key])]
        if resized:
            return f"shares a parameter with island '{resized[0]}' that one of them would resize (tied weights)"
        self.islands[path] = analysis
        self.shared += sum(params[key].numel() for key in shared)
        for key in params:
            self.owner.setdefault(key, path)
        return None


def hooks_traced_through(module: nn.Module, gm: torch.fx.GraphModule) -> list[str]:
    """The submodules of ``module`` with forward or backward hooks that ``gm`` (its graph) traces through: it calls
    neither them nor a module holding them, so it never runs those hooks."""
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    return [name for name, sub in module.named_modules() if name and has_hooks(sub)
            and not any(name == c or name.startswith(f"{c}.") for c in called)]


def _hooks_inside(child: nn.Module, analysis: Analysis) -> str | None:
    """Rule: a module inside an island runs its hooks only if the island's graph calls it as a module; one the
    graph traces through and that has hooks (Hugging Face's output capturing on a model's layers) makes its parent
    no island: the rewritten island would skip them."""
    skipped = hooks_traced_through(child, analysis.gm)
    return f"its submodule {skipped[0]} has hooks that its graph would not run (traced through)" if skipped else None


def _output_problem(analysis: Analysis, received: Example, expected: list[tuple[str, str]] | None) -> str | None:
    """Rule: an island stands in for its module only if its graph returns what the module returned in the model's
    forward: the same leaves, dtypes and shapes.  Forward hooks can add to a module's output (Hugging Face's output
    capturing fills ``hidden_states`` from hooks once a forward asked for them); a graph is captured without them."""
    if expected is None:
        return None
    with torch.no_grad(), untouched(analysis.gm), in_eval_mode(analysis.gm):
        got = output_signature(received.call(analysis.gm))
    if got == expected:
        return None
    pairs = zip(expected, got, strict=False)
    first = next((f"{k or 'the output'}: {a} in the model, {key or 'the output'}: {b} in the graph"
                  for (k, a), (key, b) in pairs if (k, a) != (key, b)),
                 f"{len(expected)} leaves in the model, {len(got)} in the graph")
    return f"its graph does not return what the module returns in the model's forward (forward hooks?): {first}"


def _tie_is_frozen(analysis: Analysis, tensor: torch.Tensor) -> bool:
    """Whether every channel dim of ``tensor`` (found by identity in the island's graph) lies in a frozen space."""
    for name in [n for n, p in analysis.gm.named_parameters(remove_duplicate=False) if p is tensor]:
        info = analysis.param_info.get(name)
        layouts = [] if info is None else [d for d in info.dims if d is not None]
        if any(not analysis.spaces[s].is_frozen for layout in layouts for s in analysis.space_ids(layout)):
            return False
    return True
