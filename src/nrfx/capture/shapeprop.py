"""Shapes of every node without real compute: run the graph on meta tensors (``propagate_shapes``).

Most ops get their output shape from a formula (``nrfx.capture.shape_formulas``); the rest run their
meta kernel; a node whose kernel has no meta implementation runs once on zeros of the right
shape instead.  Modules run on meta copies of their parameters and buffers, and every
attribute a forward sets (a cached anchor grid, a registered buffer) is put back afterwards:
shape propagation never leaves a trace on the user's modules.  ``measure_node_macs`` runs
one node the same way under ``FlopCounterMode`` (2 FLOPs = 1 MAC).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from nrfx.capture.guards import untouched
from nrfx.capture.shape_formulas import function_shape, method_shape, module_shape
from nrfx.errors import ShapeError, error_frames, frame_line, node_location, user_frame

__all__ = ["propagate_shapes", "probe_shapes", "measure_node_macs", "meta_state", "to_meta"]


def to_meta(value: Any) -> Any:
    """Tensors become meta tensors of the same shape and dtype; the structure around them is kept."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t if t.is_meta else torch.empty_like(t, device="meta"), value)


def _to_zeros(value: Any) -> Any:
    """Meta tensors become CPU zeros of the same shape (for ops with no meta kernel)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype) if t.is_meta else t, value)


def meta_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Meta copies of a module's parameters and buffers, by qualified name (shared ones listed each time)."""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    return {k: to_meta(v) for k, v in tensors.items()}




def _call_module(module: nn.Module, state: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    """Call a module on its meta state (or as it is, when it has none or is TorchScript, which functional_call
    cannot swap tensors into), leaving no trace on it."""
    with untouched(module):
        if not state or isinstance(module, torch.jit.ScriptModule):
            return module(*args, **kwargs)
        return torch.func.functional_call(module, state, args, kwargs, tie_weights=False, strict=False)


class _MetaInterpreter(torch.fx.Interpreter):
    """Runs a graph on meta tensors; parameters are swapped for meta copies, never touched."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self._meta_state: dict[str, dict[str, torch.Tensor]] = {}
        self._on_zeros = False  # retrying a node on real zeros
        self.retried: dict[torch.fx.Node, BaseException] = {}

    def get_attr(self, target: str, args: tuple, kwargs: dict) -> Any:
        return to_meta(super().get_attr(target, args, kwargs))

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        fast = function_shape(target, args, kwargs)
        return fast if fast is not None else super().call_function(target, args, kwargs)

    def call_method(self, target: str, args: tuple, kwargs: dict) -> Any:
        fast = method_shape(target, args, kwargs)
        return fast if fast is not None else super().call_method(target, args, kwargs)

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        fast = module_shape(module, args, kwargs)
        if fast is not None:
            return fast
        state = self._meta_state.get(target)
        if state is None:
            state = self._meta_state[target] = meta_state(module)
        if state and not self._on_zeros:  # a real input (export's torch.arange(..., device=cpu)) meets meta state
            args, kwargs = to_meta(args), to_meta(kwargs)
        return _call_module(module, state, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as meta_error:  # retried on real zeros below
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            saved, self._on_zeros = self.module, True
            try:
                real = getattr(self, n.op)(n.target, _to_zeros(args), _to_zeros(kwargs))
            except Exception as zeros_error:  # report both failures
                self.retried[n] = zeros_error
                raise meta_error from None
            finally:
                self.module, self._on_zeros = saved, False
            return to_meta(real)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                     auto_leaves: dict[str, str] | None = None, inputs_ran: bool = False) -> dict[torch.fx.Node, Any]:
    """Meta value (shape, dtype, structure) of every node for the given example inputs.

    ``auto_leaves`` (qualified name -> why it could not be traced) only sharpens error messages;
    ``inputs_ran``: the inputs already ran through the original model, so an error never asks for others.
    """
    interpreter = _MetaInterpreter(gm)
    interpreter.extra_traceback = False  # the ShapeError names the node itself
    try:
        with torch.no_grad():
            interpreter.run(*[to_meta(x) for x in example_inputs], enable_io_processing=False)
    except Exception as error:  # reported with the failing node
        raise _shape_error(interpreter, example_inputs, error, auto_leaves or {}, inputs_ran) from error
    return interpreter.env


Adjust = Callable[[torch.fx.Node, tuple, dict], tuple[tuple, dict]]


class _ProbeInterpreter(_MetaInterpreter):
    """The meta interpreter, with each node's arguments passed through ``adjust`` before it runs."""

    def __init__(self, gm: torch.fx.GraphModule, adjust: Adjust) -> None:
        super().__init__(gm)
        self.adjust = adjust

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> tuple[tuple, dict]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        return self.adjust(n, args, kwargs) if n.op.startswith("call_") else (args, kwargs)


def probe_shapes(gm: torch.fx.GraphModule, inputs: Sequence[Any], adjust: Adjust
                 ) -> tuple[Any, tuple[torch.fx.Node, BaseException] | None]:
    """Rule: run the graph on meta tensors, ``adjust(node, args, kwargs)`` deciding each call's arguments; return
    (the output, None), or (None, (the failing node, its error)) where it fails: a probe, never a ShapeError."""
    interpreter = _ProbeInterpreter(gm, adjust)
    try:
        with torch.no_grad():
            out = interpreter.run(*[to_meta(x) for x in inputs], enable_io_processing=False)
    except Exception as error:  # the probe reports where the graph stops
        node = _failing_node(interpreter)
        return None, (node, error)
    return out, None


def _shape_error(interpreter: _MetaInterpreter, example_inputs: Sequence[Any], error: BaseException,
                 auto_leaves: dict[str, str], inputs_ran: bool = False) -> ShapeError:
    """What failed: the node, its op and source line, on meta tensors and on zeros; then the likely cause."""
    node = _failing_node(interpreter)
    where = node_location(node) if node is not None else "the graph"
    shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs)
    text = f"{where} failed while nrfx propagated shapes: {type(error).__name__}: {error}"
    raised = user_frame(error_frames(error))
    if raised is not None and f'"{raised[0]}", line {raised[1]},' not in where:
        text += f"\n  raised at {frame_line(raised)}"
    zeros_error = interpreter.retried.get(node) if node is not None else None
    if zeros_error is not None and str(zeros_error) != str(error):
        text += f"\n  (run on zeros of the same shapes, it failed with {type(zeros_error).__name__}: {zeros_error})"
    if _is_meta_limitation(error):
        text += _real_data_advice(node, auto_leaves)
    elif not inputs_ran:
        text += (f"\n{_train_mode_hint(error)}  The example inputs were {shapes}. Pass example_inputs shaped as the "
                 "model's forward expects (a tuple, batch dimension first, e.g. torch.randn(1, 3, 224, 224)).")
    return ShapeError(text)


def _real_data_advice(node: torch.fx.Node | None, auto_leaves: dict[str, str]) -> str:
    """What to do when an op needs real values: a leaf already is one, so it must run on meta tensors."""
    need = "\n  The op needs real data (a data-dependent shape or a Python number read from a tensor). "
    if node is not None and node.op == "call_module":
        kind = (f"an automatic leaf ({auto_leaves[node.target]})" if node.target in auto_leaves
                else "a leaf module")
        return (need + f"'{node.target}' already is {kind}; nrfx runs leaves on meta tensors, then on zeros of the "
                "same shapes: make its forward run on those (torch._check(...) instead of `if tensor:`, no .item()).")
    return need + ("Make its module a leaf (leaf_modules=[...]) or move the op into a submodule that can be one, "
                   "so that it runs whole.")


def _is_meta_limitation(error: BaseException) -> bool:
    """Whether an error says the op cannot run on meta tensors (as opposed to a shape mismatch)."""
    text = str(error).lower()
    return "meta" in text or "data-dependent" in text or "item()" in text


def _train_mode_hint(error: BaseException) -> str:
    """A hint when a norm in training mode met a single value per channel (batch 1, 1×1 map)."""
    if "more than 1 value per channel" in str(error):
        return ("  A norm in training mode needs more than one value per channel: call model.eval() "
                "before analysing, or use a batch of 2 or more.\n")
    return ""


def _failing_node(interpreter: _MetaInterpreter) -> torch.fx.Node | None:
    """The first node without a value: the one that failed."""
    for node in interpreter.module.graph.nodes:
        if node not in interpreter.env:
            return node
    return None


# -- MACs of one node ---------------------------------------------------------------------------------
def _run_node(gm: torch.fx.GraphModule, node: torch.fx.Node, args: tuple, kwargs: dict) -> None:
    """Execute one node on the given (meta) arguments."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        _call_module(module, meta_state(module), args, kwargs)
    elif node.op == "call_function":
        node.target(*args, **kwargs)
    elif node.op == "call_method":
        getattr(args[0], node.target)(*args[1:], **kwargs)


def measure_node_macs(gm: torch.fx.GraphModule, node: torch.fx.Node, values: dict[torch.fx.Node, Any]) -> int:
    """MACs (whole batch) of ``node``; 0 when it cannot be re-run on meta tensors.

    A real tensor among its arguments (a ``torch.zeros`` state an exported graph made on the CPU) is moved to meta
    for a second try when the first fails (an LSTM refuses inputs on two devices)."""
    args = torch.fx.node.map_arg(node.args, lambda n: values[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
    for attempt in range(2):
        if attempt:
            args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        counter = FlopCounterMode(display=False)
        try:
            with torch.no_grad(), counter:
                _run_node(gm, node, args, kwargs)
        except Exception:
            continue
        return counter.get_total_flops() // 2
    return 0
