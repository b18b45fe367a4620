"""add_gates / fold_gates: give free spaces without a norm a liveliness signal, and take it out again.

``add_gates`` is a graph rewrite: the model is traced (a deep copy: the user's model is never
touched), and in every free space that no norm scale reads, an ``nrfx.Gate`` (all ones) is
inserted as a ``call_module`` node after the activation that follows the layer producing the
space (a transformer MLP: ``fc1 → GELU → gate → dropout → fc2``).  A graph rewrite rather than
wrapping modules, because the activation is often not a module of its own (``F.gelu`` in the
forward), the same code then serves torchvision, timm and user models, and the result is the
same kind of ``GraphModule`` that ``nrfx.rejuvenate`` returns, with the original submodule
hierarchy (each gate sits next to its producer: ``mlp.0`` gets ``mlp.0_gate``; a producer that is
no module call, such as Hugging Face's ``Conv1D`` captured as ``addmm`` with an ``[in, out]``
weight, is named by the module owning its weight: ``mlp.c_fc_gate``).

``fold_gates`` multiplies each gate into the input columns of the linear / conv layers that
read it (``W[:, c] *= g_c``, exact) and removes it: the plain architecture, same function.

A model analysed as islands (``nrfx.analysis.islands``) is gated island by island: the result is a copy
of the model, same class, with each island that gets a gate replaced by its gated GraphModule;
``fold_gates`` folds every gated GraphModule inside such a model in the same way.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from nrfx.analysis.front import analyze
from nrfx.analysis.islands import IslandAnalysis, record_calls
from nrfx.analysis.records import ViewRecord
from nrfx.analysis.whole import Analysis
from nrfx.capture.front_ends import Example
from nrfx.capture.guards import copy_of
from nrfx.capture.shapeprop import propagate_shapes
from nrfx.capture.trace import trace
from nrfx.errors import NrfxWarning
from nrfx.layers.gates import Gate
from nrfx.layers.srlayers import SR_LAYERS
from nrfx.ops.layer_kinds import in_columns
from nrfx.ops.vocabulary import OpInfo, Trait, node_info
from nrfx.rewrite.results import attach

__all__ = ["GateFold", "add_gates", "fold_gates", "gate_sites", "head_gate_sites"]

def _is_activation(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether a node applies a channel-wise activation (the op vocabulary's ACTIVATION)."""
    return node_info(gm, node).has(Trait.ACTIVATION)


def _after_activation(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
    """The node a gate follows: the producer, or the chain of activations (and identities) its only user starts.

    timm writes ``fc1 → norm → act`` with ``norm = nn.Identity()``: the gate goes after the act,
    where ``fold_gates`` can fold it into the next layer.
    """
    while len(node.users) == 1:
        user = next(iter(node.users))
        identity = user.op == "call_module" and isinstance(gm.get_submodule(user.target), nn.Identity)
        if not (_is_activation(gm, user) or identity) or not user.args or user.args[0] is not node:
            break
        node = user
    return node


def gate_sites(analysis: Analysis,
               head_sites: list[tuple[str, int, int, str]] | None = None) -> list[tuple[str, int, int]]:
    """(producer node, channel dim, width) of every conv/linear whose output is a free space with no signal, but for
    the q, k, v of heads gated per head (``head_sites``: ``head_gate_sites(analysis)``, found when not given)."""
    wanted = set(analysis.coverage().unsignalled)
    heads = _head_units(analysis, head_gate_sites(analysis) if head_sites is None else head_sites)
    sites = []
    for name, record in analysis.layers("conv", "linear"):
        spaces = analysis.space_ids(record.output) if record.output is not None else []
        if len(spaces) != 1 or spaces[0] not in wanted or (record.transposed and record.kind != "linear"):
            continue
        if analysis.spaces[spaces[0]].unit in heads:  # attention heads: one gate per head (head_gate_sites)
            continue
        out = analysis.state.values[next(n for n in analysis.gm.graph.nodes if n.name == name)]
        weight = analysis.param_info[f"{record.module}.weight" if record.module else record.weight]
        dim = -1 if record.kind == "linear" else out.dim() - len(weight.shape) + 1  # conv: 1 batched, 0 not
        sites.append((name, dim, analysis.spaces[spaces[0]].width))
    return sites


_HEAD_MOVES = ("transpose", "permute", "contiguous", torch.transpose, torch.permute)


def head_gate_sites(analysis: Analysis) -> list[tuple[str, int, int, str]]:
    """(node, head dim, heads, gate path base) for every merge of a free head space without a signal: the attention
    output (SDPA, ``attn @ v``) read where heads merge back into channels, gated per head on its head dim (a head
    space shared by several attentions, as T5's layers share their position bias, gets a gate at each)."""
    wanted = set(analysis.coverage().unsignalled)
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    sites, seen = [], set()
    for name, record in analysis.records.items():
        if not isinstance(record, ViewRecord) or not record.merge:
            continue
        node = nodes[name].args[0]
        while node.target in _HEAD_MOVES and len(node.users) == 1 and isinstance(node.args[0], torch.fx.Node):
            node = node.args[0]
        spec = analysis.state.specs.get(node)
        for dim, layout in enumerate(getattr(spec, "dims", ()) or ()):
            spaces = analysis.space_ids(layout) if layout is not None else []
            if len(spaces) == 1 and spaces[0] in wanted and (node.name, dim) not in seen and \
                    analysis.atoms.is_heads(layout):
                seen.add((node.name, dim))  # every merge of a head space (T5 shares one across its layers)
                owner = _reader_owner(analysis, nodes[name])
                sites.append((node.name, dim, analysis.spaces[spaces[0]].width, f"{owner}.heads" if owner else name))
    return sites


def _reader_owner(analysis: Analysis, node: torch.fx.Node) -> str:
    """The module holding the layer that reads merged heads (``blocks.0.attn`` for ``blocks.0.attn.proj``), or ''."""
    for _ in range(4):  # through the views between (HF ``Conv1D``: ``x.view(-1, x.size(-1))`` then addmm)
        if len(node.users) != 1:
            return ""
        node = next(iter(node.users))
        record = analysis.records.get(node.name)
        if getattr(record, "kind", None) == "linear":
            return _producer_path(record, node.name).rpartition(".")[0]
    return ""


def _head_units(analysis: Analysis, sites: list[tuple[str, int, int, str]]) -> set[int]:
    """Planning units of the head spaces gated per head (their q, k, v projections get no gate of their own)."""
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    units = set()
    for name, dim, _, _ in sites:
        layout = analysis.state.specs[nodes[name]].dims[dim]
        units.update(analysis.spaces[s].unit for s in analysis.space_ids(layout))
    return units


def _gate_path(gm: torch.fx.GraphModule, base: str) -> str:
    """A free submodule path next to ``base`` (``mlp.0`` → ``mlp.0_gate``; ``_gate1``… when taken)."""
    candidate, i = f"{base}_gate", 1
    while _has_submodule(gm, candidate):
        candidate, i = f"{base}_gate{i}", i + 1
    return candidate


def _producer_path(record: Any, node_name: str) -> str:
    """Rule: the producer's module, else the owner of its weight (HF ``Conv1D`` runs as ``addmm``), else the node."""
    if record.module:
        return record.module
    owner = (record.weight or "").rpartition(".")[0]
    return owner or node_name


def _has_submodule(gm: nn.Module, path: str) -> bool:
    """Whether ``path`` names a submodule or any other attribute already."""
    parent, _, leaf = path.rpartition(".")
    try:
        owner = gm.get_submodule(parent)
    except AttributeError:
        return False
    return hasattr(owner, leaf)


def add_gates(model: nn.Module, example_inputs: Any, **trace_options: Any) -> nn.Module:
    """A copy of ``model`` with an ``nrfx.Gate`` (all ones, same function) in every free space without a signal.

    Each gate follows the activation after the conv/linear that produces the space.  Returns a
    GraphModule (``nrfx_gates``: the paths of the gates added); the user's model is not modified.
    A model analysed as islands comes back as a copy of its own class with every gated island a
    GraphModule (``nrfx_gates``: the gates' paths in the model).  ``trace_options`` are
    ``analyze``'s (``example_kwargs``, ``capture``, ``leaf_modules``, ``concrete_args``, ``autowrap_functions``).
    """
    clone = copy_of(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "nrfx can rejuvenate only")  # that is why gates are being added
        analysis = analyze(clone, example_inputs, **trace_options)
    if not analysis.whole:
        return _gate_islands(clone, analysis)
    gm, added = _gate_graph(analysis)
    gm.training = model.training
    attach(gm, nrfx_gates=tuple(added))
    return gm


def _gate_islands(clone: nn.Module, analysis: IslandAnalysis) -> nn.Module:
    """Rule: each island with a gate site is replaced in ``clone`` by its gated graph; the others stay as they are."""
    added: list[str] = []
    for path, island in analysis.islands.items():
        if not gate_sites(island) and not head_gate_sites(island):
            continue
        module = clone.get_submodule(path)
        gm, gates = _gate_graph(island)
        gm.train(module.training)
        parent, _, name = path.rpartition(".")
        setattr(clone.get_submodule(parent), name, gm)
        added += [f"{path}.{gate}" for gate in gates]
    attach(clone, nrfx_gates=tuple(added))
    return clone


def _gate_graph(analysis: Analysis) -> tuple[torch.fx.GraphModule, list[str]]:
    """Rule: a gate after the activation that follows each gate site's producer, in the analysis' own graph."""
    gm = analysis.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    head_sites = head_gate_sites(analysis)  # found before the graph changes
    added = []
    for name, dim, width in gate_sites(analysis, head_sites):
        record = analysis.records[name]
        weight = gm.get_submodule(record.module).weight if record.module else gm.get_parameter(record.weight)
        added.append(_insert_gate(gm, _gate_path(gm, _producer_path(record, name)), _after_activation(gm, nodes[name]),
                                  Gate(width, dim, device=weight.device, dtype=weight.dtype)))
    device = next((p.device for p in gm.parameters() if p.device.type != "meta"), torch.device("cpu"))
    for name, dim, heads, base in head_sites:
        dtype = analysis.state.values[nodes[name]].dtype
        added.append(_insert_gate(gm, _gate_path(gm, base), nodes[name], Gate(heads, dim, device=device, dtype=dtype)))
    gm.graph.lint()
    gm.recompile()
    return gm, added


def _insert_gate(gm: torch.fx.GraphModule, path: str, site: torch.fx.Node, gate: Gate) -> str:
    """``gate`` registered at ``path`` and applied to ``site``'s value for every reader of it; returns ``path``."""
    gm.add_submodule(path, gate)
    with gm.graph.inserting_after(site):
        node = gm.graph.call_module(path, (site,))
    site.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    return path


def _is_pass(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether a node passes a per-channel scale through unchanged (PASS: dropout, identity, clone; no casts)."""
    traits = node_info(gm, node).traits
    return Trait.PASS in traits and Trait.CONVERTS not in traits


@dataclass(frozen=True)
class GateFold:
    """One reader of a gate: its module and, for each of its input channels / features, the gate channel feeding it."""

    weight: nn.Parameter  # (out, in / groups, *kernel)
    groups: int
    channels: torch.Tensor  # long, one entry per input channel / feature of the reader; -1: not fed by the gate


def fold_gates(model: nn.Module, example_inputs: Any = None, *,
               example_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A copy of a gated model with every foldable gate multiplied into its readers' input columns (W[:, c] *= g_c).

    Exact: the same function, without the gate.  A gate folds when everything between it and
    the linear / conv layers reading it passes a per-channel scale on: dropout, identity, and,
    given ``example_inputs`` (for the shapes), movement ops (view, reshape, flatten, permute,
    transpose, indexing), average pools, means and sums over other dims, interpolation, and max
    pools where the gate is ≥ 0.  A gate that cannot fold stays (an ``NrfxWarning`` names it and
    the op that stops it); ``gm.nrfx_gates`` lists those left.  The model is not modified (a model
    that is not a GraphModule is traced first, unless it holds gated GraphModules: the islands
    ``add_gates`` made, each folded in a copy of the model on the inputs it receives).
    """
    if not isinstance(model, torch.fx.GraphModule) and _gated_graphs(model):
        return _fold_islands(model, example_inputs, example_kwargs)
    gm = copy_of(model) if isinstance(model, torch.fx.GraphModule) else trace(copy_of(model)).gm
    example = None if example_inputs is None else _as_example(example_inputs, example_kwargs)
    values = propagate_shapes(gm, example.flat()) if example is not None else None
    kept = _fold_graph(gm, values)
    attach(gm, nrfx_gates=tuple(kept))
    return gm


def _gated_graphs(model: nn.Module) -> list[str]:
    """Paths of the outermost GraphModules inside ``model`` that hold a gate."""
    found: list[str] = []
    for path, module in model.named_modules():
        inside = any(path.startswith(f"{p}.") for p in found)
        if path and not inside and isinstance(module, torch.fx.GraphModule) and any(
                isinstance(m, Gate) for m in module.modules()):
            found.append(path)
    return found


def _fold_islands(model: nn.Module, example_inputs: Any, example_kwargs: dict[str, Any] | None) -> nn.Module:
    """Rule: every gated GraphModule of a copy of ``model`` folded on its own, shapes from one recorded forward."""
    clone = copy_of(model)
    paths = _gated_graphs(clone)
    calls = {} if example_inputs is None else record_calls(clone, _as_example(example_inputs, example_kwargs))
    kept: list[str] = []
    for path in paths:
        gm = clone.get_submodule(path)
        received = calls.get(id(gm), [])
        values = propagate_shapes(gm, received[0].flat()) if len(received) == 1 else None
        kept += [f"{path}.{gate}" for gate in _fold_graph(gm, values)]
    attach(clone, nrfx_gates=tuple(kept))
    return clone


def _as_example(example_inputs: Any, example_kwargs: dict[str, Any] | None) -> Example:
    """The model's inputs as an ``Example`` (a tensor becomes a 1-tuple)."""
    return Example(_positional(example_inputs), dict(example_kwargs or {}))


def _fold_graph(gm: torch.fx.GraphModule, values: dict | None) -> list[str]:
    """Rule: fold every gate of ``gm`` that can fold, in place; return the targets of the gates that stay."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    kept = []
    for node in [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Gate)]:
        folds = _gate_folds(gm, node, values, calls)
        if isinstance(folds, str):
            warnings.warn(f"nrfx.fold_gates keeps gate '{node.target}' (node {node.name}): {folds}; it stays in the "
                          "model (one multiply per channel)", NrfxWarning, stacklevel=3)
            kept.append(node.target)
            continue
        _scale_columns(gm.get_submodule(node.target), folds)
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return kept


def _positional(example_inputs: Any) -> tuple:
    """The positional example inputs: a tensor becomes a 1-tuple."""
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _scale_columns(gate: Gate, folds: list[GateFold]) -> None:
    """Rule: W[o, k] *= g[channel of input column k] (1 where that is -1); grouped: column k is input g(o)·K/G + k."""
    g = torch.cat([gate.weight.detach(), gate.weight.new_ones(1)])  # channel -1: a column the gate does not feed
    with torch.no_grad():
        for fold in folds:
            weight, groups = fold.weight, fold.groups
            out, per_group = weight.shape[0], weight.shape[1]
            column = (torch.arange(out) // (out // groups))[:, None] * per_group + torch.arange(per_group)[None, :]
            scale = g.to(weight.device)[fold.channels.to(weight.device)[column.to(weight.device)]]
            weight.mul_(scale.reshape(out, per_group, *[1] * (weight.dim() - 2)).to(weight.dtype))


def _gate_folds(gm: torch.fx.GraphModule, gate_node: torch.fx.Node, values: dict | None,
                calls: dict[str, int]) -> list[GateFold] | str:
    """The readers a gate folds into, following ops that pass a per-channel scale on; or why it cannot fold."""
    gate = gm.get_submodule(gate_node.target)
    if calls[gate_node.target] > 1:
        return "the gate is called more than once"
    ids = None if values is None else _channel_ids(gate, values[gate_node])
    downstream = _downstream(gm, gate_node)
    found: list[GateFold] = []
    stack = [(user, gate_node, ids) for user in gate_node.users]
    while stack:
        node, source, ids = stack.pop()
        module = _reader_module(gm, node, calls)
        if module is not None:
            fold = _reader(module, node, source, ids, gate, calls)
            if isinstance(fold, str):
                return fold
            found.extend(_stored_folds(module, fold))
            continue
        step = _through(gm, node, source, ids, values, gate, downstream)
        if isinstance(step, str):
            return step
        stack.extend((user, node, step) for user in node.users)
    return found or "nothing reads it"


def _stored_folds(module: nn.Module, fold: GateFold) -> list[GateFold]:
    """A fold into an S/R layer's dense weight as folds into the blocks it stores (their input columns)."""
    if not isinstance(module, SR_LAYERS):
        return [fold]
    return [GateFold(module.get_parameter(name), 1, fold.channels[index[1]].clone())
            for name, attr, index in module._specs() if attr == "weight"]


def _downstream(gm: torch.fx.GraphModule, gate_node: torch.fx.Node) -> set[torch.fx.Node]:
    """Every node whose value depends on the gate's output, up to the linear / conv layers reading it."""
    seen, stack = set(), [gate_node]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node is gate_node or _reader_module(gm, node, {}) is None:
            stack.extend(node.users)
    return seen


def _channel_ids(gate: Gate, value: Any) -> torch.Tensor:
    """A tensor shaped like the gate's output holding, at every element, the gate channel it belongs to."""
    shape = list(value.shape)
    dim = gate.dim % len(shape)
    view = [1] * len(shape)
    view[dim] = -1
    return torch.arange(gate.num_features).view(view).expand(shape).contiguous()


def _reader_module(gm: torch.fx.GraphModule, node: torch.fx.Node, calls: dict[str, int]) -> nn.Module | None:
    """The linear / conv layer a node runs: a module call, or ``F.linear`` of a weight nothing else uses."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return module if in_columns(module) else None
    if node.op != "call_function" or node.target is not F.linear or len(node.args) < 2:
        return None
    weight = node.args[1]
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and len(weight.users) == 1):
        return None
    if any(n.op == "get_attr" and n.target == weight.target and n is not weight for n in gm.graph.nodes) or any(
            calls.get(path, 0) and weight.target.startswith(f"{path}.") for path in calls):
        return None  # the weight is read elsewhere too (tied)
    linear = nn.Module()
    linear.weight = gm.get_parameter(weight.target)
    return linear


def _reader(module: nn.Module, node: torch.fx.Node, source: torch.fx.Node, ids: torch.Tensor | None, gate: Gate,
            calls: dict[str, int]) -> GateFold | str:
    """How a linear / conv reads the gate: the gate channel of each input column, or why it cannot fold."""
    where = f"its reader {node.target} (node {node.name})"
    functional = node.op == "call_function"
    if (not functional and calls[node.target] > 1) or node.args[0] is not source or source in node.args[1:] or (
            source in node.kwargs.values()):
        return f"{where} is called more than once or reads it other than as its input"
    in_dim = -1 if functional or isinstance(module, nn.Linear) else None
    groups = getattr(module, "groups", 1)
    if ids is None:
        if module.weight.shape[1] * groups != gate.num_features or not (
                gate.dim == -1 if in_dim == -1 else gate.dim in (0, 1)):
            return f"{where} does not read the gate's dim as its input channels"
        return GateFold(module.weight, groups, torch.arange(gate.num_features))
    if in_dim is None:  # conv: (N, C, *spatial) or (C, *spatial)
        in_dim = ids.dim() - (module.weight.dim() - 2) - 1
    columns = ids.movedim(in_dim, -1).reshape(-1, ids.shape[in_dim])
    if not bool((columns == columns[:1]).all()):
        return f"{where} reads gate channels mixed with other dims in one input column"
    return GateFold(module.weight, groups, columns[0].clone())


_MOVEMENT_METHODS = frozenset({"view", "reshape", "permute", "transpose", "flatten", "unflatten", "contiguous",
                               "movedim", "moveaxis", "swapaxes", "swapdims", "squeeze", "unsqueeze", "view_as",
                               "reshape_as", "expand", "expand_as", "clone"})
_MOVEMENT_FUNCTIONS = (torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unflatten, torch.movedim,
                       torch.moveaxis, torch.swapaxes, torch.swapdims, torch.squeeze, torch.unsqueeze, torch.clone,
                       operator.getitem)
_MOVEMENT_MODULES = (nn.Flatten, nn.Unflatten)


def _through(gm: torch.fx.GraphModule, node: torch.fx.Node, source: torch.fx.Node, ids: torch.Tensor | None,
             values: dict | None, gate: Gate, downstream: set[torch.fx.Node]) -> torch.Tensor | str | None:
    """The channel ids after an op that passes a per-channel scale on (None without shapes), or why it does not."""
    what = f"{node.target} ({type(gm.get_submodule(node.target)).__name__})" if node.op == "call_module" else \
        getattr(node.target, "__name__", node.target)
    stops = f"it reaches {node.op} {what} (node {node.name})"
    if _is_pass(gm, node) and node.args and node.args[0] is source:
        return ids
    kind = _kind(gm, node)
    if kind in ("cat", "scale"):
        return _combined(node, source, ids, values, downstream, stops)
    if kind is None or not node.args or node.args[0] is not source:
        return f"{stops} before a linear/conv layer"
    if ids is None:
        return f"{stops}; pass example_inputs to fold_gates to fold through it (nrfx follows its channels by shape)"
    if kind == "max" and bool((gate.weight < 0).any()):
        return f"{stops}: a max commutes with the gate only where it is >= 0, and it has negative entries"
    try:
        out = _moved(gm, node, ids, values) if kind == "move" else _pooled(node_info(gm, node), node, ids, values[node])
    except Exception as error:  # an op whose arguments the index tensor cannot stand in for
        return f"{stops}: following its channels failed ({type(error).__name__}: {error})"
    if isinstance(out, str):
        return f"{stops}: {out}"
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(values[node].shape):
        return f"{stops}: its channels could not be followed"
    return out


def _kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """'move' (elements rearranged), 'pool' (a per-channel linear map), 'max' (per channel, commutes for g >= 0)."""
    if node.op == "call_module":
        if isinstance(gm.get_submodule(node.target), _MOVEMENT_MODULES):
            return "move"
    elif (node.op == "call_method" and node.target in _MOVEMENT_METHODS) or (
            node.op == "call_function" and node.target in _MOVEMENT_FUNCTIONS):
        return "move"
    info = node_info(gm, node)
    if info.has(Trait.LINEAR_POOL):
        return "pool"
    if node.op == "call_function" and node.target in (torch.cat, torch.concat, torch.concatenate):
        return "cat"
    if (node.op == "call_function" and node.target in _SCALE_FUNCTIONS) or (
            node.op == "call_method" and node.target in ("mul", "div")):
        return "scale"
    return "max" if info.has(Trait.MAX_POOL) else None


def _moved(gm: torch.fx.GraphModule, node: torch.fx.Node, ids: torch.Tensor, values: dict) -> Any:
    """The op itself run on the channel ids (the other arguments at their propagated values)."""
    args = torch.fx.node.map_arg(node.args[1:], lambda n: values[n])
    kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
    if node.op == "call_module":
        return gm.get_submodule(node.target)(ids, *args, **kwargs)
    if node.op == "call_method":
        return getattr(ids, node.target)(*args, **kwargs)
    return node.target(ids, *args, **kwargs)


_SCALE_FUNCTIONS = (operator.mul, torch.mul, operator.truediv, torch.div, torch.true_divide)
def _pooled(info: OpInfo, node: torch.fx.Node, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor | str:
    """Channel ids after a per-channel pool or reduction: each output mixes elements of one channel only."""
    if info.has(Trait.REDUCTION):
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None or not all(isinstance(d, int) for d in ([dims] if isinstance(dims, int) else dims)):
            return "it reduces over every dim or over dims only known at run time"
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        low, high = ids.amin(dims, keepdim=bool(keep)), ids.amax(dims, keepdim=bool(keep))
        return low if bool((low == high).all()) else "it reduces over the gate's channels"
    spatial = info.spatial or ids.dim() - 2  # 0: every dim past N and C (interpolate, Upsample)
    channel = ids.dim() - spatial - 1
    column = ids.movedim(channel, -1).reshape(-1, ids.shape[channel])
    if out.dim() != ids.dim() or out.shape[channel] != ids.shape[channel] or not bool((column == column[:1]).all()):
        return "the gate's channels are not its channel dim"
    view = [1] * ids.dim()
    view[channel] = -1
    return column[0].view(view).expand(tuple(out.shape)).contiguous()


def _combined(node: torch.fx.Node, source: torch.fx.Node, ids: torch.Tensor | None, values: dict | None,
              downstream: set[torch.fx.Node], stops: str) -> torch.Tensor | str:
    """Channel ids after ``cat`` (other inputs: -1, no gate) or a product / quotient by what the gate does not reach.

    Rule: (g·a)·b = g·(a·b) and cat(g·a, b) scales a's columns only, when b does not depend on the gate.
    """
    operands = node.args[0] if node.target in (torch.cat, torch.concat, torch.concatenate) else node.args
    others = [n for n in torch.fx.node.map_aggregate(operands, lambda a: a) if isinstance(n, torch.fx.Node)
              and n is not source] if isinstance(operands, (list, tuple)) else []
    if any(n in downstream for n in others) or list(operands).count(source) != 1 or (
            node.target in (operator.truediv, torch.div, torch.true_divide, "div") and node.args[0] is not source) or (
            node.op == "call_method" and len(node.args) > 2):
        return f"{stops}, whose other operands depend on the gate (or it divides by it)"
    if ids is None:
        return f"{stops}; pass example_inputs to fold_gates to fold through it (nrfx follows its channels by shape)"
    out = values[node]
    if node.target not in (torch.cat, torch.concat, torch.concatenate):
        return torch.broadcast_to(ids, tuple(out.shape)).contiguous() if node.kwargs.get("rounding_mode") is None \
            else f"{stops} with a rounding mode"
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    parts = [ids if n is source else torch.full(tuple(values[n].shape), -1, dtype=ids.dtype) for n in operands]
    return torch.cat(parts, dim)
