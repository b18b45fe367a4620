"""The analysis context handed to every op rule: spaces, specs, parameters, MACs, consumers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree

from nrfx.analysis.records import Record
from nrfx.analysis.spaces import AtomTable, Layout
from nrfx.analysis.specs import TensorSpec, Zero, iter_tensor_specs
from nrfx.capture.shapeprop import measure_node_macs
from nrfx.errors import UnknownOpWarning, node_location
from nrfx.layers.srlayers import dense_names

__all__ = ["AnalysisState", "Context", "ParamInfo", "MacTerm", "Consumer"]


@dataclass(frozen=True)
class ParamInfo:
    """A parameter or buffer and the layout each of its dims carries."""

    name: str
    shape: tuple[int, ...]
    dims: tuple[Layout | None, ...]
    buffer: bool = False


@dataclass(frozen=True)
class MacTerm:
    """``coef × Π width(layouts)`` multiply-accumulates over the whole example batch."""

    node: str
    coef: int
    layouts: tuple[Layout, ...]


@dataclass(frozen=True)
class Consumer:
    """A place where the channels of dim ``dim`` of value ``vid`` are read by a weight."""

    node: str
    vid: int
    dim: int
    layout: Layout


class AnalysisState:
    """What one analysis run accumulates: spaces, specs, parameters, MACs, consumers, records."""

    def __init__(self, gm: torch.fx.GraphModule, values: dict[torch.fx.Node, Any]) -> None:
        self.gm, self.values = gm, values
        self.atoms = AtomTable()
        self.specs: dict[torch.fx.Node, Any] = {}
        self.tensors: list[TensorSpec] = []
        self.params: dict[str, ParamInfo] = {}
        self.macs: list[MacTerm] = []
        self.consumers: list[Consumer] = []
        self.unknown: dict[str, list[str]] = {}
        self.records: dict[str, Record] = {}
        self.memo: dict[Any, Layout | None] = {}
        self.names = {id(t): n for n, t in gm.named_parameters()}
        self.param_names = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
        self.param_names.update(dense_names(gm).values())  # an S/R layer's blocks read as its dense weight
        self.names.update({id(t): n for n, t in gm.named_buffers()})
        self.modules: dict[str, nn.Module] = dict(gm.named_modules(remove_duplicate=False))
        self.auto_leaves: dict[str, str] = {}


class Context:
    """The context a rule gets for one node: reads its inputs, writes into the shared ``AnalysisState``."""

    __slots__ = ("node", "state")

    def __init__(self, state: AnalysisState, node: torch.fx.Node) -> None:
        self.state, self.node = state, node

    # -- the shared stores rules read ---------------------------------------------------------
    @property
    def gm(self) -> torch.fx.GraphModule:
        """The graph module being analysed."""
        return self.state.gm

    @property
    def atoms(self) -> AtomTable:
        """Channel atoms and their classes."""
        return self.state.atoms

    @property
    def specs(self) -> dict[torch.fx.Node, Any]:
        """Spec of every node analysed so far."""
        return self.state.specs

    @property
    def records(self) -> dict[str, Record]:
        """Records of the layers and slices analysed so far."""
        return self.state.records

    @property
    def tensors(self) -> list[TensorSpec]:
        """Every tensor spec made so far."""
        return self.state.tensors

    # -- reading ------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The submodule a ``call_module`` node calls."""
        return self.state.modules[self.node.target]

    @property
    def out(self) -> Any:
        """The meta value of the current node."""
        return self.state.values[self.node]

    def value(self, x: Any) -> Any:
        """Meta value of an argument (a node's value, or the constant itself)."""
        return self.state.values[x] if isinstance(x, torch.fx.Node) else x

    def spec(self, x: Any) -> Any:
        """Spec of an argument: a node's spec, or None for constants."""
        return self.state.specs.get(x) if isinstance(x, torch.fx.Node) else None

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """A call argument by position or keyword."""
        args, kwargs = self.node.args, self.node.kwargs
        if index < len(args):
            return args[index]
        return kwargs.get(name, default)

    def literal(self, index: int, name: str, default: Any = None) -> Any:
        """A call argument by position or keyword as the values it had on the example: a node in it (a dim read as
        ``x.dim() - 1``, a size as ``x.shape[-1]``) replaced by its value.  For dim indices, which no width
        changes; a size that may follow a width is read with ``arg`` (a node there stays a node)."""
        return torch.fx.node.map_arg(self.arg(index, name, default), self.value)

    def name_of(self, tensor: torch.Tensor) -> str | None:
        """Qualified name of a parameter or buffer of the model."""
        return self.state.names.get(id(tensor))

    @property
    def where(self) -> str:
        """Where the current node is, for messages and freeze reasons."""
        return node_location(self.node)

    # -- building specs -------------------------------------------------------------------
    def tensor(self, shape: Any, dims: tuple[Layout | None, ...] | None = None,
               zero: tuple[Zero | None, ...] | None = None) -> TensorSpec:
        """A new tensor spec; dims default to no layouts, zero rules to 'nothing known'."""
        shape = tuple(int(s) for s in shape)
        dims = tuple(dims) if dims is not None else (None,) * len(shape)
        if zero is None:
            zero = tuple(None if d is None else Zero("none") for d in dims)
        dims, zero = self._sized(shape, dims, zero)
        spec = TensorSpec(len(self.state.tensors), shape, dims, tuple(zero))
        self.state.tensors.append(spec)
        return spec

    def _sized(self, shape: tuple[int, ...], dims: tuple, zero: tuple) -> tuple[tuple, tuple]:
        """Rule: a dim keeps its channels only where its size is theirs; elsewhere (a pad, a diff or a strided
        slice along channels) they freeze and the dim is plain."""
        held = [None if d is None else self.atoms.channels(d) * d.inner for d in dims]
        fits = [h is None or h == n for h, n in zip(held, shape, strict=True)]
        if all(fits):
            return dims, zero
        for d, h, n, ok in zip(dims, held, shape, fits, strict=True):
            if not ok:
                self.freeze(d, f"a dim of {n} entries no longer holds its {h} channels")
        return (tuple(d if ok else None for d, ok in zip(dims, fits, strict=True)),
                tuple(z if ok else None for z, ok in zip(zero, fits, strict=True)))

    def blank(self, value: Any) -> Any:
        """A spec mirroring ``value``'s structure (lists, tuples, dicts) with no channel layouts."""
        return pytree.tree_map(lambda v: self.tensor(v.shape) if isinstance(v, torch.Tensor) else None, value)

    def like(self, spec: TensorSpec, shape: Any = None, mask: str | None = None) -> TensorSpec:
        """Same layouts as ``spec`` (channel-wise op), zeros copied through, optional mask."""
        zero = tuple(
            None if d is None else Zero("copy", (spec.whole(i, self.atoms.channels(d)),), mask)
            for i, d in enumerate(spec.dims)
        )
        return self.tensor(spec.shape if shape is None else shape, spec.dims, zero)

    # -- spaces ---------------------------------------------------------------------------
    def fresh(self, width: int, key: Any = None) -> Layout:
        """A new channel space of ``width`` (the same one again for the same key)."""
        memo = self.state.memo
        if key is not None and key in memo:
            return memo[key]
        layout = self.atoms.layout(width)
        if key is not None:
            memo[key] = layout
        return layout

    def freeze(self, layout: Layout | None, reason: str) -> None:
        """Freeze the spaces of a layout, recording the reason and the node."""
        if layout is not None:
            self.atoms.freeze(layout, f"{reason} [{self.where}]")

    def freeze_all(self, spec: Any, reason: str) -> None:
        """Freeze every layout inside a spec structure."""
        for tensor in iter_tensor_specs(spec):
            for layout in tensor.dims:
                self.freeze(layout, reason)

    def unify(self, a: Layout | None, b: Layout | None, reason: str = "layouts do not align") -> Layout | None:
        """Tie two layouts; a layout tied to a plain dim, or misaligned, is frozen instead."""
        if a is None or b is None:
            self.freeze(a or b, f"channels meet a non-channel dim ({reason})")
            return a or b
        if not self.atoms.unify(a, b):
            self.freeze(a, reason)
            self.freeze(b, reason)
        return a

    def share(self, key: Any, layout: Layout | None) -> None:
        """Weight sharing: the layouts a shared weight meets on each call are one space."""
        memo = self.state.memo
        if key not in memo:
            memo[key] = layout
            return
        first = memo[key]
        if first is not None or layout is not None:
            self.unify(first, layout, "weight shared across calls with different channels")

    # -- costs and consumers ----------------------------------------------------------------
    def consume(self, spec: TensorSpec | None, dim: int) -> Layout | None:
        """Record that a weight reads the channels of ``spec``'s ``dim``; returns its layout."""
        if spec is None:
            return None
        layout = spec.dims[dim]
        if layout is not None:
            self.state.consumers.append(Consumer(self.node.name, spec.vid, dim, layout))
        return layout

    def param(self, tensor: torch.Tensor | None, dims: tuple[Layout | None, ...]) -> None:
        """Register the layout of each dim of a module's parameter or buffer."""
        if tensor is None:
            return
        name = self.name_of(tensor)
        if name is not None:
            self.param_named(name, tuple(tensor.shape), dims, not isinstance(tensor, nn.Parameter))

    def param_named(self, name: str, shape: tuple[int, ...], dims: tuple[Layout | None, ...],
                    buffer: bool = False) -> None:
        """Register a parameter by qualified name; a reused parameter ties its layouts."""
        known = self.state.params.get(name)
        if known is None:
            buffer = buffer or name not in self.state.param_names  # a buffer read by get_attr (blur filters)
            self.state.params[name] = ParamInfo(name, tuple(shape), tuple(dims), buffer)
            return
        for old, new in zip(known.dims, dims, strict=True):
            if old is not None or new is not None:
                self.unify(old, new, "parameter used with different channels")

    def add_macs(self, coef: int, *layouts: Layout | None) -> None:
        """Add ``coef × Π width(layouts)`` MACs (a None layout must already be in ``coef``)."""
        kept = tuple(x for x in layouts if x is not None)
        if coef:
            self.state.macs.append(MacTerm(self.node.name, int(coef), kept))

    def record(self, record: Record) -> None:
        """Remember what the rewrite stage needs to know about this node."""
        self.state.records[self.node.name] = record

    # -- unknown ops ----------------------------------------------------------------------
    def unknown_op(self, label: str) -> Any:
        """No rule: freeze every space the node touches, measure its MACs, warn once per op."""
        for arg in self.node.all_input_nodes:
            self.freeze_all(self.spec(arg), f"input of unknown op {label}")
        unknown = self.state.unknown
        first = label not in unknown
        unknown.setdefault(label, []).append(self.node.name)
        if first:
            warnings.warn(
                f"nrfx has no rule for {label} ({self.where}); the channels it touches are frozen "
                "(kept at full width and counted alive). Register a rule with nrfx.analysis.rules.module_rule/"
                "function_rule/method_rule to analyse through it.",
                UnknownOpWarning,
                stacklevel=4,
            )
        self.add_macs(self.measured_macs())
        spec = self.blank(self.out)
        self.freeze_all(spec, f"output of unknown op {label}")
        return spec

    def opaque(self, reason: str) -> Any:
        """A node nrfx cannot see into (an automatic leaf): freeze its inputs and outputs, measure its MACs."""
        for arg in self.node.all_input_nodes:
            self.freeze_all(self.spec(arg), reason)
        self.add_macs(self.measured_macs())
        spec = self.blank(self.out)
        self.freeze_all(spec, reason)
        return spec

    def measured_macs(self) -> int:
        """MACs of the current node measured by FlopCounterMode on meta tensors (2 FLOPs = 1 MAC)."""
        return measure_node_macs(self.gm, self.node, self.state.values)
