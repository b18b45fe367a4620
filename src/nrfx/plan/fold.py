"""Fold the constants that removed channels emit into their consumers, where that is exact.

A channel judged dead by its norm scale can still carry a constant: with γ = 0 a norm emits
β (and the activation after it f(β)).  Removing the channel drops its contribution from every
layer that reads it.  The exact rule nrfx follows:

* **Where a removed constant goes.**  A removed channel is removed from its whole channel space:
  every norm, activation, add and reshape on it loses it too, so its constant only ever matters
  at the *weighted consumers* of the space — the convs and linears that read it.  A reshape,
  ``flatten``, ``view``, ``permute`` or ``transpose`` between the norm and the consumer only moves
  the channel's values around; a constant channel stays constant along the other dims, and the
  analysis' layouts say which input features of the consumer carry it (after ``flatten`` of
  ``N×C×H×W``: features ``[c·H·W, (c+1)·H·W)``).  A norm over the same space in between is no
  fold target: the channel vanishes there too.  Constants are measured at each consumer's input.
* **When a consumer absorbs it exactly.**  A linear layer adds ``W[:, p]·v`` at every row.  A
  conv (any kernel, stride, dilation, groups) whose input channel ``c`` is ``v`` everywhere adds
  ``Σ_k W[o, c mod cin/g, k]·v`` to every output ``o`` of ``c``'s group, at every position, *if
  every tap reads the input*: no zero padding (``padding=0`` / ``"valid"``, or a reflect /
  replicate / circular ``padding_mode``, which pad a constant with itself).  Zero padding makes the
  output differ near the borders: no bias can absorb that, nor can a transposed conv's.
* **Only while it is a constant.**  A dead channel's value can vary anyway: a squeeze-excitation
  gate multiplies it per example (EfficientNet).  Whether an input varies is measured on the
  model the rewrite assumes, with γ = 0 on every removed channel, so a small γ that is not zero
  stays the paper's approximation and is not reported; an input that varies there cannot be
  folded.
* **Only where it reaches a survivor.**  A removed input that feeds only removed outputs (its
  group of a grouped conv, whose blocks are tied; a depthwise conv's own channel) changes nothing
  the rewrite keeps: it is neither folded nor warned about, and what the removed outputs carry is
  measured at the next layer (a norm with γ = 0 there emits its own constant).
* **Where the shift is written** (the rewrite pass ``rewrite/folds``).  Into the consumer's bias; without one,
  subtracted from the running mean of a BatchNorm that is the consumer's only reader, possibly through
  ``flatten``/``reshape``/``view``/``permute``/``transpose`` (LeViT's ``Linear → flatten(0, 1) →
  BatchNorm1d``; a ``reshape_as(y)`` reading only y's shape does not count as a reader), when
  that norm normalises the consumer's output channels in order (exact in eval mode; in train mode
  the batch mean absorbs a constant anyway).  No bias and no such norm (Wav2Vec2's bias-free
  convs): the rewritten layer gets a bias holding the shift (``out`` parameters more, outside
  the plan's cost).

Constants are measured once on the example inputs (eval mode, on the traced original) when the
plan is made, and stored in it, so a replay folds the same values.  A constant that cannot be
folded exactly is dropped with a warning giving the measured change of the output (the paper's
behaviour, ``constants="drop"``; the change is measured once, on the example inputs, by running
the original with those inputs read as 0), or its channel is kept alive (``constants="keep"``,
exact).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.utils import _pytree as pytree

from nrfx.capture.guards import hooks_silenced, in_eval_mode, untouched
from nrfx.errors import NrfxWarning
from nrfx.ops.layer_kinds import constant_input_problem, in_columns, is_scale
from nrfx.plan.maps import dim_map

__all__ = ["Constants", "measure_constants", "measure_folds", "probe_constants", "split_folds", "unfoldable_channels"]

def _why_not(gm: torch.fx.GraphModule, name: str) -> str | None:
    """Why a consumer's constants cannot be folded exactly (None: they can)."""
    return constant_input_problem(gm.get_submodule(name))


# -- measuring constants -------------------------------------------------------------------------------------------


@dataclass
class Constants:
    """Per consumer module: min and max of every input feature over the example (rows, positions, calls), and
    which features vary in the model with γ = 0 on every removed channel (the model the rewrite assumes)."""

    low: dict[str, torch.Tensor]
    high: dict[str, torch.Tensor]
    reference: list[torch.Tensor]
    varying: dict[str, torch.Tensor] = field(default_factory=dict)

    def values(self, name: str, positions: torch.Tensor) -> dict[int, float]:
        """The given features that hold one non-zero value everywhere: position -> value."""
        if name not in self.low:
            return {}
        low, high = self.low[name][positions], self.high[name][positions]
        keep = (low == high) & (low != 0)
        return dict(zip(positions[keep].tolist(), low[keep].tolist(), strict=True))

    def varies(self, name: str, positions: torch.Tensor) -> list[int]:
        """The given features that vary although their channels are dead: a gate or zero padding on the way."""
        if name not in self.varying:
            return []
        return positions[self.varying[name][positions]].tolist()


def _features(x: torch.Tensor, dim: int) -> torch.Tensor:
    """An input as (samples, features): every position and row of feature dim ``dim`` in one column."""
    return x.detach().movedim(dim, -1).reshape(-1, x.shape[dim])


def _record(stats: Constants, name: str, dim: int, x: torch.Tensor) -> None:
    """Fold one input of a module into its running min/max per feature."""
    flat = _features(x, dim)
    if not flat.numel():
        return
    low, high = flat.amin(0).cpu(), flat.amax(0).cpu()
    if name in stats.low:
        low, high = torch.minimum(stats.low[name], low), torch.maximum(stats.high[name], high)
    stats.low[name], stats.high[name] = low, high


def _run(gm: torch.fx.GraphModule, example, hooks: dict, scales: dict | None = None) -> list[torch.Tensor]:
    """Run the graph in eval mode, no grad, with forward pre-hooks and optionally other norm scales (functional: the
    parameters are not touched), leaving no trace; the float output leaves."""
    with hooks_silenced(gm):  # the user's own hooks do not fire; ours go with the swapped-in hook dicts
        for name, hook in hooks.items():
            gm.get_submodule(name).register_forward_pre_hook(hook)
        with torch.no_grad(), untouched(gm), in_eval_mode(gm):  # the user's modules: each flag put back
            out = example.call(gm) if not scales else \
                torch.func.functional_call(gm, scales, example.args, example.kwargs, strict=False)
    return [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _min_max(gm: torch.fx.GraphModule, dims: dict[str, int], example, scales: dict | None = None) -> Constants:
    """Min and max of every input feature of the consumers (name -> input dim) on the example inputs (one run)."""
    stats = Constants({}, {}, [])

    def hook(name):
        return lambda _m, args: _record(stats, name, dims[name], args[0]) if args else None

    stats.reference = _run(gm, example, {n: hook(n) for n in dims}, scales)
    return stats


def _dead_scales(gm: torch.fx.GraphModule, analysis, plan) -> dict[str, torch.Tensor]:
    """Every norm scale (and gate) with γ = 0 on the channels the plan removes: what the rewrite takes them to be."""
    scales: dict[str, torch.Tensor] = {}
    for name, norm, segments in analysis.norm_spaces(gm):
        weight = scales.get(f"{name}.weight", norm.weight.detach()).clone()
        for s, entries in segments:
            removed = torch.ones(analysis.spaces[s].width, dtype=torch.bool)
            removed[plan.keep[s]] = False
            weight[entries].view(len(removed), -1)[removed.to(weight.device)] = 0
        scales[f"{name}.weight"] = weight
    return scales


def measure_constants(gm: torch.fx.GraphModule, analysis, plan, names, example) -> Constants:
    """Min/max of the named consumers' input features on the example inputs, and which vary with every removed
    channel's γ set to 0 (two eval runs; the model's own parameters are not touched)."""
    dims = {name: dim for name, dim in _input_dims(analysis).items() if name in names}
    stats = _min_max(gm, dims, example)
    dead = _min_max(gm, dims, example, _dead_scales(gm, analysis, plan))
    stats.varying = {n: dead.low[n] != dead.high[n] for n in dead.low}
    return stats


def _output_change(gm: torch.fx.GraphModule, analysis, example, dropped: dict[str, list[int]], reference) -> float:
    """Relative change of the output (L2 over every float output) when the dropped constant inputs read 0."""
    dims = _input_dims(analysis)

    def hook(name):
        positions = torch.tensor(dropped[name], dtype=torch.long)

        def zero(_m, args):
            if not args:
                return None
            x = args[0].clone()
            x.index_fill_(dims[name] % x.dim(), positions.to(x.device), 0)
            return (x, *args[1:])
        return zero

    changed = _run(gm, example, {n: hook(n) for n in dropped})
    diff = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(changed, reference, strict=True))
    norm = sum(float(b.double().pow(2).sum()) for b in reference)
    return (diff / norm) ** 0.5 if norm else float("inf") if diff else 0.0


# -- planning ----------------------------------------------------------------------------------------------------


def _removed(analysis, plan, layout) -> torch.Tensor:
    """Old feature positions of a layout that the plan drops."""
    source = dim_map(analysis, plan, layout, 0).source
    total = analysis.atoms.channels(layout) * layout.inner
    keep = torch.zeros(total, dtype=torch.bool)
    keep[source[source >= 0]] = True
    return torch.nonzero(~keep).flatten()


def _consumer_records(analysis) -> list:
    """Layer records of every module call reading a channel space through a weight (conv, linear, a registered
    layer with their rules); ``input_dim`` says which input dim carries the space."""
    return [record for _, record in analysis.layers("conv", "linear")
            if record.module is not None and record.input is not None and record.input_dim is not None]


def _consumers(analysis) -> list[tuple[str, object]]:
    """(module name, input layout) of every consumer call."""
    return [(record.module, record.input) for record in _consumer_records(analysis)]


def _input_dims(analysis) -> dict[str, int]:
    """Per consumer module: the dim of its input, from the end, that carries its channels."""
    return {record.module: record.input_dim for record in _consumer_records(analysis)}


def _reaching_survivors(gm: torch.fx.GraphModule, analysis, plan, name: str, removed: torch.Tensor) -> torch.Tensor:
    """The removed inputs that feed a surviving output of the layer (only those change what the rewrite computes).

    A grouped conv's input c feeds only c's group; when that group's outputs are removed too
    (a depthwise conv keeps a channel's space), the constant is gone with them, and what the
    removed outputs carry is measured at the next layer.
    """
    module, record = gm.get_submodule(name), _record_of(analysis, name)
    if record is None or record.output is None:
        return removed
    kept = torch.ones(analysis.atoms.channels(record.output) * record.output.inner, dtype=torch.bool)
    kept[_removed(analysis, plan, record.output)] = False
    groups = getattr(module, "groups", 1)
    if not kept.any() or groups == 1:
        return removed if kept.any() else removed[:0]
    reaches = kept.reshape(groups, -1).any(1)  # per group: does an output of it survive?
    return removed[reaches[removed // module.weight.shape[1]]]


def _record_of(analysis, name: str):
    """The layer record of a module's call (the last one when it is called more than once)."""
    found = None
    for _, record in analysis.layers("conv", "linear"):
        if record.module == name:
            found = record
    return found


def _candidates(gm: torch.fx.GraphModule, analysis, plan) -> dict[str, torch.Tensor]:
    """Consumers with removed input features that reach a surviving output: module name -> their positions."""
    out = {}
    for name, layout in _consumers(analysis):
        removed = _removed(analysis, plan, layout)
        if removed.numel():
            removed = _reaching_survivors(gm, analysis, plan, name, removed)
        if removed.numel():
            out[name] = removed
    return out


def _may_emit_constants(gm: torch.fx.GraphModule, analysis) -> bool:
    """Whether some channel's producer ignores its input: a norm with γ = 0 and β ≠ 0, or a
    conv/linear (by its layer record) with an all-zero weight row and a bias.  Without one no constant exists."""
    rows_out = {r.module for _, r in analysis.layers("conv", "linear") if r.module is not None and not r.transposed}
    for name, module in gm.named_modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor) or weight.is_meta:
            continue
        if is_scale(module) and bool(((weight == 0) & (bias != 0)).any()):
            return True
        if (name in rows_out or in_columns(module)) and weight.dim() >= 2:  # its rows are its outputs
            rows = weight.detach().reshape(weight.shape[0], -1)
            if bool(((rows == 0).all(1) & (bias.detach() != 0)).any()):
                return True
    return False


def probe_constants(analysis, plan) -> Constants | None:
    """``measure_constants`` at every conv/linear consumer, γ = 0 where ``plan`` removes (None: no constant exists)."""
    gm = analysis.gm
    if not _may_emit_constants(gm, analysis):
        return None
    return measure_constants(gm, analysis, plan, [name for name, _ in _consumers(analysis)], analysis.example)


_VARIES = "its input varies though the channel is dead (a gate multiplies it, or zero padding before this layer)"


def split_folds(gm: torch.fx.GraphModule, analysis, plan, constants: Constants) -> tuple[dict, dict]:
    """Removed inputs per consumer that reach a survivor and are not zero, split: ({name: {position: v}} folded,
    {name: (positions, why)} not foldable exactly: a constant the layer cannot absorb, or a varying input)."""
    folds, unfoldable = {}, {}
    for name, removed in _candidates(gm, analysis, plan).items():
        values, varying = constants.values(name, removed), constants.varies(name, removed)
        why = _why_not(gm, name) if values else None
        if values and why is None:
            folds[name] = {str(k): v for k, v in values.items()}
        bad = sorted({*varying, *(values if why else ())})
        if bad:
            unfoldable[name] = (bad, "; ".join(r for r in (why, _VARIES if varying else None) if r))
    return folds, unfoldable


def measure_folds(gm: torch.fx.GraphModule, analysis, plan, example) -> tuple[dict[str, dict], list[str]]:
    """Per foldable consumer {position: constant} of its removed constant inputs; notes (and an ``NrfxWarning``
    with the measured output change) for the removed inputs no consumer can absorb exactly, which are dropped."""
    candidates = _candidates(gm, analysis, plan)
    if not candidates or not _may_emit_constants(gm, analysis):
        return {}, []
    constants = measure_constants(gm, analysis, plan, candidates, example)
    folds, unfoldable = split_folds(gm, analysis, plan, constants)
    if not unfoldable:
        return folds, []
    change = _output_change(gm, analysis, example, {n: p for n, (p, _) in unfoldable.items()}, constants.reference)
    notes = [f"fold: {len(p)} removed inputs of {n} cannot be folded exactly ({why}); dropped"
             for n, (p, why) in unfoldable.items()]
    layers = ", ".join(list(unfoldable)[:5]) + (f" and {len(unfoldable) - 5} more" if len(unfoldable) > 5 else "")
    summary = (f"fold: dropping {sum(len(p) for p, _ in unfoldable.values())} removed inputs of dead channels that "
               f"{layers} cannot absorb exactly changes the output by {change:.3g} (relative L2, on the example "
               "inputs); rejuvenate(..., constants='keep') keeps those channels instead (exact)")
    warnings.warn(summary, NrfxWarning, stacklevel=5)  # the caller of rejuvenate
    return folds, [*notes, summary]


def _space_channel(analysis, layout, position: int) -> tuple[int, int]:
    """(space, channel) that a feature position of a layout carries."""
    channel = position // layout.inner
    for s in analysis.space_ids(layout):
        width = analysis.spaces[s].width
        if channel < width:
            return s, channel
        channel -= width
    raise IndexError(f"feature {position} lies outside its layout")


def unfoldable_channels(gm: torch.fx.GraphModule, analysis, plan, constants: Constants) -> dict[int, set[int]]:
    """Channels per space that the plan removes though a consumer cannot fold what they carry exactly."""
    layouts = dict(_consumers(analysis))
    out: dict[int, set[int]] = {}
    for name, (positions, _) in split_folds(gm, analysis, plan, constants)[1].items():
        for p in positions:
            s, c = _space_channel(analysis, layouts[name], p)
            out.setdefault(s, set()).add(c)
    return out
