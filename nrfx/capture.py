"""Capture front ends: one FX graph over the user's own modules, from fx tracing or torch.export.

``"fx"``: symbolic tracing with nrfx's leaf policy (``nrfx.trace``).  ``"export"``:
``torch.export.export(strict=False)`` with the batch dim of every input dynamic, then two passes
make the aten graph look like a traced one: every run of aten nodes that one call of a leaf
module produced (a module the analysis has a rule for, called on one tensor) is *raised* back
into a ``call_module`` of the user's own module object (so BatchNorm and dropout follow
``.train()``/``.eval()``, the parameter names are the user's, and the rewrite resizes the
module as after fx), and the remaining aten ops are written as the torch-level calls of the op
table (``nrfx.aten``).  ``"auto"``: fx; torch.export when the root cannot be traced or automatic
leaves hold more than half of the parameters.  The model is never modified.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn

from .aten import to_torch_level
from .errors import TraceError
from .shapeprop import hooks_silenced, in_eval_mode, untouched
from .trace import Traced, defaulted_args, trace

__all__ = ["Example", "Captured", "CAPTURES", "capture", "auto_leaf_share"]

CAPTURES = ("auto", "fx", "export", "islands")  # islands: nrfx.islands, when nothing captures the whole
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
    def plain(self) -> bool:
        """Positional tensors only: what fx symbolic tracing takes."""
        return not self.kwargs and all(isinstance(x, torch.Tensor) for x in self.args)


@dataclass
class Captured(Traced):
    """A captured model: the graph module over the user's modules, how it was captured, and why."""

    method: str = "fx"
    notes: list[str] = field(default_factory=list)
    aten_left: dict[str, int] = field(default_factory=dict)


def auto_leaf_share(model: nn.Module, auto_leaves: Iterable[str]) -> float:
    """Share of the model's parameters inside automatic leaves."""
    total = sum(p.numel() for p in model.parameters())
    inside = {id(p): p.numel() for name in auto_leaves for p in model.get_submodule(name).parameters()}
    return sum(inside.values()) / total if total else 0.0


def capture(model: nn.Module, example: Example, method: str = "auto", *, leaf_modules: Iterable[type | str] = (),
            concrete_args: dict[str, Any] | None = None, autowrap_functions: Sequence[Callable] = (),
            raisable: Callable[[nn.Module], bool] = lambda m: False) -> Captured:
    """The model as one FX graph, by ``method`` ('auto', 'fx' or 'export'); see the module docstring."""
    if method not in CAPTURES[:3]:
        raise TraceError(f"capture must be one of {CAPTURES}, got {method!r}")
    if method == "export":
        return export_capture(model, example, raisable)
    if method == "fx" and not example.plain:
        raise TraceError("capture='fx' takes positional tensor inputs only; nested or keyword inputs need "
                         "capture='export' (or 'auto')")
    why, detail = "the inputs are not plain positional tensors", ""
    if example.plain:
        try:
            captured = _fx_capture(model, example, leaf_modules, concrete_args, autowrap_functions)
        except TraceError as error:
            if method == "fx":
                raise
            why, detail = "fx could not trace the root", f"\n{error}"
        else:
            share = auto_leaf_share(model, captured.auto_leaves)
            if method == "fx" or share <= AUTO_LEAF_LIMIT:
                return captured
            why = f"automatic fx leaves hold {share:.0%} of the parameters"
    return _export_after(model, example, raisable, why, detail)


def _export_after(model: nn.Module, example: Example, raisable, why: str, detail: str) -> Captured:
    """torch.export because fx fell short (``why``); both errors in the message when export fails too."""
    try:
        captured = export_capture(model, example, raisable)
    except TraceError as error:
        raise TraceError(f"nrfx cannot capture {type(model).__name__}: {why}{detail}\n"
                         f"torch.export (tried next) failed too: {error}") from error
    captured.notes.insert(0, f"capture: torch.export, because {why}")
    return captured


def _fx_capture(model, example: Example, leaf_modules, concrete_args, autowrap_functions) -> Captured:
    """Symbolic tracing (nrfx.trace) with forward parameters past the inputs fixed at their defaults."""
    concrete_args = defaulted_args(model, len(example.args), concrete_args)
    traced = trace(model, leaf_modules, concrete_args, autowrap_functions)
    return Captured(traced.gm, traced.auto_leaves, method="fx")


# -- torch.export ---------------------------------------------------------------------------
def export_capture(model: nn.Module, example: Example, raisable: Callable[[nn.Module], bool]) -> Captured:
    """torch.export (non-strict, batch dims dynamic, eval mode), leaf runs raised, aten ops at torch level."""
    exported, notes = _export(model, example)
    graph = exported.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target.startswith("_guards")]:
        graph.erase_node(node)
    raised = raise_leaf_runs(graph, model, raisable)
    for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
        graph.erase_node(node)
    gm = torch.fx.GraphModule(_root(graph, model, exported), graph, type(model).__name__)
    left = to_torch_level(gm)
    gm.graph.lint()
    gm.recompile()
    notes.append(f"capture: torch.export, {raised} leaf-module calls raised to the user's modules")
    if left:
        notes.append("capture: aten ops without a torch-level rule (their channels freeze): " +
                     ", ".join(f"{k} ×{v}" for k, v in sorted(left.items())))
    return Captured(gm, {}, method="export", notes=notes, aten_left=left)


def _export(model: nn.Module, example: Example) -> tuple[torch.fx.GraphModule, list[str]]:
    """``torch.export`` in eval mode with the batch dim dynamic (static when that fails); the model untouched."""
    notes: list[str] = []
    try:
        with untouched(model), in_eval_mode(model):
            try:
                program = _export_call(model, example, _batch_dynamic(model, example))
            except Exception as dynamic_error:  # retried with every shape static
                program = _export_call(model, example, None)
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
    return exported, notes


def _export_call(model: nn.Module, example: Example, dynamic_shapes: Any):
    """One torch.export.export call, non-strict, quiet: a failure prints whole graphs, the error says enough."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings(), hooks_silenced(model):
            warnings.simplefilter("ignore")  # the user's hooks do not fire (nor enter the graph, as with fx)
            return torch.export.export(model, example.args, example.kwargs, strict=False,
                                       dynamic_shapes=dynamic_shapes)
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
    outside (plus the module's own parameters and buffers), is read outside through one tensor,
    and the module's forward takes exactly one required argument.
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
    for node in graph.nodes:
        owner = _owner(node, model, raisable) if node.op == "call_function" else None
        if owner is None:
            continue
        if runs and runs[-1].key == owner[0] and runs[-1].nodes[-1].next is node:
            runs[-1].nodes.append(node)
        else:
            runs.append(_Run(owner[0], owner[1], [node]))
    return runs


def _owner(node: torch.fx.Node, model: nn.Module, raisable) -> tuple[str, str] | None:
    """(call key, module path) of the outermost raisable module on the node's module stack."""
    for key, entry in (node.meta.get("nn_module_stack") or {}).items():
        path = entry[0] if isinstance(entry, tuple) else None
        if not path:
            continue
        module = _attribute(model, path)
        if isinstance(module, nn.Module) and raisable(module):
            return key, path
    return None


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


def _raise(graph: torch.fx.Graph, model: nn.Module, run: _Run) -> bool:
    """Raise one run if it has the shape of a one-tensor-in, one-tensor-out module call."""
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
    if len(external) != 1 or external[0].op == "get_attr" or len(outputs) != 1 or not _is_tensor_node(outputs[0]):
        return False
    if not _one_required_argument(module):
        return False
    with graph.inserting_after(run.nodes[-1]):
        call = graph.create_node("call_module", run.path, (external[0],))
    call.meta = dict(outputs[0].meta)
    outputs[0].replace_all_uses_with(call)
    for node in reversed(run.nodes):
        graph.erase_node(node)
    return True
