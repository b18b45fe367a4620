"""add_gates / fold_gates: give free spaces without a norm a liveliness signal, and take it out again.

``add_gates`` is a graph rewrite: the model is traced (a deep copy: the user's model is never
touched), and in every free space that no norm scale reads, an ``nrfx.Gate`` (all ones) is
inserted as a ``call_module`` node after the activation that follows the layer producing the
space (a transformer MLP: ``fc1 → GELU → gate → dropout → fc2``).  A graph rewrite rather than
wrapping modules, because the activation is often not a module of its own (``F.gelu`` in the
forward), the same code then serves torchvision, timm and user models, and the result is the
same kind of ``GraphModule`` that ``nrfx.rejuvenate`` returns, with the original submodule
hierarchy (each gate sits next to its producer: ``mlp.0`` gets ``mlp.0_gate``).

``fold_gates`` multiplies each gate into the input columns of the linear / conv layers that
read it (``W[:, c] *= g_c``, exact) and removes it: the plain architecture, same function.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .analysis import Analysis, analyze
from .errors import RewriteError
from .gates import Gate
from .trace import trace

__all__ = ["add_gates", "fold_gates", "gate_sites"]

_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                       nn.Hardswish, nn.Tanh, nn.Hardtanh, nn.Sigmoid, nn.Hardsigmoid, nn.PReLU)
_ACTIVATION_FUNCTIONS = (F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
                         F.hardtanh, F.sigmoid, F.hardsigmoid, torch.relu, torch.tanh, torch.sigmoid)
_ACTIVATION_METHODS = ("relu", "gelu", "silu", "sigmoid", "tanh")
_PASS_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)  # x·g passes unchanged
_PASS_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)


def _is_activation(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether a node applies a channel-wise activation."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in _ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in _ACTIVATION_METHODS


def _after_activation(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
    """The node a gate follows: the producer, or the chain of activations its only user starts."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not _is_activation(gm, user) or user.args[0] is not node:
            break
        node = user
    return node


def gate_sites(analysis: Analysis) -> list[tuple[str, int, int]]:
    """(producer node, channel dim, width) of every conv/linear whose output is a free space with no signal."""
    wanted = set(analysis.coverage().unsignalled)
    sites = []
    for name, record in analysis.layers("conv", "linear"):
        spaces = analysis.space_ids(record.output) if record.output is not None else []
        if len(spaces) != 1 or spaces[0] not in wanted or record.transposed:
            continue
        out = analysis.state.values[next(n for n in analysis.gm.graph.nodes if n.name == name)]
        weight = analysis.param_info[f"{record.module}.weight" if record.module else record.weight]
        dim = -1 if record.kind == "linear" else out.dim() - len(weight.shape) + 1  # conv: 1 batched, 0 not
        sites.append((name, dim, analysis.spaces[spaces[0]].width))
    return sites


def _gate_path(gm: torch.fx.GraphModule, base: str) -> str:
    """A free submodule path next to ``base`` (``mlp.0`` → ``mlp.0_gate``; ``_gate1``… when taken)."""
    candidate, i = f"{base}_gate", 1
    while _has_submodule(gm, candidate):
        candidate, i = f"{base}_gate{i}", i + 1
    return candidate


def _has_submodule(gm: nn.Module, path: str) -> bool:
    """Whether ``path`` names a submodule or any other attribute already."""
    parent, _, leaf = path.rpartition(".")
    try:
        owner = gm.get_submodule(parent)
    except AttributeError:
        return False
    return hasattr(owner, leaf)


def add_gates(model: nn.Module, example_inputs: Any, **trace_options: Any) -> torch.fx.GraphModule:
    """A copy of ``model`` with an ``nrfx.Gate`` (all ones, same function) in every free space without a signal.

    Each gate follows the activation after the conv/linear that produces the space.  Returns a
    GraphModule (``nrfx_gates``: the paths of the gates added); the user's model is not modified.
    ``trace_options`` are ``analyze``'s (``leaf_modules``, ``concrete_args``, ``autowrap_functions``).
    """
    clone = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "nrfx can rejuvenate only")  # that is why gates are being added
        analysis = analyze(clone, example_inputs, **trace_options)
    gm = analysis.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    added = []
    for name, dim, width in gate_sites(analysis):
        producer = nodes[name]
        record = analysis.records[name]
        path = _gate_path(gm, record.module or name)
        site = _after_activation(gm, producer)
        weight = gm.get_parameter(f"{record.module}.weight" if record.module else record.weight)
        gm.add_submodule(path, Gate(width, dim, device=weight.device, dtype=weight.dtype))
        with gm.graph.inserting_after(site):
            gate = gm.graph.call_module(path, (site,))
        site.replace_all_uses_with(gate, delete_user_cb=lambda user, gate=gate: user is not gate)
        added.append(path)
    gm.graph.lint()
    gm.recompile()
    gm.training = model.training
    gm.nrfx_gates = tuple(added)
    return gm


def _is_pass(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether a node passes a per-channel scale through unchanged (dropout, identity)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _PASS_MODULES)
    return node.op == "call_function" and node.target in _PASS_FUNCTIONS


def _reads_channels(module: nn.Module, gate: Gate) -> bool:
    """Whether a reader's input columns (dim 1 of its weight) are the gate's channels."""
    if module.weight.shape[1] != gate.num_features:
        return False
    return gate.dim == -1 if isinstance(module, nn.Linear) else gate.dim in (0, 1)


def _readers(gm: torch.fx.GraphModule, gate: torch.fx.Node, calls: dict[str, int]) -> list[nn.Module] | str:
    """Linear / ungrouped conv modules that read the gate's output through dropout or identity only, or why not."""
    found, stack = [], [(user, gate) for user in gate.users]
    module_of = gm.get_submodule
    while stack:
        node, source = stack.pop()
        module = module_of(node.target) if node.op == "call_module" else None
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not getattr(module, "transposed", False):
            if getattr(module, "groups", 1) != 1 or calls[node.target] > 1 or node.args[0] is not source:
                return f"its reader {node.target} is grouped, called more than once, or reads it as a weight"
            if not _reads_channels(module, module_of(gate.target)):
                return f"its reader {node.target} does not read the gate's dim as its input channels"
            found.append(module)
        elif _is_pass(gm, node) and node.args and node.args[0] is source:
            stack.extend((user, node) for user in node.users)
        else:
            return f"it reaches {node.op} {getattr(node.target, '__name__', node.target)} before a linear/conv layer"
    return found or "nothing reads it"


def fold_gates(model: nn.Module) -> torch.fx.GraphModule:
    """A copy of a gated model with every gate multiplied into its readers' input columns (W[:, c] *= g_c).

    Exact: the plain architecture with the same function.  A gate must reach only linear or
    ungrouped conv layers, through dropout or identity; otherwise a RewriteError names it.
    The model is not modified (a model that is not a GraphModule is traced first).
    """
    gm = copy.deepcopy(model) if isinstance(model, torch.fx.GraphModule) else trace(copy.deepcopy(model)).gm
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    gates = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Gate)]
    for node in gates:
        gate = gm.get_submodule(node.target)
        readers = _readers(gm, node, calls)
        if isinstance(readers, str) or calls[node.target] > 1:
            reason = readers if isinstance(readers, str) else "the gate is called more than once"
            raise RewriteError(f"cannot fold gate '{node.target}': {reason}. Keep the gate in the model (it is one "
                               "multiply per channel), or move it to just before the layer that reads it")
        with torch.no_grad():
            for reader in readers:
                shape = [1] * reader.weight.dim()
                shape[1] = -1
                reader.weight.mul_(gate.weight.detach().reshape(shape).to(reader.weight.dtype))
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm
