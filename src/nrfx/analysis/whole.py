"""Analysis: run the op rules over one captured graph, and count c(A), U(θ) and r(θ) (``analyze_whole``).

The rule pass never runs the model's weights (the capture ran it once, to accept the graph):
shapes come from meta tensors, costs from the parameter layouts and MAC terms the rules
registered, and liveliness from the masks (norm scales or the user's) pushed through the zero
rules of every value.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.fx
from torch import nn

from nrfx.analysis import rules as _rules  # noqa: F401 - registers the built-in rules
from nrfx.analysis.context import AnalysisState, Context, ParamInfo
from nrfx.analysis.cost import CostModel, Ratios, by_kind, mac_cost, param_cost
from nrfx.analysis.masks import check_masks, norm_masks, whole_blocks
from nrfx.analysis.records import LayerRecord, SliceRecord
from nrfx.analysis.reprs import analysis_repr, utilization_repr
from nrfx.analysis.rules.registry import COUNT_READERS, lookup
from nrfx.analysis.spaces import Layout
from nrfx.analysis.specs import ChannelCount, TensorSpec
from nrfx.capture.caches import cache_output_leaves
from nrfx.capture.front_ends import MODE_BRANCH, Captured, Example
from nrfx.capture.front_ends import capture as _capture
from nrfx.errors import NrfxError, NrfxWarning, RenamedAttribute, RuleError, ShapeError, node_location
from nrfx.layers.srlayers import dense_names
from nrfx.ops.layer_kinds import LEAF_LAYERS

__all__ = ["analyze_whole", "Example", "Analysis", "ModelAnalysis", "Space", "Utilization", "Coverage",
           "COVERAGE_WARN_BELOW", "COVERAGE_MIN_CHANNELS", "as_example"]

COVERAGE_WARN_BELOW = 0.5  # analyze warns when less than this share of the channels is monitored,
COVERAGE_MIN_CHANNELS = 256  # in a model with at least this many channels (tiny test models stay quiet)


@dataclass(frozen=True)
class Space:
    """A channel space: one width shared by tied dims; frozen spaces keep their width.

    ``block``: channels are kept and added in whole blocks of this width (a grouped conv's or a
    GroupNorm's group); ``unit``: the first space of its planning unit (spaces a grouped conv
    ties group by group share the number of blocks and which blocks survive; its own index
    when untied); ``heads``: its channels count attention heads (alignment skips it: the head
    count is no layer's width, q, k and v are); ``summed``: an add joins two activations in it
    (a residual stream, which ``residual="keep"`` leaves as it is); ``contracted``: a product of two
    activations sums over it (q·kᵀ without heads), so no channel may be added to it.
    """

    index: int
    width: int
    frozen: tuple[str, ...]
    block: int = 1
    unit: int = -1
    heads: bool = False  # its channels count attention heads (a batch dim of attention, never a layer's width)
    summed: bool = False  # an add joins two activations in it: a residual stream (the paper's "main stream")
    contracted: bool = False  # a product of two activations sums over it: new channels would change the product

    @property
    def is_frozen(self) -> bool:
        """Whether the space keeps its width and counts as fully alive."""
        return bool(self.frozen)


@dataclass(frozen=True)
class Utilization(Ratios):
    """U(θ) and r(θ) in params and MACs, and the live channels of every space."""

    params: int
    macs: int
    live_params: int
    live_macs: int
    alive: tuple[torch.Tensor, ...]

    flops = RenamedAttribute("macs")
    live_flops = RenamedAttribute("live_macs")
    r_flops = RenamedAttribute("r_macs")

    def __repr__(self) -> str:
        """r(θ), U(θ)/c(A) and the count of dead channels (the masks are in ``alive``)."""
        return utilization_repr(self)


@dataclass(frozen=True)
class Coverage:
    """Share of all channels (summed widths of every space) in free spaces, and in free spaces with a liveliness signal.

    A signal is a per-channel scale read by a layer record of kind "norm" on the space (BatchNorm,
    InstanceNorm with affine, ``nrfx.Gate``).  ``unsignalled`` lists the free spaces without one:
    ``nrfx.add_gates`` puts a gate in each.
    """

    channels: int
    free_channels: int
    monitored_channels: int
    unsignalled: tuple[int, ...] = ()

    @property
    def free(self) -> float:
        """Share of the channels in spaces that may change width."""
        return self.free_channels / self.channels if self.channels else 0.0

    @property
    def monitored(self) -> float:
        """Share of the channels nrfx can find dead and rejuvenate: free and with a liveliness signal."""
        return self.monitored_channels / self.channels if self.channels else 0.0


@runtime_checkable
class ModelAnalysis(Protocol):
    """What every analysis answers, of a whole graph (``Analysis``) or of islands (``nrfx.IslandAnalysis``).

    ``whole`` tells which; ``parts()`` maps module paths to the graph analyses it is made of (``{"": self}``
    for a whole one), so a caller plans, gates or reports part by part without asking for a type.
    """

    capture: str
    capture_notes: list[str]

    @property
    def whole(self) -> bool: ...

    @property
    def params(self) -> int: ...

    @property
    def macs(self) -> int: ...

    @property
    def unknown_ops(self) -> dict[str, tuple[str, ...]]: ...

    @property
    def auto_leaves(self) -> dict[str, str]: ...

    def parts(self) -> dict[str, Analysis]: ...

    def coverage(self) -> Coverage: ...

    def utilization(self, masks: dict[str, torch.Tensor] | None = None) -> Utilization: ...

    def masks_from(self, model: nn.Module, threshold: float = 0.01) -> dict[str, torch.Tensor]: ...

    def report(self, masks: dict[str, torch.Tensor] | None = None) -> Any: ...


def as_example(example_inputs: Any, example_kwargs: dict[str, Any] | None = None) -> Example:
    """Example inputs: a tensor, or a tuple/list of positional args (each any nest of lists, tuples, dicts)."""
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(args, (list, tuple)) or not (args or example_kwargs):
        raise ShapeError(
            f"example_inputs must be a tensor or a tuple of positional arguments, got {type(example_inputs).__name__}; "
            "pass e.g. torch.randn(2, 3, 224, 224), or (images, targets) for a model with two arguments"
        )
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise ShapeError(f"example_kwargs must be a dict of keyword arguments, got {type(example_kwargs).__name__}")
    example = Example(tuple(args), dict(example_kwargs or {}))
    if not example.tensors():
        raise ShapeError(f"the example inputs hold no tensor (got {example_inputs!r}: a shape is not an input); "
                         "pass tensors, e.g. torch.randn(2, 3, 224, 224)")
    return example


def _batch_size(example: Example) -> int:
    """Batch size of the example inputs: the first dim of the first tensor that has one."""
    for x in example.tensors():
        if x.dim() > 0:
            return max(int(x.shape[0]), 1)
    return 1


class Analysis:
    """The channel graph of a model: spaces, parameter layouts, MAC terms and consumers."""

    def __init__(self, model: nn.Module, captured: Captured, state: AnalysisState, example: Example) -> None:
        self.model_name = type(model).__name__
        self.gm = captured.gm
        self.capture = captured.method
        self.capture_notes = list(captured.notes)
        self.auto_leaves = dict(captured.auto_leaves)
        self.example = example
        self.batch = _batch_size(example)
        self.input_shapes = tuple(tuple(x.shape) for x in example.tensors())
        self.state = state
        self.atoms = state.atoms
        self.unknown_ops = {k: tuple(v) for k, v in state.unknown.items()}
        self.records = state.records
        self.param_info: dict[str, ParamInfo] = dict(state.params)
        self._index_spaces()
        self._constant_params = self._count_constant_params(model)
        self.mask_sites = self._mask_sites()
        self.param_cost = param_cost(self.param_info, self.space_ids, self._constant_params)
        self.mac_cost = mac_cost(state.macs, self.space_ids, _input_dependent_nodes(self.gm), self.batch)
        full = [s.width for s in self.spaces]
        self.params = self.param_cost(full)
        self.macs = self.mac_cost(full)
        self._default_masks = norm_masks(model)

    def __repr__(self) -> str:
        """One line: model, inputs, c(A), r(θ), spaces and coverage (``report()`` has the layers)."""
        return analysis_repr(self)

    whole = True  # one graph of the whole model (ModelAnalysis)

    def parts(self) -> dict[str, Analysis]:
        """This one graph, at the model's root path ``""``."""
        return {"": self}

    flops = RenamedAttribute("macs")
    live_flops = RenamedAttribute("live_macs")
    effective_flops = RenamedAttribute("effective_macs")
    flops_at = RenamedAttribute("macs_at")
    flops_under = RenamedAttribute("macs_under")

    # -- structure ------------------------------------------------------------------------
    def _index_spaces(self) -> None:
        """Number the classes of leaf atoms that some layout uses."""
        blocks = self.atoms.resolve_blocks()  # may cut and freeze: before the classes are read
        used: set[int] = set()
        layouts = [d for t in self.state.tensors for d in t.dims if d is not None]
        layouts += [d for p in self.param_info.values() for d in p.dims if d is not None]
        for layout in layouts:
            used.update(self.atoms.leaves(layout.atoms))
        index: dict[int, int] = {}
        units: dict[int, int] = {}  # unit root -> its first space
        spaces: list[Space] = []
        for leaf in sorted(used):
            root = self.atoms.find(leaf)
            if root not in index:
                index[root] = len(spaces)
                reasons = tuple(self.atoms.frozen.get(root, ()))
                tied = blocks.get(root)
                members = self.atoms.members[root]
                heads, summed, contracted = (not flags.isdisjoint(members)
                                             for flags in (self.atoms.heads, self.atoms.summed, self.atoms.contracted))
                spaces.append(Space(len(spaces), self.atoms.width[leaf], reasons, tied.block if tied else 1,
                                    units.setdefault(tied.unit, len(spaces)) if tied else len(spaces),
                                    heads, summed, contracted))
        self.spaces: list[Space] = spaces
        self._space_of_root = index

    def space_ids(self, layout: Layout) -> list[int]:
        """Space index of each leaf atom of a layout, in channel order."""
        return [self._space_of_root[self.atoms.find(a)] for a in self.atoms.leaves(layout.atoms)]

    def norm_spaces(self, model: nn.Module) -> list[tuple[str, nn.Module, list[tuple[int, slice]]]]:
        """Every norm with a scale whose output is followed: (name, module, [(space, its entries of γ)…]).

        A space's entries are ``width × layout.inner`` consecutive entries of the norm's γ (one
        run of ``inner`` per channel).  A norm called twice is listed twice.
        """
        modules = dict(model.named_modules())
        found = []
        for _, record in self.layers("norm"):
            name, layout = record.module, record.output
            module = modules.get(name)
            if layout is None or getattr(module, "weight", None) is None:
                continue
            segments, offset = [], 0
            for s in self.space_ids(layout):
                size = self.spaces[s].width * layout.inner
                segments.append((s, slice(offset, offset + size)))
                offset += size
            found.append((name, module, segments))
        return found

    def signalled_spaces(self) -> set[int]:
        """Spaces that a norm scale or a gate reads (a "norm" record whose module has a ``weight``), with every space
        planned in one unit with them (the q, k and v blocks of gated heads)."""
        modules = dict(self.gm.named_modules())
        found: set[int] = set()
        for _, record in self.layers("norm"):
            if record.output is not None and getattr(modules.get(record.module), "weight", None) is not None:
                found.update(self.space_ids(record.output))
        units = {self.spaces[s].unit for s in found}  # spaces planned as one unit (heads) share its signal
        return {s.index for s in self.spaces if s.unit in units}

    def coverage(self) -> Coverage:
        """Channels in free spaces, and in free spaces with a liveliness signal, as a typed record."""
        signalled = self.signalled_spaces()
        free = [s for s in self.spaces if not s.is_frozen]
        return Coverage(sum(s.width for s in self.spaces), sum(s.width for s in free),
                        sum(s.width for s in free if s.index in signalled),
                        tuple(s.index for s in free if s.index not in signalled))

    def layers(self, *kinds: str) -> Iterator[tuple[str, LayerRecord]]:
        """(node name, record) of every recorded layer, optionally only of the given kinds."""
        for name, record in self.records.items():
            if isinstance(record, LayerRecord) and (not kinds or record.kind in kinds):
                yield name, record

    def slices(self) -> Iterator[tuple[str, SliceRecord]]:
        """(node name, record) of every literal channel slice the rewrite moves."""
        for name, record in self.records.items():
            if isinstance(record, SliceRecord):
                yield name, record

    def width(self, layout: Layout, live: Sequence[int]) -> int:
        """Features a layout carries when space ``s`` has ``live[s]`` channels."""
        return layout.inner * sum(live[s] for s in self.space_ids(layout))

    def _count_constant_params(self, model: nn.Module) -> int:
        """Parameters no rule claimed (branches the trace never reaches too): counted at full size."""
        dense = dense_names(self.gm)  # an S/R layer's blocks are claimed with its dense weight and bias
        registered = {n for n, p in self.param_info.items() if not p.buffer}
        claimed = {id(p) for n, p in self.gm.named_parameters(remove_duplicate=False)
                   if dense.get(n, n) in registered}
        return sum(p.numel() for p in model.parameters() if id(p) not in claimed)

    def _mask_sites(self) -> dict[str, int]:
        """Module names a mask may be keyed by, with their channel count."""
        sites: dict[str, int] = {}
        for tensor in self.state.tensors:
            for layout, zero in zip(tensor.dims, tensor.zero, strict=True):
                if zero is not None and zero.mask is not None:
                    sites[zero.mask] = self.atoms.channels(layout)
        return sites

    # -- costs ----------------------------------------------------------------------------
    def _counts(self, alive: Sequence[torch.Tensor]) -> list[int]:
        """Live channel count per space (frozen spaces count whole)."""
        return [s.width if s.is_frozen else int(a.sum()) for s, a in zip(self.spaces, alive, strict=True)]

    def params_under(self, alive: Sequence[torch.Tensor]) -> int:
        """Parameters of the network with only the ``alive`` channels of every space."""
        return self.params_at(self._counts(alive))

    def params_at(self, live: Sequence[int]) -> int:
        """Parameters of the network when space ``s`` has ``live[s]`` channels."""
        return self.param_cost(live)

    @property
    def effective_params(self) -> int:
        """Parameters the forward uses: ``params`` less the cross blocks cr S/R layers store but never compute."""
        return self.params - sum(r.unused_params for _, r in self.layers())

    @property
    def effective_macs(self) -> int:
        """MACs per example that run: ``macs`` less the cross blocks of cr S/R layers."""
        return self.macs - sum(r.unused_macs for _, r in self.layers()) // self.batch

    def cost_model(self, kind: str) -> CostModel:
        """The cost model the planner and the report evaluate: 'params' or 'macs' (MACs per example)."""
        return by_kind(kind, self.param_cost, self.mac_cost)

    def macs_under(self, alive: Sequence[torch.Tensor]) -> int:
        """MACs per example of the network with only the ``alive`` channels."""
        return self.macs_at(self._counts(alive))

    def macs_at(self, live: Sequence[int]) -> int:
        """MACs per example when space ``s`` has ``live[s]`` channels (work on weights alone is not divided)."""
        return self.mac_cost(live)

    # -- liveliness -----------------------------------------------------------------------
    def alive(self, masks: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        """Live channels per space: dead only where zero at every weight that reads the space.

        Channels grouped in blocks (grouped convs, GroupNorm, heads) live or die a whole block at a time:
        a block is alive when any of its channels is, in any space of its planning unit that a weight reads.
        """
        masks = self._default_masks if masks is None else self._user_masks(masks)
        zeros = _propagate_zeros(self, masks)
        dead: list[torch.Tensor | None] = [None] * len(self.spaces)
        for consumer in self.state.consumers:
            vector = zeros.get((consumer.vid, consumer.dim))
            offset = 0
            for s in self.space_ids(consumer.layout):
                width = self.spaces[s].width
                part = vector[offset:offset + width] if vector is not None else torch.zeros(width, dtype=torch.bool)
                dead[s] = part.clone() if dead[s] is None else dead[s] & part
                offset += width
        return whole_blocks(self.spaces, [
            torch.ones(s.width, dtype=torch.bool) if d is None or s.is_frozen else ~d
            for s, d in zip(self.spaces, dead, strict=True)
        ], [d is not None or s.is_frozen for s, d in zip(self.spaces, dead, strict=True)])

    def _user_masks(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Validated user masks; a mask on a frozen space is ignored with a warning."""
        checked = check_masks(masks, self.mask_sites, self.gm)
        frozen = self.frozen_sites  # a walk over every tensor: once, not once per mask
        for name in [n for n in checked if n in frozen]:
            warnings.warn(f"mask for '{name}' is ignored: its channels are frozen ({frozen[name]})",
                          NrfxWarning, stacklevel=4)
            del checked[name]
        for name, norm in self._sites_behind_norms(checked).items():
            warnings.warn(f"mask for '{name}' does not make its channels dead: the norm '{norm}' after it emits a "
                          "constant where its input is zero (β − γ·μ/σ); key the mask by the norm instead",
                          NrfxWarning, stacklevel=4)
        return checked

    def _sites_behind_norms(self, names) -> dict[str, str]:
        """Mask sites (conv, linear) whose output some per-channel norm reads directly: site -> norm."""
        found: dict[str, str] = {}
        nodes = {n.name: n for n in self.gm.graph.nodes}
        for node_name, record in self.layers("conv", "linear"):
            if record.module not in names:
                continue
            for user in nodes[node_name].users:
                norm = self.records.get(user.name)
                if isinstance(norm, LayerRecord) and norm.kind == "norm":
                    found[record.module] = norm.module
        return found

    @property
    def frozen_sites(self) -> dict[str, str]:
        """Mask sites whose channels are all in frozen spaces, with the first reason."""
        out = {}
        for tensor in self.state.tensors:
            for layout, zero in zip(tensor.dims, tensor.zero, strict=True):
                if zero is None or zero.mask is None:
                    continue
                spaces = [self.spaces[s] for s in self.space_ids(layout)]
                if spaces and all(sp.is_frozen for sp in spaces):
                    out[zero.mask] = spaces[0].frozen[0]
        return out

    def utilization(self, masks: dict[str, torch.Tensor] | None = None) -> Utilization:
        """U(θ) and r(θ) under the given masks (None: masks read from the norm scales)."""
        alive = self.alive(masks)
        return Utilization(self.params, self.macs, self.params_under(alive), self.macs_under(alive), alive)

    @property
    def live_params(self) -> int:
        """U(θ) in parameters under the masks read from the norms at analysis time."""
        return self.utilization().live_params

    @property
    def live_macs(self) -> int:
        """U(θ) in MACs per example under the masks read from the norms at analysis time."""
        return self.utilization().live_macs

    def masks_from(self, model: nn.Module, threshold: float = 0.01) -> dict[str, torch.Tensor]:
        """Masks read now from the norm scales of ``model`` at the sites this analysis follows (no forward).

        Norms on frozen spaces are left out (their channels count alive anyway); pass the result
        to ``utilization``, ``report`` or ``rejuvenate``.  The analysis itself holds no mutable masks.
        """
        sites = self.mask_sites.keys() - self.frozen_sites.keys()
        return {k: v for k, v in norm_masks(model, threshold).items() if k in sites}

    def report(self, masks: dict[str, torch.Tensor] | None = None):
        """A per-layer report of channels, params and MACs under the masks."""
        from nrfx.report import build_report

        return build_report(self, masks)

    @property
    def frozen_spaces(self) -> list[Space]:
        """Spaces that keep their width, with the reasons."""
        return [s for s in self.spaces if s.is_frozen]


def _input_dependent_nodes(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the nodes whose value depends on the example inputs (their work scales with the batch)."""
    names: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(arg.name in names for arg in node.all_input_nodes):
            names.add(node.name)
    return names


def _propagate_zeros(analysis: Analysis, masks: dict[str, torch.Tensor]) -> dict[tuple[int, int], torch.Tensor]:
    """Known-zero channels of every (value, dim), following each value's zero rules in order."""
    zeros: dict[tuple[int, int], torch.Tensor] = {}
    channels = analysis.atoms.channels
    for tensor in analysis.state.tensors:
        for dim, (layout, zero) in enumerate(zip(tensor.dims, tensor.zero, strict=True)):
            if layout is None or zero is None:
                continue
            width = channels(layout)
            vector = _apply_zero_rule(zero, zeros, width)
            if zero.mask is not None and zero.mask in masks:
                vector = vector | ~masks[zero.mask].to(torch.bool)
            zeros[(tensor.vid, dim)] = vector
    return zeros


def _gather(segments, zeros, width: int) -> torch.Tensor:
    """Concatenate the zero vectors of a segment list (unknown parts count as non-zero)."""
    parts = []
    for seg in segments:
        source = zeros.get((seg.vid, seg.dim))
        missing = torch.zeros(seg.stop - seg.start, dtype=torch.bool)
        parts.append(source[seg.start:seg.stop] if source is not None else missing)
    vector = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
    return vector if vector.numel() == width else torch.zeros(width, dtype=torch.bool)


def _apply_zero_rule(zero, zeros, width: int) -> torch.Tensor:
    """Evaluate one zero rule: none, copy, and (add/sub) or or (mul)."""
    if zero.op == "none" or not zero.sources:
        return torch.zeros(width, dtype=torch.bool)
    vectors = [_gather(src, zeros, width) for src in zero.sources]
    if zero.op == "copy":
        return vectors[0]
    result = vectors[0].clone()
    for v in vectors[1:]:
        result = result & v if zero.op == "and" else result | v
    return result


def _analyze_graph(state: AnalysisState) -> None:
    """Run the rule of every node in order, each with its own context, storing its output spec."""
    for node in state.gm.graph.nodes:
        ctx = Context(state, node)
        spec = ctx.specs[node] = _node_spec(ctx, node)
        mutated = _mutated_arg(ctx, node)
        if mutated is not None and isinstance(spec, TensorSpec) and isinstance(ctx.specs.get(mutated), TensorSpec):
            # ``y.add_(z)``: nodes after this one that read ``y`` read the mutated tensor
            ctx.specs[mutated] = spec


_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor)


def _mutated_arg(ctx: Context, node: torch.fx.Node) -> torch.fx.Node | None:
    """The node whose tensor an in-place op (``x.add_``, ``x += y``, ``inplace=True``) overwrites."""
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node):
        return None
    if node.op == "call_method":
        inplace = node.target.endswith("_") and not node.target.startswith("_")
    elif node.op == "call_function":
        inplace = (node.target in _INPLACE_OPERATORS or getattr(node.target, "__name__", "").endswith("_")
                   or node.kwargs.get("inplace") is True)
    elif node.op == "call_module":
        inplace = getattr(ctx.module, "inplace", False) is True
    else:
        inplace = False
    return first if inplace else None


def _node_spec(ctx: Context, node: torch.fx.Node) -> Any:
    """The spec of one node: placeholders and attributes carry no channels, output freezes."""
    if node.op in ("placeholder", "get_attr"):
        return ctx.blank(ctx.out)
    module = ctx.module if node.op == "call_module" else None
    rule = lookup(node.op, node.target, module) if node.op != "output" else None
    if rule not in COUNT_READERS:
        _freeze_counts(ctx, node)
    if node.op == "output":
        for arg in _pinned_outputs(ctx, node):
            ctx.freeze_all(ctx.spec(arg), "reaches the model output")
        return None
    if module is not None and node.target in ctx.state.auto_leaves:
        return ctx.opaque(f"automatic leaf: {ctx.state.auto_leaves[node.target]}")
    if node.op == "call_function" and _is_container_class(node.target):
        return {key: ctx.spec(value) for key, value in node.kwargs.items()}  # output structure: specs by field
    if rule is None:
        return ctx.unknown_op(_label(node, module))
    try:
        return rule(ctx, node)
    except NrfxError:
        raise
    except Exception as error:
        raise _rule_error(rule, node, module, error) from error


def _freeze_counts(ctx: Context, node: torch.fx.Node) -> None:
    """Rule: a channel count read as a number (``ChannelCount``) freezes its space wherever it goes, except into a
    rule that reads counts (the sizes of a view or reshape)."""
    for arg in node.all_input_nodes:
        count = ctx.spec(arg)
        if isinstance(count, ChannelCount):
            ctx.atoms.freeze(count.layout, f"channel count read as a number [{count.where}] and used by "
                                           f"{node_location(node)}")


def _rule_error(rule: Any, node: torch.fx.Node, module: nn.Module | None, error: Exception) -> RuleError:
    """The error a rule's own exception becomes: the rule, the node and its source line, and what to do."""
    name = f"{getattr(rule, '__module__', '')}.{getattr(rule, '__qualname__', rule)}"
    advice = ("a rule registered with nrfx.register_layer / module_rule / function_rule must fit every call it "
              "is registered for: fix it or unregister it (nrfx.unregister_layer) to analyse through the op"
              if not name.startswith("nrfx.") or (module is not None and type(module) in LEAF_LAYERS) else
              "this is a bug in nrfx: please report it with the model")
    return RuleError(f"the channel rule {name} failed on {node_location(node)} ({_label(node, module)}): "
                     f"{type(error).__name__}: {error}; {advice}")


def _pinned_outputs(ctx: Context, node: torch.fx.Node) -> list[torch.fx.Node]:
    """The output's tensors whose channels the user reads: all but those inside a key/value cache (capture/caches)."""
    caches = cache_output_leaves(ctx.state.gm)
    if not caches:
        return list(node.all_input_nodes)
    leaves = torch.utils._pytree.tree_leaves(node.args[0])
    return [leaf for i, leaf in enumerate(leaves) if isinstance(leaf, torch.fx.Node) and i not in caches]


def _is_container_class(target: Any) -> bool:
    """A dataclass or dict subclass built from keyword fields (fx records model outputs such as ModelOutput so)."""
    return isinstance(target, type) and (dataclasses.is_dataclass(target) or issubclass(target, dict))


def _label(node: torch.fx.Node, module: nn.Module | None) -> str:
    """A readable name for an op: module type, function or method name."""
    if isinstance(module, torch.jit.ScriptModule):
        return f"TorchScript module {module.original_name}"
    if module is not None:
        return f"module {type(module).__module__}.{type(module).__qualname__}"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    target = node.target
    qualname = str(getattr(target, "__qualname__", target)).replace("_VariableFunctionsClass.", "")
    return f"function {getattr(target, '__module__', '')}.{qualname}"


def analyze_whole(model: nn.Module, example: Example, capture: str = "auto", **options: Any) -> Analysis:
    """Capture the whole model as one graph and analyse it (no islands)."""
    captured = _capture(model, example, capture, raisable=_has_module_rule, **options)  # fx, else torch.export
    state = AnalysisState(captured.gm, captured.values)
    state.auto_leaves.update(captured.auto_leaves)
    _warn_auto_leaves(captured.auto_leaves)
    _analyze_graph(state)
    analysis = Analysis(model, captured, state, example)
    for note in captured.notes:
        if "specialised" in note or "could not stay dynamic" in note or MODE_BRANCH in note:
            warnings.warn(note, NrfxWarning, stacklevel=3)
    _warn_low_coverage(analysis)
    return analysis


def _has_module_rule(module: nn.Module) -> bool:
    """Whether the op table has a rule for this module type (export raises its calls to call_module)."""
    return lookup("call_module", None, module) is not None


def _warn_low_coverage(analysis: Analysis) -> None:
    """One warning when little of a model that is not tiny can be rejuvenated and gates would help.

    Fires when under ``COVERAGE_WARN_BELOW`` of the channels are monitored, the model has at least
    ``COVERAGE_MIN_CHANNELS`` channels, and some free space has no liveliness signal; it says what froze
    the rest.  A model whose free spaces all carry a norm stays quiet (the report shows its coverage).
    A model with unknown ops and nothing free warns whatever its size: the channels behind an unknown op
    get no space, so the channel count alone would call it tiny.
    """
    cover = analysis.coverage()
    unsignalled = cover.free_channels - cover.monitored_channels
    if analysis.unknown_ops and not cover.free_channels:  # whatever the size: unknown ops hide their channels
        ops = ", ".join(sorted(analysis.unknown_ops))
        warnings.warn(f"nrfx can rejuvenate only 0% of the channels of {analysis.model_name}: no channel space is "
                      f"free, and ops without a rule froze every channel they touch ({ops}). Register rules "
                      "(nrfx.analysis.rules.function_rule, ...) for them to analyse through.", NrfxWarning,
                      stacklevel=3)
        return
    if cover.channels < COVERAGE_MIN_CHANNELS or cover.monitored >= COVERAGE_WARN_BELOW or not unsignalled:
        return
    reasons: dict[str, int] = {}
    for space in analysis.frozen_spaces:
        reason = space.frozen[0].split(" [")[0]
        reasons[reason] = reasons.get(reason, 0) + space.width
    top = ", ".join(f"{r} ({n / cover.channels:.0%})" for r, n in sorted(reasons.items(), key=lambda i: -i[1])[:3])
    warnings.warn(
        f"nrfx can rejuvenate only {cover.monitored:.0%} of the channels of {analysis.model_name}: "
        f"{1 - cover.free:.0%} are frozen" + (f" (mostly: {top})" if top else "") +
        f", and {unsignalled / cover.channels:.0%} are free but have no liveliness signal (no norm scale). "
        "nrfx.add_gates(model, example_inputs) inserts a per-channel gate in every free space without one.",
        NrfxWarning, stacklevel=3)


def _warn_auto_leaves(auto_leaves: dict[str, str]) -> None:
    """One warning naming every submodule that became an automatic leaf (its channels are frozen)."""
    if auto_leaves:
        names = ", ".join(f"'{k}' ({v})" for k, v in auto_leaves.items())
        warnings.warn(f"nrfx cannot trace into {names}: each became an automatic leaf whose channels are frozen. "
                      "Pass leaf_modules=[...] to choose leaves yourself, or make the code traceable.",
                      NrfxWarning, stacklevel=3)
