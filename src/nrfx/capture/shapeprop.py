"""Shapes of every node without real compute: run the graph on meta tensors (``propagate_shapes``).

Most ops get their output shape from a formula (``nrfx.capture.shape_formulas``); the rest run their
meta kernel; a node whose kernel has no meta implementation runs once on zeros of the right
shape instead.  Modules run on meta copies of their parameters and buffers, and every
attribute a forward sets (a cached anchor grid, a registered buffer) is put back afterwards:
shape propagation never leaves a trace on the user's modules.  ``measure_node_macs`` runs
one node the same way under ``FlopCounterMode`` (2 FLOPs = 1 MAC).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from nrfx.capture.shape_formulas import function_shape, method_shape, module_shape
from nrfx.errors import ShapeError, error_frames, frame_line, node_location, user_frame

__all__ = ["propagate_shapes", "probe_shapes", "measure_node_macs", "meta_state", "to_meta", "untouched",
           "in_eval_mode", "hooks_silenced", "buffer_values", "restore_buffer_values"]


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


@contextmanager
def in_eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` and every submodule in eval mode for the block; each training flag put back after."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


@contextmanager
def hooks_silenced(module: nn.Module) -> Iterator[None]:
    """Rule: the user's forward hooks do not fire in the block; torch's own (weight_norm, spectral_norm) still do.

    Each submodule's hook dicts are swapped for copies holding only torch's hooks and put back on
    exit, so hooks registered inside the block vanish with them.
    """
    saved = [(m, {k: m.__dict__[k] for k in _HOOK_DICTS if k in m.__dict__}) for m in module.modules()]
    try:
        for m, hooks in saved:
            kept = {k: v for k, v in hooks["_forward_pre_hooks"].items() if _torch_own(v)} \
                if "_forward_pre_hooks" in hooks else {}
            for key, value in hooks.items():
                m.__dict__[key] = type(value)(kept.items()) if key == "_forward_pre_hooks" else type(value)()
        yield
    finally:
        for m, hooks in saved:
            m.__dict__.update(hooks)


def _torch_own(hook: object) -> bool:
    """A hook torch installs for a parametrisation (weight_norm, spectral_norm): part of the model's forward."""
    return type(hook).__module__.startswith("torch.nn.utils")


@contextmanager
def untouched(module: nn.Module) -> Iterator[None]:
    """Rule: whatever a forward assigns to any submodule's attributes, buffers or dicts and lists is undone on exit,
    and so are in-place updates of buffer data (a step counter's ``add_``, an EMA's ``mul_``).

    The dicts and lists are put back in place: a cache a forward fills (timm's attention-bias cache,
    which an FX trace fills with a proxy of its own graph) is emptied again.
    """
    saved = [(m, dict(m.__dict__), dict(m._buffers), dict(m._parameters), _contents(m)) for m in module.modules()]
    values = buffer_values(module)
    try:
        yield
    finally:
        for m, attributes, buffers, parameters, contents in saved:
            _restore(m.__dict__, attributes)
            _restore(m._buffers, buffers)
            _restore(m._parameters, parameters)
            for container, items in contents:
                _refill(container, items)
        restore_buffer_values(values)


BufferValue = tuple[str, torch.Tensor, int, torch.Tensor]


def buffer_values(module: nn.Module) -> list[BufferValue]:
    """(name, buffer, its version counter, a copy of its data) of every buffer with data (not on meta)."""
    return [(name, b, b._version, b.detach().clone()) for name, b in module.named_buffers()
            if isinstance(b, torch.Tensor) and not b.is_meta]


def restore_buffer_values(values: list[BufferValue]) -> list[str]:
    """Rule: a buffer a forward updated in place gets its data back; returns their names.

    Updated means its version moved or its data changed: a kernel that writes a buffer itself (BatchNorm's
    running stats in training) does not move the version.
    """
    changed = []
    with torch.no_grad():
        for name, buffer, version, data in values:
            if buffer._version != version or not _same(buffer, data):
                buffer.copy_(data)
                changed.append(name)
    return changed


def _same(buffer: torch.Tensor, data: torch.Tensor) -> bool:
    """Whether a buffer still holds ``data`` (same shape, equal values, NaN where ``data`` has NaN)."""
    if buffer.shape != data.shape or buffer.dtype != data.dtype:
        return False
    if not buffer.is_floating_point():
        return torch.equal(buffer, data)
    return bool(((buffer == data) | (buffer.isnan() & data.isnan())).all())


def _contents(module: nn.Module) -> list[tuple[dict | list, dict | list]]:
    """Every dict / list attribute of a module with a shallow copy of its items (torch's own dicts apart)."""
    return [(value, copy.copy(value)) for key, value in module.__dict__.items()
            if isinstance(value, (dict, list)) and key not in _MODULE_INTERNALS]


def _refill(container: dict | list, items: dict | list) -> None:
    """Put a dict or list back to its saved items, in place (the same object stays referenced)."""
    if isinstance(container, dict):
        if container.keys() != items.keys() or any(container[k] is not v for k, v in items.items()):
            container.clear()
            container.update(items)
    elif len(container) != len(items) or any(a is not b for a, b in zip(container, items, strict=True)):
        container[:] = items


def _restore(current: dict, saved: dict) -> None:
    """Put a dict back to its saved items (same objects), dropping keys added since."""
    for key in [k for k in current if k not in saved]:
        del current[key]
    for key, value in saved.items():
        if current.get(key, _MISSING) is not value:
            current[key] = value


_MISSING = object()
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)  # hooks, _parameters, _buffers, _modules: not caches


def _call_module(module: nn.Module, state: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    """Call a module on its meta state (or as it is, when it has none), leaving no trace on it."""
    with untouched(module):
        if not state:
            return module(*args, **kwargs)
        return torch.func.functional_call(module, state, args, kwargs, tie_weights=False, strict=False)


class _MetaInterpreter(torch.fx.Interpreter):
    """Runs a graph on meta tensors; parameters are swapped for meta copies, never touched."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self._meta_state: dict[str, dict[str, torch.Tensor]] = {}
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
        return _call_module(module, state, args, kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception as meta_error:  # retried on real zeros below
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            saved = self.module
            try:
                real = getattr(self, n.op)(n.target, _to_zeros(args), _to_zeros(kwargs))
            except Exception as zeros_error:  # report both failures
                self.retried[n] = zeros_error
                raise meta_error from None
            finally:
                self.module = saved
            return to_meta(real)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                     auto_leaves: dict[str, str] | None = None) -> dict[torch.fx.Node, Any]:
    """Meta value (shape, dtype, structure) of every node for the given example inputs.

    ``auto_leaves`` (qualified name -> why it could not be traced) only sharpens error messages.
    """
    interpreter = _MetaInterpreter(gm)
    interpreter.extra_traceback = False  # the ShapeError names the node itself
    try:
        with torch.no_grad():
            interpreter.run(*[to_meta(x) for x in example_inputs], enable_io_processing=False)
    except Exception as error:  # reported with the failing node
        raise _shape_error(interpreter, example_inputs, error, auto_leaves or {}) from error
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
                 auto_leaves: dict[str, str]) -> ShapeError:
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
    else:
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
    """MACs (whole batch) of ``node``; 0 when it cannot be re-run on meta tensors."""
    args = torch.fx.node.map_arg(node.args, lambda n: values[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            _run_node(gm, node, args, kwargs)
    except Exception:
        return 0
    return counter.get_total_flops() // 2
