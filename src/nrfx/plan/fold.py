"""Fold the constants that removed channels emit into their consumers, where that is exact.

A channel judged dead by its norm scale can still carry a constant: with γ = 0 a norm emits
β (and the activation after it f(β)).  Removing the channel drops its contribution from every
layer that reads it.  The exact rule nrfx follows:

* **Where a removed constant goes.**  A removed channel is removed from its whole channel space:
  every norm, activation, add and reshape on it loses it too, so its constant only ever matters
  at the *weighted consumers* of the space — the convs, linears and recurrent layers that read it — and at
  the sums and means over its channels (a constant there cannot be folded: the rewrite sums the survivors).
  A reshape, ``flatten``, ``view``, ``permute`` or ``transpose`` between the norm and the consumer only moves
  the channel's values around; a constant channel stays constant along the other dims, and the
  analysis' layouts say which input features of the consumer carry it (after ``flatten`` of
  ``N×C×H×W``: features ``[c·H·W, (c+1)·H·W)``).  A norm over the same space in between is no
  fold target: the channel vanishes there too.  Constants are measured at each consumer's input.
  A function call (``F.linear(x, w, b)``, as timm's ``Linear`` subclass makes, or ``F.conv2d``) is
  measured like a module call (keyed ``"node <fx node name>"``).
* **When a consumer absorbs it exactly.**  A linear layer adds ``W[:, p]·v`` at every row; a recurrent layer
  ``W_ih[:, p]·v`` to its gates at every step (each direction's ``bias_ih_l0`` holds it).  A
  conv (any kernel, stride, dilation, groups) whose input channel ``c`` is ``v`` everywhere adds
  ``Σ_k W[o, c mod cin/g, k]·v`` to every output ``o`` of ``c``'s group, at every position, *if
  every tap reads the input*: no zero padding (``padding=0`` / ``"valid"``, or a reflect /
  replicate / circular ``padding_mode``, which pad a constant with itself).  Zero padding makes the
  output differ near the borders: no bias can absorb that, nor can a transposed conv's.
* **Only while it is a constant.**  A dead channel's value can vary anyway: a squeeze-excitation
  gate multiplies it per example (EfficientNet), or a per-channel gate with its own live norm.
  Constants, and whether they vary, are measured on the model the rewrite assumes: γ = 0 where the
  plan removes a channel that the norm's own mask marks dead (a live gate norm keeps its γ), weight
  rows at 0 for a mask keyed by a conv or linear, γ = 0 at every norm of a live channel only the
  budget removes. A feature varies where it differs on the example *or* depends on the inputs at all
  (``_input_dependent``: a run on NaN inputs in which norms and gates with γ = 0, and conv/linear modules with
  an all-zero row, emit their constants, and an exact 0 absorbs (``plan/taint``); a model that cannot run
  on NaN warns and the example decides alone): a gate saturated on every example (a hard sigmoid at 1 or 0)
  cannot make it look constant; *or* depends on the input size (``_size_dependent``: a run on the example
  resized in one group of its dims at a time, as ``nrfx.capture.fixed_sizes`` probes): a sum over positions
  (``y.sum((2, 3))`` before a linear), padding to a multiple.  A small γ that is not zero thus folds f(β), and the
  rest stays the paper's approximation, not reported; an input that varies there cannot be folded.
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
  convs): the rewritten layer gets a bias holding the shift (``out`` parameters more; a params
  budget pays for them: ``plan_rejuvenation`` plans the widths with them set aside, and
  ``cost_after`` counts them).  A function call's shift goes into the bias parameter ``b`` it reads,
  when no other node reads ``b``; without one (or with a shared one) its constants cannot be folded.

Constants are measured once on the example inputs (eval mode, on the traced original) when the
plan is made, and stored in it, so a replay folds the same values.  A constant that cannot be
folded exactly is dropped with a warning giving the measured change of the output (the paper's
behaviour, ``constants="drop"``; the change is measured once, on the example inputs, by running
the original with those inputs read as 0), or its channel is kept alive (``constants="keep"``,
exact).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from nrfx.analysis.records import SumRecord
from nrfx.capture.contexts import regions_restored
from nrfx.capture.fixed_sizes import by_input, resized_inputs, size_groups, sizes_unchecked
from nrfx.capture.front_ends import Example
from nrfx.capture.guards import hooks_silenced, in_eval_mode, untouched
from nrfx.errors import NrfxWarning
from nrfx.layers.gates import Gate
from nrfx.ops.layer_kinds import constant_input_problem, conv_padding_problem, in_columns, is_scale
from nrfx.plan.maps import dim_map
from nrfx.plan.taint import NanTaint, integer_inputs, poisoned

__all__ = ["NODE_PREFIX", "Constants", "consumer_records", "record_of", "fold_candidates", "measure_constants",
           "measure_folds", "probe_constants", "split_folds", "unfoldable_channels"]

NODE_PREFIX = "node "  # consumer keys of functional calls (F.linear, F.conv2d): "node <fx node name>"


def _why_not(gm: torch.fx.GraphModule, analysis, name: str) -> str | None:
    """Why a consumer's constants cannot be folded exactly (None: they can)."""
    if name.startswith(NODE_PREFIX):
        record = record_of(analysis, name)
        if isinstance(record, SumRecord):
            return "a sum or mean over channels: the rewrite sums the survivors, nothing there takes a constant"
        return _call_problem(gm, record, name[len(NODE_PREFIX):])
    return constant_input_problem(gm.get_submodule(name))


def _call_problem(gm: torch.fx.GraphModule, record, node_name: str) -> str | None:
    """Rule: a function call (``F.linear``, ``F.conv2d``) folds into the bias parameter it reads when nothing else
    reads that parameter and, for a conv, every tap reads the input (no padding)."""
    node = next((n for n in gm.graph.nodes if n.name == node_name), None)
    if node is None or record is None or record.weight is None or record.bias is None:
        return "a functional call without a bias parameter: nrfx adds no bias to a function call"
    readers = _parameter_readers(gm, record.bias)
    if readers != [node]:
        return f"a functional call whose bias {record.bias} is read elsewhere too"
    if record.kind != "conv":
        return None
    return conv_padding_problem(node.kwargs.get("padding", node.args[4] if len(node.args) > 4 else 0),
                                record.transposed)


def _parameter_readers(gm: torch.fx.GraphModule, path: str) -> list[Any]:
    """The nodes that read a parameter: users of its ``get_attr`` nodes, and calls of a module holding it."""
    readers = [user for n in gm.graph.nodes if n.op == "get_attr" and n.target == path for user in n.users]
    owners = [n for n in gm.graph.nodes if n.op == "call_module" and path.startswith(f"{n.target}.")]
    return readers + owners


# -- measuring constants -------------------------------------------------------------------------------------------


@dataclass
class Constants:
    """Per consumer module, in the model the rewrite assumes (``_assumed_params``): min and max of every input
    feature over the example (rows, positions, calls) and which features vary."""

    low: dict[str, torch.Tensor]
    high: dict[str, torch.Tensor]
    varying: dict[str, torch.Tensor] = field(default_factory=dict)

    def values(self, name: str, positions: torch.Tensor) -> dict[int, float]:
        """The given features that hold one non-zero value everywhere: position -> value."""
        if name not in self.low:
            return {}
        low, high = self.low[name][positions], self.high[name][positions]
        keep = (low == high) & (low != 0)
        if name in self.varying:  # one value on the example, but the inputs decide it
            keep &= ~self.varying[name][positions]
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


def _run(gm: torch.fx.GraphModule, example, hooks: dict, params: dict | None = None,
         after: dict | None = None) -> list[torch.Tensor]:
    """Run the graph in eval mode, no grad, with forward pre-hooks (``after``: forward hooks, by module name) and
    optionally other parameters (functional: the model's own are not touched), leaving no trace; the float output
    leaves."""
    taps = {n[len(NODE_PREFIX):]: h for n, h in hooks.items() if n.startswith(NODE_PREFIX)}
    with regions_restored(), hooks_silenced(gm), _node_taps(gm, taps):
        for name, hook in hooks.items():  # the user's own hooks do not fire; ours go with the swapped-in hook dicts
            if not name.startswith(NODE_PREFIX):
                gm.get_submodule(name).register_forward_pre_hook(hook)
        for name, hook in (after or {}).items():
            gm.get_submodule(name).register_forward_hook(hook)
        with torch.no_grad(), untouched(gm), in_eval_mode(gm):  # the user's modules: each flag put back
            out = example.call(gm) if not params else \
                torch.func.functional_call(gm, params, example.args, example.kwargs, strict=False)
    return [t.detach() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


@contextlib.contextmanager
def _node_taps(gm: torch.fx.GraphModule, hooks: dict[str, Any]) -> Iterator[None]:
    """Forward pre-hooks on function and method calls (by fx node name): each node's target wrapped while the block
    runs, the graph put back after."""
    nodes = [node for node in gm.graph.nodes if node.name in hooks and node.op in ("call_function", "call_method")]
    if not nodes:
        yield
        return
    calls = {node: (node.op, node.target) for node in nodes}
    for node in nodes:  # a method call is tapped as the function torch.Tensor.<method>, the tensor first
        function = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target)
        node.op, node.target = "call_function", _tapped(function, hooks[node.name])
    gm.recompile()
    try:
        yield
    finally:
        for node, (op, target) in calls.items():
            node.op, node.target = op, target
        gm.recompile()


def _tapped(function: Any, hook: Any) -> Any:
    """``function`` with a forward pre-hook (``hook(None, args)`` may return new args)."""

    def tapped(*args: Any, **kwargs: Any) -> Any:
        changed = hook(None, args)
        return function(*(args if changed is None else changed), **kwargs)

    tapped.__name__ = f"nrfx_tapped_{getattr(function, '__name__', 'call')}"
    return tapped


def _min_max(gm: torch.fx.GraphModule, dims: dict[str, int], example, params: dict | None = None) -> Constants:
    """Min and max of every input feature of the consumers (name -> input dim) on the example inputs (one run)."""
    stats = Constants({}, {})

    def hook(name):
        return lambda _m, args: _record(stats, name, dims[name], args[0]) if args else None

    _run(gm, example, {n: hook(n) for n in dims}, params)
    return stats


def _per_entry(flags: torch.Tensor, entries: int) -> torch.Tensor:
    """Per-channel flags spread over a parameter's entries (``entries // len(flags)`` per channel)."""
    return flags.repeat_interleave(entries // len(flags)) if len(flags) else flags


def _site_dead(masks: dict[str, torch.Tensor], name: str, entries: int) -> torch.Tensor:
    """Per entry of a mask site's parameter: does the site's own mask mark it dead?  (A site the masks leave out
    is alive.)"""
    mask = masks.get(name)
    if mask is None:
        return torch.zeros(entries, dtype=torch.bool)
    dead = ~torch.as_tensor(mask).to(torch.bool).flatten().cpu()
    return _per_entry(dead, entries) if dead.numel() and entries % dead.numel() == 0 else \
        torch.zeros(entries, dtype=torch.bool)


def _live_channels(analysis, masks: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Live channels per space under the masks the plan was made with (checked, and warned about, back then)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NrfxWarning)
        return list(analysis.alive(masks))


def _assumed_scales(gm: torch.fx.GraphModule, analysis, plan, masks) -> dict[str, torch.Tensor]:
    """Rule: a norm's (or gate's) γ is 0 on a channel the plan removes where the norm's own mask marks it dead
    (a small γ counts as 0: the paper's approximation), or where the channel is live and only the budget removes it.
    A norm whose γ is alive there keeps it (a gate on a channel that another factor kills still varies).
    ``masks=None`` (a replayed plan without its masks): γ is 0 on every removed channel."""
    live = _live_channels(analysis, masks) if masks is not None else None
    scales: dict[str, torch.Tensor] = {}
    for name, norm, segments in analysis.norm_spaces(gm):
        weight = scales.get(f"{name}.weight", norm.weight.detach()).clone()
        dead = _site_dead(masks, name, weight.numel()) if masks is not None else None
        for s, entries in segments:
            removed = torch.ones(analysis.spaces[s].width, dtype=torch.bool)
            removed[plan.keep[s]] = False
            size = entries.stop - entries.start
            zero = _per_entry(removed, size)
            if dead is not None:
                zero &= _per_entry(live[s], size) | dead[entries]
            weight[entries][zero.to(weight.device)] = 0
        scales[f"{name}.weight"] = weight
    return scales


def _assumed_rows(gm: torch.fx.GraphModule, analysis, plan, masks) -> dict[str, torch.Tensor]:
    """Rule: a conv's or linear's weight row is 0 where its own mask (a user mask keyed by the layer) marks the
    output dead and the plan removes it; its bias, if any, is what the channel then carries."""
    rows: dict[str, torch.Tensor] = {}
    for _, record in analysis.layers("conv", "linear"):
        name = record.module
        if masks is None or name not in masks or record.output is None or record.transposed:
            continue
        weight = rows.get(f"{name}.weight", gm.get_submodule(name).weight.detach()).clone()
        zero = torch.zeros(weight.shape[0], dtype=torch.bool)
        zero[_removed(analysis, plan, record.output)] = True
        zero &= _site_dead(masks, name, weight.shape[0])
        weight[zero.to(weight.device)] = 0
        rows[f"{name}.weight"] = weight
    return rows


def _assumed_params(gm: torch.fx.GraphModule, analysis, plan, masks) -> dict[str, torch.Tensor]:
    """The parameters of the model the rewrite assumes: the original with its removed dead channels' scales (and
    rows of layers keyed by a mask) at 0.  Constants are measured on it, so a dead channel with a small γ and a
    shift β ≠ 0 folds f(β)."""
    return {**_assumed_rows(gm, analysis, plan, masks), **_assumed_scales(gm, analysis, plan, masks)}


def _measure(gm: torch.fx.GraphModule, analysis, names, example, params: dict[str, torch.Tensor]) -> Constants:
    """Min/max of the named consumers' input features in the assumed model (``params``) and which of them vary
    there: differ on the example, depend on the inputs (``_input_dependent``: a gate that happens to saturate
    on the example still varies) or on their size (``_size_dependent``: a sum over positions).  Eval runs; the
    model's own parameters are not touched."""
    dims = {name: dim for name, dim in _input_dims(analysis).items() if name in names}
    stats = _min_max(gm, dims, example, params)
    tainted = _input_dependent(gm, analysis, dims, example, params)
    resized = _size_dependent(gm, dims, example, params, stats)
    stats.varying = {n: (stats.low[n] != stats.high[n]) | tainted.get(n, False) | resized.get(n, False)
                     for n in stats.low}
    return stats


def _size_dependent(gm: torch.fx.GraphModule, dims: dict[str, int], example, params: dict[str, torch.Tensor],
                    stats: Constants) -> dict[str, torch.Tensor]:
    """Rule: a consumer's input feature depends on the input size where it takes other values when one group of
    the input dims (one example size: an image's height and width, a sequence) is resized, to half plus one (cheap)
    or else to 1.5 times plus one (``nrfx.capture.fixed_sizes``; the graph's own size asserts pass, the in-place
    result runs the model's forward at any size): a sum over positions, padding to a multiple.  A group the graph runs
    at neither size (an image's channels) tells nothing and is skipped; one spanning several inputs that merely share
    a size is measured input by input."""
    moved: dict[str, torch.Tensor] = {}
    leaves = example.flat()
    for size, group in size_groups(leaves).items():
        measured = [_resized_stats(gm, dims, example, params, group, size)]
        if measured[0] is None and len(by_input(group)) > 1:  # inputs that merely share a size: each on its own
            measured = [_resized_stats(gm, dims, example, params, part, size) for part in by_input(group)]
        for other in (m for m in measured if m is not None):
            for name in stats.low.keys() & other.low.keys():
                differs = _differs(other.low[name], stats.low[name]) | _differs(other.high[name], stats.high[name])
                moved[name] = moved[name] | differs if name in moved else differs
    return moved


def _resized_stats(gm: torch.fx.GraphModule, dims: dict[str, int], example, params: dict[str, torch.Tensor],
                   group: list, size: int) -> Constants | None:
    """``_min_max`` on the example with ``group`` resized to the first probe size the graph runs at (its own size
    asserts passing: ``sizes_unchecked``), None where it runs at neither."""
    for _, *resized in resized_inputs(example.args, example.kwargs, group, size):
        try:
            with sizes_unchecked(), contextlib.redirect_stderr(io.StringIO()):  # fx prints a failing graph's code
                return _min_max(gm, dims, Example(*resized), params)
        except Exception:  # the model takes no input of this size
            continue
    return None


_SAME_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}  # else 1e-2: a mean over 16 or 36 copies of v rounds


def _differs(other: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """Per feature, whether two measurements differ by more than rounding (relative, the dtype's tolerance)."""
    rtol = _SAME_TOLERANCE.get(example.dtype, 1e-2)
    return ~torch.isclose(other, example, rtol=rtol, atol=rtol * float(example.abs().max().clamp_min(1e-30)))


# -- which features depend on the inputs (the taint run) ------------------------------------------------------------


def _input_dependent(gm: torch.fx.GraphModule, analysis, dims: dict[str, int], example,
                     params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rule: a consumer's input feature depends on the inputs where a run on NaN inputs (``plan/taint``)
    brings it a NaN; a layer whose output channel ignores its input (γ = 0, an all-zero weight row: the constants
    folds are about) emits its constant there instead of NaN.  Per consumer, one flag per feature; empty where
    the run fails (the example's own variation then decides alone)."""
    found: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                flat = _features(args[0], dims[name])
                if flat.numel():
                    nan = torch.isnan(flat).any(0).cpu()
                    found[name] = found[name] | nan if name in found else nan
        return record

    try:
        with NanTaint(integer_inputs(nan_example := poisoned(example))):
            _run(gm, nan_example, {n: hook(n) for n in dims}, params, _constant_emitters(gm, analysis, params))
    except Exception as error:  # a model that cannot run on NaN inputs: the example decides alone, said so
        warnings.warn(f"fold: the run on NaN inputs that tells which removed inputs depend on the inputs failed "
                      f"({type(error).__name__}: {error}); whether a removed constant varies is judged on the example "
                      "inputs alone (a gate that saturates on every example would hide it)", NrfxWarning, stacklevel=2)
        return {}
    return found


def _constant_emitters(gm: torch.fx.GraphModule, analysis, params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Forward hooks, by module name, putting back the constant a layer emits on the output channels that ignore
    its input in the assumed model (a norm's or gate's γ = 0; a conv's or linear's all-zero weight row)."""
    hooks = {}
    for name, dim in _emitter_dims(gm, analysis).items():
        weight = params.get(f"{name}.weight", getattr(gm.get_submodule(name), "weight", None))
        if not isinstance(weight, torch.Tensor) or weight.is_meta or not weight.numel():
            continue
        silent = (weight.detach().reshape(weight.shape[0], -1) == 0).all(1)
        if silent.any():
            hooks[name] = _emitting(silent, dim)
    return hooks


def _emitter_dims(gm: torch.fx.GraphModule, analysis) -> dict[str, int]:
    """Per layer that can ignore an input channel: the output dim carrying its channels (γ's, a weight's rows)."""
    dims: dict[str, int] = {}
    for _, record in analysis.layers("conv", "linear"):
        if record.module is not None and not record.transposed:
            dims[record.module] = 1 if record.kind == "conv" else -1
    specs = {node.target: analysis.state.specs.get(node) for node in gm.graph.nodes if node.op == "call_module"}
    for name, module, _ in analysis.norm_spaces(gm):
        zero = getattr(specs.get(name), "zero", ())  # an in-place op after the norm leaves its spec instead
        found = [d for d, rule in enumerate(zero) if rule is not None and rule.mask == name]
        dim = found[0] if len(found) == 1 else _scale_dim(module)
        if dim is not None:
            dims[name] = dim
    return dims


def _scale_dim(module: nn.Module) -> int | None:
    """The output dim a norm's or gate's γ scales, by its type (None: unknown)."""
    if isinstance(module, Gate):
        return module.dim
    return 1 if isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)) else None


def _emitting(silent: torch.Tensor, dim: int) -> Any:
    """A forward hook: where ``silent`` (per channel of output dim ``dim``), the layer's output on zero inputs."""
    def hook(module, args, out):
        if not isinstance(out, torch.Tensor) or out.shape[dim] != silent.numel():
            return None
        quiet = tuple(torch.zeros_like(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                      for a in args)
        shape = [1] * out.dim()
        shape[dim] = -1
        return torch.where(silent.to(out.device).view(shape), module.forward(*quiet), out)
    return hook


def measure_constants(gm: torch.fx.GraphModule, analysis, plan, names, example,
                      masks: dict[str, torch.Tensor] | None = None) -> Constants:
    """Min/max of the named consumers' input features on the example inputs, and which vary, in the model the
    rewrite assumes (``_assumed_params`` under the masks the plan was made with)."""
    return _measure(gm, analysis, names, example, _assumed_params(gm, analysis, plan, masks))


def _output_change(gm: torch.fx.GraphModule, analysis, example, dropped: dict[str, list[int]]) -> float:
    """Relative change of the original's output (L2 over every float output) when the dropped constant inputs read 0
    (two eval runs)."""
    reference = _run(gm, example, {})
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


def consumer_records(analysis) -> list[tuple[str, Any]]:
    """(key, layer record) of every call reading a channel space through a weight (conv, linear, a registered
    layer with their rules): a module call keyed by the module's name, a functional one (``F.linear(x, w)``) by
    ``"node <name>"``; ``input_dim`` says which input dim carries the space."""
    return [(record.module if record.module is not None else NODE_PREFIX + node, record)
            for node, record in analysis.layers("conv", "linear", "recurrent")
            if (record.module is not None or record.weight is not None) and record.input is not None
            and record.input_dim is not None]


def _sum_readers(analysis) -> list[tuple[str, SumRecord]]:
    """(``"node <name>"``, record) of every sum or mean over a channel dim: it reads removed channels too (the
    rewrite sums the survivors only), and nothing there takes a constant."""
    return [(NODE_PREFIX + name, record) for name, record in analysis.records.items() if isinstance(record, SumRecord)]


def _consumers(analysis) -> list[tuple[str, object]]:
    """(key, input layout) of every consumer call and every sum over channels."""
    return [*((key, record.input) for key, record in consumer_records(analysis)),
            *((key, record.layout) for key, record in _sum_readers(analysis))]


def _input_dims(analysis) -> dict[str, int]:
    """Per consumer (and sum over channels): the dim of its input that carries its channels (a layer's from the
    end)."""
    return {**{key: record.input_dim for key, record in consumer_records(analysis)},
            **{key: record.dim for key, record in _sum_readers(analysis)}}


def _reaching_survivors(gm: torch.fx.GraphModule, analysis, plan, name: str, removed: torch.Tensor) -> torch.Tensor:
    """The removed inputs that feed a surviving output of the layer (only those change what the rewrite computes).

    A grouped conv's input c feeds only c's group; when that group's outputs are removed too
    (a depthwise conv keeps a channel's space), the constant is gone with them, and what the
    removed outputs carry is measured at the next layer.
    """
    record = record_of(analysis, name)
    if getattr(record, "output", None) is None:  # no record, no output space, or a sum (it reads every channel)
        return removed
    kept = torch.ones(analysis.atoms.channels(record.output) * record.output.inner, dtype=torch.bool)
    kept[_removed(analysis, plan, record.output)] = False
    groups, per_group = _input_groups(gm, analysis, name, record)
    if not kept.any() or groups == 1:
        return removed if kept.any() else removed[:0]
    reaches = kept.reshape(groups, -1).any(1)  # per group: does an output of it survive?
    return removed[reaches[removed // per_group]]


def _input_groups(gm: torch.fx.GraphModule, analysis, name: str, record) -> tuple[int, int]:
    """(groups, input channels per group) of a consumer: a module's own, or a function call's from its record and
    its weight's shape (one group when the weight is unknown: every removed input then counts)."""
    if record.module is not None:
        module = gm.get_submodule(name)
        return getattr(module, "groups", 1), module.weight.shape[1]
    info = analysis.param_info.get(record.weight)
    return (record.groups, info.shape[1]) if info is not None and len(info.shape) > 1 else (1, 1)


def record_of(analysis, name: str):
    """The layer record of a consumer (a module's: its last call when it is called more than once)."""
    if name.startswith(NODE_PREFIX):
        return analysis.records.get(name[len(NODE_PREFIX):])
    found = None
    for key, record in consumer_records(analysis):
        if key == name:
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


def fold_candidates(gm: torch.fx.GraphModule, analysis, plan) -> list[str]:
    """The modules a fold may write to: those with removed input features that reach a surviving output."""
    return [name for name in _candidates(gm, analysis, plan) if not name.startswith(NODE_PREFIX)]


def _may_emit_constants(gm: torch.fx.GraphModule, analysis, params: dict[str, torch.Tensor]) -> bool:
    """Whether some channel's producer ignores its input in the assumed model (``params`` over the model's own): a
    norm with γ = 0 and β ≠ 0, or a conv/linear (by its layer record) with an all-zero weight row and a bias.
    Without one no constant exists."""
    rows_out = {r.module for _, r in analysis.layers("conv", "linear") if r.module is not None and not r.transposed}
    for name, module in gm.named_modules():
        weight, bias = params.get(f"{name}.weight", getattr(module, "weight", None)), getattr(module, "bias", None)
        if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor) or weight.is_meta:
            continue
        if is_scale(module) and bool(((weight == 0) & (bias != 0)).any()):
            return True
        if (name in rows_out or in_columns(module)) and weight.dim() >= 2:  # its rows are its outputs
            rows = weight.detach().reshape(weight.shape[0], -1)
            if bool(((rows == 0).all(1) & (bias.detach() != 0)).any()):
                return True
    return False


def probe_constants(analysis, plan, masks: dict[str, torch.Tensor] | None = None) -> Constants | None:
    """``measure_constants`` at every conv/linear consumer, in the model ``plan`` and ``masks`` assume (None: no
    constant exists)."""
    gm = analysis.gm
    params = _assumed_params(gm, analysis, plan, masks)
    if not _may_emit_constants(gm, analysis, params):
        return None
    return _measure(gm, analysis, [name for name, _ in _consumers(analysis)], analysis.example, params)


_VARIES = ("its input varies though the channel is dead (a gate multiplies it, zero padding before this layer, or "
           "it follows the input size: a sum over positions)")


def split_folds(gm: torch.fx.GraphModule, analysis, plan, constants: Constants) -> tuple[dict, dict]:
    """Removed inputs per consumer that reach a survivor and are not zero, split: ({name: {position: v}} folded,
    {name: (positions, why)} not foldable exactly: a constant the layer cannot absorb, or a varying input)."""
    folds, unfoldable = {}, {}
    for name, removed in _candidates(gm, analysis, plan).items():
        values, varying = constants.values(name, removed), constants.varies(name, removed)
        why = _why_not(gm, analysis, name) if values else None
        if values and why is None:
            folds[name] = {str(k): v for k, v in values.items()}
        bad = sorted({*varying, *(values if why else ())})
        if bad:
            unfoldable[name] = (bad, "; ".join(r for r in (why, _VARIES if varying else None) if r))
    return folds, unfoldable


def measure_folds(gm: torch.fx.GraphModule, analysis, plan, example,
                  masks: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, dict], list[str]]:
    """Per foldable consumer {position: constant} of its removed constant inputs; notes (and an ``NrfxWarning``
    with the measured output change) for the removed inputs no consumer can absorb exactly, which are dropped.
    ``masks``: those the plan was made with (None: every removed channel is taken as dead at every norm)."""
    candidates = _candidates(gm, analysis, plan)
    if not candidates:
        return {}, []
    params = _assumed_params(gm, analysis, plan, masks)
    if not _may_emit_constants(gm, analysis, params):
        return {}, []
    constants = _measure(gm, analysis, candidates, example, params)
    folds, unfoldable = split_folds(gm, analysis, plan, constants)
    if not unfoldable:
        return folds, []
    change = _output_change(gm, analysis, example, {n: p for n, (p, _) in unfoldable.items()})
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
