"""Fold the constants that removed channels emit into their consumers (where that is exact).

A channel judged dead by its norm scale can still carry a constant: with γ = 0 a norm emits
β.  Removing the channel drops ``W[:, c]·v`` from every consumer.  For a 1×1 convolution
without padding or a linear layer that term is the same at every position, so it is added
to the consumer's bias, or, when the consumer has no bias and feeds a BatchNorm, subtracted
from that norm's running mean (exact in eval mode; in train mode the batch mean absorbs a
constant anyway).  Constants are measured once on the example inputs (eval mode, on the
traced original) when the plan is made, and stored in it, so a replay folds the same values.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from .maps import dim_map
from .shapeprop import hooks_silenced, in_eval_mode, untouched

__all__ = ["measure_folds", "apply_folds"]


def _foldable(module: nn.Module) -> bool:
    """1×1 convolution with no padding and one group, or a linear layer."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1:
        padding = module.padding if isinstance(module.padding, tuple) else (0,)
        return all(k == 1 for k in module.kernel_size) and all(p == 0 for p in padding)
    return False


def _removed(analysis, plan, layout) -> torch.Tensor:
    """Old feature positions of a layout that the plan drops."""
    source = dim_map(analysis, plan, layout, 0).source
    total = analysis.atoms.channels(layout) * layout.inner
    keep = torch.zeros(total, dtype=torch.bool)
    keep[source[source >= 0]] = True
    return torch.nonzero(~keep).flatten()


def _candidates(gm: torch.fx.GraphModule, analysis, plan) -> dict[str, torch.Tensor]:
    """Foldable consumers with removed input features: module name -> removed positions."""
    out = {}
    for _, record in analysis.layers("conv", "linear"):
        name, layout = record.module, record.input
        if name is None or layout is None:
            continue
        removed = _removed(analysis, plan, layout)
        module = gm.get_submodule(name)
        if removed.numel() and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            out[name] = removed
    return out


def _capture(gm: torch.fx.GraphModule, names, example) -> dict[str, list[torch.Tensor]]:
    """Inputs each named module receives on the example inputs, in eval mode, no grad, leaving no trace."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with hooks_silenced(gm):  # the user's own hooks do not fire; ours go with the swapped-in hook dicts
        for n in names:
            gm.get_submodule(n).register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0].detach()))
        with torch.no_grad(), untouched(gm), in_eval_mode(gm):  # the user's modules: each flag put back
            example.call(gm)
    return seen


def _constants(xs: list[torch.Tensor], removed: torch.Tensor, linear: bool) -> dict[int, float]:
    """Removed features whose value is the same everywhere (every row, position and call)."""
    values = {}
    for position in removed.tolist():
        parts = [(x[..., position] if linear else x[:, position]).reshape(-1) for x in xs]
        flat = torch.cat(parts)
        if flat.numel() and bool(flat.max() == flat.min()) and float(flat[0]) != 0.0:
            values[position] = float(flat[0])
    return values


_SCALED_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)  # γ = 0 with β ≠ 0 emits the constant β


def _may_emit_constants(gm: torch.fx.GraphModule) -> bool:
    """Whether some channel's producer ignores its input: a norm with γ = 0 and β ≠ 0, or a
    conv/linear with an all-zero weight row and a bias.  Without one no constant exists."""
    for module in gm.modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor) or weight.is_meta:
            continue
        if isinstance(module, _SCALED_NORMS) and bool(((weight == 0) & (bias != 0)).any()):
            return True
        if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and weight.dim() >= 2:
            rows = weight.detach().reshape(weight.shape[0], -1) if not getattr(module, "transposed", False) else None
            if rows is not None and bool(((rows == 0).all(1) & (bias.detach() != 0)).any()):
                return True
    return False


def measure_folds(gm: torch.fx.GraphModule, analysis, plan, example) -> tuple[dict[str, dict], list[str]]:
    """Per foldable consumer: {position: constant} of the removed features that carry one;
    and notes naming the consumers whose constants cannot be folded exactly."""
    candidates = _candidates(gm, analysis, plan)
    if not candidates or not _may_emit_constants(gm):
        return {}, []
    captured = _capture(gm, candidates, example)
    folds, notes = {}, []
    for name, removed in candidates.items():
        module = gm.get_submodule(name)
        values = _constants(captured[name], removed, isinstance(module, nn.Linear))
        if not values:
            continue
        if _foldable(module):
            folds[name] = {str(k): v for k, v in values.items()}
        else:
            notes.append(f"fold: {len(values)} removed inputs of {name} carry constants a {type(module).__name__} "
                         "with this kernel/padding cannot absorb exactly; they are dropped")
    return folds, notes


def _delta(weight: torch.Tensor, values: dict[str, float]) -> torch.Tensor:
    """Per old output channel: Σ over folded inputs of W[o, c]·v_c (kernel of size 1)."""
    cols = torch.tensor([int(k) for k in values], dtype=torch.long)
    vals = torch.tensor(list(values.values()), dtype=torch.float64)
    w = weight.detach().reshape(weight.shape[0], weight.shape[1]).to("cpu", torch.float64)
    return w[:, cols] @ vals


def apply_folds(gm: torch.fx.GraphModule, analysis, plan, maps) -> list[str]:
    """Rewrite pass: add each consumer's folded constants to its bias, or to the following BatchNorm's mean."""
    notes = []
    users = {n.target: list(n.users) for n in gm.graph.nodes if n.op == "call_module"}
    for name, values in (plan.folds or {}).items():
        delta = _delta(analysis.gm.get_submodule(name).weight, values)
        pmap = maps.get(f"{name}.weight")
        source = pmap.dims[0].source if pmap is not None and pmap.dims[0].dim == 0 else torch.arange(delta.numel())
        kept = torch.nonzero(source >= 0).flatten()
        shift = torch.zeros(source.numel(), dtype=torch.float64)
        shift[kept] = delta[source[kept]]
        notes.append(_fold_into(gm, name, shift, users.get(name, [])))
    return notes


def _fold_into(gm: torch.fx.GraphModule, name: str, shift: torch.Tensor, users) -> str:
    """Add ``shift`` to a consumer's bias, or subtract it from the running mean of its BatchNorm."""
    module = gm.get_submodule(name)
    with torch.no_grad():
        if module.bias is not None:
            module.bias.add_(shift.to(module.bias.device, module.bias.dtype))
            return f"fold: constants of removed inputs of {name} added to its bias"
        norm = gm.get_submodule(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.running_mean is not None:
            norm.running_mean.sub_(shift.to(norm.running_mean.device, norm.running_mean.dtype))
            return f"fold: constants of removed inputs of {name} moved into {users[0].target}.running_mean"
    return f"fold: {name} has no bias and no BatchNorm after it; constants of removed inputs dropped"
