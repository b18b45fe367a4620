"""Trace any model into an FX graph and propagate shapes on the meta device.

Leaf policy: torch.nn built-ins, the user's ``leaf_modules`` (types or qualified names),
timm's registered no-trace modules and functions when timm is importable, and every
submodule whose code cannot be traced (it becomes a leaf automatically, its channels are
frozen by the analysis, and the reason is recorded).  Shapes come from running each node
on meta tensors: no real compute, no activation memory; a node whose kernel has no meta
implementation runs once on zeros of the right shape instead.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from .errors import ShapeError, TraceError, node_location

__all__ = ["Traced", "trace", "propagate_shapes"]

_MAX_AUTO_LEAVES = 64


@dataclass
class Traced:
    """A traced model: the graph module (sharing the model's parameters) and why leaves were made."""

    gm: torch.fx.GraphModule
    auto_leaves: dict[str, str] = field(default_factory=dict)


class _SubmoduleFailed(Exception):
    """Raised from the innermost submodule whose forward could not be traced."""

    def __init__(self, qualname: str, error: BaseException) -> None:
        super().__init__(qualname)
        self.qualname, self.error = qualname, error


def _timm_notrace() -> tuple[set[type], list[Callable]]:
    """timm's registered no-trace modules and functions (empty when timm is absent)."""
    try:
        from timm.layers import _fx
    except Exception:  # noqa: BLE001 - timm is optional and may be broken
        return set(), []
    functions = [f for f in _fx.get_notrace_functions() if callable(f)]
    return set(_fx.get_notrace_modules()), functions


class NrfxTracer(torch.fx.Tracer):
    """FX tracer with a user-extensible leaf policy and automatic leaves for untraceable code."""

    def __init__(self, leaf_modules: Iterable[type | str] = (), autowrap: Sequence[Callable] = ()) -> None:
        timm_modules, timm_functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(autowrap) + tuple(timm_functions))
        self.record_stack_traces = True
        leaves = list(leaf_modules)
        self.leaf_types = tuple({t for t in leaves if isinstance(t, type)} | timm_modules)
        self.leaf_names = {n for n in leaves if isinstance(n, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """torch.nn built-ins, the user's leaf types and names, and auto leaves are leaves."""
        if module_qualified_name in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """Trace into ``m``; if its code cannot be traced, report the innermost culprit."""
        qualname = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _SubmoduleFailed:
            raise
        except Exception as error:  # noqa: BLE001 - any trace failure makes this a leaf candidate
            if qualname == "" or self.is_leaf_module(m, qualname):
                raise
            raise _SubmoduleFailed(qualname, error) from error


def _user_frame(error: BaseException) -> str:
    """The last traceback frame outside torch, as 'file:line: code'."""
    frames = traceback.extract_tb(error.__traceback__)
    mine = [f for f in frames if "/torch/" not in f.filename and "/nrfx/" not in f.filename]
    frame = (mine or frames or [None])[-1]
    if frame is None:
        return "unknown location"
    return f"{frame.filename}:{frame.lineno}: {frame.line}"


def trace(
    model: nn.Module,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    autowrap_functions: Sequence[Callable] = (),
) -> Traced:
    """Symbolically trace ``model``; untraceable submodules become leaves, the root cannot."""
    leaves = list(leaf_modules)
    auto: dict[str, str] = {}
    for _ in range(_MAX_AUTO_LEAVES):
        tracer = NrfxTracer(leaves, autowrap_functions)
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except _SubmoduleFailed as failed:
            auto[failed.qualname] = f"untraceable code ({type(failed.error).__name__}: {failed.error})"
            leaves.append(failed.qualname)
            continue
        except Exception as error:  # noqa: BLE001 - turned into a TraceError with a way out
            raise TraceError(
                f"nrfx cannot trace {type(model).__name__}: {type(error).__name__}: {error}\n"
                f"  at {_user_frame(error)}\n"
                "  The model's own forward has code FX cannot trace (data-dependent control flow, "
                "len()/int() of a tensor, ...). Move that code into a submodule and pass it as "
                "leaf_modules=[...], or fix the branch with concrete_args={...}."
            ) from error
        name = type(model).__name__
        return Traced(torch.fx.GraphModule(tracer.root, graph, name), auto)
    raise TraceError(f"nrfx gave up on {type(model).__name__}: more than {_MAX_AUTO_LEAVES} untraceable submodules")


# ---------------------------------------------------------------------------------------
# shape propagation on the meta device
# ---------------------------------------------------------------------------------------


def _to_meta(value: Any) -> Any:
    """Tensors become meta tensors of the same shape and dtype; structure is kept."""
    if isinstance(value, torch.Tensor):
        return value if value.is_meta else torch.empty_like(value, device="meta")
    if isinstance(value, (list, tuple)):
        items = [_to_meta(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def _to_zeros(value: Any) -> Any:
    """Meta tensors become CPU zeros of the same shape (for ops with no meta kernel)."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        return torch.zeros(value.shape, dtype=value.dtype)
    if isinstance(value, (list, tuple)):
        items = [_to_zeros(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {k: _to_zeros(v) for k, v in value.items()}
    return value


class _MetaInterpreter(torch.fx.Interpreter):
    """Runs a graph on meta tensors; parameters are swapped for meta copies, never touched."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self._meta_state: dict[str, dict[str, torch.Tensor]] = {}

    def get_attr(self, target: str, args: tuple, kwargs: dict) -> Any:
        return _to_meta(super().get_attr(target, args, kwargs))

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        state = self._meta_state.get(target)
        if state is None:
            tensors = dict(module.named_parameters(remove_duplicate=False))
            tensors.update(module.named_buffers(remove_duplicate=False))
            state = self._meta_state[target] = {k: _to_meta(v) for k, v in tensors.items()}
        if not state:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, state, args, kwargs, tie_weights=False, strict=False)

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as meta_error:  # noqa: BLE001 - retried on real zeros below
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            saved = self.module
            try:
                real = getattr(self, n.op)(n.target, _to_zeros(args), _to_zeros(kwargs))
            except Exception:  # noqa: BLE001 - report the original failure
                raise meta_error from None
            finally:
                self.module = saved
            return _to_meta(real)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> dict[torch.fx.Node, Any]:
    """Meta value (shape, dtype, structure) of every node for the given example inputs."""
    interpreter = _MetaInterpreter(gm)
    try:
        with torch.no_grad():
            interpreter.run(*[_to_meta(x) for x in example_inputs])
    except Exception as error:  # noqa: BLE001 - reported with the failing node
        node = _failing_node(interpreter)
        where = node_location(node) if node is not None else "the graph"
        shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else repr(x) for x in example_inputs)
        raise ShapeError(
            f"the example inputs {shapes} do not run through the model: {where} failed with "
            f"{type(error).__name__}: {error}\n  Pass example_inputs shaped as the model's forward expects "
            "(a tuple of tensors, batch dimension first, e.g. torch.randn(1, 3, 224, 224))."
        ) from error
    return interpreter.env


def _failing_node(interpreter: _MetaInterpreter) -> torch.fx.Node | None:
    """The first node without a value: the one that failed."""
    for node in interpreter.module.graph.nodes:
        if node not in interpreter.env:
            return node
    return None
