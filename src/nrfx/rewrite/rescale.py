"""Neural rescaling (paper Sec. 3.2): |γ'| = max(|γ|, γ0), sign kept, compensated exactly.

A norm's output is scaled by s = γ'/γ per channel (β' = s·β).  The function is preserved
when every path from the norm to a weight goes through positively homogeneous ops only
(ReLU, pooling, dropout, identity): then the consumers' input weights of that channel are
divided by s.  Any other path (an add, a concat, a gate, the output) makes the rescaling
inexact, so that norm is skipped and the notes say why.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from nrfx.ops.layer_kinds import in_columns, is_scale
from nrfx.ops.vocabulary import Trait, node_info, op_info
from nrfx.rewrite.tensors import matched_gamma

__all__ = ["apply_rescale"]

def _plain_scale(norm: nn.Module) -> bool:
    """Rule: only a norm whose forward is the stock one (no activation fused in, as timm's BatchNormAct2d)."""
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        return True
    if type(norm).forward in (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward):
        return True
    fused = [getattr(norm, name, None) for name in ("drop", "act")]  # timm's BatchNormAct2d: ReLU is fine
    return hasattr(norm, "act") and all(p is None or op_info("call_module", None, p).has(Trait.HOMOGENEOUS)
                                        for p in fused)


def _is_homogeneous(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether f(s·x) = s·f(x) per channel for s > 0 (the op vocabulary's HOMOGENEOUS)."""
    return node_info(gm, node).has(Trait.HOMOGENEOUS)


def _consumers(gm: torch.fx.GraphModule, norm: torch.fx.Node, calls: dict[str, int]) -> list[str] | str:
    """Layers whose weight columns read the norm's channels (conv, linear), reached through homogeneous ops only, or
    why there are none."""
    if calls[norm.target] > 1:
        return "the norm is called more than once"
    found, stack = [], list(norm.users)
    while stack:
        node = stack.pop()
        if node.op == "call_module" and in_columns(gm.get_submodule(node.target)):
            if calls[node.target] > 1:
                return f"consumer {node.target} shares its weight across calls"
            found.append(node.target)
        elif _is_homogeneous(gm, node):
            stack.extend(node.users)
        else:
            return f"path through {node.op} {getattr(node.target, '__name__', node.target)} is not homogeneous"
    return found or "no consumer"


def apply_rescale(gm: torch.fx.GraphModule, analysis, plan, maps) -> list[str]:
    """Rewrite pass: when the plan asks, rescale the scales of every eligible norm; returns notes."""
    if not plan.rescale:
        return []
    notes, done = [], 0
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in gm.graph.nodes:
        if node.op != "call_module" or not is_scale(gm.get_submodule(node.target)):
            continue
        norm = gm.get_submodule(node.target)
        if norm.weight is None:
            continue
        consumers = _consumers(gm, node, calls) if _plain_scale(norm) else (
            f"{type(norm).__name__} runs more than a per-channel scale (an activation inside)")
        if isinstance(consumers, str):
            notes.append(f"rescale skipped at {node.target}: {consumers}")
            continue
        _rescale(gm, norm, consumers, _threshold(plan.gamma0, norm, maps.get(f"{node.target}.weight")))
        done += 1
    notes.append(f"rescale: {done} norms rescaled with exact compensation")
    return notes


def _threshold(gamma0: float | str | None, norm: nn.Module, pmap) -> float:
    """γ0 for one norm: the plan's number, 1 by default, or the survivors' median |γ| for "match"."""
    if gamma0 is None:
        return 1.0
    if gamma0 != "match":
        return float(gamma0)
    kept = pmap.dims[0].kept if pmap is not None and pmap.dims else slice(None)
    return matched_gamma(norm.weight[kept])


def _rescale(gm: torch.fx.GraphModule, norm: nn.Module, consumers: list[str], gamma0: float) -> None:
    """γ' = sign(γ)·max(|γ|, γ0), β' = s·β (a gate has no β), consumers' input weights divided by s."""
    with torch.no_grad():
        gamma = norm.weight
        nonzero = gamma != 0
        target = torch.where(nonzero, gamma.sign() * torch.clamp(gamma.abs(), min=gamma0), gamma)
        scale = torch.where(nonzero, target / torch.where(nonzero, gamma, torch.ones_like(gamma)), 1.0)
        gamma.copy_(target)
        if getattr(norm, "bias", None) is not None:
            norm.bias.mul_(scale)
        for name in consumers:
            consumer = gm.get_submodule(name)
            _divide_inputs(consumer.weight, scale, getattr(consumer, "groups", 1))


def _divide_inputs(weight: torch.Tensor, scale: torch.Tensor, groups: int) -> None:
    """W[:, c] /= s_c; in a grouped conv input channel c = k·(cin/groups) + j is column j of group k's rows."""
    per_group = weight.shape[1]
    if per_group * groups != scale.numel():
        return
    grouped = weight.reshape(groups, weight.shape[0] // groups, per_group, *weight.shape[2:])
    factor = scale.reshape(groups, 1, per_group, *([1] * (weight.dim() - 2))).to(weight.dtype)
    weight.copy_((grouped / factor).reshape(weight.shape))
