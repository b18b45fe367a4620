"""Capture front ends: one FX graph over the user's own modules, from fx tracing or torch.export.

``"fx"``: symbolic tracing with nrfx's leaf policy (``nrfx.capture.trace``).  ``"export"``:
``torch.export.export(strict=False)`` with the batch dim of every input dynamic, then two passes
make the aten graph look like a traced one: every run of aten nodes that one call of a leaf
module produced (a module the analysis has a rule for, called on one tensor) is *raised* back
into a ``call_module`` of the user's own module object (so BatchNorm and dropout follow
``.train()``/``.eval()``, the parameter names are the user's, and the rewrite resizes the
module as after fx), and the remaining aten ops are written as the torch-level calls of the op
table (``nrfx.capture.aten``).  ``"auto"``: fx; torch.export when the root cannot be traced, automatic
leaves and leaves no rule reads hold more than half of the parameters, or the fx graph does not compute what
the model does.
Every graph is checked before it is accepted: one real forward of it must match the model's on the
example inputs (``_verify``), and literal batch sizes in views are taken from the input where that is
provably right, or reported (``check_batch_literals``).  The model is never modified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import logging
import math
import operator
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from nrfx.capture.aten import to_torch_level
from nrfx.capture.caches import register_cache_pytrees
from nrfx.capture.contexts import inline_context_regions, regions_restored
from nrfx.capture.fixed_sizes import GUARD, by_input, fixed_dims, guard_sizes, resized_inputs
from nrfx.capture.guards import hooks_silenced, in_eval_mode, in_mode, untouched
from nrfx.capture.mha import heads_exposed, keep_opened_modules
from nrfx.capture.modes import follow_the_flag, node_keys
from nrfx.capture.positional import positional_calls
from nrfx.capture.shapeprop import probe_shapes, propagate_shapes
from nrfx.capture.trace import Traced, defaulted_args, trace
from nrfx.errors import ShapeError, TraceError, node_location

__all__ = ["Example", "Captured", "CAPTURES", "CaptureMismatch", "capture", "auto_leaf_share", "check_batch_literals",
           "guard_batch", "MODE_BRANCH", "output_signature"]

CAPTURES = ("auto", "fx", "export")  # one graph of the whole model; analyze also takes "islands"
AUTO_LEAF_LIMIT = 0.5  # "auto" leaves fx for export when automatic leaves hold more of the parameters


@dataclass(frozen=True)
class Example:
    """Example inputs as the model's forward takes them: positional args (any nest) and keyword args."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    def flat(self) -> tuple:
        """The leaves in the order of a captured graph's placeholders."""
        return tuple(pytree.tree_leaves((self.args, self.kwargs)))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor leaf."""
        return tuple(x for x in self.flat() if isinstance(x, torch.Tensor))

    def call(self, module: nn.Module) -> Any:
        """``module(*args, **kwargs)``."""
        return module(*self.args, **self.kwargs)

    @property
    def batch(self) -> int:
        """The example batch size: dim 0 of the first tensor that has dims (1 when none has)."""
        return next((int(x.shape[0]) for x in self.tensors() if x.dim() > 0), 1)

    @property
    def plain(self) -> bool:
        """Positional tensors only: what fx symbolic tracing takes."""
        return not self.kwargs and all(isinstance(x, torch.Tensor) for x in self.args)


@dataclass
class Captured(Traced):
    """A captured model: the graph module over the user's modules, how it was captured, and why."""

    method: str = "fx"
    notes: list[str] = field(default_factory=list)
    aten_left: dict[str, int] = field(default_factory=dict)
    values: dict[torch.fx.Node, Any] = field(default_factory=dict)  # every node's value on meta tensors


@dataclass(frozen=True)
class _ShapeFailure:
    """An fx graph that matched the model but failed on meta tensors: 'auto' tries export, and raises this if that
    fails too."""

    error: ShapeError


def auto_leaf_share(model: nn.Module, auto_leaves: Iterable[str]) -> float:
    """Share of the model's parameters inside automatic leaves."""
    total = sum(p.numel() for p in model.parameters())
    inside = {id(p): p.numel() for name in auto_leaves for p in model.get_submodule(name).parameters()}
    return sum(inside.values()) / total if total else 0.0


def opaque_leaves(gm: torch.fx.GraphModule, model: nn.Module, raisable: Callable[[nn.Module], bool],
                  leaf_modules: Iterable[type | str] = ()) -> list[str]:
    """Rule: a module with parameters that fx left as a leaf and no rule reads (timm's no-trace modules, a torch.nn
    module without a rule) is as opaque as an automatic leaf, so its parameters count toward ``AUTO_LEAF_LIMIT``;
    the user's own ``leaf_modules`` do not (asked for)."""
    declared = tuple(t for t in leaf_modules if isinstance(t, type))
    names = {n for n in leaf_modules if isinstance(n, str)}
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in names:
            continue
        module = model.get_submodule(node.target)
        if not raisable(module) and not isinstance(module, declared) and next(module.parameters(), None) is not None:
            found.append(node.target)
    return found


def capture(model: nn.Module, example: Example, method: str = "auto", *, leaf_modules: Iterable[type | str] = (),
            concrete_args: dict[str, Any] | None = None, autowrap_functions: Sequence[Callable] = (),
            raisable: Callable[[nn.Module], bool] | None = None) -> Captured:
    """The model as one FX graph, by ``method`` ('auto', 'fx' or 'export'); see the module docstring.

    A graph is accepted only when one real forward of it matches the model's on the example inputs
    (``_verify``) and it runs on meta tensors (``values``); its literal batch sizes are then checked
    (``check_batch_literals``).  The fallback policy of 'auto' is here, whole: fx first; torch.export
    when fx cannot trace the root, the inputs are not plain tensors, automatic leaves (and, given ``raisable``:
    which modules the analysis has a rule for, the leaves no rule reads: ``opaque_leaves``) hold too much, or
    the fx graph differs from the model or fails on meta tensors (that failure stands when export
    fails too: it names the node).  ``nrfx.analyze`` goes on to islands when this raises a TraceError.
    """
    if method not in CAPTURES:
        raise TraceError(f"capture must be one of {CAPTURES}, got {method!r}")
    knows_rules = raisable is not None  # without the analysis' rules no leaf counts as opaque
    raisable = raisable or (lambda m: False)
    reference = _Reference(model, example)
    if method == "export":
        return _checked_export(model, example, raisable, reference)
    if method == "fx" and not example.plain:
        raise TraceError("capture='fx' takes positional tensor inputs only; nested or keyword inputs need "
                         "capture='export' (or 'auto')")
    why, detail = "the inputs are not plain positional tensors", ""
    if example.plain:
        try:
            captured = _fx_capture(model, example, leaf_modules, concrete_args, autowrap_functions, raisable)
        except TraceError as error:
            if method == "fx":
                raise
            why, detail = "fx could not trace the root", f"\n{error}"
        else:
            opaque = opaque_leaves(captured.gm, model, raisable, leaf_modules) if knows_rules else []
            share = auto_leaf_share(model, {*captured.auto_leaves, *opaque})
            why = f"automatic fx leaves{' and modules without a rule' if opaque else ''} hold {share:.0%} of the " \
                  "parameters"
            if method == "fx" or share <= AUTO_LEAF_LIMIT:
                options = (leaf_modules, concrete_args, autowrap_functions, raisable)
                retrace = lambda: _fx_capture(model, example, *options).gm  # noqa: E731
                accepted = _accepted_fx(captured, model, example, reference, method, retrace)
                if isinstance(accepted, Captured):
                    return accepted
                why = accepted
    return _export_after(model, example, raisable, why, detail, reference)


def _with_values(captured: Captured, example: Example) -> Captured:
    """The capture with every node's value on meta tensors (a ShapeError when the graph does not run); calls pass
    their tensors positionally first (``positional_calls``)."""
    positional_calls(captured.gm)
    captured.values = propagate_shapes(captured.gm, example.flat(), captured.auto_leaves)
    return captured


def _accepted_fx(captured: Captured, model: nn.Module, example: Example, reference: _Reference,
                 method: str, retrace: Callable[[], torch.fx.GraphModule]) -> Captured | _ShapeFailure | str:
    """The fx capture when one real forward of its graph matches the model's (in the model's own mode; in the
    other mode a mismatch is noted, ``_note_mode_branches``).

    Otherwise: with ``method`` 'fx' a ``CaptureMismatch``; with 'auto' why capture moves on to export.
    """
    why = _verify(captured, reference, training=None)
    if why is None:
        _note_mode_branches(captured, reference, retrace)
        accepted = check_batch_literals(captured, example)
        try:
            return _with_values(accepted, example)
        except ShapeError as error:
            if method == "fx":
                raise
            return _ShapeFailure(error)
    if method == "fx":
        raise CaptureMismatch(f"the fx graph of {type(model).__name__} does not compute what the model computes on the "
                              f"example inputs: {why}.\n  fx runs the Python code once on proxies, so a branch taken "
                              "or a value read at trace time can differ from the real run. Pass capture='export' "
                              "(torch.export records what really runs), or capture='auto' to fall back to it.")
    return f"the fx graph differs from the model on the example inputs ({why})"


_MODES = {True: "train", False: "eval"}
MODE_BRANCH = "differs from the model in"  # analyze warns on the capture note that says so


def _note_mode_branches(captured: Captured, reference: _Reference, retrace: Callable[[], torch.fx.GraphModule]) -> None:
    """Rule: an fx graph that matches the model in its own mode is traced again in the other mode, and nothing
    runs when that settles it: the same graph; or the same calls differing only in literals, which were read from
    ``self.training`` and now follow the calling module's flag (``nrfx.capture.modes``).  Otherwise (a Python
    branch on ``self.training``) the graph runs once in that mode against the model, and where they differ a note
    names the first node where the traces part and the ways out (``analyze`` warns)."""
    training = not any(m.training for m in reference.model.modules())  # the other mode
    other = _retraced(reference.model, retrace, training)
    mine = list(captured.gm.graph.nodes)
    theirs = list(other.graph.nodes) if other is not None else None
    keys = (node_keys(mine), node_keys(theirs)) if theirs is not None else None
    if keys is not None and keys[0] == keys[1]:
        return
    mended = follow_the_flag(captured.gm, other, training) if other is not None else []
    if mended:
        captured.notes.append(f"capture: {len(mended)} call(s) given a value read from self.training at trace time now "
                              "read the calling module's flag when the graph runs: " +
                              ", ".join(node_location(n) for n in mended[:3]))
        return
    why = _verify(captured, reference, training=training)
    if why is None:
        return
    where = _first_difference(mine, theirs, keys, training) if keys is not None else ""
    own, then = _MODES[not training], _MODES[training]
    captured.notes.append(
        f"capture: traced in {own} mode, the graph {MODE_BRANCH} {then} mode on the example inputs ({why}){where}. "
        f"A Python branch on self.training was fixed when fx traced the model: the analysis and the rewritten model "
        f"run the {own}-mode code in both modes. Analyse the model in the mode you will run the result in (the "
        "driver analyses in train mode), or make the module that branches a leaf (leaf_modules=[...]: it runs its "
        "own forward, branch included; its channels freeze)")


def _retraced(model: nn.Module, retrace: Callable[[], torch.fx.GraphModule],
              training: bool) -> torch.fx.GraphModule | None:
    """The model traced again with every module in train (or eval) mode; None when that trace fails."""
    try:
        with in_mode(model, training):
            return retrace()
    except TraceError:
        return None


def _first_difference(mine: list[torch.fx.Node], theirs: list[torch.fx.Node], keys: tuple[list, list],
                      training: bool) -> str:
    """Where the other mode's trace first differs from the graph (``keys``: both lists' ``node_keys``), as ``; the
    traces first differ at …``."""
    index = next((i for i, (a, b) in enumerate(zip(*keys, strict=False)) if a != b), min(len(mine), len(theirs)))
    found = [f"{node_location(nodes[index])} in {_MODES[flag]} mode" for nodes, flag in
             ((theirs, training), (mine, not training)) if index < len(nodes)]
    return "; the traces first differ at " + " against ".join(found)


def _export_after(model: nn.Module, example: Example, raisable, why: str | _ShapeFailure, detail: str,
                  reference: _Reference) -> Captured:
    """torch.export because fx fell short (``why``); both errors in the message when export fails too (after an fx
    graph that failed on meta tensors, that failure: it names the node, most often the inputs do not fit)."""
    if isinstance(why, _ShapeFailure):
        failure, why = why.error, f"the fx graph failed on the example inputs ({str(why.error).splitlines()[0]})"
    else:
        failure = None
    try:
        captured = _checked_export(model, example, raisable, reference)
    except TraceError as error:
        if failure is not None:
            raise failure from None
        raise TraceError(f"nrfx cannot capture {type(model).__name__}: {why}{detail}\n"
                         f"torch.export (tried next) failed too: {error}") from error
    captured.notes.insert(0, f"capture: torch.export, because {why}")
    return captured


def _checked_export(model: nn.Module, example: Example, raisable, reference: _Reference) -> Captured:
    """The export capture when one real forward of its graph matches the model's in eval mode (export's mode)."""
    captured = export_capture(model, example, raisable)
    why = _verify(captured, reference, training=False)
    if why is not None:
        raise CaptureMismatch(f"torch.export's graph of {type(model).__name__} does not compute what the model "
                              f"computes on the example inputs (in eval mode): {why}")
    _note_export_in_train_mode(captured, reference)
    _check_fixed_sizes(captured, example, reference)
    return _with_values(check_batch_literals(captured, example), example)


def _check_fixed_sizes(captured: Captured, example: Example, reference: _Reference) -> None:
    """Rule (``nrfx.capture.fixed_sizes``): each group of input dims torch.export fixed (one example size) is probed
    at a smaller and a larger size; where the graph fails or differs from the model at one the model takes, the graph
    asserts the size and a note says so; where the model takes neither, the graph asserts it."""
    placeholders = list(captured.gm.graph.find_nodes(op="placeholder"))
    for size, group in fixed_dims(captured.gm, example.flat()).items():
        found = _fixed_size_problem(captured, reference, example, group, size)
        parts = by_input(group) if found is not None and found[1].startswith(_MODEL_RAISES) else []
        if len(parts) > 1:  # inputs that merely share a size: each one's dims on their own
            for dims in parts:
                _guard_fixed_size(captured, placeholders, dims, size,
                                  _fixed_size_problem(captured, reference, example, dims, size))
        else:
            _guard_fixed_size(captured, placeholders, group, size, found)


def _guard_fixed_size(captured: Captured, placeholders: list[torch.fx.Node], dims: list[tuple[int, int]], size: int,
                      found: tuple[int, str] | None) -> None:
    """The size assert and the note for one group whose probe found a problem (``_fixed_size_problem``)."""
    if found is not None:
        at = "at {} {}".format(*found)
        guard_sizes(captured.gm, dims, size, lambda name, dim: (
            f"{GUARD} dim {dim} of input '{name}' at {size} (the example's) and this graph runs at "
            f"that size only ({at}). Capture at the size you will run (example_inputs), rejuvenate with inplace=True "
            "(your model keeps its own forward, which runs at any size), or capture='fx' where the model traces"))
        if not found[1].startswith(_MODEL_RAISES):  # else the model takes no other size either (an image's channels)
            names = ", ".join(f"{placeholders[i].name}[{d}]" for i, d in dims)
            captured.notes.append(f"capture: torch.export fixed the input size {size} ({names}) and the graph runs at "
                                  f"that size only: {at}; the graph asserts it")


def _fixed_size_problem(captured: Captured, reference: _Reference, example: Example, dims: list[tuple[int, int]],
                        size: int) -> tuple[int, str] | None:
    """(probe size, what goes wrong there): the graph failing or differing at a probe size the model takes, or the
    model taking none of them; None when the graph matches the model wherever the model runs."""
    taken, refusal = False, None
    for probe, *resized in resized_inputs(example.args, example.kwargs, dims, size):
        problem = _probe_problem(captured, reference, Example(*resized))
        if problem is None:
            taken = True
        elif problem.startswith(_MODEL_RAISES):
            refusal = refusal or (probe, problem)
        else:
            return probe, problem
    return None if taken else refusal


_MODEL_RAISES = "the model itself raises"


def _probe_problem(captured: Captured, reference: _Reference, probe: Example) -> str | None:
    """What goes wrong when the graph runs on ``probe`` next to the model (eval mode): None when both agree."""
    if reference.meta:
        return "nothing could be checked (a model or input on the meta device)"
    try:
        expected = reference.run(lambda e: e.call(reference.model), False, example=probe)
    except Exception as error:  # the model itself does not take this size: nothing says the graph would
        return f"{_MODEL_RAISES} {type(error).__name__}"
    try:
        got = reference.run(lambda e: _run_graph(captured.gm, e), False, captured.gm, example=probe)
    except _GraphFailed as failed:
        where = node_location(failed.node) if failed.node is not None else "the graph"
        return f"{where} raises {type(failed.error).__name__}: {str(failed.error).splitlines()[0][:200]}"
    mismatch = _mismatch(expected, got)
    return None if mismatch is None else f"the graph differs from the model: {mismatch}"


def _note_export_in_train_mode(captured: Captured, reference: _Reference) -> None:
    """Rule: torch.export traces in eval mode; where its graph run in train mode differs from the model in train
    mode (functional code that reads ``self.training``: a dropout rate, stochastic depth, an ``if`` block), a note
    says so and names the ways out (``analyze`` warns)."""
    why = _verify(captured, reference, training=True)
    if why is not None:
        captured.notes.append(
            f"capture: traced in eval mode (torch.export), the graph {MODE_BRANCH} train mode on the example inputs "
            f"({why}). Functional code that reads self.training (a dropout rate, stochastic depth, an `if "
            "self.training:` block) keeps its eval behaviour, so the rewritten model trains without it (Hugging "
            "Face's attention dropout, for one). Ways out: capture='fx' where the model traces (values read from "
            "the flag follow it there), an nn.Dropout module in place of the functional call, or a rate of 0")


def _fx_capture(model, example: Example, leaf_modules, concrete_args, autowrap_functions,
                has_rule: Callable[[nn.Module], bool]) -> Captured:
    """Symbolic tracing (nrfx.capture.trace) with forward parameters past the inputs fixed at their defaults;
    modules with a rule (``has_rule``) are leaves."""
    concrete_args = defaulted_args(model, len(example.args), concrete_args)
    traced = trace(model, leaf_modules, concrete_args, autowrap_functions, has_rule)
    keep_opened_modules(traced.gm, model)
    return Captured(traced.gm, traced.auto_leaves, method="fx")


# -- torch.export ---------------------------------------------------------------------------
_TORCH_CUDA_AUTOCAST_OFF = "CUDA is not available or torch_xla is imported. Disabling autocast"  # torch.amp's warning


def export_capture(model: nn.Module, example: Example, raisable: Callable[[nn.Module], bool]) -> Captured:
    """torch.export (non-strict, batch dims dynamic, eval mode), leaf runs raised, aten ops at torch level."""
    exported, notes, cuda_off = _export(model, example)
    graph = exported.graph
    regions = inline_context_regions(exported, cuda_off)
    if regions:
        notes.append(f"capture: {regions} autocast / grad-mode regions of torch.export's graph inlined")
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target.startswith("_guards")]:
        graph.erase_node(node)
    graph.eliminate_dead_code()  # aten ops nothing reads (attention weights a caller dropped); mutations stay
    raised = raise_leaf_runs(graph, model, raisable)
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)
    gm = torch.fx.GraphModule(_root(graph, model, exported), graph, type(model).__name__)
    keep_opened_modules(gm, model)
    if example.tensors() and not _batch_is_dynamic(exported):
        guard_batch(gm, {n: n.meta.get("val") for n in graph.find_nodes(op="placeholder")}, example.batch,
                    "torch.export fixed the batch size at the example's (an example batch of 1 does that): "
                    "pass example inputs with a batch of 2 or more (or capture='fx') to run it at any batch")
    left = to_torch_level(gm)
    gm.graph.lint()
    gm.recompile()
    notes.append(f"capture: torch.export, {raised} leaf-module calls raised to the user's modules")
    if left:
        notes.append("capture: aten ops without a torch-level rule (their channels freeze): " +
                     ", ".join(f"{k} ×{v}" for k, v in sorted(left.items())))
    return Captured(gm, {}, method="export", notes=notes, aten_left=left)


def _export(model: nn.Module, example: Example) -> tuple[torch.fx.GraphModule, list[str], bool]:
    """``torch.export`` in eval mode with the batch dim dynamic (static when that fails); the model untouched.
    Also returns whether torch turned off a CUDA autocast the forward enabled (``_export_call``)."""
    notes: list[str] = []
    register_cache_pytrees()  # HF caches in the output (nrfx.capture.caches)
    try:
        with untouched(model), in_eval_mode(model), heads_exposed():
            try:
                program, cuda_off = _export_call(model, example, _batch_dynamic(model, example))
            except Exception as dynamic_error:  # retried with every shape static
                program, cuda_off = _export_call(model, example, None)
                notes.append(f"capture: the batch dim could not stay dynamic ({type(dynamic_error).__name__}); "
                             "the captured model runs at the example's shapes only")
    except Exception as error:
        raise TraceError(f"torch.export failed on {type(model).__name__}: {type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''}\n  Help it as torch.export's docs say "
                         "(torch._check for data-dependent sizes), or make the failing submodule a leaf.") from error
    exported = program.module()
    if example.tensors() and not _batch_is_dynamic(exported):
        notes.append("capture: torch.export specialised the batch dim (an example batch of 1 does that); "
                     "pass an example batch of 2 or more to run the result at any batch size")
    return exported, notes, cuda_off


def _export_call(model: nn.Module, example: Example, dynamic_shapes: Any) -> tuple[Any, bool]:
    """One torch.export.export call, non-strict, quiet: a failure prints whole graphs, the error says enough.
    Returns the program and whether torch turned off a ``torch.autocast("cuda")`` the forward enabled (no CUDA)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings(record=True) as caught, \
                hooks_silenced(model):
            warnings.simplefilter("always")  # recorded, not shown; the user's hooks do not fire (as with fx)
            program = torch.export.export(model, example.args, example.kwargs, strict=False,
                                          dynamic_shapes=dynamic_shapes)
        return program, any(_TORCH_CUDA_AUTOCAST_OFF in str(w.message) for w in caught)
    finally:
        logging.disable(previous)


def _batch_dynamic(model: nn.Module, example: Example) -> dict[str, Any] | None:
    """Dynamic-shape specs by parameter name: dim 0 of every tensor ``Dim.AUTO``, the rest static."""
    try:
        bound = inspect.signature(model.forward).bind(*example.args, **example.kwargs)
    except (TypeError, ValueError):
        return None

    def spec(x: Any) -> Any:
        return {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _batch_is_dynamic(gm: torch.fx.GraphModule) -> bool:
    """Whether some tensor placeholder kept a symbolic dim 0."""
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0 and not isinstance(val.shape[0], int):
            return True
    return False


def _root(graph: torch.fx.Graph, model: nn.Module, exported: nn.Module) -> dict[str, Any]:
    """Every attribute the graph reads, from the user's model where it lives there (shared, not copied)."""
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            found = _attribute(model, node.target)
            root[node.target] = found if found is not None else _attribute(exported, node.target)
    return root


def _attribute(owner: nn.Module, path: str) -> Any:
    """``owner.a.b.c`` for ``path`` 'a.b.c', or None."""
    value: Any = owner
    for part in path.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


# -- raising leaf-module runs -----------------------------------------------------------------
@dataclass
class _Run:
    """Consecutive aten nodes of one call of one raisable module."""

    key: str
    path: str
    nodes: list[torch.fx.Node]


def raise_leaf_runs(graph: torch.fx.Graph, model: nn.Module, raisable: Callable[[nn.Module], bool]) -> int:
    """Replace each run of one leaf-module call by ``call_module`` of the user's module; count them.

    A run is raised only when it is the whole call (its key appears once), reads one tensor from
    outside (plus the module's own parameters and buffers), is read outside through one tensor (a
    recurrent layer: through elements of its aten op's tuple), and the module's forward takes exactly
    one required argument.
    """
    runs = _runs(graph, model, raisable)
    keys = [run.key for run in runs]
    raised = 0
    for run in runs:
        if keys.count(run.key) == 1 and _raise(graph, model, run):
            raised += 1
    return raised


def _runs(graph: torch.fx.Graph, model: nn.Module, raisable) -> list[_Run]:
    """Consecutive call_function nodes grouped by the outermost raisable module call they belong to."""
    runs: list[_Run] = []
    names = {id(m): name for name, m in model.named_modules()}
    for node in graph.nodes:
        owner = _owner(node, model, raisable, names) if node.op == "call_function" else None
        if owner is None:
            continue
        if runs and runs[-1].key == owner[0] and runs[-1].nodes[-1].next is node:
            runs[-1].nodes.append(node)
        else:
            runs.append(_Run(owner[0], owner[1], [node]))
    return runs


def _owner(node: torch.fx.Node, model: nn.Module, raisable, names: dict[int, str]) -> tuple[str, str] | None:
    """(call key, the module's own name in the model) of the outermost raisable module on the node's module stack."""
    for key, entry in (node.meta.get("nn_module_stack") or {}).items():
        path = entry[0] if isinstance(entry, tuple) else None
        if not path:
            continue
        module = _module_at(model, path)
        if isinstance(module, nn.Module) and raisable(module) and id(module) in names:
            return key, names[id(module)]
    return None


_SLICE = re.compile(r"slice\((-?\d+|None), (-?\d+|None), (-?\d+|None)\)")


def _module_at(model: nn.Module, path: str) -> Any:
    """The object an ``nn_module_stack`` path reaches: parts are attributes or, where the forward sliced a
    Sequential or ModuleList (``self.model[:-1]``), ``slice(a, b, c)`` applied to it; None when it leads nowhere."""
    value: Any = model
    for part in path.split("."):
        cut = _SLICE.fullmatch(part)
        if cut is None:
            value = getattr(value, part, None)
        elif isinstance(value, (nn.Sequential, nn.ModuleList)):
            value = value[slice(*(None if v == "None" else int(v) for v in cut.groups()))]
        else:
            return None
        if value is None:
            return None
    return value


def _one_required_argument(module: nn.Module) -> bool:
    """Whether ``module.forward`` takes exactly one argument without a default."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params) == 1


def _is_tensor_node(node: torch.fx.Node) -> bool:
    """Whether export recorded a tensor value for the node."""
    return isinstance(node.meta.get("val"), torch.Tensor)


def _element_paths(module: nn.Module) -> dict[int, tuple[int, ...]] | None:
    """Rule: where each element of a recurrent layer's aten op lands in what its call returns: an LSTM's
    (out, h, c) as (out, (h, c)), a GRU's or RNN's (out, h) and an LSTMCell's (h, c) as they are; None for any
    other module whose call returns a tuple (MultiheadAttention) or a tensor."""
    if isinstance(module, nn.LSTM):
        return {0: (0,), 1: (1, 0), 2: (1, 1)}
    if isinstance(module, (nn.RNNBase, nn.LSTMCell)):
        return {0: (0,), 1: (1,)}
    return None


# torch modules whose call returns a tuple: a run of theirs ends in elements of it, not in what the call returns
_RETURN_TUPLES = (nn.RNNBase, nn.LSTMCell, nn.MultiheadAttention)


def _raise(graph: torch.fx.Graph, model: nn.Module, run: _Run) -> bool:
    """Raise one run if it has the shape of a one-tensor-in, one-tensor-out module call (or, for a recurrent
    layer, of a call whose tuple elements are read outside)."""
    inside = set(run.nodes)
    own = run.path + "."
    external: list[torch.fx.Node] = []
    for node in run.nodes:
        for arg in node.all_input_nodes:
            if arg in inside or (arg.op == "get_attr" and arg.target.startswith(own)):
                continue
            if arg.op == "get_attr" or (_is_tensor_node(arg) and arg not in external):
                external.append(arg)
    outputs = [n for n in run.nodes if any(u not in inside for u in n.users)]
    module = _attribute(model, run.path)
    if len(external) != 1 or external[0].op == "get_attr" or not _one_required_argument(module):
        return False
    if isinstance(module, _RETURN_TUPLES):
        return _raise_elements(graph, run, external[0], outputs, _element_paths(module))
    if len(outputs) != 1 or not _is_tensor_node(outputs[0]):
        return False
    with graph.inserting_after(run.nodes[-1]):
        call = graph.create_node("call_module", run.path, (external[0],))
    call.meta = dict(outputs[0].meta)
    outputs[0].replace_all_uses_with(call)
    _erase(graph, run)
    return True


def _raise_elements(graph: torch.fx.Graph, run: _Run, source: torch.fx.Node, outputs: list[torch.fx.Node],
                    paths: dict[int, tuple[int, ...]] | None) -> bool:
    """Raise a run read outside only through ``getitem``s of one aten op: the module call, then each element
    read from what the call returns along its path (``lstm[1]`` becomes ``call[1][0]``)."""
    if paths is None or not outputs:
        return False
    ops = {o.args[0] for o in outputs if o.target is operator.getitem}
    if len(ops) != 1 or any(o.target is not operator.getitem or o.args[1] not in paths for o in outputs):
        return False
    (op,) = ops
    with graph.inserting_after(run.nodes[-1]):
        call = graph.create_node("call_module", run.path, (source,))
    call.meta = {k: v for k, v in op.meta.items() if k != "val"}  # its value is the call's tuple, not the op's
    last = call
    for output in outputs:
        element = call
        for index in paths[output.args[1]]:
            with graph.inserting_after(last):
                element = last = graph.call_function(operator.getitem, (element, index))
            element.meta = dict(call.meta)
        element.meta = dict(output.meta)
        output.replace_all_uses_with(element)
    _erase(graph, run)
    return True


def _erase(graph: torch.fx.Graph, run: _Run) -> None:
    """Remove a raised run's nodes, last first."""
    for node in reversed(run.nodes):
        graph.erase_node(node)


# -- checking a capture against one real forward ------------------------------------------------
class CaptureMismatch(TraceError):
    """A captured graph does not compute what the model computes on the example inputs."""


_RTOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}  # else 1e-4: the graph runs the model's own kernels
_ATOL = 1e-5  # times the largest magnitude of the model's output leaf (at least 1)


class _Reference:
    """The model's own outputs on the example (one forward per train/eval mode), and the RNG state runs start from."""

    def __init__(self, model: nn.Module, example: Example) -> None:
        self.model, self.example = model, example
        tensors = [*example.tensors(), *model.parameters(), *model.buffers()]
        self.meta = any(t.is_meta for t in tensors)
        self.devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        self.rng = _rng_state(self.devices)
        self.outputs: dict[bool | None, Any] = {}

    def expected(self, training: bool | None) -> Any:
        """The model's outputs in train mode, eval mode or its own mode (None) (one forward each; its own mode is
        eval mode when no module is training)."""
        key = training if training is not None or any(m.training for m in self.model.modules()) else False
        if key not in self.outputs:
            self.outputs[key] = self.run(lambda example: example.call(self.model), key)
        return self.outputs[key]

    def run(self, call: Callable[[Example], Any], training: bool | None, graph: nn.Module | None = None,
            example: Example | None = None) -> Any:
        """``call(a copy of the example, or of ``example``)`` from the saved RNG state, without grad or the user's
        hooks, with every module in train or eval mode (None: as they are); the models and the caller's RNG state put
        back (a forward that writes into its inputs writes into the copy)."""
        kept = untouched(graph) if graph is not None else contextlib.nullcontext()
        with regions_restored(), torch.random.fork_rng(devices=self.devices), torch.no_grad(), untouched(self.model), \
                kept, hooks_silenced(self.model), contextlib.ExitStack() as modes:
            for module in (self.model, graph) if training is not None else ():
                if module is not None:  # the graph's own holders of traced-through modules carry flags it reads too
                    modes.enter_context(in_mode(module, training))
            _set_rng_state(self.rng, self.devices)
            given = example if example is not None else self.example
            return call(Example(*pytree.tree_map_only(torch.Tensor, torch.clone, (given.args, given.kwargs))))


def _rng_state(devices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The CPU generator's state and each used CUDA device's."""
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor]], devices: list[int]) -> None:
    """Put the generators back to ``state``."""
    torch.set_rng_state(state[0])
    for device, cuda_state in zip(devices, state[1], strict=True):
        torch.cuda.set_rng_state(cuda_state, device)


class _GraphFailed(Exception):
    """The captured graph raised at ``node`` on the example inputs."""

    def __init__(self, node: torch.fx.Node | None, error: BaseException) -> None:
        super().__init__(str(error))
        self.node, self.error = node, error


class _Recording(torch.fx.Interpreter):
    """A plain interpreter that names the node that raised."""

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as error:  # re-raised with the node
            raise _GraphFailed(n, error) from error


def _run_graph(gm: torch.fx.GraphModule, example: Example) -> Any:
    """The graph's outputs on the example, structured as the model's (export's output spec applied)."""
    interpreter = _Recording(gm)
    interpreter.extra_traceback = False
    return gm.graph.process_outputs(interpreter.run(*example.flat(), enable_io_processing=False))


def _verify(captured: Captured, reference: _Reference, training: bool | None) -> str | None:
    """Rule: a graph is accepted only when one real forward of it on the example matches the model's (same RNG
    state, same mode: train, eval, or the model's own (None), nothing of the model kept); returns what differs,
    None when it matches or cannot run."""
    if reference.meta:
        return None  # a model or input on the meta device has no values to compare (analyze works on those)
    try:
        expected = reference.expected(training)
    except Exception as error:  # the model itself fails on the example; shape propagation names the cause
        mode = "" if training is None else f" in {_MODES[training]} mode"
        captured.notes.append(f"capture: not checked by a real forward{mode} (the model raised {type(error).__name__} "
                              f"on the example inputs{mode})")
        return None
    try:
        got = reference.run(lambda example: _run_graph(captured.gm, example), training, captured.gm)
    except _GraphFailed as failed:
        where = node_location(failed.node) if failed.node is not None else "the graph"
        return f"{where} raised {type(failed.error).__name__}: {failed.error}"
    return _mismatch(expected, got)


def _mismatch(expected: Any, got: Any) -> str | None:
    """Rule: outputs match when they have the same leaves at the same key paths (container types may differ: fx
    returns a dict subclass with non-name keys as a plain dict) and every leaf matches (``_leaf_mismatch``)."""
    want, have = _flat(expected), _flat(got)
    if [k for k, _ in want] != [k for k, _ in have]:
        return (f"the output structure differs (model: {_short([k for k, _ in want])}; "
                f"graph: {_short([k for k, _ in have])})")
    for (key, a), (_, b) in zip(want, have, strict=True):
        problem = _leaf_mismatch(a, b)
        if problem is not None:
            return f"output{key}: {problem}" if key else f"the output: {problem}"
    return None


def _flat(value: Any, key: str = "") -> list[tuple[str, Any]]:
    """(key path, leaf) of every leaf under mappings, lists, tuples and dataclasses, whatever their classes."""
    if isinstance(value, Mapping):
        return [pair for k, v in value.items() for pair in _flat(v, f"{key}[{k!r}]")]
    if isinstance(value, (list, tuple)):
        return [pair for i, v in enumerate(value) for pair in _flat(v, f"{key}[{i}]")]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [pair for f in dataclasses.fields(value) for pair in _flat(getattr(value, f.name), f"{key}.{f.name}")]
    return [(key, value)]


def output_signature(value: Any) -> list[tuple[str, str]]:
    """(key path, what the leaf is: a tensor's dtype and shape, else its type) of every leaf of an output."""
    return [(key, f"{leaf.dtype} {tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor) else type(leaf).__name__)
            for key, leaf in _flat(value)]


def _short(keys: list[str]) -> str:
    """Key paths in at most 200 characters."""
    text = ", ".join(k or "the output itself" for k in keys) or "no leaves"
    return text if len(text) <= 200 else text[:197] + "..."


def _leaf_mismatch(a: Any, b: Any) -> str | None:
    """Rule: tensors match in shape, dtype and values (floats within the tolerance, others exactly); numbers, strings
    and None are equal; other objects only need the same type."""
    if type(a) is not type(b) and not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return f"the model gives a {type(a).__name__}, the graph a {type(b).__name__}"
    if not isinstance(a, torch.Tensor):
        plain = a is None or isinstance(a, (bool, int, float, complex, str))
        return f"the model gives {a!r}, the graph {b!r}" if plain and a != b else None
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"the model gives {a.dtype} {tuple(a.shape)}, the graph {b.dtype} {tuple(b.shape)}"
    if not (a.is_floating_point() or a.is_complex()):
        return None if torch.equal(a, b) else "integer or boolean values differ"
    return _value_mismatch(a, b)


def _value_mismatch(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Rule: |a - b| <= atol + rtol·|a| everywhere (NaN where both are NaN), atol scaled by the largest |a|."""
    rtol = _RTOL.get(a.dtype, 1e-4)
    finite = a[torch.isfinite(a)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    if torch.allclose(b, a, rtol=rtol, atol=_ATOL * scale, equal_nan=True):
        return None
    diff = (a - b).abs().nan_to_num(nan=float("inf")).max()
    return f"values differ by up to {float(diff):.3g} (largest |value| {scale:.3g}, rtol {rtol:g})"


# -- batch sizes written as literals ---------------------------------------------------------------
_RESHAPES = frozenset({"view", "reshape", "expand"})  # x.<method>(*sizes): a literal can be taken from x
_CREATORS = frozenset({"new_zeros", "new_ones", "new_empty", "new_full", "zeros", "ones", "empty", "full", "rand",
                       "randn"})  # a batch-sized tensor from nothing: a literal here cannot be traced to an input


def check_batch_literals(captured: Captured, example: Example) -> Captured:
    """Rule: a literal equal to the example batch in a view/reshape/expand becomes ``x.size(j)`` where it provably is
    dim j of the input and that dim is its batch dim (it moves with the input batch and sits at the same flat offset);
    when the graph still does not run, or its outputs do not follow the batch, at batch + 1, a note says it runs at
    the example batch only (``analyze`` warns)."""
    gm, batch = captured.gm, example.batch
    sites = _literal_sites(gm.graph, batch)
    if batch < 2 or not sites:
        return captured  # a batch of 1 makes every literal 1 look like a batch (export specialises it and warns)
    try:
        before = propagate_shapes(gm, example.flat(), captured.auto_leaves)
    except ShapeError:
        return captured  # the analysis reports a graph that does not run on meta tensors
    fixes: dict[torch.fx.Node, dict[int, int]] = {}
    out, failure = probe_shapes(gm, _probe_inputs(example, batch + 1), _fixer(sites, before, batch, fixes))
    for node, fix in fixes.items():
        _take_sizes(gm.graph, node, fix)
    if fixes:
        gm.graph.lint()
        gm.recompile()
        captured.notes.append(f"capture: {len(fixes)} literal batch size(s) ({batch}) in view/reshape/expand written "
                              "as the input's size, so the result runs at any batch: " +
                              ", ".join(node_location(n) for n in list(fixes)[:3]))
    problem = _batch_problem(before, out, failure, gm.graph, batch)
    if problem is not None:
        guard_batch(gm, before, batch, "a literal batch size in its graph fixes it (see the capture notes): compute "
                                       "the size from the input (x.shape[0]) in the model's code")
        left = "; ".join(node_location(n) for n in [n for n in sites if n not in fixes][:3])
        captured.notes.append(
            f"capture: the graph is specialised to batch {batch}, the result runs at batch {batch} only: at batch "
            f"{batch + 1} {problem}. The batch size is a literal {batch} at {left or 'a node nrfx cannot trace back'} "
            "(a size cached by an earlier call?). Compute it from the input (x.shape[0]) in the model's code, or "
            f"always call the result at batch {batch}.")
    return captured


def guard_batch(gm: torch.fx.GraphModule, values: Mapping[torch.fx.Node, Any], batch: int, why: str) -> None:
    """Rule: a graph that runs at the example batch only checks it first (``torch._assert`` on dim 0 of its first
    batched input), so a call at another batch raises instead of computing a wrong result in silence."""
    graph = gm.graph
    placeholders = list(graph.find_nodes(op="placeholder"))
    batched = [n for n in placeholders if isinstance(values.get(n), torch.Tensor) and values[n].dim() > 0
               and values[n].shape[0] == batch]
    if not batched:
        return
    with graph.inserting_after(placeholders[-1]):
        size = graph.call_method("size", (batched[0], 0))
    with graph.inserting_after(size):
        same = graph.call_function(operator.eq, (size, batch))
    with graph.inserting_after(same):
        graph.call_function(torch._assert, (same, f"nrfx: this graph runs at batch {batch} only: {why}"))
    graph.lint()
    gm.recompile()


def _sizes(node: torch.fx.Node) -> tuple[list, bool] | None:
    """The size list of a view/reshape/expand call and whether it is passed as one tuple (else as varargs)."""
    if node.op == "call_method" and node.target in _RESHAPES and len(node.args) > 1:
        packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
        return (list(node.args[1]) if packed else list(node.args[1:])), packed
    if node.op == "call_function" and node.target is torch.reshape and len(node.args) == 2:
        return list(node.args[1]), True
    return None


def _is_literal(value: Any, batch: int) -> bool:
    """An int (not a bool, not a node) equal to the batch."""
    return isinstance(value, int) and not isinstance(value, bool) and value == batch


def _literal_sites(graph: torch.fx.Graph, batch: int) -> dict[torch.fx.Node, list[int]]:
    """Nodes holding the batch as a literal size: reshapes (with the literal's positions) and creators (no position)."""
    sites: dict[torch.fx.Node, list[int]] = {}
    for node in graph.nodes:
        sizes = _sizes(node)
        if sizes is not None:
            positions = [i for i, v in enumerate(sizes[0]) if _is_literal(v, batch)]
            if positions:
                sites[node] = positions
        elif _creates_batch(node, batch):
            sites[node] = []
    return sites


def _creates_batch(node: torch.fx.Node, batch: int) -> bool:
    """Whether a tensor-creating call's first size is the literal batch."""
    name = getattr(node.target, "__name__", node.target)
    if node.op not in ("call_function", "call_method") or name not in _CREATORS:
        return False
    args = node.args[1:] if node.op == "call_method" else node.args
    first = args[0] if args else node.kwargs.get("size")
    first = first[0] if isinstance(first, (list, tuple)) and first else first
    return _is_literal(first, batch)


def _probe_inputs(example: Example, probe: int) -> list[Any]:
    """The example's leaves on meta, each tensor with the example batch in dim 0 resized to ``probe``."""
    batch = example.batch

    def resized(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
            return torch.empty((probe, *x.shape[1:]), dtype=x.dtype, device="meta")
        return x

    return [resized(x) for x in example.flat()]


def _fixer(sites: dict[torch.fx.Node, list[int]], before: dict[torch.fx.Node, Any], batch: int,
           fixes: dict[torch.fx.Node, dict[int, int]]):
    """The probe's ``adjust``: at a site whose literal provably is the input's batch dim, use the probe's size."""

    def adjust(node: torch.fx.Node, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if not sites.get(node) or not isinstance(args[0], torch.Tensor):
            return args, kwargs
        fix = _provable(node, sites[node], before, args[0], batch)
        if not fix:
            return args, kwargs
        fixes[node] = fix
        return _with_sizes(node, args, {i: args[0].shape[j] for i, j in fix.items()}), kwargs

    return adjust


def _provable(node: torch.fx.Node, positions: list[int], before: dict[torch.fx.Node, Any], probe: torch.Tensor,
              batch: int) -> dict[int, int]:
    """{size position: input dim} for literals that sit on a batch dim of the input (sized ``batch`` at the example,
    another size in the probe): at the same flat offset for view/reshape, the same aligned dim for expand."""
    x, out = before.get(node.args[0]), before.get(node)
    if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
        return {}
    moving = [j for j in range(x.dim()) if x.shape[j] == batch and probe.shape[j] != batch]
    fix = {}
    for i in positions:
        if node.target == "expand":
            j = i - (out.dim() - x.dim())
            found = j if j in moving else None
        else:
            offset = math.prod(out.shape[:i])
            found = next((j for j in moving if math.prod(x.shape[:j]) == offset), None)
        if found is not None:
            fix[i] = found
    return fix


def _with_sizes(node: torch.fx.Node, args: tuple, sizes: dict[int, Any]) -> tuple:
    """``args`` of a reshape node with the sizes at the given positions replaced."""
    packed = _sizes(node)[1]
    new = list(args[1]) if packed else list(args[1:])
    for i, size in sizes.items():
        new[i] = size
    return (args[0], type(args[1])(new)) if packed else (args[0], *new)


def _take_sizes(graph: torch.fx.Graph, node: torch.fx.Node, fix: dict[int, int]) -> None:
    """Rewrite the node's literal sizes as ``x.size(j)`` nodes of its input."""
    sizes = {}
    for i, j in fix.items():
        with graph.inserting_before(node):
            size = graph.call_method("size", (node.args[0], j))
        size.stack_trace = node.stack_trace
        sizes[i] = size
    node.args = _with_sizes(node, node.args, sizes)


def _batch_problem(before: dict[torch.fx.Node, Any], out: Any, failure, graph: torch.fx.Graph,
                   batch: int) -> str | None:
    """What goes wrong at batch + 1: a node that fails, or an output whose dim 0 stays at the example batch."""
    if failure is not None:
        node, error = failure
        where = node_location(node) if node is not None else "the graph"
        return f"{where} fails ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    output = next(iter(graph.find_nodes(op="output")))
    was = pytree.tree_leaves(before.get(output))
    now = pytree.tree_leaves(out)
    for a, b in zip(was, now, strict=False):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() and a.shape[0] == batch \
                and b.shape[0] == batch:
            return f"an output keeps dim 0 at {batch} (shape {tuple(b.shape)})"
    return None
