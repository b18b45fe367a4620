"""Trace any model into an FX graph and propagate shapes on the meta device.

Leaf policy: torch.nn built-ins, the user's ``leaf_modules`` (types or qualified names),
timm's registered no-trace modules and functions when timm is importable, and every
submodule whose code cannot be traced (it becomes a leaf automatically, its channels are
frozen by the analysis, and the reason is recorded).  ``a += b`` (and ``-=``, ``*=``, ``/=``)
stays in place, as the eager code ran it, where ``a`` is a fresh conv/linear/norm/arithmetic
output that nothing else reads; elsewhere it is traced out of place, as plain FX does.
Shapes are propagated afterwards by ``nrfx.capture.shapeprop``.
"""

from __future__ import annotations

import builtins
import dataclasses
import inspect
import keyword
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from nrfx.capture import mha, swin, transformer
from nrfx.capture.contexts import switches_seen
from nrfx.capture.guards import untouched
from nrfx.capture.modes import FLAG_READ, flags_survive_retraces
from nrfx.errors import TraceError, error_frames, format_frame, frame_line, live_frames, user_frame
from nrfx.layers.gates import Gate
from nrfx.layers.srlayers import SR_LAYERS
from nrfx.ops.layer_kinds import LEAF_LAYERS
from nrfx.ops.optable import keeps_behaviour

__all__ = ["Traced", "trace", "defaulted_args", "keep_safe_inplace"]

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
    """timm's registered no-trace modules and functions (empty when timm is absent), and its weight-standardised
    convs (StdConv2d, ScaledStdConv2d): traced into, their weight is computed (an unknown op freezing both sides);
    kept whole, the rule of their SAME-padded twins reads them."""
    try:
        from timm.layers import _fx, std_conv
    except Exception:  # timm is optional and may be broken
        return set(), []
    functions = [f for f in _fx.get_notrace_functions() if callable(f)]
    return set(_fx.get_notrace_modules()) | {std_conv.StdConv2d, std_conv.ScaledStdConv2d}, functions


def _timm_drop_path() -> list[Callable]:
    """timm's functional drop path (it returns early in eval mode: autowrapped so that it stays a node)."""
    try:
        from timm.layers.drop import drop_path
    except Exception:  # timm is optional and may be broken
        return []
    return [drop_path]


def _train_mode_functions() -> dict[Callable, inspect.Signature]:
    """Functions whose ``training`` argument a module passes as ``self.training`` (dropout, stochastic depth)."""
    import torch.nn.functional as F

    functions: list[Callable] = [F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                 F.feature_alpha_dropout, *_TIMM_DROP_PATH]
    try:
        from torchvision.ops import stochastic_depth
        functions.append(stochastic_depth)
    except Exception:  # pragma: no cover - torchvision absent, or broken (built for another torch)
        pass
    return {f: inspect.signature(f) for f in functions}


_TIMM_DROP_PATH = tuple(_timm_drop_path())  # looked up once: a tracer is built per trace attempt
_TRAIN_MODE = _train_mode_functions()


def _baked_training(target: Any, args: tuple, kwargs: dict, mode: Callable[[], bool]) -> inspect.BoundArguments | None:
    """Rule: a dropout-like call given ``training=`` the calling module's own flag (``mode()``, as traced) with a
    rate > 0 was handed ``self.training``, which tracing turned into a constant (a flag left at its default, as
    timm's ``drop_path(x, p)`` does, is the caller's choice).  Its bound arguments, or None.  ``mode`` is only
    called for a dropout-like target (finding the calling module walks the module tree)."""
    signature = _TRAIN_MODE.get(target) if callable(target) else None
    if signature is None:
        return None
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    passed = bound.arguments.get("training")
    bound.apply_defaults()
    rate = bound.arguments.get("p", bound.arguments.get("drop_prob"))
    return bound if isinstance(rate, (int, float)) and rate > 0 and passed is mode() else None


_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
            operator.itruediv: operator.truediv}
_FRESH_MODULES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_FRESH_FUNCTIONS = (*_INPLACE, *_INPLACE.values(), torch.add, torch.sub, torch.mul, torch.div)


class _InplaceProxy(torch.fx.Proxy):
    """An FX proxy that records ``a += b`` (and -=, *=, /=) as the in-place operator.

    Its class is named ``Proxy`` so that trace errors (``int() ... not 'Proxy'``) read as FX's own.
    """

    def __iadd__(self, other: Any) -> torch.fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.iadd, (self, other), {})

    def __isub__(self, other: Any) -> torch.fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.isub, (self, other), {})

    def __imul__(self, other: Any) -> torch.fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.imul, (self, other), {})

    def __itruediv__(self, other: Any) -> torch.fx.Proxy:
        return self.tracer.create_proxy("call_function", operator.itruediv, (self, other), {})


_InplaceProxy.__name__ = _InplaceProxy.__qualname__ = "Proxy"


def _fresh(node: Any, modules: dict[str, nn.Module]) -> bool:
    """Whether a node makes a new tensor its producer does not keep for backward (safe to update in place)."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(modules.get(node.target), _FRESH_MODULES)
    return node.op == "call_function" and node.target in _FRESH_FUNCTIONS


def keep_safe_inplace(gm: torch.fx.GraphModule) -> None:
    """Rule: an in-place operator stays so only on a fresh tensor read by nothing else; else it turns functional."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _INPLACE:
            target = node.args[0]
            if not (_fresh(target, modules) and len(target.users) == 1):
                node.target = _INPLACE[node.target]


def _keeps_a_torch_layer(module: nn.Module) -> bool:
    """Whether the module's class subclasses a torch.nn layer and computes what it computes (``keeps_behaviour``)."""
    base = next((b for b in type(module).__mro__[1:] if b.__module__.startswith("torch.nn.") and b is not nn.Module),
                None)
    return base is not None and keeps_behaviour(type(module), base, module)


class NrfxTracer(torch.fx.Tracer):
    """FX tracer with a user-extensible leaf policy and automatic leaves for untraceable code."""

    def __init__(self, leaf_modules: Iterable[type | str] = (), autowrap: Sequence[Callable] = (),
                 has_rule: Callable[[nn.Module], bool] | None = None) -> None:
        timm_modules, timm_functions = _timm_notrace()
        self.has_rule = has_rule or (lambda m: False)
        super().__init__(autowrap_functions=tuple(autowrap) + tuple(timm_functions) + _TIMM_DROP_PATH)
        self.record_stack_traces = False  # FX's full capture costs more than the trace; see create_node
        leaves = list(leaf_modules)
        self.leaf_types = tuple({t for t in leaves if isinstance(t, type)} | timm_modules)
        self.leaf_names = {n for n in leaves if isinstance(n, str)}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        """torch.nn built-ins, TorchScript modules (compiled code: FX would record their C++ handle's ``forward``),
        the user's leaf types and names, and auto leaves are leaves."""
        if module_qualified_name in self.leaf_names or isinstance(m, torch.jit.ScriptModule):
            return True
        if isinstance(m, (*SR_LAYERS, Gate, *LEAF_LAYERS)):
            return True  # nrfx's S/R layers and gates (the conv/linear/norm they stand for), registered layers
        if self.has_rule(m) and _keeps_a_torch_layer(m):
            return True  # a torch.nn layer's subclass computing what the layer does (a BatchNorm2d with its own init)
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        """Proxies that keep the model's in-place arithmetic (see ``keep_safe_inplace``)."""
        return _InplaceProxy(node, self)

    def create_node(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                    type_expr: Any = None) -> torch.fx.Node:
        """FX's node, with the user's source line as its stack trace (for error messages)."""
        bound = _baked_training(target, args, kwargs, lambda: self._caller().training) if kind == "call_function" \
            else None
        if bound is not None:
            args, kwargs = self._training_read_at_run_time(bound)
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind.startswith("call_") and not node.stack_trace:
            node.stack_trace = _user_source_line()
        return node

    def _caller(self) -> nn.Module:
        """The module whose forward is being traced now."""
        path = self.scope.module_path
        return self.root.get_submodule(path) if path else self.root

    def _training_read_at_run_time(self, bound: inspect.BoundArguments) -> tuple[tuple, dict]:
        """The call with its ``training`` argument read from the calling module's flag when the graph runs.

        Tracing records ``F.dropout(x, p, self.training)`` with the flag of the moment: traced in eval mode it
        would never drop in training, traced in train mode (the driver) it would drop in eval; a ``get_attr``
        of ``<module>.training`` follows ``.train()``/``.eval()``."""
        path = self.scope.module_path
        flag = super().create_node("get_attr", f"{path}.training" if path else "training", (), {})
        flag.meta[FLAG_READ] = True  # made a by_mode call once the GraphModule exists (flags_survive_retraces)
        bound.arguments["training"] = flag
        return bound.args, bound.kwargs

    def create_arg(self, a: Any) -> Any:
        """FX's argument, except that a dict subclass (OrderedDict, a dataclass such as Hugging Face's
        ModelOutput) is rebuilt as itself from keyword fields, not flattened to a plain dict."""
        if isinstance(a, dict) and type(a) is not dict and all(_is_name(k) for k in a):
            fields = {k: self.create_arg(v) for k, v in a.items()}
            if dataclasses.is_dataclass(a):
                fields = {f.name: self.create_arg(getattr(a, f.name)) for f in dataclasses.fields(a)}
            return self.create_node("call_function", type(a), (), fields)
        return super().create_arg(a)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """Trace into ``m``; if its code cannot be traced, report the innermost culprit."""
        qualname = self.path_of_module(m)
        own_forward = "forward" in vars(m)  # an instance whose forward was replaced computes something else
        if qualname not in self.leaf_names and not (self.leaf_types and isinstance(m, self.leaf_types)) \
                and not own_forward:
            # an attention's heads (nrfx.capture.mha, .swin), a transformer's layers (nrfx.capture.transformer), opened
            for opened in (mha.traced_call if isinstance(m, nn.MultiheadAttention) else transformer.traced_call,
                           swin.traced_call):
                expanded = opened(m, args, kwargs)
                if expanded is not None:
                    return expanded
        try:
            return super().call_module(m, forward, args, kwargs)
        except _SubmoduleFailed:
            raise
        except Exception as error:  # any trace failure makes this a leaf candidate
            if qualname == "" or self.is_leaf_module(m, qualname):
                raise
            raise _SubmoduleFailed(qualname, error) from error


def _is_name(key: Any) -> bool:
    """Whether a dict key can be a keyword argument in generated code."""
    return isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key)


def _user_source_line() -> str | None:
    """The innermost calling frame in the user's code, as a one-frame stack trace.

    Walking frames is ~50× cheaper than FX's ``record_stack_traces`` capture, and the
    innermost user line is all that error messages (``node_location``) show.
    """
    frame = user_frame(live_frames())
    return format_frame(frame) if frame is not None else None


def _user_frame(error: BaseException) -> str:
    """Where an error was raised in the user's code (else its innermost frame), as 'file:line: code'."""
    frame = user_frame(error_frames(error)) or next(error_frames(error), None)
    return frame_line(frame) if frame is not None else "unknown location"


def drop_stale_wraps() -> int:
    """Rule: a ``torch.fx.wrap`` registration whose globals lack the name is dropped (it breaks every later trace).

    A recompiled GraphModule that calls a wrapped function of torch itself (fx's ``_assert_is_none``,
    emitted for ``concrete_args`` of None) registers it under its dotted name in its generated
    code's globals, where no such name exists; every ``symbolic_trace`` in the process then fails
    with a KeyError (pytorch/pytorch#130701).  Returns how many were dropped.
    """
    table = torch.fx._symbolic_trace._wrapped_fns_to_patch
    stale = [key for key, frame in table.items() if key[1] not in frame and not hasattr(builtins, key[1])]
    for key in stale:
        del table[key]
    return len(stale)


def trace(
    model: nn.Module,
    leaf_modules: Iterable[type | str] = (),
    concrete_args: dict[str, Any] | None = None,
    autowrap_functions: Sequence[Callable] = (),
    has_rule: Callable[[nn.Module], bool] | None = None,
) -> Traced:
    """Symbolically trace ``model``; untraceable submodules become leaves, the root cannot; so do modules
    ``has_rule`` accepts (the analysis' rule for the class, or a base class whose forward it keeps)."""
    leaves = list(leaf_modules)
    auto: dict[str, str] = {}
    drop_stale_wraps()
    for _ in range(_MAX_AUTO_LEAVES):
        tracer = NrfxTracer(leaves, autowrap_functions, has_rule)
        versions = [(name, b, b._version) for name, b in model.named_buffers()]  # an in-place update moves these
        try:
            with untouched(model):  # a forward run on proxies leaves none in the model (timm's bias caches)
                with switches_seen() as switches:  # the forward's grad-mode / autocast switches, listed
                    graph = tracer.trace(model, concrete_args=concrete_args)
                gm = _graph_module(tracer.root, graph, type(model).__name__)  # copies FX's _tensor_constant*
                updated = [name for name, b, version in versions if b._version != version]
        except _SubmoduleFailed as failed:
            auto[failed.qualname] = f"untraceable code ({type(failed.error).__name__}: {failed.error})"
            leaves.append(failed.qualname)
            continue
        except Exception as error:  # turned into a TraceError with a way out
            raise TraceError(
                f"nrfx cannot trace {type(model).__name__}: {type(error).__name__}: {error}\n"
                f"  at {_user_frame(error)}\n"
                "  The model's own forward has code FX cannot trace (data-dependent control flow, "
                "len()/int() of a tensor, ...). Move that code into a submodule and pass it as "
                "leaf_modules=[...], or fix the branch with concrete_args={...}."
            ) from error
        if updated:
            raise TraceError(
                f"{type(model).__name__}'s forward updates buffer(s) {updated[:5]} in place (a counter, a running "
                "average): FX tracing runs that update once on the real buffer and leaves it out of the graph. "
                "capture='export' keeps it in the graph (capture='auto' falls back to it)")
        switches = [switch for switch in switches if not switch.by_checkpoint]
        if switches:
            raise TraceError(
                f"{type(model).__name__}'s forward makes {switches[0]}, which FX tracing runs once while tracing "
                "and leaves out of the graph: the graph would run in the caller's grad mode and precision where the "
                "model switches. capture='export' keeps the region in the graph (capture='auto' falls back to it), or "
                "make the submodule that makes the switch a leaf (leaf_modules=[...])")
        flags_survive_retraces(gm)
        keep_safe_inplace(gm)
        return Traced(gm, auto)
    raise TraceError(f"nrfx gave up on {type(model).__name__}: more than {_MAX_AUTO_LEAVES} untraceable submodules")


def _graph_module(root: nn.Module, graph: torch.fx.Graph, name: str) -> torch.fx.GraphModule:
    """A GraphModule whose Python code is generated on first use (the analysis never calls it)."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # older torch: code generated now
        return torch.fx.GraphModule(root, graph, name)
    return _LazyGraphModule(root, graph, name)


def defaulted_args(model: nn.Module, n_inputs: int, concrete_args: dict[str, Any] | None) -> dict[str, Any] | None:
    """Forward parameters past the example inputs are fixed at their defaults (``mask=None`` stays None).

    Left symbolic, ``if mask is not None`` would trace the branch the example never takes.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return concrete_args
    fixed = dict(concrete_args or {})
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for p in params[n_inputs:]:
        if p.kind in kinds and p.default is not inspect.Parameter.empty:
            fixed.setdefault(p.name, p.default)
    return fixed or concrete_args
