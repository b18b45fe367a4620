"""torch.export's context regions inlined: ``autocast`` and grad-mode blocks become enter/exit calls.

Export (pre-dispatch) wraps every ``torch.autocast`` block and every ``torch.no_grad`` /
``torch.set_grad_enabled`` block of a forward into one higher-order op whose body is a submodule
(``wrap_with_autocast``, ``wrap_with_set_grad_enabled``).  To the analysis that is one node
without a rule, and it would freeze every channel it touches: a model whose ``forward`` runs under
autocast (``@torch.autocast``, a Hugging Face ``Trainer`` with ``bf16=True``, which has accelerate
wrap the model's ``forward``) would be one frozen node.  Inlined, the body's nodes join the graph
between calls that enter and leave the context (``enter_autocast`` / ``exit_autocast``, which are
torch.amp's own ``_enter_autocast`` / ``_exit_autocast``; ``enter_grad_mode`` / ``exit_grad_mode``,
which give the caller's grad mode back): the graph runs as the model does, and the layers inside
are analysed and rewritten like any other.  The four are ``torch.fx.wrap``-ped and marked as side
effects, so dead-code elimination keeps them, and the enter calls read the graph's first input,
so a GraphModule pickled with ``torch.save`` (which traces its code again, and runs at trace time
every call that reads no traced value) keeps them as nodes.  A region whose result is read other
than item by item stays as it is (frozen).

fx tracing runs such a switch once, at trace time, and records nothing of it: its graph would
compute with gradients where the model has none, or in full precision where it autocasts (a
difference the acceptance run cannot see when the region changes nothing on the example's
device, ``torch.autocast("cuda")`` analysed on the CPU).  ``switches_seen`` lists the switches a
trace makes, so that the fx front end can refuse the graph (and 'auto' move on to export).  One
maker is told apart: a reentrant ``torch.utils.checkpoint`` runs its function under no_grad (its
backward runs it again with grad).  fx drops the checkpoint and keeps the plain calls (right for
the analysis and the rewrite); export records the no_grad region, and its graph would give those
layers no gradient: a grad-mode region traced inside a checkpoint's forward is refused.
"""

from __future__ import annotations

import operator
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from nrfx.capture.modes import retraceable_call
from nrfx.errors import NrfxWarning, TraceError, frame_line, live_frames, node_location, user_frame

__all__ = ["inline_context_regions", "switches_seen", "Switch", "enter_autocast", "exit_autocast",
           "enter_grad_mode", "exit_grad_mode", "REGION_CALLS", "regions_restored"]


@torch.fx.node.has_side_effect
def enter_autocast(anchor: Any, device_type: str, dtype: torch.dtype | None, enabled: bool,
                   cache_enabled: bool | None) -> object:
    """Enter an autocast region (a node of the captured graph); returns what ``exit_autocast`` takes.

    ``anchor`` (the graph's first input, unused) ties the call to a trace: tracing the code again records
    the call instead of running it.
    """
    return torch.amp.autocast_mode._enter_autocast(device_type, dtype, enabled, cache_enabled)


@torch.fx.node.has_side_effect
def exit_autocast(mode: object) -> None:
    """Leave the autocast region ``enter_autocast`` entered."""
    torch.amp.autocast_mode._exit_autocast(mode)


@torch.fx.node.has_side_effect
def enter_grad_mode(anchor: Any, enabled: bool) -> bool:
    """Enter a grad-mode region (a node of the captured graph); returns the caller's mode for ``exit_grad_mode``.

    ``anchor``: as ``enter_autocast``'s.
    """
    previous = torch.is_grad_enabled()
    torch._C._set_grad_enabled(enabled)
    return previous


@torch.fx.node.has_side_effect
def exit_grad_mode(previous: bool) -> None:
    """Give the caller's grad mode back."""
    torch._C._set_grad_enabled(previous)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_nesting() -> int:
    """How many autocast regions are open (read by stepping the counter up and back)."""
    torch.autocast_increment_nesting()
    return torch.autocast_decrement_nesting()


@contextmanager
def regions_restored() -> Iterator[None]:
    """Rule: a graph run that raises inside one of its own autocast or grad-mode regions (``enter_autocast`` with no
    ``exit_autocast`` after it) leaves the caller's autocast state and grad mode as they were: nrfx's own runs of a
    graph (checks, probes at other sizes, measurements) put them back whatever happens."""
    saved = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES]
    cache, grad, nesting = torch.is_autocast_cache_enabled(), torch.is_grad_enabled(), _autocast_nesting()
    try:
        yield
    finally:
        for device, enabled, dtype in saved:
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)
        torch.set_autocast_cache_enabled(cache)
        while _autocast_nesting() > nesting:
            if torch.autocast_decrement_nesting() == 0:
                torch.clear_autocast_cache()
        torch._C._set_grad_enabled(grad)


for _call in (enter_autocast, exit_autocast, enter_grad_mode, exit_grad_mode):
    torch.fx.wrap(_call.__name__)
REGION_CALLS = (enter_autocast, exit_autocast, enter_grad_mode, exit_grad_mode)

_HOP = torch.ops.higher_order
_BODY_AT = {_HOP.wrap_with_autocast: 4, _HOP.wrap_with_set_grad_enabled: 1}  # the body's position in the args


def inline_context_regions(gm: torch.fx.GraphModule, cuda_off: bool = False) -> int:
    """Rule: every autocast / grad-mode region whose outputs are read by index is inlined; returns how many.
    ``cuda_off``: torch said, while exporting, that it turned off a CUDA autocast the forward enabled."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _BODY_AT and _read_by_index(node):
            count += _inline(gm, node, cuda_off)
    return count


def _read_by_index(node: torch.fx.Node) -> bool:
    """Whether every user of the region takes one of its outputs by a constant index."""
    return all(user.target is operator.getitem and isinstance(user.args[1], int) for user in node.users)


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node, cuda_off: bool) -> int:
    """The region's body copied before ``node``, between its context's enter and exit; ``node`` removed."""
    at = _BODY_AT[node.target]
    context, body_node, operands = node.args[:at], node.args[at], node.args[at + 1:]
    body = gm.get_submodule(body_node.target)
    if node.target is _HOP.wrap_with_set_grad_enabled:
        _refuse_reentrant_checkpoint(body)
    elif cuda_off:
        _warn_if_disabled_for_want_of_cuda(body, context)
    inner = inline_context_regions(body, cuda_off)  # nested regions first: their bodies are the body's submodules
    graph = gm.graph
    with graph.inserting_before(node):
        leave = _enter(graph, node.target, context)
        inputs = [n for n in body.graph.nodes if n.op == "placeholder"]
        outputs = graph.graph_copy(body.graph, dict(zip(inputs, operands, strict=True)))
        leave()
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
    for user in list(node.users):
        user.replace_all_uses_with(outputs[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)
    if not body_node.users:
        graph.erase_node(body_node)
    return 1 + inner


def _refuse_reentrant_checkpoint(body: torch.fx.GraphModule) -> None:
    """Rule: a grad-mode region recorded inside a reentrant checkpoint's forward is refused (no gradient there)."""
    traced = next((n for n in body.graph.nodes if _REENTRANT_FORWARD.search(n.meta.get("stack_trace") or "")), None)
    if traced is not None:
        raise TraceError(f"torch.export recorded the forward of a reentrant torch.utils.checkpoint, which runs under "
                         f"no_grad ({node_location(traced)}): a graph of it would give those layers no gradient. "
                         "Pass use_reentrant=False to the checkpoint, or capture='fx' (fx keeps the plain calls)")


def _warn_if_disabled_for_want_of_cuda(body: torch.fx.GraphModule, context: tuple) -> None:
    """Rule: a CUDA autocast region recorded disabled, where torch said it turned one the forward enabled off
    (no CUDA on this machine), is said aloud: the graph would run the region in full precision on a GPU too."""
    device_type, _, enabled = context[:3]
    if device_type == "cuda" and not enabled and not torch.cuda.is_available():
        nodes = [n for n in body.graph.nodes if n.op == "call_function"]
        first = next((n for n in nodes if n.meta.get("stack_trace")), None)
        where = f"around {node_location(first)}" if first is not None else "of the forward"
        warnings.warn(f"torch.export recorded the torch.autocast('cuda') region {where} as disabled: "
                      "CUDA is not available on this machine, so torch turned it off. Where your forward enables it, "
                      "the rewritten GraphModule runs this region in full precision on a GPU too: analyse and "
                      "rejuvenate on a machine with CUDA, or pass inplace=True (your forward keeps its own autocast)",
                      NrfxWarning, stacklevel=2)


def _enter(graph: torch.fx.Graph, region: object, context: tuple):
    """The call entering the region's context (at the insertion point); returns a function adding its exit."""
    enter, leave = (enter_autocast, exit_autocast) if region is _HOP.wrap_with_autocast else \
        (enter_grad_mode, exit_grad_mode)
    entered = retraceable_call(graph, enter, tuple(context))
    return lambda: retraceable_call(graph, leave, (entered,), anchored=False)


@dataclass(frozen=True)
class Switch:
    """One grad-mode or autocast switch made while tracing: what, the user's line, whether a checkpoint made it."""

    kind: str
    where: str
    by_checkpoint: bool  # made by a reentrant torch.utils.checkpoint's forward (runs the function under no_grad)

    def __str__(self) -> str:
        return f"{self.kind} at {self.where}"


_SWITCHING_FILES = tuple(os.path.join(*parts) for parts in (
    ("torch", "autograd", "grad_mode.py"), ("torch", "amp", "autocast_mode.py"), ("torch", "utils", "_contextlib.py"),
    ("contextlib.py",)))
_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")
_REENTRANT_FORWARD = re.compile(r'torch[/\\]utils[/\\]checkpoint\.py", line \d+, in forward')


@contextmanager
def switches_seen() -> Iterator[list[Switch]]:
    """Rule: every grad-mode or autocast switch made in the block is listed: what it is, the user's line, its maker."""
    seen: list[Switch] = []
    grad, autocast = torch._C._set_grad_enabled, torch.set_autocast_enabled

    def spy(kind: str, switch: Callable) -> Callable:
        def recorded(*args):
            frames = list(live_frames())[1:]  # this function's own frame left out
            frame = user_frame(frames)
            maker = next((f for f in frames if not f[0].endswith(_SWITCHING_FILES)), ("", 0, ""))
            where = frame_line(frame) if frame else "an unknown line"
            seen.append(Switch(kind, where, maker[0].endswith(_CHECKPOINT_FILE) and maker[2] == "forward"))
            return switch(*args)
        return recorded

    torch._C._set_grad_enabled = spy("a grad-mode switch (torch.no_grad, enable_grad or set_grad_enabled)", grad)
    torch.set_autocast_enabled = spy("an autocast switch (torch.autocast)", autocast)
    try:
        yield seen
    finally:
        torch._C._set_grad_enabled, torch.set_autocast_enabled = grad, autocast
